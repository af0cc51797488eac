"""The SQLite catalog of an index (through sqlite-utils): schema, description, rows, clusters.

Part of :mod:`simsearch.store`; only :class:`~simsearch.store.IndexStore` calls its write methods.
SQLite is the source of truth. Each indexed image is one row whose integer primary key is also
its FAISS id, and whose float32 vector is stored with it, so the FAISS file can always be
rebuilt or repaired from here. Only this module writes SQL.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import sqlite_utils

from ..errors import IndexCorruptError, IndexNotFoundError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CATALOG_FILE = "catalog.db"

# The fields of an index's description that must match for vectors to be comparable.
IDENTITY_KEYS = ("model", "weights", "dim", "preprocessing")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def storable_path(path: str) -> str | bytes:
    """The value a path is stored and looked up under: lossless, and distinct for distinct names.

    POSIX file names are bytes; one that is not valid UTF-8 reaches Python with surrogate escapes,
    which SQLite text cannot hold. A valid UTF-8 name is stored as text, exactly as it reads (as
    every earlier version stored it); any other name is stored as its raw bytes (a BLOB). SQLite
    never finds a BLOB equal to a text value, so a name cannot collide with another whose text
    looks the same (``x\\xff.jpg`` spelt out), and :func:`real_path` gives back the very bytes.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def real_path(stored: str | bytes) -> str:
    """The path to open for a stored path (the inverse of :func:`storable_path`)."""
    return os.fsdecode(stored) if isinstance(stored, bytes) else stored


def display_path(path: str | bytes) -> str:
    """A path as printable text: bytes that are not UTF-8 are written as ``\\xff`` escapes."""
    raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def _storable_record(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (storable_path(v) if k == "path" else display_path(v)) if isinstance(v, str) else v for k, v in record.items()
    }


@dataclass
class ImageRow:
    """The catalog's view of one file."""

    id: int
    path: str
    size: int | None
    mtime_ns: int | None
    hash: str | None
    width: int | None
    height: int | None
    status: str
    error: str | None
    real_path: str = field(default="", repr=False, compare=False)
    """The name to open the file by; ``path`` is the same name as printable text (they differ only
    for a name that is not valid UTF-8, which the catalog hands over as its stored bytes)."""

    def __post_init__(self) -> None:
        stored = self.path
        self.real_path = real_path(stored)
        self.path = display_path(stored) if isinstance(stored, bytes) else stored

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Clustering:
    """A clustering as stored: per cluster its centroid and size; per image (``ids``) its cluster and
    distance to that centroid; ``info`` (k, n, niter, seed, objective, created_at) goes in the meta."""

    centroids: np.ndarray
    sizes: np.ndarray
    ids: np.ndarray
    assignments: np.ndarray
    distances: np.ndarray
    info: dict[str, Any]


_ROW_COLUMNS = "id, path, size, mtime_ns, hash, width, height, status, error"


class Catalog:
    """One index's SQLite database."""

    def __init__(self, db: sqlite_utils.Database, path: Path) -> None:
        self.db = db
        self.path = path

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], create: bool = False) -> "Catalog":
        index_dir = Path(index_dir)
        path = index_dir / CATALOG_FILE
        if not path.exists():
            if not create:
                raise IndexNotFoundError(
                    f"no index at {index_dir} (create one with: simsearch index FOLDER --index {index_dir})"
                )
            index_dir.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
            db = sqlite_utils.Database(conn)
            db.enable_wal()
            db.execute("PRAGMA synchronous=NORMAL")
            catalog = cls(db, path)
            catalog._ensure_schema()
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptError(f"cannot open {path}: {exc}") from exc
        return catalog

    def close(self) -> None:
        self.db.close()

    def _ensure_schema(self) -> None:
        db = self.db
        if "meta" not in db.table_names():
            with self.transaction():
                db["meta"].create({"key": str, "value": str}, pk="key")
                db["images"].create(
                    {
                        "id": int,
                        "path": str,
                        "size": int,
                        "mtime_ns": int,
                        "hash": str,
                        "width": int,
                        "height": int,
                        "status": str,
                        "error": str,
                        "vector": bytes,
                        "indexed_at": str,
                    },
                    pk="id",
                    not_null={"path", "status"},
                )
                db["images"].create_index(["path"], unique=True)
                db["images"].create_index(["hash"])
                db["images"].create_index(["status"])
                db["clusters"].create({"cluster": int, "size": int, "centroid": bytes}, pk="cluster")
                db["cluster_members"].create({"image_id": int, "cluster": int, "distance": float}, pk="image_id")
                db["cluster_members"].create_index(["cluster", "distance"])
                db["ann_pending"].create({"id": int}, pk="id")
                self._set_meta_raw({"schema_version": SCHEMA_VERSION, "created_at": utc_now()})
                self._create_labels_table()
            return
        version = self.get_meta().get("schema_version")
        if version != SCHEMA_VERSION:
            raise IndexCorruptError(
                f"{self.path} has schema version {version}, this simsearch reads version {SCHEMA_VERSION}; "
                "rebuild the index with --rebuild"
            )
        if "labels" not in db.table_names():  # an index made before labels: gains the table, keeps its vectors
            with self.transaction():
                if "labels" not in db.table_names():
                    self._create_labels_table()

    def _create_labels_table(self) -> None:
        # One label per image: given (imported) or predicted (classify --write). Keyed by the row id,
        # so a moved or re-embedded file keeps its label; delete_rows drops it with the row.
        self.db["labels"].create(
            {"image_id": int, "label": str, "source": str, "confidence": float, "updated_at": str},
            pk="image_id",
            not_null={"label", "source"},
        )
        self.db["labels"].create_index(["source", "label"])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of work: everything inside commits together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # -- description -----------------------------------------------------------------------
    def get_meta(self) -> dict[str, Any]:
        return {row["key"]: json.loads(row["value"]) for row in self.db["meta"].rows}

    def _set_meta_raw(self, values: dict[str, Any]) -> None:
        self.db["meta"].upsert_all(
            [{"key": k, "value": json.dumps(v, sort_keys=True)} for k, v in values.items()], pk="key"
        )

    def set_meta(self, values: dict[str, Any]) -> None:
        with self.transaction():
            self._set_meta_raw(values)

    def identity(self) -> dict[str, Any] | None:
        """The model description the vectors were made with, or None for a fresh index."""
        meta = self.get_meta()
        if "model" not in meta:
            return None
        return {k: meta.get(k) for k in IDENTITY_KEYS}

    # -- rows ------------------------------------------------------------------------------
    def rows(self, where: str | None = None, params: Iterable[Any] = ()) -> list[ImageRow]:
        sql = f"SELECT {_ROW_COLUMNS} FROM images"
        if where:
            sql += f" WHERE {where}"
        return [ImageRow(*r) for r in self.db.execute(sql + " ORDER BY id", list(params)).fetchall()]

    def rows_by_ids(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = [int(i) for i in ids]
        out: dict[int, ImageRow] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"SELECT {_ROW_COLUMNS} FROM images WHERE id IN ({marks})", chunk):
                out[r[0]] = ImageRow(*r)
        return out

    def row_by_path(self, path: str) -> ImageRow | None:
        rows = self.rows("path = ?", [storable_path(path)])
        return rows[0] if rows else None

    def ok_ids_by_hash(self, digest: str) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM images WHERE hash = ? AND status = 'ok'", [digest])]

    def ok_ids_sharing_hash(self) -> list[list[int]]:
        """Ids of ok rows grouped by content hash, for every hash held by two rows or more."""
        sql = (
            "SELECT group_concat(id) FROM images WHERE status = 'ok' AND hash IS NOT NULL "
            "GROUP BY hash HAVING count(*) > 1"
        )
        return [sorted(int(i) for i in r[0].split(",")) for r in self.db.execute(sql)]

    def ok_ids(self) -> np.ndarray:
        return np.array(
            [r[0] for r in self.db.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id")], dtype=np.int64
        )

    def counts(self) -> dict[str, int]:
        counts = {"ok": 0, "failed": 0}
        for status, n in self.db.execute("SELECT status, count(*) FROM images GROUP BY status"):
            counts[status] = n
        return counts

    def insert_row(self, record: dict[str, Any], vector: np.ndarray | None) -> int:
        """Insert a new file's row (call inside a transaction); returns its id = FAISS id."""
        return self.insert_rows([record], [vector])[0]

    # Batched writes: one executemany per batch instead of a statement (and a Python-level
    # sqlite-utils round trip) per row; the indexer's commit stays well ahead of a GPU encoder.
    _WRITE_COLUMNS = ("path", "size", "mtime_ns", "hash", "width", "height", "status", "error")

    def _values(self, record: dict[str, Any], vector: np.ndarray | None, now: str) -> tuple[Any, ...]:
        rec = _storable_record(record)
        return tuple(rec.get(c) for c in self._WRITE_COLUMNS) + (_blob(vector), now)

    def insert_rows(self, records: list[dict[str, Any]], vectors: list[np.ndarray | None]) -> list[int]:
        """Insert new files' rows (call inside a transaction); returns their ids = FAISS ids.

        Ids are assigned here, after the current maximum, which the surrounding write
        transaction (BEGIN IMMEDIATE) keeps stable.
        """
        if not records:
            return []
        start = int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]) + 1
        ids = list(range(start, start + len(records)))
        now = utc_now()
        cols = ", ".join(("id",) + self._WRITE_COLUMNS + ("vector", "indexed_at"))
        marks = ", ".join("?" * (len(self._WRITE_COLUMNS) + 3))
        self.db.conn.executemany(
            f"INSERT INTO images ({cols}) VALUES ({marks})",
            [(i,) + self._values(r, v, now) for i, r, v in zip(ids, records, vectors)],
        )
        self._mark_pending(ids)
        return ids

    def update_rows(self, ids: list[int], records: list[dict[str, Any]], vectors: list[np.ndarray | None]) -> None:
        """Replace existing rows' metadata and vectors (call inside a transaction)."""
        if not ids:
            return
        now = utc_now()
        sets = ", ".join(f"{c} = ?" for c in self._WRITE_COLUMNS + ("vector", "indexed_at"))
        self.db.conn.executemany(
            f"UPDATE images SET {sets} WHERE id = ?",
            [self._values(r, v, now) + (int(i),) for i, r, v in zip(ids, records, vectors)],
        )
        self._mark_pending([int(i) for i in ids])
        # a changed file keeps its given label; a prediction made from its old vector is stale
        self.db.conn.executemany(
            "DELETE FROM labels WHERE image_id = ? AND source = 'predicted'", [(int(i),) for i in ids]
        )

    def update_row(self, row_id: int, record: dict[str, Any], vector: np.ndarray | None = None, *, keep_vector: bool = False) -> None:
        values = dict(_storable_record(record), indexed_at=utc_now())
        if not keep_vector:
            values["vector"] = _blob(vector)
            self._mark_pending([row_id])
        self.db["images"].update(row_id, values)

    def delete_rows(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        self._mark_pending(ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
            self.db.execute(f"DELETE FROM cluster_members WHERE image_id IN ({marks})", chunk)
            self.db.execute(f"DELETE FROM labels WHERE image_id IN ({marks})", chunk)

    # -- ids whose vector changed since the FAISS file was last saved ---------------------------
    # An id can keep its number while its vector changes (a modified file, or SQLite reusing the
    # id of a deleted last row), which comparing id sets cannot see. Every vector change records
    # its id here in the same transaction; the store re-syncs these ids into FAISS before it
    # saves, and clears them only after the save.
    def _mark_pending(self, ids: list[int]) -> None:
        if ids:
            self.db.conn.executemany("INSERT OR IGNORE INTO ann_pending (id) VALUES (?)", [(i,) for i in ids])

    def pending_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT id FROM ann_pending ORDER BY id")], dtype=np.int64)

    def clear_pending(self, ids: Iterable[int] | None = None) -> None:
        with self.transaction():
            if ids is None:
                self.db.execute("DELETE FROM ann_pending")
            else:
                self.db.conn.executemany("DELETE FROM ann_pending WHERE id = ?", [(int(i),) for i in ids])

    def vector(self, row_id: int) -> np.ndarray | None:
        r = self.db.execute("SELECT vector FROM images WHERE id = ?", [row_id]).fetchone()
        return None if r is None or r[0] is None else np.frombuffer(r[0], dtype=np.float32).copy()

    def iter_vectors(self, ids: Iterable[int] | None = None, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stored vectors of ok rows as (ids, matrix) chunks; memory stays bounded by ``chunk``."""
        if ids is None:
            cursor = self.db.execute("SELECT id, vector FROM images WHERE status = 'ok' ORDER BY id")
            while True:
                rows = cursor.fetchmany(chunk)
                if not rows:
                    return
                yield _unpack(rows)
        else:
            id_list = [int(i) for i in ids]
            for start in range(0, len(id_list), 500):
                part = id_list[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self.db.execute(
                    f"SELECT id, vector FROM images WHERE status = 'ok' AND id IN ({marks}) ORDER BY id", part
                ).fetchall()
                if rows:
                    yield _unpack(rows)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors())
        if not parts:
            dim = int(self.get_meta().get("dim") or 0)
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # -- labels ----------------------------------------------------------------------------
    def set_labels(self, labels: dict[int, str], source: str, confidences: dict[int, float] | None = None) -> None:
        """Write one label per image id (call inside a transaction); replaces what the ids had."""
        now = utc_now()
        conf = confidences or {}
        self.db.conn.executemany(
            "INSERT OR REPLACE INTO labels (image_id, label, source, confidence, updated_at) VALUES (?, ?, ?, ?, ?)",
            [(int(i), str(label), source, conf.get(i), now) for i, label in labels.items()],
        )

    def delete_labels(self, source: str | None = None) -> int:
        """Drop every label, or those of one source (call inside a transaction); returns how many."""
        if source is None:
            return self.db.execute("DELETE FROM labels").rowcount
        return self.db.execute("DELETE FROM labels WHERE source = ?", [source]).rowcount

    def labels(self, source: str | None = None, ok_only: bool = True) -> dict[int, str]:
        """image id -> label (of one source, or all), for rows that still exist (ok rows by default)."""
        sql = "SELECT l.image_id, l.label FROM labels l JOIN images i ON i.id = l.image_id"
        where, params = [], []
        if ok_only:
            where.append("i.status = 'ok'")
        if source is not None:
            where.append("l.source = ?")
            params.append(source)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return {i: label for i, label in self.db.execute(sql + " ORDER BY l.image_id", params)}

    def label_counts(self) -> list[tuple[str, str, int]]:
        """(label, source, count) over rows that still exist, most frequent first."""
        sql = (
            "SELECT l.label, l.source, count(*) AS n FROM labels l JOIN images i ON i.id = l.image_id "
            "GROUP BY l.label, l.source ORDER BY n DESC, l.label, l.source"
        )
        return [(label, source, n) for label, source, n in self.db.execute(sql)]

    def ids_by_paths(self, paths: Iterable[str]) -> dict[str, int]:
        """path (as given) -> row id, for the paths that are indexed (any status)."""
        wanted = {storable_path(p): p for p in paths}
        stored = list(wanted)
        out: dict[str, int] = {}
        for start in range(0, len(stored), 500):
            chunk = stored[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for i, p in self.db.execute(f"SELECT id, path FROM images WHERE path IN ({marks})", chunk):
                out[wanted[p]] = i
        return out

    # -- clusters --------------------------------------------------------------------------
    def replace_clusters(self, clustering: Clustering) -> None:
        """Swap in a new clustering atomically: readers see the old one or the new one, never a mix."""
        c = clustering
        with self.transaction():
            self.db.execute("DELETE FROM clusters")
            self.db.execute("DELETE FROM cluster_members")
            self.db.conn.executemany(
                "INSERT INTO clusters (cluster, size, centroid) VALUES (?, ?, ?)",
                [(k, int(c.sizes[k]), _blob(c.centroids[k])) for k in range(len(c.centroids))],
            )
            self.db.conn.executemany(
                "INSERT INTO cluster_members (image_id, cluster, distance) VALUES (?, ?, ?)",
                zip(c.ids.tolist(), c.assignments.tolist(), c.distances.astype(float).tolist()),
            )
            self._set_meta_raw({"clustering": c.info})

    def cluster_sizes(self) -> dict[int, int]:
        """Current members per stored cluster (files removed since the clustering no longer count)."""
        sql = (
            "SELECT c.cluster, count(m.image_id) FROM clusters c LEFT JOIN cluster_members m ON m.cluster = c.cluster "
            "GROUP BY c.cluster ORDER BY c.cluster"
        )
        return {c: n for c, n in self.db.execute(sql)}

    def cluster_members(self, cluster: int, limit: int | None = None) -> list[tuple[ImageRow, float]]:
        """Members of a cluster, nearest to its centroid first."""
        sql = (
            f"SELECT {', '.join('i.' + c.strip() for c in _ROW_COLUMNS.split(','))}, m.distance "
            "FROM cluster_members m JOIN images i ON i.id = m.image_id WHERE m.cluster = ? ORDER BY m.distance, i.id"
        )
        params: list[Any] = [cluster]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [(ImageRow(*r[:-1]), float(r[-1])) for r in self.db.execute(sql, params)]

    def clear_clusters(self) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM clusters")
            self.db.execute("DELETE FROM cluster_members")
            self.db.execute("DELETE FROM meta WHERE key = 'clustering'")

    def clear_all(self) -> None:
        """Drop every row and the model description (for --rebuild)."""
        with self.transaction():
            self.db.execute("DELETE FROM images")
            self.db.execute("DELETE FROM labels")
            self.db.execute("DELETE FROM ann_pending")
            self.db.execute("DELETE FROM clusters")
            self.db.execute("DELETE FROM cluster_members")
            self.db.execute("DELETE FROM meta WHERE key NOT IN ('schema_version', 'created_at')")


def _blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _unpack(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    return ids, mat.copy()

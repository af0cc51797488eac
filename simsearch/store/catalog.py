"""The SQLite catalog of an index (through sqlite-utils): schema, description, rows, clusters.

Part of :mod:`simsearch.store`; only :class:`~simsearch.store.IndexStore` calls its write methods.
SQLite is the source of truth for metadata. Each indexed image is one row whose integer primary
key is also its FAISS id; its vector lives in the vector file (:mod:`.vector_file`) at the row's
``slot``, with the slot bytes' CRC-32 in ``vcrc``, so the FAISS file can always be rebuilt or
repaired from there. Every write transaction bumps the catalog's ``generation`` and stamps the
rows it writes with it (``gen``); a FAISS save records the generation it holds, so readers can
tell rows the saved FAISS file does not reflect yet. Only this module writes SQL.

Tables are created through sqlite-utils; everything else is plain SQL on the connection, so that
opening a catalog (``simsearch info``, a query) does not import sqlite-utils and its plugin
machinery (about a tenth of a second). Schema version 2 (this one) keeps no vectors in SQLite; version 1 kept float32 blobs in
``images.vector`` and is migrated in place by the store (:meth:`Catalog.migrate_v1_rows`).
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

from ..errors import IndexCorruptError, IndexNotFoundError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MMAP_BYTES = 1 << 30  # SQLite reads the catalog through a map of up to this many bytes
# the slots of ok rows by id, alone in an index of their own (a covering, partial index; see
# Catalog.slots_of): 19 MB at a million rows, read in place of the rows themselves
OK_SLOT_INDEX = "idx_images_ok_slot"
_CREATE_OK_SLOT_INDEX = (
    f"CREATE INDEX IF NOT EXISTS {OK_SLOT_INDEX} ON images (id, slot, status) WHERE status = 'ok' AND slot IS NOT NULL"
)
CATALOG_FILE = "catalog.db"
# Files that only an index holds: a catalog missing or empty beside them is damage, not a new index.
_INDEX_DATA_FILES = ("vectors.faiss", "vectors.f16")

# The fields of an index's description that must match for vectors to be comparable.
IDENTITY_KEYS = ("model", "weights", "dim", "preprocessing")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def identity_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The identity fields of an index description, or None when it records no model (a fresh index)."""
    if "model" not in meta:
        return None
    return {k: meta.get(k) for k in IDENTITY_KEYS}


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
    gen: int | None = None  # the generation of the write that last set this row's vector
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


_ROW_COLUMNS = "id, path, size, mtime_ns, hash, width, height, status, error, gen"
_UPDATABLE = frozenset({"path", "size", "mtime_ns", "hash", "width", "height", "status", "error", "indexed_at"})


class Database:
    """The catalog's SQLite connection with the few helpers it needs (``execute``, ``table_names``).

    ``db[name]`` hands out a sqlite-utils table, importing sqlite-utils then: only creating tables
    needs it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, parameters: Any = None) -> sqlite3.Cursor:
        return self.conn.execute(sql) if parameters is None else self.conn.execute(sql, parameters)

    def table_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]

    def enable_wal(self) -> None:
        if str(self.conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            self.conn.execute("PRAGMA journal_mode=wal")

    def close(self) -> None:
        self.conn.close()

    def __getitem__(self, table: str) -> Any:
        import sqlite_utils

        return sqlite_utils.Database(self.conn)[table]


class Catalog:
    """One index's SQLite database."""

    def __init__(self, db: Database, path: Path, readonly: bool = False) -> None:
        self.db = db
        self.path = path
        self.readonly = readonly
        self._ok_slot_index: bool | None = None  # whether OK_SLOT_INDEX exists (looked up once)
        self.schema_version: int | None = None
        self.write_gen: int | None = None  # the generation of the open write transaction
        self._counting = False  # transactions bump the generation once the schema is there

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], create: bool = False, readonly: bool = False) -> "Catalog":
        """Open (``create``: or start) the catalog of ``index_dir``.

        ``readonly``: open with SQLite's ``mode=ro`` (falling back to ``immutable=1`` where even the
        WAL's shared-memory file cannot be made), for an index the user may read but not write.
        A catalog that is missing or empty next to vector files is refused, never started afresh.
        """
        index_dir = Path(index_dir)
        path = index_dir / CATALOG_FILE
        data_files = [name for name in _INDEX_DATA_FILES if (index_dir / name).exists()]
        if not path.exists():
            if data_files:
                raise IndexCorruptError(
                    f"{path} is missing but {', '.join(data_files)} is there: refusing to start a new index over it "
                    f"(restore {CATALOG_FILE}, or move the folder away to start over)"
                )
            if not create:
                raise IndexNotFoundError(
                    f"no index at {index_dir} (create one with: simsearch index FOLDER --index {index_dir})"
                )
            index_dir.mkdir(parents=True, exist_ok=True)
        try:
            if readonly:
                db = Database(_connect_readonly(path))
            else:
                conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
                db = Database(conn)
                db.enable_wal()
                db.execute("PRAGMA synchronous=NORMAL")
            # reads through a memory map: a random row costs a page-table lookup, not a read()
            # call (120 random rows' slots, what one re-ranked query needs at 1M: 1.1 -> 0.8 ms);
            # address space only, the pages are the OS's file cache
            db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            catalog = cls(db, path, readonly=readonly)
            catalog._ensure_schema(create=create and not data_files)
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptError(f"cannot open {path}: {exc}") from exc
        return catalog

    def close(self) -> None:
        self.db.close()

    def _ensure_schema(self, create: bool = True) -> None:
        db = self.db
        if "meta" not in db.table_names():
            if not create or self.readonly:
                raise IndexCorruptError(
                    f"{self.path} is empty (no simsearch tables)"
                    + (" but vector files are beside it: refusing to treat it as a new index (restore it from a "
                       "backup, or move the folder away to start over)" if not self.readonly else "")
                )
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
                        "slot": int,
                        "vcrc": int,
                        "gen": int,
                        "indexed_at": str,
                    },
                    pk="id",
                    not_null={"path", "status"},
                )
                db["images"].create_index(["path"], unique=True)
                db["images"].create_index(["hash"])
                db["images"].create_index(["status"])
                db["images"].create_index(["slot"])
                db.execute(_CREATE_OK_SLOT_INDEX)
                db["clusters"].create({"cluster": int, "size": int, "centroid": bytes}, pk="cluster")
                db["cluster_members"].create({"image_id": int, "cluster": int, "distance": float}, pk="image_id")
                db["cluster_members"].create_index(["cluster", "distance"])
                db["ann_pending"].create({"id": int}, pk="id")
                db["free_slots"].create({"slot": int}, pk="slot")
                self._set_meta_raw({"schema_version": SCHEMA_VERSION, "created_at": utc_now(), "generation": 0})
                self._create_labels_table()
            self.schema_version = SCHEMA_VERSION
            self._counting = True
            return
        version = self.get_meta().get("schema_version")
        if version not in (1, SCHEMA_VERSION):
            raise IndexCorruptError(
                f"{self.path} has schema version {version}, this simsearch reads versions 1 and {SCHEMA_VERSION}; "
                "use a newer simsearch, or rebuild the index with --rebuild"
            )
        self.schema_version = int(version)
        self._counting = True
        if "labels" not in db.table_names() and not self.readonly:
            # an index made before labels gains the table and keeps its vectors
            with self.transaction():
                if "labels" not in db.table_names():
                    self._create_labels_table()

    def ensure_write_indexes(self) -> None:
        """Add the indexes a writer's O(changed) checks rely on to a catalog made before them (once).

        ``idx_images_slot`` answers "the highest slot referenced" and "rows whose slot lies past the
        vector file's end" by a seek instead of a scan of every row. :data:`OK_SLOT_INDEX` answers
        :meth:`slots_of`. Older code ignores them; creating them on a large catalog takes a few
        seconds, once, under the write lock."""
        if self.readonly or self.schema_version != SCHEMA_VERSION:
            return
        have = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        if "idx_images_slot" not in have:
            log.info("adding the slot index to %s (once)", self.path)
            with self.transaction():
                self.db.execute("CREATE INDEX IF NOT EXISTS idx_images_slot ON images (slot)")
        if OK_SLOT_INDEX not in have:
            log.info("adding the slot-by-id index to %s (once)", self.path)
            with self.transaction():
                self.db.execute(_CREATE_OK_SLOT_INDEX)
            self._ok_slot_index = True

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
        """One atomic unit of work: everything inside commits together or not at all.

        Bumps the generation; rows written inside are stamped with it (:attr:`write_gen`)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self._counting:
                self._bump_generation()
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the catalog, whatever a writer commits meanwhile.

        A read transaction: the write-ahead log keeps the pages it started with until it ends, so a
        whole-index read (an export) never pairs one commit's rows with another's. Nested: a no-op."""
        if self.db.conn.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")  # a read transaction has nothing to keep or undo

    def _bump_generation(self) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', '1') "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
        )
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        self.write_gen = int(row[0]) if row else None

    # -- description -----------------------------------------------------------------------
    def get_meta(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self.db.execute("SELECT key, value FROM meta")}

    def _set_meta_raw(self, values: dict[str, Any]) -> None:
        self.db.conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()],
        )

    def set_meta(self, values: dict[str, Any]) -> None:
        with self.transaction():
            self._set_meta_raw(values)

    def identity(self) -> dict[str, Any] | None:
        """The model description the vectors were made with, or None for a fresh index."""
        return identity_of(self.get_meta())

    @property
    def generation(self) -> int:
        """How many write transactions the catalog has seen (bumped by every commit)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def meta_value(self, key: str) -> Any:
        """One entry of the description (one indexed read, not the whole table)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return None if row is None else json.loads(row[0])

    def integrity_errors(self) -> list[str]:
        """What SQLite's ``PRAGMA integrity_check`` finds wrong (empty when the file is sound)."""
        try:
            found = [r[0] for r in self.db.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as exc:
            return [str(exc)]
        return [] if found == ["ok"] else found

    def has_pending(self) -> bool:
        return self.db.execute("SELECT EXISTS (SELECT 1 FROM ann_pending)").fetchone()[0] == 1

    # -- rows ------------------------------------------------------------------------------
    def rows(self, where: str | None = None, params: Iterable[Any] = ()) -> list[ImageRow]:
        sql = f"SELECT {_ROW_COLUMNS} FROM images"
        if where:
            sql += f" WHERE {where}"
        return [ImageRow(*r) for r in self.db.execute(sql + " ORDER BY id", list(params)).fetchall()]

    def rows_under(self, root: str) -> list[ImageRow]:
        """Rows whose path is ``root`` or lies inside it (an absolute, normalised path), in id order.

        A range seek on the path index, so an incremental run over one folder reads that folder's
        rows, not the catalog. Text paths compare as UTF-8 bytes (SQLite's BINARY collation), so the
        folder's rows are exactly those from ``root/`` up to ``root0`` (``0`` follows ``/``); names
        that are not UTF-8 are stored as BLOBs (:func:`storable_path`) and get the same range in bytes.
        """
        prefix = root.rstrip(os.sep) + os.sep
        ranges: list[tuple[str | bytes, str | bytes]] = []
        stored_prefix = storable_path(prefix)
        if isinstance(stored_prefix, str):  # a text root: its files may have text or BLOB names
            ranges.append((prefix, prefix[:-1] + chr(ord(os.sep) + 1)))
        raw = os.fsencode(prefix)
        ranges.append((raw, raw[:-1] + bytes([raw[-1] + 1])))
        seen: dict[int, ImageRow] = {}
        for low, high in ranges:
            for row in self.rows("path >= ? AND path < ?", [low, high]):
                seen[row.id] = row
        exact = self.row_by_path(root)  # the root itself, when it is a file
        if exact is not None:
            seen[exact.id] = exact
        return [seen[i] for i in sorted(seen)]

    def rows_by_ids(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = [int(i) for i in ids]
        out: dict[int, ImageRow] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"SELECT {_ROW_COLUMNS} FROM images WHERE id IN ({marks})", chunk):
                out[r[0]] = ImageRow(*r)
        return out

    def rows_and_slots(self, ids: Iterable[int]) -> dict[int, tuple[ImageRow, int | None]]:
        """Rows of ``ids`` with each one's vector slot (None: no stored vector), in one read per
        500 ids: what a query by indexed id needs of the catalog, for the query and its hits alike."""
        ids = [int(i) for i in ids]
        out: dict[int, tuple[ImageRow, int | None]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.db.execute(f"SELECT {_ROW_COLUMNS}, slot FROM images WHERE id IN ({marks})", chunk):
                out[r[0]] = (ImageRow(*r[:-1]), r[-1])
        return out

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` of this connection: it changes when another connection
        commits, so a reader may keep what it read while it holds (one cheap statement, no table read)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def row_by_path(self, path: str) -> ImageRow | None:
        rows = self.rows("path = ?", [storable_path(path)])
        return rows[0] if rows else None

    def ok_ids_by_hash(self, digest: str) -> list[int]:
        # ``+status``: seek by hash; the planner would otherwise walk every ok row of the status index
        return [r[0] for r in self.db.execute("SELECT id FROM images WHERE hash = ? AND +status = 'ok'", [digest])]

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
        """Rows by status (``ok``, ``failed``): without reading the rows.

        ``count(*)`` of the table is SQLite's page-by-page count of its smallest index (no row is
        decoded: ~20 ms at 1M rows); the statuses other than ``ok`` are few and counted by a seek
        on the status index; ``ok`` is the rest. (Grouping by status would visit every entry.)"""
        total = int(self.db.execute("SELECT count(*) FROM images").fetchone()[0])
        counts = {"ok": 0, "failed": 0}
        status = self.db.execute("SELECT MIN(status) FROM images").fetchone()[0]
        while status is not None:  # each distinct status by one seek (a skip scan of the index)
            if status != "ok":
                counts[status] = int(self.db.execute("SELECT count(*) FROM images WHERE status = ?", [status]).fetchone()[0])
            status = self.db.execute("SELECT MIN(status) FROM images WHERE status > ?", [status]).fetchone()[0]
        counts["ok"] = total - sum(n for name, n in counts.items() if name != "ok")
        return counts

    def insert_row(self, record: dict[str, Any], ref: tuple[int, int] | None) -> int:
        """Insert a new file's row (call inside a transaction); returns its id = FAISS id."""
        return self.insert_rows([record], [ref])[0]

    # Batched writes: one executemany per batch instead of a statement (and a Python-level
    # sqlite-utils round trip) per row; the indexer's commit stays well ahead of a GPU encoder.
    _WRITE_COLUMNS = ("path", "size", "mtime_ns", "hash", "width", "height", "status", "error")

    def _values(self, record: dict[str, Any], ref: tuple[int, int] | None, now: str) -> tuple[Any, ...]:
        rec = _storable_record(record)
        slot, crc = ref if ref is not None else (None, None)
        return tuple(rec.get(c) for c in self._WRITE_COLUMNS) + (slot, crc, self.write_gen, now)

    def insert_rows(self, records: list[dict[str, Any]], refs: list[tuple[int, int] | None]) -> list[int]:
        """Insert new files' rows (call inside a transaction); returns their ids = FAISS ids.

        ``refs``: per row, the (slot, CRC-32) of its vector in the vector file, or None (failed).

        Ids are assigned here, after the current maximum, which the surrounding write
        transaction (BEGIN IMMEDIATE) keeps stable.
        """
        if not records:
            return []
        start = int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]) + 1
        ids = list(range(start, start + len(records)))
        now = utc_now()
        cols = ", ".join(("id",) + self._WRITE_COLUMNS + ("slot", "vcrc", "gen", "indexed_at"))
        marks = ", ".join("?" * (len(self._WRITE_COLUMNS) + 5))
        self.db.conn.executemany(
            f"INSERT INTO images ({cols}) VALUES ({marks})",
            [(i,) + self._values(r, v, now) for i, r, v in zip(ids, records, refs)],
        )
        self._use_slots(refs)
        self._mark_pending(ids)
        return ids

    def update_rows(self, ids: list[int], records: list[dict[str, Any]], refs: list[tuple[int, int] | None]) -> None:
        """Replace existing rows' metadata and vectors (call inside a transaction); their old slots are freed."""
        if not ids:
            return
        now = utc_now()
        self._free_slots_of([int(i) for i in ids])
        sets = ", ".join(f"{c} = ?" for c in self._WRITE_COLUMNS + ("slot", "vcrc", "gen", "indexed_at"))
        self.db.conn.executemany(
            f"UPDATE images SET {sets} WHERE id = ?",
            [self._values(r, v, now) + (int(i),) for i, r, v in zip(ids, records, refs)],
        )
        self._use_slots(refs)
        self._mark_pending([int(i) for i in ids])
        # a changed file keeps its given label; a prediction made from its old vector is stale
        self.db.conn.executemany(
            "DELETE FROM labels WHERE image_id = ? AND source = 'predicted'", [(int(i),) for i in ids]
        )

    def update_row(self, row_id: int, record: dict[str, Any]) -> None:
        """Change a row's metadata only (a move or a touch); its vector stays (call inside a transaction)."""
        values = dict(_storable_record(record), indexed_at=utc_now())
        unknown = set(values) - _UPDATABLE
        if unknown:
            raise ValueError(f"not columns of a row: {sorted(unknown)}")
        sets = ", ".join(f"{c} = ?" for c in values)
        self.db.execute(f"UPDATE images SET {sets} WHERE id = ?", [*values.values(), int(row_id)])

    def mark_for_reembedding(self, ids: Iterable[int], error: str) -> None:
        """Rows whose stored vector is lost: failed, with no size, so the next index run re-embeds them."""
        ids = [int(i) for i in ids]
        self._free_slots_of(ids)
        self.db.conn.executemany(
            "UPDATE images SET status = 'failed', error = ?, size = NULL, slot = NULL, vcrc = NULL, gen = ? "
            "WHERE id = ?",
            [(error, self.write_gen, i) for i in ids],
        )
        self._mark_pending(ids)

    def delete_rows(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        self._mark_pending(ids)
        self._free_slots_of(ids)
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

    # -- vector slots (the vectors themselves are in the vector file) ------------------------
    def iter_slots(self, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, slots, CRC-32s) of every ok row with a stored vector, in id order, ``chunk`` rows at a
        time (the slots of given rows: :meth:`slots_of`)."""
        cursor = self.db.execute("SELECT id, slot, vcrc FROM images WHERE status = 'ok' AND slot IS NOT NULL ORDER BY id")
        while True:
            rows = cursor.fetchmany(chunk)
            if not rows:
                return
            yield _slot_arrays(rows)

    def count_stored(self) -> int:
        """How many ok rows have a stored vector (what :meth:`iter_ok_rows` yields): a count of
        :data:`OK_SLOT_INDEX` where the catalog has it."""
        return int(self.db.execute("SELECT count(*) FROM images WHERE status = 'ok' AND slot IS NOT NULL").fetchone()[0])

    def iter_ok_rows(self, chunk: int = 4096) -> Iterator[tuple[list[ImageRow], np.ndarray, np.ndarray]]:
        """(rows, slots, CRC-32s) of every ok row with a stored vector, in id order, ``chunk`` rows at
        a time: what a read of every row with its vector needs (an export), in one statement."""
        cursor = self.db.execute(
            f"SELECT {_ROW_COLUMNS}, slot, vcrc FROM images WHERE status = 'ok' AND slot IS NOT NULL ORDER BY id"
        )
        while True:
            rows = cursor.fetchmany(chunk)
            if not rows:
                return
            refs = np.array([r[-2:] for r in rows], dtype=np.int64).reshape(len(rows), 2)
            yield [ImageRow(*r[:-2]) for r in rows], refs[:, 0].copy(), refs[:, 1].copy()

    def slots_of(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of the ok rows among ``ids`` that have a stored vector, in id order.

        What re-ranking needs for each candidate (hundreds per query): read from
        :data:`OK_SLOT_INDEX` where the catalog has it, whose pages hold a few hundred rows' slots
        each, instead of the rows with their paths (20 to a page), so a query's random ids touch
        far fewer pages (120 random ids at 1M: 0.4 ms against 1.1 ms)."""
        id_list = sorted({int(i) for i in ids})
        if self._ok_slot_index is None:
            self._ok_slot_index = self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", [OK_SLOT_INDEX]
            ).fetchone() is not None
        using = f" INDEXED BY {OK_SLOT_INDEX}" if self._ok_slot_index else ""
        found: list[tuple[int, int]] = []
        for start in range(0, len(id_list), 500):
            part = id_list[start : start + 500]
            marks = ",".join("?" * len(part))
            found += self.db.execute(
                f"SELECT id, slot FROM images{using} WHERE id IN ({marks}) AND status = 'ok' AND slot IS NOT NULL ORDER BY id",
                part,
            ).fetchall()
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pairs = np.array(found, dtype=np.int64)
        return pairs[:, 0], pairs[:, 1]

    def free_slots(self, n: int) -> list[int]:
        """Up to ``n`` slots freed by deleted or replaced rows, lowest first, for reuse."""
        return [r[0] for r in self.db.execute("SELECT slot FROM free_slots ORDER BY slot LIMIT ?", [int(n)])]

    def slot_top(self) -> int:
        """1 + the highest slot a row references (0 for none): one seek on the slot index."""
        return int(self.db.execute("SELECT COALESCE(MAX(slot), -1) FROM images").fetchone()[0]) + 1

    def free_slots_from(self, count: int) -> bool:
        """Whether any free slot is at or past ``count``."""
        return self.db.execute("SELECT EXISTS (SELECT 1 FROM free_slots WHERE slot >= ?)", [int(count)]).fetchone()[0] == 1

    def ids_with_slot_from(self, count: int) -> np.ndarray:
        """Ok rows whose slot is at or past ``count`` (past the end of a vector file cut short)."""
        # a seek on the slot index: ``+status`` keeps the planner off the status index, and the ids
        # are sorted here (ORDER BY id would make it walk the whole table in id order instead)
        sql = "SELECT id FROM images WHERE +status = 'ok' AND slot >= ?"
        return np.sort(np.array([r[0] for r in self.db.execute(sql, [int(count)])], dtype=np.int64))

    def forget_slots_from(self, count: int) -> None:
        """Free slots at or past ``count`` no longer exist (the vector file was cut back)."""
        with self.transaction():
            self.db.execute("DELETE FROM free_slots WHERE slot >= ?", [int(count)])

    def _use_slots(self, refs: list[tuple[int, int] | None]) -> None:
        used = [(int(ref[0]),) for ref in refs if ref is not None]
        if used:
            self.db.conn.executemany("DELETE FROM free_slots WHERE slot = ?", used)

    def _free_slots_of(self, ids: list[int]) -> None:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            self.db.execute(
                f"INSERT OR IGNORE INTO free_slots (slot) SELECT slot FROM images WHERE id IN ({marks}) "
                "AND slot IS NOT NULL",
                chunk,
            )

    # -- migration from schema version 1 (float32 blobs in images.vector) -------------------
    def migrate_v1_prepare(self) -> None:
        """Add version 2's columns and tables to a version-1 catalog (idempotent)."""
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(images)")}
        with self.transaction():
            for name in ("slot", "vcrc", "gen"):
                if name not in columns:
                    self.db.execute(f"ALTER TABLE images ADD COLUMN {name} INTEGER")
            self.db.execute("CREATE TABLE IF NOT EXISTS free_slots (slot INTEGER PRIMARY KEY)")
            if self.meta_value("generation") is None:
                self._set_meta_raw({"generation": 0})

    def migrate_v1_rows(self, limit: int) -> list[tuple[int, bytes]]:
        """(id, float32 blob) of up to ``limit`` version-1 rows whose vector is not in the vector file yet."""
        return self.db.execute(
            "SELECT id, vector FROM images WHERE vector IS NOT NULL AND slot IS NULL ORDER BY id LIMIT ?", [int(limit)]
        ).fetchall()

    def migrate_v1_set_slots(self, ids: list[int], refs: list[tuple[int, int]]) -> None:
        """Point rows at their vectors' new slots and drop their blobs, in one transaction."""
        with self.transaction():
            self.db.conn.executemany(
                "UPDATE images SET slot = ?, vcrc = ?, gen = ?, vector = NULL WHERE id = ?",
                [(s, c, self.write_gen, int(i)) for i, (s, c) in zip(ids, refs)],
            )

    def migrate_v1_finish(self) -> None:
        """Record schema version 2; every ok row is pending, so FAISS is resynced from the vector file."""
        with self.transaction():
            self.db.execute("UPDATE images SET vector = NULL WHERE vector IS NOT NULL")
            self.db.execute("UPDATE images SET gen = ? WHERE gen IS NULL", [self.write_gen])
            self.db.execute("INSERT OR IGNORE INTO ann_pending (id) SELECT id FROM images WHERE status = 'ok'")
            # until the store has rebuilt FAISS from the vector file (then it deletes this)
            self._set_meta_raw({"schema_version": SCHEMA_VERSION, "migration": "rebuild FAISS"})
        self.schema_version = SCHEMA_VERSION
        self.db.execute("VACUUM")  # give back the pages the blobs took (atomic, like any transaction)

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

    def label_members(
        self, label: str, source: str | None = None, limit: int | None = None, offset: int = 0
    ) -> tuple[int, list[tuple[ImageRow, str, float | None]]]:
        """(how many ok rows carry ``label`` (of ``source``, or any), one page of them as
        (row, source, confidence)): given labels first, then predictions by confidence, then id."""
        where = "l.label = ? AND i.status = 'ok'" + (" AND l.source = ?" if source is not None else "")
        params: list[Any] = [label] + ([source] if source is not None else [])
        base = "FROM labels l JOIN images i ON i.id = l.image_id WHERE " + where
        total = int(self.db.execute("SELECT count(*) " + base, params).fetchone()[0])
        sql = (
            f"SELECT {', '.join('i.' + c.strip() for c in _ROW_COLUMNS.split(','))}, l.source, l.confidence " + base
            + " ORDER BY l.source = 'predicted', -coalesce(l.confidence, 1), i.id LIMIT ? OFFSET ?"
        )
        rows = self.db.execute(sql, params + [-1 if limit is None else int(limit), int(offset)])
        return total, [(ImageRow(*r[:-2]), r[-2], r[-1]) for r in rows]

    def label_examples(self) -> dict[str, int]:
        """label -> the id of one ok image carrying it (a given label's if any), to show the class by."""
        sql = (
            "SELECT l.label, l.image_id FROM labels l JOIN images i ON i.id = l.image_id WHERE i.status = 'ok' "
            "ORDER BY l.label, l.source = 'predicted', -coalesce(l.confidence, 1), l.image_id"
        )
        out: dict[str, int] = {}
        for label, image_id in self.db.execute(sql):
            out.setdefault(label, int(image_id))
        return out

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
            self.db.execute("DELETE FROM free_slots")
            self.db.execute("DELETE FROM clusters")
            self.db.execute("DELETE FROM cluster_members")
            self.db.execute("DELETE FROM meta WHERE key NOT IN ('schema_version', 'created_at', 'generation')")


def _blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _slot_arrays(rows: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = np.array(rows, dtype=np.int64).reshape(len(rows), 3)
    return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy()


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that writes nothing, not even the WAL's -shm file.

    With a write-ahead log beside the file (a writer is running, or was killed), ``mode=ro`` reads
    it through its -shm; without one (no writer has it open) the file is complete and is opened
    ``immutable``, which needs no -shm. ``immutable`` is also the fallback where ``mode=ro`` fails.
    """
    from urllib.parse import quote

    uri = "file:" + quote(str(path.resolve()))
    has_wal = all(path.with_name(path.name + ext).exists() for ext in ("-wal", "-shm"))
    attempts = ("mode=ro", "mode=ro&immutable=1") if has_wal else ("mode=ro&immutable=1",)
    last: Exception | None = None
    for flags in attempts:
        try:
            conn = sqlite3.connect(f"{uri}?{flags}", uri=True, timeout=30, isolation_level=None)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as exc:
            last = exc
    assert last is not None
    raise last

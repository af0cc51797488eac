"""An index directory behind one door: the SQLite catalog, the vector file and the FAISS file.

:class:`IndexStore` is the only code that writes any of them. Jobs (indexing, clustering, repair)
say what changed through its intent-level methods (:meth:`~IndexStore.apply_changes`,
:meth:`~IndexStore.commit`, :meth:`~IndexStore.replace_clustering`, :meth:`~IndexStore.save`, ...).
A commit writes the vectors into the vector file and fsyncs it, then the rows that reference
them in one SQLite transaction, then mirrors the change into FAISS. Readers read vectors through
:meth:`~IndexStore.iter_vectors` / :meth:`~IndexStore.vectors_of`, and may read ``store.catalog``
and ``store.ann`` directly.

The catalog and the vector file are the source of truth; the FAISS file is derived from them.
Opening is O(1): nothing is scanned. Each FAISS save records in the catalog the generation it
holds, the file's size, CRC-32 and stat stamp (``faiss_saved``), so readers use the last saved
state while a writer runs (:meth:`IndexStore.searchable_row`). Two checks find what a crash or
damage left: :meth:`IndexStore.check`, the full one (``simsearch info --check`` and ``index
--repair``: every id in FAISS against every ok row, every checksum), and
:meth:`IndexStore.quick_check`, which costs what changed and starts every index run: the ids
changed since the last save (``ann_pending``, written in the same transaction as each change),
rows whose slot lies past the vector file's end (a seek on the slot index), the FAISS file
against its record (size and stat stamp; its CRC-32 only when the stamp differs) and its vector
count against the catalog's ok rows (a disagreement falls back to the full check).
:meth:`IndexStore.repair` fixes what the stored vectors allow, and marks rows whose own vector is
damaged for re-embedding. A version-1 index (vectors as SQLite blobs) is migrated on open,
crash-safe, without re-embedding.

Readers that only search may open the store with ``map_faiss=True``: the FAISS file is then
memory-mapped read-only (opening costs no read of it; pages come in as searches touch them). A
writer never changes a mapped index: taking the write lock, or any write, loads it into memory.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from ..errors import EmptyIndexError, IndexBusyError, IndexCorruptError, IndexMismatchError, IndexWriteError
from .catalog import IDENTITY_KEYS, Catalog, Clustering, ImageRow
from .vector_file import VECTOR_FILE, VectorFile, file_crc, from_stored, row_crcs, to_stored
from .vector_index import DEFAULT_FACTORY, FAISS_FILE, VectorIndex

if TYPE_CHECKING:
    from .thumbnails import ThumbnailCache

# rows moved out of SQLite blobs per step of a version-1 migration (one fsync + one commit each)
MIGRATE_CHUNK = 4096
DAMAGED_VECTOR = "stored vector damaged; re-embedding on the next index run"

log = logging.getLogger(__name__)

LOCK_FILE = "write.lock"

# What a model mismatch says, by where it was found (see IndexStore.check_model).
_MISMATCH = {
    "run": (
        "the index at {path} was built with {built}; this run uses {now}. "
        "Use the same model, or --rebuild to start over"
    ),
    "reload": (
        "the index at {path} was built with {built}, but its weights now load as {now} "
        "(was the weights file changed?); rebuild with --rebuild"
    ),
}


@dataclass
class Consistency:
    """How the FAISS file differs from the catalog's ok rows."""

    missing: np.ndarray  # ok rows not in FAISS
    extra: np.ndarray  # FAISS ids with no ok row
    stale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # ids whose vector changed since FAISS was saved (or held twice): same id, maybe another vector
    faiss_damaged: str | None = None  # why the FAISS file cannot be trusted (unreadable, not the file saved)
    damaged: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # ok rows whose stored vector fails its CRC (or lies past the vector file's end): not recoverable
    damaged_paths: list[str] = field(default_factory=list)
    catalog_errors: list[str] = field(default_factory=list)  # PRAGMA integrity_check findings

    @property
    def ok(self) -> bool:
        return (
            len(self.missing) == 0
            and len(self.extra) == 0
            and len(self.stale) == 0
            and self.faiss_damaged is None
            and len(self.damaged) == 0
            and not self.catalog_errors
        )

    @property
    def count(self) -> int:
        """How many ids were out of step, each once (a missing row is usually pending too)."""
        return len(np.union1d(np.union1d(np.union1d(self.missing, self.extra), self.stale), self.damaged))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "missing_from_faiss": len(self.missing),
            "extra_in_faiss": len(self.extra),
            "stale": len(self.stale),
            "faiss_damaged": self.faiss_damaged,
            "damaged_vectors": len(self.damaged),
            "damaged_paths": list(self.damaged_paths),
            "catalog_errors": list(self.catalog_errors),
        }


class IndexStore:
    """Catalog + vector index of one index directory, and the only writer of both."""

    def __init__(self, path: Path, catalog: Catalog, ann: VectorIndex | None, map_faiss: bool = False) -> None:
        self.path = path
        self.catalog = catalog
        self._ann = ann
        self._ann_loaded = ann is not None
        self._ann_mapped = False  # the loaded FAISS index is a read-only memory map of the file
        self.map_faiss = map_faiss
        self._vectors: VectorFile | None = None
        self._lock_fd: int | None = None
        self.saved: dict[str, Any] | None = None  # faiss_saved as of opening / the last save

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], create: bool = False, readonly: bool | None = None, map_faiss: bool = False
    ) -> "IndexStore":
        """Open an index directory: O(1), nothing is read but the description.

        ``readonly``: None opens read-only when the directory or its catalog is not writable by
        this user (``info`` and ``query`` still work); True always. ``map_faiss``: memory-map the
        FAISS file read-only when it is first used (for searching; see the module's docstring).
        A version-1 index is migrated here when it can be written.
        """
        path = Path(path)
        if readonly is None:
            readonly = (path / "catalog.db").exists() and not _writable(path)
        catalog = Catalog.open(path, create=create, readonly=readonly)
        store = cls(path, catalog, None, map_faiss=map_faiss)
        try:
            if catalog.schema_version == 1:
                if readonly:
                    raise IndexCorruptError(
                        f"the index at {path} was written by an older simsearch (schema version 1); open it once "
                        f"with write access to migrate it (simsearch index --repair --index {path})"
                    )
                store.lock_for_writing()
                store._migrate_v1()
            elif not readonly and catalog.meta_value("migration") is not None:
                store._finish_migration()
            store.saved = catalog.meta_value("faiss_saved")
        except BaseException:
            store.close()
            raise
        return store

    @property
    def readonly(self) -> bool:
        return self.catalog.readonly

    @property
    def ann(self) -> VectorIndex | None:
        """The FAISS index, read from disk on first use (opening the store does not read it)."""
        if not self._ann_loaded:
            self._ann_loaded = True
            self._load_ann()
        return self._ann

    @ann.setter
    def ann(self, value: VectorIndex | None) -> None:
        self._ann, self._ann_loaded, self._ann_mapped = value, True, False

    def release_ann(self) -> bool:
        """Drop the in-memory FAISS index when its saved file holds all of it (nothing changed or
        pending since the last save); the next use reads the file again. For a job about to build
        a new layout beside it, which would otherwise hold both (a flat index of a million 512-d
        vectors is 2 GB). Returns whether it was dropped."""
        if self._ann is None or self._ann.changed or self.catalog.has_pending() or not self._faiss_file_matches_stamp():
            return False
        self._ann, self._ann_loaded, self._ann_mapped = None, False, False
        return True

    def _forget_mapped_ann(self) -> None:
        """From now on this store changes FAISS: drop a read-only mapped index, so that the next use
        loads one into memory (FAISS aborts the process on a write to a mapped one)."""
        self.map_faiss = False
        if self._ann_mapped:
            self._ann, self._ann_loaded, self._ann_mapped = None, False, False

    @property
    def vectors(self) -> VectorFile | None:
        """The vector file (None while the index has no recorded dim)."""
        if self._vectors is None:
            dim = self.catalog.meta_value("dim")
            if dim is None:
                return None
            self._vectors = VectorFile.open(self.path / VECTOR_FILE, int(dim), writable=not self.readonly)
        return self._vectors

    def close(self) -> None:
        self._vectors = None  # drops the memory map (and its open file)
        self.catalog.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def lock_for_writing(self) -> None:
        """Make this the index's only writer until :meth:`close`; a second one fails at once.

        Two ``simsearch index`` runs on one index would otherwise race on new rows and on the FAISS
        file. The lock is an advisory POSIX record lock (``lockf``): it belongs to this process only
        (forked decode workers do not inherit it) and dies with it, so a killed run never leaves a
        stale lock behind. Readers (query, info) do not take it.
        """
        if self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): concurrent writers are the caller's business
            self._forget_mapped_ann()
            self.catalog.ensure_write_indexes()
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise IndexBusyError(
                f"another process is writing to the index at {self.path} (an index or repair run); "
                "wait for it to finish"
            ) from None
        self._lock_fd = fd
        self._forget_mapped_ann()
        self.catalog.ensure_write_indexes()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ann_path(self) -> Path:
        # a layout rebuild writes a new file and switches ``ann_file`` in one commit (see layouts)
        return self.path / str(self.catalog.meta_value("ann_file") or FAISS_FILE)

    @property
    def meta(self) -> dict[str, Any]:
        return self.catalog.get_meta()

    @property
    def factory(self) -> str:
        """The FAISS layout this index records (``faiss_factory``), or the default for a fresh one."""
        return str(self.meta.get("faiss_factory", DEFAULT_FACTORY))

    def _load_ann(self) -> None:
        dim = self.catalog.meta_value("dim")
        if self.ann_path.exists():
            mapped = self.map_faiss
            ann = VectorIndex.load(self.ann_path, self.factory, mapped=mapped)
            if dim is not None and ann.dim != dim:
                raise IndexCorruptError(f"{self.ann_path} holds {ann.dim}-d vectors, the catalog says {dim}")
            self._ann, self._ann_mapped = ann, mapped
        elif dim is not None:
            self._ann = VectorIndex(int(dim), self.factory)

    def _require_ann(self) -> VectorIndex:
        """The FAISS index, to change it (loaded into memory if it was mapped read-only)."""
        self._forget_mapped_ann()
        if self.ann is None:
            raise IndexCorruptError(f"{self.path} has rows but no recorded dim; rebuild it with --rebuild")
        return self.ann

    def _require_vectors_file(self) -> VectorFile:
        vf = self.vectors
        if vf is None:
            raise IndexCorruptError(f"{self.path} has rows but no recorded dim; rebuild it with --rebuild")
        return vf

    # -- reading vectors (the one public way) ------------------------------------------------
    def iter_vectors(
        self, ids: Iterable[int] | None = None, chunk: int = 4096, mapped: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stored vectors of ok rows as (ids, float32 matrix) chunks in id order; memory bounded by ``chunk``.

        ``ids``: only these (ids with no ok row are left out). Vectors come back as stored: float16
        widened to float32 (see :mod:`simsearch.store.vector_file`), exactly what FAISS holds.
        ``mapped=False``: plain file reads, for a scan of every vector that should not leave the
        whole file resident (see :meth:`VectorFile.read16`).
        """
        vf = self.vectors
        if vf is None:
            return
        if ids is not None:  # a few given rows (re-ranking's candidates): by the slot index
            id_list = sorted({int(i) for i in ids})
            for start in range(0, len(id_list), chunk):
                row_ids, slots = self.catalog.slots_of(id_list[start : start + chunk])
                if len(row_ids):
                    yield row_ids, vf.read(slots, mapped)
            return
        for row_ids, slots, _ in self.catalog.iter_slots(chunk=chunk):
            yield row_ids, vf.read(slots, mapped)

    def iter_stored(self, chunk: int = 4096) -> Iterator[tuple[list[ImageRow], np.ndarray]]:
        """Every ok row with its stored vector (float32, as FAISS holds it), in id order, ``chunk``
        rows at a time, as one state of the index (an export of the whole index).

        The rows come from one read transaction (:meth:`Catalog.snapshot`), and each vector is
        checked against its row's CRC-32: a slot that a writer freed and filled again meanwhile, or
        a damaged one, is an error, never another image's vector under this row's path. Plain file
        reads, so the vector file does not stay resident (see :meth:`VectorFile.read16`)."""
        vf = self.vectors
        if vf is None:
            return
        with self.catalog.snapshot():
            for rows, slots, crcs in self.catalog.iter_ok_rows(chunk):
                rows16 = vf.read16(slots, mapped=False)
                bad = np.flatnonzero(np.array(row_crcs(rows16), dtype=np.int64) != crcs)
                if len(bad):
                    raise IndexCorruptError(
                        f"the stored vector of {rows[int(bad[0])].path} does not match its checksum: the index "
                        f"was written while it was read (run again), or it is damaged "
                        f"(simsearch index --repair --index {self.path})"
                    )
                yield rows, from_stored(rows16)

    def vectors_of(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, their vectors) for ``ids``, in id order; ids with no ok row are left out."""
        parts = list(self.iter_vectors(ids))
        return _concat(parts, self._dim())

    def all_vectors(self, chunk: int = 4096, mapped: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every ok row's (ids, vectors), in id order (for jobs that need them all at once).

        Filled into arrays sized from the row count, chunk by chunk, so the peak is one copy of the
        vectors (2 GB at a million 512-d), not the chunks and their concatenation. ``mapped``: as
        for :meth:`iter_vectors`."""
        n = int(self.catalog.counts()["ok"])
        ids = np.empty(n, np.int64)
        vectors = np.empty((n, self._dim()), np.float32)
        filled = 0
        for chunk_ids, part in self.iter_vectors(chunk=chunk, mapped=mapped):
            m = min(len(chunk_ids), n - filled)
            ids[filled : filled + m], vectors[filled : filled + m] = chunk_ids[:m], part[:m]
            filled += m
        return ids[:filled], vectors[:filled]

    def _dim(self) -> int:
        return int(self.catalog.meta_value("dim") or 0)

    # -- what readers may use ----------------------------------------------------------------
    @property
    def saved_generation(self) -> int | None:
        """The catalog generation the FAISS file on disk was saved at (None: not recorded)."""
        return None if not self.saved else int(self.saved["generation"])

    def searchable_row(self, row: ImageRow | None) -> bool:
        """Whether a FAISS hit on this row may be shown (see :func:`searchable`), against the FAISS
        file saved as of this store's opening or last save."""
        return searchable(row, self.saved_generation)

    # -- model identity --------------------------------------------------------------------
    def check_model(self, description: dict[str, Any], *, reloading: bool = False) -> None:
        """Refuse a model whose identity (model, weights, dim, preprocessing) is not the index's.

        A fresh index (no model recorded) accepts any. ``reloading``: the model was recreated from
        the index's own description (a query), so a mismatch means its weights changed on disk.
        """
        built = self.catalog.identity()
        now = {k: description[k] for k in IDENTITY_KEYS}
        if built is not None and built != now:
            raise IndexMismatchError(
                _MISMATCH["reload" if reloading else "run"].format(
                    path=self.path, built=describe_identity(built), now=describe_identity(now)
                )
            )

    def ensure_identity(self, description: dict[str, Any], rebuild: bool = False) -> None:
        """Record the model for a fresh index; refuse a different one unless ``rebuild``.

        Rebuilding (even with the same model) drops every row, vector and thumbnail, and keeps the
        recorded FAISS layout.
        """
        if not rebuild:
            self.check_model(description)
        current = self.catalog.identity()
        if current == {k: description[k] for k in IDENTITY_KEYS} and not rebuild:
            return
        if current is not None:
            log.warning("rebuilding %s: dropping every vector made with %s", self.path, describe_identity(current))
        factory = self.factory
        self.catalog.clear_all()
        for name in (FAISS_FILE, VECTOR_FILE):
            (self.path / name).unlink(missing_ok=True)
        self.thumbnails.clear()
        self._vectors = None
        self.catalog.set_meta(dict(description, faiss_factory=factory))
        self.catalog.db.execute("DELETE FROM meta WHERE key = 'faiss_saved'")
        self.saved = None
        self.ann = VectorIndex(int(description["dim"]), factory)

    # -- writes ----------------------------------------------------------------------------
    def set_meta(self, values: dict[str, Any]) -> None:
        """Record these entries of the index's description (one transaction)."""
        self.catalog.set_meta(values)

    def apply_changes(
        self,
        moves: Sequence[tuple[int, dict[str, Any]]] = (),
        touches: Sequence[tuple[int, int]] = (),
        removals: Sequence[ImageRow] = (),
    ) -> None:
        """The changes that need no embedding, in one transaction, then mirrored into FAISS.

        ``moves``: (row id, the file's new ``path``/``size``/``mtime_ns``); the row and its vector
        follow the file. ``touches``: (row id, new ``mtime_ns``) of files whose content is unchanged.
        ``removals``: rows of files that are gone; their vectors leave FAISS too.
        """
        ann = self._require_ann()
        with self.catalog.transaction():
            for row_id, location in moves:
                self.catalog.update_row(row_id, location)
            for row_id, mtime_ns in touches:
                self.catalog.update_row(row_id, {"mtime_ns": mtime_ns})
            self.catalog.delete_rows(row.id for row in removals)
        ann.remove([row.id for row in removals if row.ok])

    def commit(
        self, records: Sequence[dict[str, Any]], vectors: np.ndarray, replacing: Sequence[ImageRow | None]
    ) -> list[int]:
        """Write one batch of embedded files: rows in one SQLite transaction, then vectors into FAISS.

        ``records[i]``: a file's row (``status`` ``ok`` or ``failed``); ``replacing[i]``: the row it
        replaces, or None for a new file; ``vectors``: one per ok record, in order. Returns every
        record's id (= its FAISS id). The transaction marks the ids pending, so a crash before the
        FAISS update or the next :meth:`save` is repaired from the stored vectors.
        """
        ann = self._require_ann()
        ids, stored = self.store_rows(records, vectors, replacing)
        drop_ids = [row.id for row in replacing if row is not None and row.ok]
        # FAISS ids in the order of vectors (the ok records, in input order)
        add_ids = [i for i, record in zip(ids, records) if record["status"] == "ok"]
        ann.remove(drop_ids)
        ann.add(np.array(add_ids, dtype=np.int64), stored)
        return ids

    def store_rows(
        self, records: Sequence[dict[str, Any]], vectors: np.ndarray, replacing: Sequence[ImageRow | None]
    ) -> tuple[list[int], np.ndarray]:
        """The durable half of :meth:`commit`: vectors into the vector file (fsynced), then the rows
        in one transaction; FAISS is not touched. Returns (ids, the vectors as stored, float32).

        On a failure (a full disk) nothing is referenced and new slots at the file's end are cut
        back, so the index is as it was."""
        vf = self._require_vectors_file()
        n_ok = sum(1 for r in records if r["status"] == "ok")
        rows16 = to_stored(np.asarray(vectors).reshape(n_ok, vf.dim) if n_ok else np.zeros((0, vf.dim)))
        crcs = row_crcs(rows16)
        reuse = self.catalog.free_slots(n_ok)
        old_count = vf.count
        slots = reuse + list(range(old_count, old_count + n_ok - len(reuse)))
        vf.write(np.array(slots, dtype=np.int64), rows16)
        refs = iter(list(zip(slots, crcs)))
        new_records: list[dict[str, Any]] = []
        new_vectors: list[tuple[int, int] | None] = []
        upd_ids: list[int] = []
        upd_records: list[dict[str, Any]] = []
        upd_vectors: list[tuple[int, int] | None] = []
        places: list[tuple[bool, int]] = []  # per record: (is new, index into new_records | existing row id)
        for record, row in zip(records, replacing):
            vector = next(refs) if record["status"] == "ok" else None
            if row is None:
                places.append((True, len(new_records)))
                new_records.append(record)
                new_vectors.append(vector)
            else:
                places.append((False, row.id))
                upd_ids.append(row.id)
                upd_records.append(record)
                upd_vectors.append(vector)
        try:
            with self.catalog.transaction():
                new_ids = self.catalog.insert_rows(new_records, new_vectors)
                self.catalog.update_rows(upd_ids, upd_records, upd_vectors)
        except BaseException:
            vf.truncate(old_count)  # the new tail slots are referenced by nothing
            raise
        ids = [new_ids[k] if is_new else k for is_new, k in places]
        return ids, from_stored(rows16)
    def import_vectors(
        self, records: Sequence[dict[str, Any]], vectors: np.ndarray, identity: dict[str, Any]
    ) -> list[int]:
        """Add vectors computed elsewhere: ``records[i]`` (``path``, ``size``, ``mtime_ns``, optional
        ``hash``/``width``/``height``) with ``vectors[i]``, made by the model ``identity`` describes
        (it must be the index's, or becomes a fresh index's). A known path is replaced. Returns the
        ids; call :meth:`save` after. See :mod:`simsearch.store.importing`."""
        from .importing import import_into

        return import_into(self, records, vectors, identity)

    def replace_clustering(self, clustering: Clustering) -> None:
        """Swap in a new clustering atomically (readers see the old one or the new one)."""
        self.catalog.replace_clusters(clustering)

    def save(self, resync: bool = False) -> None:
        """Write FAISS atomically and record what it holds, then forget the ids changed since the
        last save (a crash in between leaves them pending, and the next :meth:`repair` redoes them).

        The catalog records (``faiss_saved``) the generation the file holds and its size and
        CRC-32, which readers and :meth:`check` go by. ``resync``: first replace the pending ids'
        vectors from the vector file. Needed only when the in-memory index may lag the catalog (a
        run interrupted between a commit and its FAISS update); normally every committed change
        has been mirrored already.
        """
        if self._ann is None:  # never loaded (nothing written through this store) or no dim yet
            if self._ann_loaded or not self.catalog.has_pending():
                return
        ann = self._require_ann()
        pending = self.catalog.pending_ids()
        if resync:
            self._resync(pending)
        if not ann.changed and len(pending) == 0 and self._faiss_file_matches_stamp():
            return  # nothing changed since this file was written: rewriting it would cost its whole size
        generation = self.catalog.generation
        size, crc = ann.save(self.ann_path)
        saved = {"generation": generation, "size": size, "crc32": crc, "ntotal": len(ann), "stamp": _stamp(self.ann_path)}
        with self.catalog.transaction():
            self.catalog._set_meta_raw({"faiss_saved": saved})
            if len(pending):
                self.catalog.db.conn.executemany(
                    "DELETE FROM ann_pending WHERE id = ?", [(int(i),) for i in pending]
                )
        self.saved = saved

    def switch_layout(self, ann: VectorIndex, name: str, factory: str, layout: dict[str, Any]) -> None:
        """Put a layout rebuilt from the stored vectors in place: written to a new file ``name``
        (fsynced, renamed), then one commit switches ``ann_file``, ``faiss_factory``, ``ann_layout``
        and what the saved file holds (``faiss_saved``) to it. A crash before the commit leaves the
        old layout in use and an orphan file the next run removes (:mod:`simsearch.store.layouts`)."""
        generation = self.catalog.generation
        size, crc = ann.save(self.path / name)
        saved = {"generation": generation, "size": size, "crc32": crc, "ntotal": len(ann), "stamp": _stamp(self.path / name)}
        with self.catalog.transaction():
            self.catalog._set_meta_raw({"ann_file": name, "faiss_factory": factory, "ann_layout": layout, "faiss_saved": saved})
        self.saved = saved
        self.ann = ann

    # -- consistency -----------------------------------------------------------------------
    def check(self, verify_vectors: bool = False, verify_catalog: bool = False) -> Consistency:
        """Compare FAISS with the catalog's ok rows (a full scan), and the FAISS file with its
        recorded size and CRC-32. ``verify_vectors``: also check every stored vector's CRC-32;
        ``verify_catalog``: also run SQLite's ``PRAGMA integrity_check``."""
        catalog_errors = self.catalog.integrity_errors() if verify_catalog else []
        faiss_damaged = self._faiss_file_problem()
        ok_ids = self.catalog.ok_ids()
        ann_ids = np.zeros(0, np.int64)
        try:
            ann = self.ann
        except IndexCorruptError as exc:
            faiss_damaged, ann = str(exc), None
        if ann is not None:
            ann_ids = ann.ids()
        unique, counts = np.unique(ann_ids, return_counts=True)
        stale = np.union1d(self.catalog.pending_ids(), unique[counts > 1])
        # rows pointing past the vector file's end are found cheaply every time; CRCs on request
        damaged = self._damaged_vectors() if verify_vectors else self._vectors_past_end()
        rows = self.catalog.rows_by_ids(damaged)
        return Consistency(
            missing=np.setdiff1d(ok_ids, unique, assume_unique=True),
            extra=np.setdiff1d(unique, ok_ids, assume_unique=True),
            stale=stale,
            faiss_damaged=faiss_damaged,
            damaged=damaged,
            damaged_paths=[rows[int(i)].path for i in damaged if int(i) in rows],
            catalog_errors=catalog_errors,
        )

    def quick_check(self) -> Consistency:
        """What the start of a run must find, at the cost of what changed since the last save.

        No id or row is read but those changed: the ids changed since the last save (pending:
        each change records its id in the same transaction, and the save that mirrors it clears
        it), ok rows whose slot lies past the vector file's end (one seek on the slot index), and
        whether the FAISS file is the one last saved (size and stat stamp; the CRC-32 of the whole
        file only when the stamp differs, e.g. after a copy) holding the vector count recorded.
        With nothing pending, FAISS must hold as many live vectors as the catalog has ok rows; when
        it does not (a file put back from elsewhere), this falls back to the full :meth:`check`."""
        empty = np.zeros(0, np.int64)
        faiss_damaged = self._faiss_file_problem(thorough=False)
        ann: VectorIndex | None = None
        try:
            ann = self.ann
        except IndexCorruptError as exc:
            faiss_damaged = str(exc)
        if faiss_damaged is None and ann is not None and self.saved and len(ann) != self.saved.get("ntotal", len(ann)):
            faiss_damaged = f"{self.ann_path} holds {len(ann)} vectors, {self.saved.get('ntotal')} were saved"
        pending = self.catalog.pending_ids()
        if faiss_damaged is None and len(pending) == 0:
            live, ok = self._live_vectors(ann), self.catalog.counts()["ok"]
            if live != ok:
                log.warning(
                    "%s: FAISS holds %d vectors, the catalog %d ok rows: checking every id", self.path, live, ok
                )
                return self.check()
        damaged = self._vectors_past_end()
        rows = self.catalog.rows_by_ids(damaged)
        return Consistency(
            missing=empty,
            extra=empty,
            stale=pending,
            faiss_damaged=faiss_damaged,
            damaged=damaged,
            damaged_paths=[rows[int(i)].path for i in damaged if int(i) in rows],
        )

    @staticmethod
    def _live_vectors(ann: VectorIndex | None) -> int:
        """Vectors a FAISS index answers with (a layout that cannot delete keeps dead slots)."""
        if ann is None:
            return 0
        from .tombstones import can_remove, tombstone_count

        # (counting dead slots reads the whole id map: only for the layouts that have them)
        return len(ann) if can_remove(ann.index) else len(ann) - tombstone_count(ann.index)

    def _faiss_file_problem(self, thorough: bool = True) -> str | None:
        """Why the FAISS file on disk is not the one last saved, or None (a missing file is not damage).

        ``thorough``: compare the whole file's CRC-32 with the record; else only when its stat
        stamp (mtime, ctime, inode) is not the one recorded at the save (any write, copy or
        replacement of the file changes it)."""
        if not self.ann_path.exists() or not self.saved:
            return None
        size = self.ann_path.stat().st_size
        if size != self.saved.get("size"):
            return f"{self.ann_path} is {size} bytes, {self.saved.get('size')} were saved"
        if not thorough and self._faiss_file_matches_stamp():
            return None
        if file_crc(self.ann_path) != self.saved.get("crc32"):
            return f"{self.ann_path} does not match the checksum recorded when it was saved"
        return None

    def _faiss_file_matches_stamp(self) -> bool:
        """Whether the FAISS file is, by its stat, the very file the last save recorded."""
        if not self.saved or "stamp" not in self.saved or not self.ann_path.exists():
            return False
        return bool(_stamp(self.ann_path) == self.saved["stamp"] and self.ann_path.stat().st_size == self.saved.get("size"))

    def _vectors_past_end(self) -> np.ndarray:
        vf = self.vectors
        if vf is None:
            return np.zeros(0, np.int64)
        return self.catalog.ids_with_slot_from(vf.count)

    def _damaged_vectors(self) -> np.ndarray:
        """Ok rows whose stored vector fails its CRC-32 or lies past the end of the vector file."""
        vf = self.vectors
        if vf is None:
            return np.zeros(0, np.int64)
        count = vf.count
        bad: list[np.ndarray] = []
        for ids, slots, crcs in self.catalog.iter_slots():
            inside = slots < count
            bad.append(ids[~inside])
            if inside.any():
                got = np.array(row_crcs(vf.read16(slots[inside])), dtype=np.int64)
                bad.append(ids[inside][got != crcs[inside]])
        return np.concatenate(bad) if bad else np.zeros(0, np.int64)

    def repair(self, verify_vectors: bool = False, full: bool = True) -> Consistency:
        """Make FAISS match the catalog from the stored vectors; returns what was found.

        A FAISS file that is unreadable or not the one saved is rebuilt from the vector file.
        Rows whose stored vector is damaged (``verify_vectors``) cannot be recovered here: they
        are marked failed, with the size cleared, so the next index run re-embeds their files.
        ``full``: find what to repair with the full :meth:`check` (``index --repair``); else with
        :meth:`quick_check` (the start of a run), and once the ids it found are repaired, a count
        of FAISS's vectors that still disagrees with the catalog's ok rows falls back to the full check.
        """
        self._trim_vectors()
        found = self.check(verify_vectors=verify_vectors) if full else self.quick_check()
        if found.ok:
            self._repaired()
            return found
        log.warning(
            "repairing %s: %d vectors missing from FAISS, %d ids in it with no row, %d possibly stale, "
            "%d stored vectors damaged%s",
            self.path,
            len(found.missing),
            len(found.extra),
            len(found.stale),
            len(found.damaged),
            f"; FAISS file: {found.faiss_damaged}" if found.faiss_damaged else "",
        )
        if len(found.damaged):
            with self.catalog.transaction():
                self.catalog.mark_for_reembedding(found.damaged, DAMAGED_VECTOR)
            self._trim_vectors()
        if found.faiss_damaged is not None:
            self._rebuild_ann()
        else:
            ann = self._require_ann()
            ann.remove(found.extra)
            self._resync(np.union1d(np.union1d(found.missing, found.stale), found.damaged))
        if not full and found.faiss_damaged is None:
            live, ok = self._live_vectors(self.ann), self.catalog.counts()["ok"]
            if live != ok:  # something besides the changed ids is out of step
                log.warning("%s: FAISS holds %d vectors, the catalog %d ok rows: checking every id", self.path, live, ok)
                return self.repair(verify_vectors=verify_vectors, full=True)
        self.save()
        self._repaired()
        return found

    def _repaired(self) -> None:
        if self.catalog.meta_value("migration") is not None:
            with self.catalog.transaction():
                self.catalog.db.execute("DELETE FROM meta WHERE key = 'migration'")

    def _trim_vectors(self) -> None:
        """Cut the vector file back to the slots rows reference (a crash can leave unused ones at its end)."""
        vf = self.vectors
        if vf is None or self.readonly:
            return
        top = self.catalog.slot_top()
        count = vf.count
        if count > top:
            vf.truncate(top)
            count = top
        if self.catalog.free_slots_from(count):
            self.catalog.forget_slots_from(count)  # freed slots past the file's end do not exist

    def _rebuild_ann(self) -> None:
        """A fresh FAISS index of the recorded layout from every stored vector (no re-embedding)."""
        dim = self._dim()
        if not dim:
            return
        ann = VectorIndex(dim, self.factory)
        if not ann.is_trained:
            _, sample = self.all_vectors()
            ann.train(sample)
        for ids, vectors in self.iter_vectors():
            ann.add(ids, vectors)
        self.ann = ann

    def _resync(self, ids: np.ndarray) -> None:
        """Replace whatever FAISS holds for ``ids`` with the stored vectors (ok rows only)."""
        ann = self._require_ann()
        if len(ids) == 0:
            return
        ann.remove(ids)
        for chunk_ids, vectors in self.iter_vectors(ids):
            ann.add(chunk_ids, vectors)

    def require_consistent(self) -> None:
        found = self.check()
        if not found.ok:
            raise IndexCorruptError(
                f"the index at {self.path} is out of step: {len(found.missing)} catalog rows are missing from "
                f"the FAISS file and {len(found.extra)} FAISS ids have no row (an interrupted run?). "
                f"Run: simsearch index --repair --index {self.path}"
            )

    # -- migration ---------------------------------------------------------------------------
    def _migrate_v1(self) -> None:
        """Move a version-1 catalog's vector blobs into the vector file, chunk by chunk.

        Each chunk: write its vectors at the file's end and fsync, then point the rows at them and
        drop their blobs in one transaction. A kill at any point leaves rows either with their blob
        or with a slot; the next open cuts the file back to the slots referenced and carries on.
        The last step records version 2 and marks every row pending, so FAISS is rebuilt from the
        vector file (the next :meth:`repair`, here at once).
        """
        log.warning("migrating %s to schema version 2 (vectors out of SQLite into %s)", self.path, VECTOR_FILE)
        self.catalog.migrate_v1_prepare()
        vf = self.vectors
        if vf is not None:
            vf.truncate(self.catalog.slot_top())  # slots written by an interrupted step that no row references
            while True:
                rows = self.catalog.migrate_v1_rows(MIGRATE_CHUNK)
                if not rows:
                    break
                ids = [int(r[0]) for r in rows]
                rows16 = to_stored(np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1))
                start = vf.count
                slots = list(range(start, start + len(rows)))
                vf.write(np.array(slots, dtype=np.int64), rows16)
                self.catalog.migrate_v1_set_slots(ids, list(zip(slots, row_crcs(rows16))))
        self.catalog.migrate_v1_finish()
        self.catalog.ensure_write_indexes()
        self.repair()

    def _finish_migration(self) -> None:
        """A migration killed after recording version 2 but before FAISS was rebuilt: rebuild it now
        (unless a writer holds the index: its run starts with the same repair)."""
        try:
            self.lock_for_writing()
        except IndexBusyError:
            return
        self.repair()

    def require_stored_vectors(self) -> int:
        """How many ok rows hold a stored vector, for jobs that read the vector file rather than
        search FAISS (k-means, the duplicates graph): the FAISS file is not loaded (a flat one is 2 GB
        at a million 512-d vectors). An error for an index with no images, with rows pointing past
        the vector file's end, or whose saved FAISS file is gone (damage: say how to repair it
        rather than work around it)."""
        ok = int(self.catalog.counts()["ok"])
        if ok == 0:
            raise EmptyIndexError(f"the index at {self.path} holds no images yet (run simsearch index FOLDER)")
        if self.saved and not self.ann_path.exists():
            self.require_consistent()
        self._require_vectors_file()
        past = self._vectors_past_end()
        if len(past):
            raise IndexCorruptError(
                f"the index at {self.path} has {len(past)} rows past the end of its vector file. "
                f"Run: simsearch index --repair --index {self.path}"
            )
        return ok

    def require_vectors(self) -> VectorIndex:
        """The vector index; an error for an index with no images, or with images its FAISS file lost."""
        if self.catalog.counts()["ok"] == 0:
            raise EmptyIndexError(f"the index at {self.path} holds no images yet (run simsearch index FOLDER)")
        if self.ann is None or len(self.ann) == 0:
            if not self.ann_path.exists() and not self.saved:  # the first run has not saved yet
                raise EmptyIndexError(
                    f"the index at {self.path} has no searchable images yet (its first index run has not saved any)"
                )
            self.require_consistent()  # rows but an empty or deleted FAISS file: say how to repair it
        assert self.ann is not None
        return self.ann

    # -- labels (the catalog's labels table; written only through these) ------------------------
    def import_labels(self, labels: dict[int, str]) -> None:
        """Record given labels (image id -> label) in one transaction; they replace any label those images had."""
        with self.catalog.transaction():
            self.catalog.set_labels(labels, "given")

    def write_predictions(self, labels: dict[int, str], confidences: dict[int, float]) -> None:
        """Replace every predicted label with these (given labels are never touched)."""
        given = self.catalog.labels("given", ok_only=False)
        with self.catalog.transaction():
            self.catalog.delete_labels("predicted")
            self.catalog.set_labels({i: l for i, l in labels.items() if i not in given}, "predicted", confidences)

    def clear_labels(self, source: str | None = None) -> int:
        """Drop every label, or those of one source (given / predicted); returns how many went."""
        with self.catalog.transaction():
            return self.catalog.delete_labels(source)

    def record_classifier(self, info: dict[str, Any]) -> None:
        """Keep the classifier's calibration (and what it was fitted on) in the index description."""
        self.set_meta({"classifier": info})

    # -- near-duplicates (simsearch.duplicates) ----------------------------------------------
    def record_duplicates_calibration(self, calibration: dict[str, Any]) -> None:
        """Keep the duplicates threshold a calibration chose (with the model identity it holds for)."""
        self.set_meta({"duplicates_calibration": calibration})

    def forget_moved_images(self, rows: Sequence[ImageRow]) -> None:
        """Drop rows whose files were moved out of the indexed folders: catalog, FAISS and thumbnails.

        The caller holds the write lock (:meth:`lock_for_writing`).
        """
        if not rows:
            return
        self.apply_changes(removals=rows)
        self.save()
        self.thumbnails.drop([row.id for row in rows])

    @property
    def thumbnails(self) -> "ThumbnailCache":
        """Bounded JPEG thumbnails of indexed images, cached under ``thumbs/`` (see :mod:`simsearch.store.thumbnails`)."""
        from .thumbnails import ThumbnailCache

        return ThumbnailCache(self.path, self.catalog)

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def _stamp(path: Path) -> list[int]:
    """A file's stat stamp (mtime, ctime, inode): any write, copy or replacement of it changes one."""
    st = path.stat()
    return [st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _writable(index_dir: Path) -> bool:
    """Whether this user may write the index directory and its catalog."""
    return os.access(index_dir, os.W_OK) and os.access(index_dir / "catalog.db", os.W_OK)


@contextmanager
def storage_errors(index_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failure to write the index (a full disk, a read-only folder, a permission) into one
    :class:`~simsearch.errors.IndexWriteError` that says so in a line; other errors pass through."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if any(s in text for s in ("disk is full", "readonly", "read-only", "unable to open", "disk I/O")):
            raise IndexWriteError(_write_failure(index_dir, text)) from None
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM) or (
            exc.errno is None and "No space left" in str(exc)
        ):
            raise IndexWriteError(_write_failure(index_dir, exc.strerror or str(exc))) from None
        raise


def _write_failure(index_dir: str | os.PathLike[str], reason: str) -> str:
    return (
        f"cannot write the index at {index_dir}: {reason}. Nothing committed before was lost; "
        "fix the cause (make room, or use a folder you can write) and run again"
    )


def _concat(parts: list[tuple[np.ndarray, np.ndarray]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def searchable(row: ImageRow | None, saved_generation: int | None) -> bool:
    """Whether a hit on ``row`` from a FAISS file saved at ``saved_generation`` may be shown: the row
    exists, is ok, and its vector is no newer than that file (a row changed since has another vector there)."""
    if row is None or not row.ok:
        return False
    return saved_generation is None or row.gen is None or row.gen <= saved_generation


def describe_identity(identity: dict[str, Any]) -> str:
    """A model identity in one line, for error messages."""
    prep = identity.get("preprocessing") or {}
    return (
        f"model={identity.get('model')} weights={identity.get('weights')} dim={identity.get('dim')} "
        f"input={prep.get('crop_size')}px"
    )

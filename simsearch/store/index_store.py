"""An index directory behind one door: the SQLite catalog and the FAISS file, kept in agreement.

:class:`IndexStore` is the only code that writes either. Jobs (indexing, clustering, repair) say
what changed through its intent-level methods (:meth:`~IndexStore.apply_changes`,
:meth:`~IndexStore.commit`, :meth:`~IndexStore.replace_clustering`, :meth:`~IndexStore.save`, ...),
and it writes SQLite first, then mirrors the change into FAISS. Readers may read
``store.catalog`` and ``store.ann`` directly.

The catalog is the source of truth; the FAISS file is derived from its stored vectors. After a
crash the FAISS file may lag the catalog by the last batches: :meth:`IndexStore.check` reports
that, and :meth:`IndexStore.repair` fixes it from the stored vectors without re-embedding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import EmptyIndexError, IndexBusyError, IndexCorruptError, IndexMismatchError
from .catalog import IDENTITY_KEYS, Catalog, Clustering, ImageRow
from .vector_index import DEFAULT_FACTORY, FAISS_FILE, VectorIndex

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

    @property
    def ok(self) -> bool:
        return len(self.missing) == 0 and len(self.extra) == 0 and len(self.stale) == 0

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.stale)


class IndexStore:
    """Catalog + vector index of one index directory, and the only writer of both."""

    def __init__(self, path: Path, catalog: Catalog, ann: VectorIndex | None) -> None:
        self.path = path
        self.catalog = catalog
        self.ann = ann
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = False) -> "IndexStore":
        path = Path(path)
        catalog = Catalog.open(path, create=create)
        store = cls(path, catalog, None)
        store._load_ann()
        return store

    def close(self) -> None:
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
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): concurrent writers are the caller's business
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

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ann_path(self) -> Path:
        # a layout rebuild writes a new file and switches ``ann_file`` in one commit (see layouts)
        return self.path / str(self.meta.get("ann_file") or FAISS_FILE)

    @property
    def meta(self) -> dict[str, Any]:
        return self.catalog.get_meta()

    @property
    def factory(self) -> str:
        """The FAISS layout this index records (``faiss_factory``), or the default for a fresh one."""
        return str(self.meta.get("faiss_factory", DEFAULT_FACTORY))

    def _load_ann(self) -> None:
        dim = self.meta.get("dim")
        if self.ann_path.exists():
            self.ann = VectorIndex.load(self.ann_path, self.factory)
            if dim is not None and self.ann.dim != dim:
                raise IndexCorruptError(f"{self.ann_path} holds {self.ann.dim}-d vectors, the catalog says {dim}")
        elif dim is not None:
            self.ann = VectorIndex(int(dim), self.factory)

    def _require_ann(self) -> VectorIndex:
        if self.ann is None:
            raise IndexCorruptError(f"{self.path} has rows but no recorded dim; rebuild it with --rebuild")
        return self.ann

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

        Rebuilding drops every row and vector, and keeps the recorded FAISS layout.
        """
        if not rebuild:
            self.check_model(description)
        current = self.catalog.identity()
        if current == {k: description[k] for k in IDENTITY_KEYS}:
            return
        if current is not None:
            log.warning("rebuilding %s: dropping every vector made with %s", self.path, describe_identity(current))
        factory = self.factory
        self.catalog.clear_all()
        if self.ann_path.exists():
            self.ann_path.unlink()
        self.catalog.set_meta(dict(description, faiss_factory=factory))
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
                self.catalog.update_row(row_id, location, keep_vector=True)
            for row_id, mtime_ns in touches:
                self.catalog.update_row(row_id, {"mtime_ns": mtime_ns}, keep_vector=True)
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
        new_records: list[dict[str, Any]] = []
        new_vectors: list[np.ndarray | None] = []
        upd_ids: list[int] = []
        upd_records: list[dict[str, Any]] = []
        upd_vectors: list[np.ndarray | None] = []
        drop_ids: list[int] = []
        slots: list[tuple[bool, int]] = []  # per record: (is new, index into new_records | existing row id)
        vec_iter = iter(vectors)
        for record, row in zip(records, replacing):
            vector = next(vec_iter) if record["status"] == "ok" else None
            if row is None:
                slots.append((True, len(new_records)))
                new_records.append(record)
                new_vectors.append(vector)
            else:
                slots.append((False, row.id))
                upd_ids.append(row.id)
                upd_records.append(record)
                upd_vectors.append(vector)
                if row.ok:
                    drop_ids.append(row.id)
        with self.catalog.transaction():
            new_ids = self.catalog.insert_rows(new_records, new_vectors)
            self.catalog.update_rows(upd_ids, upd_records, upd_vectors)
        ids = [new_ids[k] if is_new else k for is_new, k in slots]
        # FAISS ids in the order of vectors (the ok records, in input order)
        add_ids = [i for i, record in zip(ids, records) if record["status"] == "ok"]
        ann.remove(drop_ids)
        ann.add(np.array(add_ids, dtype=np.int64), vectors)
        return ids

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
        """Write FAISS atomically, then forget the ids changed since the last save (a crash in
        between leaves them pending, and the next :meth:`repair` redoes them).

        ``resync``: first replace those ids' vectors from the catalog. Needed only when the
        in-memory index may lag the catalog (a run interrupted between a commit and its FAISS
        update); normally every committed change has been mirrored already.
        """
        if self.ann is None:
            return
        pending = self.catalog.pending_ids()
        if resync:
            self._resync(pending)
        self.ann.save(self.ann_path)
        if len(pending):
            self.catalog.clear_pending(pending)

    # -- consistency -----------------------------------------------------------------------
    def check(self) -> Consistency:
        ok_ids = self.catalog.ok_ids()
        ann_ids = self.ann.ids() if self.ann is not None else np.zeros(0, np.int64)
        unique, counts = np.unique(ann_ids, return_counts=True)
        stale = np.union1d(self.catalog.pending_ids(), unique[counts > 1])
        return Consistency(
            missing=np.setdiff1d(ok_ids, unique, assume_unique=True),
            extra=np.setdiff1d(unique, ok_ids, assume_unique=True),
            stale=stale,
        )

    def repair(self) -> Consistency:
        """Make FAISS match the catalog from the stored vectors; returns what was fixed."""
        found = self.check()
        if found.ok:
            return found
        ann = self._require_ann()
        log.warning(
            "repairing %s: %d vectors missing from FAISS, %d ids in it with no row, %d possibly stale",
            self.path,
            len(found.missing),
            len(found.extra),
            len(found.stale),
        )
        ann.remove(found.extra)
        self._resync(np.union1d(found.missing, found.stale))
        self.save()
        return found

    def _resync(self, ids: np.ndarray) -> None:
        """Replace whatever FAISS holds for ``ids`` with the catalog's stored vectors (ok rows only)."""
        ann = self._require_ann()
        if len(ids) == 0:
            return
        ann.remove(ids)
        for chunk_ids, vectors in self.catalog.iter_vectors(ids):
            ann.add(chunk_ids, vectors)

    def require_consistent(self) -> None:
        found = self.check()
        if not found.ok:
            raise IndexCorruptError(
                f"the index at {self.path} is out of step: {len(found.missing)} catalog rows are missing from "
                f"the FAISS file and {len(found.extra)} FAISS ids have no row (an interrupted run?). "
                f"Run: simsearch index --repair --index {self.path}"
            )

    def require_vectors(self) -> VectorIndex:
        """The vector index; an error for an index with no images, or with images its FAISS file lost."""
        if self.catalog.counts()["ok"] == 0:
            raise EmptyIndexError(f"the index at {self.path} holds no images yet (run simsearch index FOLDER)")
        if self.ann is None or len(self.ann) == 0:
            self.require_consistent()  # rows but an empty or deleted FAISS file: say how to repair it
        assert self.ann is not None
        return self.ann

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def describe_identity(identity: dict[str, Any]) -> str:
    """A model identity in one line, for error messages."""
    prep = identity.get("preprocessing") or {}
    return (
        f"model={identity.get('model')} weights={identity.get('weights')} dim={identity.get('dim')} "
        f"input={prep.get('crop_size')}px"
    )

"""An index directory: the SQLite catalog and the FAISS file, kept in agreement.

The catalog is the source of truth; the FAISS file is derived from its stored vectors. After a
crash the FAISS file may lag the catalog by the last batches: :meth:`IndexStore.check` reports
that, and :meth:`IndexStore.repair` fixes it from the stored vectors without re-embedding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .ann import DEFAULT_FACTORY, FAISS_FILE, VectorIndex
from .catalog import IDENTITY_KEYS, Catalog, storable_path, utc_now  # noqa: F401 (re-exported)
from .errors import EmptyIndexError, IndexBusyError, IndexCorruptError, IndexMismatchError

log = logging.getLogger(__name__)

DEFAULT_INDEX_DIR = "index_data"
LOCK_FILE = "write.lock"
INDEX_ENV_VAR = "SIMSEARCH_INDEX"


def default_index_dir() -> Path:
    """``$SIMSEARCH_INDEX`` if set, else ``./index_data`` relative to the working directory."""
    return Path(os.environ.get(INDEX_ENV_VAR) or DEFAULT_INDEX_DIR)


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
    """Catalog + vector index of one index directory."""

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
        return self.path / FAISS_FILE

    @property
    def meta(self) -> dict[str, Any]:
        return self.catalog.get_meta()

    def _load_ann(self) -> None:
        meta = self.catalog.get_meta()
        dim = meta.get("dim")
        factory = meta.get("faiss_factory", DEFAULT_FACTORY)
        if self.ann_path.exists():
            self.ann = VectorIndex.load(self.ann_path, factory)
            if dim is not None and self.ann.dim != dim:
                raise IndexCorruptError(f"{self.ann_path} holds {self.ann.dim}-d vectors, the catalog says {dim}")
        elif dim is not None:
            self.ann = VectorIndex(int(dim), factory)

    # -- model identity --------------------------------------------------------------------
    def ensure_identity(self, description: dict[str, Any], rebuild: bool = False) -> None:
        """Record the model for a fresh index; refuse a different one unless ``rebuild``."""
        current = self.catalog.identity()
        wanted = {k: description[k] for k in IDENTITY_KEYS}
        if current is not None and current != wanted:
            if not rebuild:
                raise IndexMismatchError(
                    f"the index at {self.path} was built with {describe_identity(current)}; "
                    f"this run uses {describe_identity(wanted)}. Use the same model, or --rebuild to start over"
                )
            log.warning("rebuilding %s: dropping every vector made with %s", self.path, describe_identity(current))
        if current is None or current != wanted:
            self.catalog.clear_all()
            if self.ann_path.exists():
                self.ann_path.unlink()
            self.catalog.set_meta(dict(description, faiss_factory=DEFAULT_FACTORY))
            self.ann = VectorIndex(int(description["dim"]), DEFAULT_FACTORY)

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
        if self.ann is None:
            raise IndexCorruptError(f"{self.path} has rows but no recorded dim; rebuild it with --rebuild")
        log.warning(
            "repairing %s: %d vectors missing from FAISS, %d ids in it with no row, %d possibly stale",
            self.path,
            len(found.missing),
            len(found.extra),
            len(found.stale),
        )
        self.ann.remove(found.extra)
        self._resync(np.union1d(found.missing, found.stale))
        self.save_ann()
        return found

    def _resync(self, ids: np.ndarray) -> None:
        """Replace whatever FAISS holds for ``ids`` with the catalog's stored vectors (ok rows only)."""
        assert self.ann is not None
        if len(ids) == 0:
            return
        self.ann.remove(ids)
        for chunk_ids, vectors in self.catalog.iter_vectors(ids):
            self.ann.add(chunk_ids, vectors)

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

    def save_ann(self, resync: bool = False) -> None:
        """Write FAISS atomically, then forget the ids changed since the last save (a crash in
        between leaves them pending, and the next :meth:`repair` redoes them).

        ``resync``: first replace those ids' vectors from the catalog. Needed only when the
        in-memory index may lag the catalog (a run interrupted between a commit and its FAISS
        update); normally the caller has mirrored every committed change already.
        """
        if self.ann is None:
            return
        pending = self.catalog.pending_ids()
        if resync:
            self._resync(pending)
        self.ann.save(self.ann_path)
        if len(pending):
            self.catalog.clear_pending(pending)

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
        self.catalog.set_meta({"classifier": info})

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def describe_identity(identity: dict[str, Any]) -> str:
    prep = identity.get("preprocessing") or {}
    return (
        f"model={identity.get('model')} weights={identity.get('weights')} dim={identity.get('dim')} "
        f"input={prep.get('crop_size')}px"
    )


def index_info(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Location, model, dim, counts, size on disk, last update and last clustering of an index."""
    with IndexStore.open(index_dir) as store:
        meta = store.meta
        counts = store.catalog.counts()
        found = store.check()
        clustering = meta.get("clustering")
        return {
            "index": str(store.path.resolve()),
            "schema_version": meta.get("schema_version"),
            "model": meta.get("model"),
            "weights": meta.get("weights"),
            "dim": meta.get("dim"),
            "preprocessing": meta.get("preprocessing"),
            "faiss_factory": meta.get("faiss_factory"),
            "precisions": meta.get("precisions", []),
            "indexed": counts["ok"],
            "failed": counts["failed"],
            "faiss_vectors": len(store.ann) if store.ann is not None else 0,
            "consistent": found.ok,
            "size_bytes": store.size_on_disk(),
            "created_at": meta.get("created_at"),
            "updated_at": meta.get("updated_at"),
            "roots": meta.get("roots", []),
            "last_clustering": clustering,
        }

"""The FAISS index behind one small interface: add, remove by id, search, save, load.

Part of :mod:`simsearch.store`: :class:`~simsearch.store.IndexStore` is the only code that
changes it. Vectors are L2-normalised, so inner product is cosine similarity. Ids are the
catalog's row ids. The layout is a faiss ``index_factory`` string (default ``IDMap2,Flat``: exact
search), recorded in the catalog as ``faiss_factory``; the store builds every index from that
record. :meth:`VectorIndex.ids` and :meth:`VectorIndex.stored` read a layout with or without
an ID map. Saving writes a temporary file, fsyncs it and renames it over the old one, so a crash
never leaves a torn file; a reader may load the file memory-mapped (``mapped=True``: FAISS's
``IO_FLAG_MMAP_IFC``, read-only; never changed: adding to it would abort inside FAISS).

faiss is imported on first use, not with this module: ``simsearch info`` and other commands that
open an index without searching it do not pay for it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import IndexCorruptError
from .vector_file import file_crc

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """``vector_index.faiss``: the faiss module, imported when first asked for."""
    if name == "faiss":
        import faiss

        return faiss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

FAISS_FILE = "vectors.faiss"
DEFAULT_FACTORY = "IDMap2,Flat"


class VectorIndex:
    """Cosine-similarity search over id-tagged vectors."""

    def __init__(self, dim: int, factory: str = DEFAULT_FACTORY, index: faiss.Index | None = None) -> None:
        import faiss

        self.dim = dim
        self.factory = factory
        self.index = index if index is not None else faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        # changed since it was read from or written to its file (a new index has no file yet);
        # the store skips rewriting a file nothing changed
        self.changed = True

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Only needed for trainable layouts (IVF, PQ); a no-op for Flat."""
        if not self.index.is_trained:
            self.changed = True
            self.index.train(_as_f32(vectors))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.changed = True
        self.index.add_with_ids(_as_f32(vectors), np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray | list[int]) -> int:
        import faiss

        from .tombstones import can_remove, tombstone

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        self.changed = True
        if not can_remove(self.index):  # HNSW: dead slots stay in the graph, marked (see tombstones)
            return tombstone(self.index, ids)
        return int(self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))

    def ids(self) -> np.ndarray:
        """Every id held: in storage order for an ID map, list by list for an IVF layout, else 0..n-1."""
        import faiss

        from .tombstones import TOMBSTONE

        outer = faiss.downcast_index(self.index)
        if hasattr(outer, "id_map"):
            held = faiss.vector_to_array(outer.id_map).astype(np.int64)
            return held[held != TOMBSTONE]
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:  # an IVF layout keeps the ids it was given in its inverted lists
            lists = ivf.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(lists.nlist)
                if lists.list_size(i)
            ]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return np.arange(self.index.ntotal, dtype=np.int64)

    def _flat(self) -> tuple[faiss.Index, faiss.IndexFlat | None]:
        """(the outer index, downcast; its flat storage, or None when the layout is not flat)."""
        import faiss

        outer = faiss.downcast_index(self.index)
        inner = faiss.downcast_index(outer.index) if hasattr(outer, "id_map") else outer
        return outer, inner if isinstance(inner, faiss.IndexFlat) else None

    @property
    def is_exact(self) -> bool:
        """True for a flat layout (every vector stored as is, so search is exact and the vectors can be read back)."""
        return self._flat()[1] is not None

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of a flat layout, in storage order (a copy), e.g. to search them on a GPU."""
        ids, view = self.stored_view()
        return ids, np.array(view)

    def stored_view(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`stored` without the copy: the vectors are a read-only view of FAISS's own storage
        (a memory-mapped index stays mapped, not read into memory). Valid only while this object
        lives and is not changed: whoever keeps the view keeps this index too."""
        import faiss

        flat = self._flat()[1]
        if flat is None:
            raise ValueError(f"the vectors of a {self.factory!r} index are not stored as is")
        n, d = int(flat.ntotal), int(flat.d)
        if n == 0:
            return self.ids(), np.zeros((0, d), np.float32)
        view = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
        view.flags.writeable = False
        return self.ids(), view

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), best first; missing neighbours have id -1."""
        return self.index.search(_as_f32(queries), clamp_k(k, len(self)))

    def save(self, path: str | os.PathLike[str]) -> tuple[int, int]:
        """Write the index atomically; returns the file's (size, CRC-32) for the catalog to record."""
        written = write_atomic(self.index, Path(path))
        self.changed = False
        return written

    @classmethod
    def load(cls, path: str | os.PathLike[str], factory: str = DEFAULT_FACTORY, mapped: bool = False) -> "VectorIndex":
        """Read a FAISS file. ``mapped``: memory-map it read-only (every layout here supports it; loading
        costs no read, searches read the pages they touch); such an index must never be changed."""
        import faiss

        flags = 0
        if mapped:
            flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise IndexCorruptError(f"cannot read FAISS index {path}: {exc}") from exc
        loaded = cls(index.d, factory, index)
        loaded.changed = False
        return loaded


def clamp_k(k: int, n: int) -> int:
    """The number of neighbours a search returns: ``k``, but no more than the ``n`` vectors held (and at least 1)."""
    return max(1, min(k, n))


def write_atomic(index: faiss.Index, path: Path) -> tuple[int, int]:
    """Write ``index`` to a temporary file, fsync it, rename it over ``path``; returns (size, CRC-32).

    Any failure (a full disk, a read-only folder) removes the temporary file and leaves ``path``
    as it was, and comes out as an :class:`OSError` (FAISS reports write errors as RuntimeError).
    """
    import faiss

    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as exc:
            reason = _faiss_reason(exc)
            code = errno.ENOSPC if "No space left" in reason else errno.EIO
            raise OSError(code, reason, str(tmp)) from exc
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        size, crc = tmp.stat().st_size, file_crc(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size, crc


def _faiss_reason(exc: RuntimeError) -> str:
    """What went wrong, without FAISS's C++ source location: the OS reason it ends with, if any."""
    text = " ".join(str(exc).split())
    found = re.search(r"\(([^()]+)\)\s*$", text)
    return found.group(1) if found else text[-200:] or "write failed"


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)

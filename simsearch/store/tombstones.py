"""Deletes for FAISS layouts that cannot remove a vector (HNSW): tombstones inside the index itself.

Part of :mod:`simsearch.store`. An HNSW graph has no delete, so a removed or replaced vector stays
in the graph; under an ``IDMap2`` wrapper its slot's id is overwritten with :data:`TOMBSTONE`
(-1, what FAISS itself answers for "no neighbour"). The dead slot is thus saved with the FAISS file
(crash-safe exactly like every other change to it), never returned as a result, and counted by
:func:`tombstone_count` so that searches fetch deep enough and the layout is rebuilt from the stored
vectors once dead slots pass a fraction (see :mod:`simsearch.store.layouts`). Depends on faiss only.
"""

from __future__ import annotations

import faiss
import numpy as np

TOMBSTONE = -1


def can_remove(index: faiss.Index) -> bool:
    """Whether ``index`` deletes vectors for real (Flat, IVF) rather than needing tombstones (HNSW)."""
    inner = faiss.downcast_index(index)
    while True:
        if hasattr(inner, "id_map"):
            inner = faiss.downcast_index(inner.index)
        elif isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        else:
            break
    return not isinstance(inner, faiss.IndexHNSW)


def tombstone(index: faiss.Index, ids: np.ndarray) -> int:
    """Mark every slot holding one of ``ids`` dead; returns how many slots were marked."""
    outer = faiss.downcast_index(index)
    if not hasattr(outer, "id_map"):
        raise ValueError("tombstones need an IDMap layout")
    id_map = faiss.vector_to_array(outer.id_map)
    dead = np.isin(id_map, np.asarray(ids, dtype=np.int64)) & (id_map != TOMBSTONE)
    count = int(dead.sum())
    if count:
        id_map[dead] = TOMBSTONE
        faiss.copy_array_to_vector(id_map.astype(np.int64), outer.id_map)
        if hasattr(outer, "construct_rev_map"):  # IDMap2 keeps an id -> slot map too
            outer.construct_rev_map()
    return count


def tombstone_count(index: faiss.Index) -> int:
    """Dead slots in ``index`` (0 for a layout without an id map)."""
    outer = faiss.downcast_index(index)
    if not hasattr(outer, "id_map"):
        return 0
    return int((faiss.vector_to_array(outer.id_map) == TOMBSTONE).sum())

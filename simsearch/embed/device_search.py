"""Exact search with the vectors resident on a torch device: a GPU for big collections and query batches.

FAISS-CPU's flat search scans every stored vector on the CPU for each query batch. On a GPU the
same exact inner-product top-k is a GEMM and a top-k per chunk of the collection (the way FAISS's
``GpuIndexFlat`` works), see :func:`simsearch.embed.gpu_ops.exact_search`. torch is always there when a
GPU is (it runs the model), so this needs no GPU build of FAISS. The copy is read from the FAISS
index once, when the searcher opens; results follow :meth:`simsearch.store.VectorIndex.search`'s contract.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from ..store import VectorIndex, clamp_k
from ..errors import InputError
from .gpu_ops import exact_search

log = logging.getLogger(__name__)

SEARCH_BACKENDS = ("auto", "faiss", "torch")
# leave this share of the free GPU memory to the model and the query batches
_GPU_MEMORY_SHARE = 0.5


class NeighbourSearch(Protocol):
    """What the query layer needs of a vector search: (scores, ids), each (n_queries, k), best first."""

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class DeviceExactIndex:
    """A flat index's ids and vectors copied to a torch device, searched exactly there."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)

    @classmethod
    def from_index(cls, ann: VectorIndex, device: torch.device | str) -> "DeviceExactIndex":
        ids, vectors = ann.stored()
        return cls(ids, vectors, device)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = clamp_k(k, len(self))
        if len(self) == 0:  # as FAISS answers an empty index
            n = len(queries)
            return np.full((n, k), -np.finfo(np.float32).max, np.float32), np.full((n, k), -1, np.int64)
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
            scores, rows = exact_search(q, self.vectors, k)
            ids = torch.where(rows >= 0, self.ids[rows.clamp(min=0)], rows)
            return scores.cpu().numpy(), ids.cpu().numpy()


def open_search(ann: VectorIndex, device: torch.device, backend: str = "auto") -> NeighbourSearch:
    """The search to use for ``ann`` next to a model on ``device``.

    ``faiss``: FAISS on the CPU. ``torch``: exact search on ``device`` (a flat layout only).
    ``auto``: ``torch`` when ``device`` is a GPU, the layout is flat and the vectors fit in half
    of the free GPU memory; FAISS otherwise.
    """
    if backend not in SEARCH_BACKENDS:
        raise InputError(f"unknown search backend {backend!r}; use {', '.join(SEARCH_BACKENDS)}")
    if backend == "faiss" or (backend == "auto" and device.type != "cuda"):
        return ann
    if not ann.is_exact:
        if backend == "torch":
            raise InputError(f"exact search on {device} needs a flat index; this one is {ann.factory!r}")
        return ann
    if backend == "auto":
        need = len(ann) * (ann.dim * 4 + 8)
        free, _ = torch.cuda.mem_get_info(device)
        if need > _GPU_MEMORY_SHARE * free:
            log.info("searching on the CPU: the %d vectors (%.1f GB) would not fit beside the model", len(ann), need / 1e9)
            return ann
    log.debug("exact search on %s over %d vectors", device, len(ann))
    return DeviceExactIndex.from_index(ann, device)

"""Exact nearest neighbours over the stored vectors, whatever the FAISS layout: brute force in chunks.

Part of :mod:`simsearch.store`. The store's stored vectors are the ground truth from which every
approximate layout is built; this module searches them exactly, chunk by chunk
(:meth:`~simsearch.store.IndexStore.iter_vectors`), keeping a running top-k, so memory stays bounded
by one chunk whatever the collection's size. It answers ``simsearch query --exact``, gives the
layouts' recall tuning its exact top-10 (:mod:`simsearch.store.layouts`), and re-scores the
candidates of a lossy layout (PQ) exactly.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def merge_topk(
    best_scores: np.ndarray, best_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a chunk's (n_queries, m) scores/ids into a running top-k; best first, ties by smaller id."""
    all_scores = np.concatenate([best_scores, scores], axis=1)
    all_ids = np.concatenate([best_ids, ids], axis=1)
    if all_scores.shape[1] > k:
        part = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        all_scores = np.take_along_axis(all_scores, part, axis=1)
        all_ids = np.take_along_axis(all_ids, part, axis=1)
    order = np.lexsort((all_ids, -all_scores), axis=-1) if all_scores.size else np.zeros(all_scores.shape, np.int64)
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


def exact_search_chunks(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries, k), best first, over every (ids, vectors) chunk; -1 pads."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(q)
    best_scores = np.full((n, 0), -np.inf, np.float32)
    best_ids = np.zeros((n, 0), np.int64)
    for ids, vectors in chunks:
        scores = q @ np.asarray(vectors, dtype=np.float32).T
        best_scores, best_ids = merge_topk(best_scores, best_ids, scores, np.broadcast_to(ids, scores.shape), k)
    if best_scores.shape[1] < k:  # fewer vectors than k: pad as FAISS does
        pad = k - best_scores.shape[1]
        best_scores = np.concatenate([best_scores, np.full((n, pad), -np.finfo(np.float32).max, np.float32)], axis=1)
        best_ids = np.concatenate([best_ids, np.full((n, pad), -1, np.int64)], axis=1)
    return best_scores.astype(np.float32), best_ids.astype(np.int64)


class ExactSearch:
    """Brute-force search over a store's stored vectors, with the search interface of a vector index."""

    def __init__(self, store: object, chunk: int = 16384) -> None:
        self.store = store
        self.chunk = chunk

    def __len__(self) -> int:
        return int(self.store.catalog.counts()["ok"])  # type: ignore[attr-defined]

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.store.iter_vectors(chunk=self.chunk)  # type: ignore[attr-defined,no-any-return]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search_chunks(self._chunks(), queries, max(1, min(k, max(1, len(self)))))


def stored_vectors(store: object, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, their stored vectors) for the ok rows among ``ids`` (-1 entries ignored)."""
    return store.vectors_of(np.unique(ids[ids >= 0]))  # type: ignore[attr-defined,no-any-return]


def rerank(
    store: object, queries: np.ndarray, ids: np.ndarray, k: int, vectors: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate ``ids`` (-1 = none) with the stored vectors; the best ``k``,
    ties by smaller id. ``vectors``: those already read (:func:`stored_vectors`), else read here."""
    found, matrix = stored_vectors(store, ids) if vectors is None else vectors
    n = len(queries)
    out_scores = np.full((n, k), -np.finfo(np.float32).max, np.float32)
    out_ids = np.full((n, k), -1, np.int64)
    if not len(found):
        return out_scores, out_ids
    for row in range(n):
        cand = np.unique(ids[row][ids[row] >= 0])  # sorted: ties below go to the smaller id
        pos = np.minimum(np.searchsorted(found, cand), len(found) - 1)
        known = found[pos] == cand
        cand, pos = cand[known], pos[known]
        if not len(cand):
            continue
        scores = matrix[pos] @ np.asarray(queries[row], dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        out_scores[row, : len(order)] = scores[order]
        out_ids[row, : len(order)] = cand[order]
    return out_scores, out_ids

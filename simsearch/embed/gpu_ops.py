"""Spherical k-means and exact inner-product search in torch, for a CUDA device when FAISS has none.

The k-means follows FAISS's ``Clustering`` with ``spherical=True`` step for step (the same
initial rows for the same seed, assign by maximum inner product, centroid = mean of its members,
re-normalise, split a big cluster into an empty one with FAISS's random draws), so ``cluster
--device cuda`` and ``--device cpu`` give the same clustering up to float rounding; the objective
is FAISS's too (sum of the members' inner products with their centroids at the last assignment).
FAISS's random numbers come from ``std::mt19937``, the generator numpy's legacy ``RandomState``
is built on, seeded the same way: its raw 32-bit draws replay FAISS's.
Everything is plain torch, so it runs (and is tested) on CPU as well; memory stays bounded by
processing the vectors in row chunks.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# faiss/Clustering.cpp: the relative perturbation used when splitting a cluster into an empty one
_SPLIT_EPS = 1.0 / 1024.0
# at most this many float32 scores alive at once (rows x centroids), 1 GiB
_SCORE_BUDGET = 1 << 28


def _rows_per_chunk(k: int) -> int:
    return max(1, _SCORE_BUDGET // max(1, k))


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the max-inner-product centroid, that inner product) for every row of ``x``."""
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    best = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _rows_per_chunk(centroids.shape[0])
    ct = centroids.t().contiguous()
    for s in range(0, x.shape[0], step):
        scores = x[s : s + step] @ ct
        v, i = scores.max(dim=1)
        best[s : s + step] = v
        labels[s : s + step] = i
    return labels, best


class _Mt19937:
    """FAISS's ``RandomGenerator``: raw ``std::mt19937`` draws (numpy's legacy seeding is mt19937's)."""

    def __init__(self, seed: int) -> None:
        self._rs = np.random.RandomState(seed & 0xFFFFFFFF)
        self._buf = np.zeros(0, dtype=np.uint64)
        self._pos = 0

    def next(self) -> int:
        if self._pos == len(self._buf):
            # with this range, each value is one raw 32-bit output, in order
            self._buf = self._rs.randint(0, 1 << 32, size=256, dtype=np.uint64)
            self._pos = 0
        self._pos += 1
        return int(self._buf[self._pos - 1])

    def rand_int(self, bound: int) -> int:
        return self.next() % bound

    def rand_float(self) -> np.float32:
        return np.float32(self.next()) / np.float32(4294967295.0)


def faiss_init_rows(n: int, k: int, seed: int) -> np.ndarray:
    """The rows FAISS's ``Clustering`` starts from (``x[perm[:k]]``, ``rand_perm`` seeded ``seed + 1``).

    Only the first ``k`` steps of its Fisher-Yates shuffle decide them, so this is O(k), not O(n).
    """
    rng = _Mt19937(seed + 1)
    moved: dict[int, int] = {}
    rows = np.empty(k, dtype=np.int64)
    for i in range(k):
        j = i + rng.rand_int(n - i)
        rows[i] = moved.get(j, j)
        moved[j] = moved.get(i, i)
    return rows


def init_centroids(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The k rows of ``x`` FAISS's k-means starts from for ``seed``, in its order (on any device)."""
    rows = faiss_init_rows(x.shape[0], k, seed)
    return x[torch.from_numpy(rows).to(x.device)].clone()


def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    niter: int = 25,
    seed: int = 1234,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """FAISS-style spherical k-means on ``x`` (n, d) float32, on its device.

    Returns (centroids (k, d), labels (n,) from the last iteration's assignment, objective).
    """
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and {n}")
    if k == n and init is None:  # FAISS's corner case: the points are the centroids, no iterations
        labels, best = assign_nearest(x, x)
        return x.clone(), labels, float(best.double().sum())
    c = (init.to(x.device, x.dtype) if init is not None else init_centroids(x, k, seed)).clone()
    c = torch.nn.functional.normalize(c, dim=1)
    objective = 0.0
    labels = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(niter):
        labels, best = assign_nearest(x, c)
        objective = float(best.double().sum())
        sums = torch.zeros((k, d), dtype=x.dtype, device=x.device).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        new = sums * (1.0 / counts.clamp(min=1).to(x.dtype))[:, None]  # FAISS's arithmetic
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            new = _split_clusters(new, counts.cpu().numpy().astype(np.float32), empty, n)
        c = torch.nn.functional.normalize(new, dim=1)
    return c, labels, objective


def _split_clusters(c: torch.Tensor, counts: np.ndarray, empty: list[int], n: int) -> torch.Tensor:
    """Give each empty cluster half of a big one, as FAISS's ``split_clusters`` does: the same draws
    (a generator seeded 1234 at every call), the same float32 arithmetic, the same +-eps split."""
    c = c.clone()
    rng = _Mt19937(1234)
    sign = torch.ones(c.shape[1], dtype=c.dtype, device=c.device)
    sign[1::2] = -1.0
    k = len(counts)
    for ci in empty:
        cj = 0
        while True:  # scan for a cluster to split, each picked with probability ~ its size
            # (n == k: FAISS divides by zero; max(1, .) picks the same clusters)
            p = np.float32((float(counts[cj]) - 1.0) / float(max(1, n - k)))
            if rng.rand_float() < p:
                break
            cj = (cj + 1) % k
        c[ci] = c[cj] * (1 + _SPLIT_EPS * sign)
        c[cj] = c[cj] * (1 - _SPLIT_EPS * sign)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return c


def kmeans_torch(
    vectors: np.ndarray, k: int, niter: int = 25, seed: int = 1234, device: str = "cuda"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """:func:`simsearch.cluster.kmeans`'s contract on a torch device: (centroids, assignments,
    Euclidean distances to the assigned centroid, objective)."""
    dev = torch.device(device)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(dev)
        c, _, objective = spherical_kmeans(x, k, niter=niter, seed=seed)
        labels, ip = assign_nearest(x, c)  # final centroids, as the FAISS path searches them
        # squared norms by reduction: no n x d temporary
        sq = torch.linalg.vector_norm(x, dim=1).square_() + torch.linalg.vector_norm(c, dim=1).square_()[labels] - 2 * ip
        dist = sq.clamp_(min=0).sqrt_()
        return (
            c.cpu().numpy(),
            labels.cpu().numpy().astype(np.int64),
            dist.cpu().numpy().astype(np.float32),
            objective,
        )


def exact_search(
    queries: torch.Tensor, vectors: torch.Tensor, k: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: (scores, row indices), each (n_queries, k), best first.

    The database is scanned in row chunks (a running top-k is merged), so scores for all rows
    never exist at once; rows past the end (k > n) come back as index -1, score -inf.
    """
    q, n = queries.shape[0], vectors.shape[0]
    kk = min(k, n)
    chunk = chunk or max(kk, _SCORE_BUDGET // max(1, q))
    best_s = torch.full((q, 0), float("-inf"), dtype=queries.dtype, device=queries.device)
    best_i = torch.zeros((q, 0), dtype=torch.int64, device=queries.device)
    for s in range(0, n, chunk):
        scores = queries @ vectors[s : s + chunk].t()
        v, i = scores.topk(min(kk, scores.shape[1]), dim=1)
        cand_s = torch.cat([best_s, v], dim=1)
        cand_i = torch.cat([best_i, i + s], dim=1)
        top = cand_s.topk(min(kk, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, cand_i.gather(1, top.indices)
    if kk < k:
        pad = k - kk
        best_s = torch.cat([best_s, best_s.new_full((q, pad), float("-inf"))], dim=1)
        best_i = torch.cat([best_i, best_i.new_full((q, pad), -1)], dim=1)
    return best_s, best_i

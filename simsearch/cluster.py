"""k-means over the stored vectors with FAISS; results persisted in the catalog.

Vectors are L2-normalised, so spherical k-means (centroids re-normalised each iteration) is the
natural fit for cosine similarity. Each image gets its nearest centroid and its Euclidean
distance to it; a cluster's representatives are the members nearest its centroid. The result is
written through :meth:`simsearch.store.IndexStore.replace_clustering`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from .errors import InputError
from .store import Clustering, IndexStore, storage_errors, utc_now

log = logging.getLogger(__name__)


@dataclass
class Member:
    """An image in a cluster."""

    path: str
    distance: float
    width: int | None = None
    height: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClusterSummary:
    cluster: int
    size: int
    representatives: list[Member] = field(default_factory=list)


@dataclass
class ClusterResult:
    """A clustering of the whole index."""

    k: int
    n: int
    niter: int
    seed: int
    objective: float
    created_at: str
    clusters: list[ClusterSummary] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kmeans(
    vectors: np.ndarray, k: int, niter: int = 25, seed: int = 1234, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Spherical k-means: (centroids, assignments, distances, objective).

    ``device``: ``cpu`` (FAISS), ``cuda`` (FAISS's GPU k-means if this FAISS has GPUs, else torch on
    CUDA, see :mod:`simsearch.embed.gpu_ops`), or ``auto`` (``cuda`` when a GPU is present).
    """
    n, d = vectors.shape
    if k < 1:
        raise InputError("k must be at least 1")
    if k > n:
        raise InputError(f"cannot make {k} clusters from {n} images (k must be at most the number of images)")
    backend = _kmeans_backend(device)
    if backend == "torch":
        from .embed.gpu_ops import kmeans_torch

        return kmeans_torch(vectors, k, niter=niter, seed=seed, device="cuda")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    # min_points_per_centroid=1: small collections are legitimate here; faiss would print a warning.
    km = faiss.Kmeans(
        d, k, niter=niter, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30,
        **({"gpu": True} if backend == "faiss-gpu" else {}),
    )
    km.train(x)
    centroids = km.centroids.copy()
    index = faiss.IndexFlatL2(d)
    index.add(centroids)
    sq, assign = index.search(x, 1)
    distances = np.sqrt(np.maximum(sq[:, 0], 0.0))
    objective = float(km.obj[-1]) if len(km.obj) else float(sq.sum())
    return centroids, assign[:, 0].astype(np.int64), distances.astype(np.float32), objective


# k-means trains on at most this many points per centroid (FAISS's own default), a random sample of
# the collection; every vector is then assigned to its nearest centroid chunk by chunk.
POINTS_PER_CENTROID = 256
ASSIGN_CHUNK = 65536


def kmeans_sampled(
    store: IndexStore, k: int, niter: int = 25, seed: int = 1234, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """k-means of a large collection in bounded memory: (ids, centroids, assignments, distances, objective).

    Trains on a random sample of ``POINTS_PER_CENTROID * k`` stored vectors, then assigns every
    stored vector in chunks of :data:`ASSIGN_CHUNK`; the objective is the sum of squared distances
    over the whole collection.
    """
    all_ids = store.catalog.ok_ids()
    rng = np.random.default_rng(seed)
    sample_ids = np.sort(rng.choice(all_ids, size=min(len(all_ids), POINTS_PER_CENTROID * k), replace=False))
    sample = np.concatenate([v for _, v in store.iter_vectors(sample_ids, chunk=ASSIGN_CHUNK)])
    centroids = kmeans(sample, k, niter=niter, seed=seed, device=device)[0]
    del sample
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ids, assign, dist = [], [], []
    objective = 0.0
    for chunk_ids, chunk in store.iter_vectors(chunk=ASSIGN_CHUNK):
        sq, nearest = index.search(np.ascontiguousarray(chunk, dtype=np.float32), 1)
        ids.append(chunk_ids)
        assign.append(nearest[:, 0].astype(np.int64))
        dist.append(np.sqrt(np.maximum(sq[:, 0], 0.0)).astype(np.float32))
        objective += float(sq.sum())
    return np.concatenate(ids), centroids, np.concatenate(assign), np.concatenate(dist), objective


def _kmeans_backend(device: str) -> str:
    """faiss (CPU), faiss-gpu, or torch (CUDA without a GPU build of FAISS).

    On a machine with no NVIDIA driver, ``auto`` never imports torch (``cluster`` stays fast)."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        return "faiss"
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is not None and get_num_gpus() > 0:
        return "faiss-gpu"
    from .embed.cuda_probe import cuda_maybe_present

    if device == "auto" and not cuda_maybe_present():
        return "faiss"
    import torch

    if torch.cuda.is_available():
        return "torch"
    if device == "cuda":
        raise InputError("k-means on cuda was asked for, but no CUDA device is available (use cpu or auto)")
    return "faiss"


def cluster_index(
    index_dir: str | os.PathLike[str], k: int, niter: int = 25, seed: int = 1234, representatives: int = 5,
    device: str = "auto",
) -> ClusterResult:
    """Cluster every indexed image into ``k`` groups and store the result (replacing any earlier one)."""
    t0 = time.perf_counter()
    with storage_errors(index_dir), IndexStore.open(index_dir) as store:
        if store.require_stored_vectors() > POINTS_PER_CENTROID * k:
            ids, centroids, assign, dist, objective = kmeans_sampled(store, k, niter=niter, seed=seed, device=device)
        else:
            ids, vectors = store.all_vectors()
            centroids, assign, dist, objective = kmeans(vectors, k, niter=niter, seed=seed, device=device)
        sizes = np.bincount(assign, minlength=k)
        info = {"k": k, "n": int(len(ids)), "niter": niter, "seed": seed, "objective": objective, "created_at": utc_now()}
        store.replace_clustering(Clustering(centroids, sizes, ids, assign, dist, info))
        result = _load(store, representatives)
    result.seconds = time.perf_counter() - t0
    return result


def _load(store: IndexStore, representatives: int) -> ClusterResult:
    info = store.meta.get("clustering")
    if not info:
        raise InputError(f"the index at {store.path} has not been clustered yet (run simsearch cluster -k N)")
    result = ClusterResult(**{k: info[k] for k in ("k", "n", "niter", "seed", "objective", "created_at")})
    for c, size in store.catalog.cluster_sizes().items():
        members = store.catalog.cluster_members(c, limit=representatives)
        result.clusters.append(
            ClusterSummary(c, size, [Member(r.path, round(d, 6), r.width, r.height) for r, d in members])
        )
    return result


def load_clusters(index_dir: str | os.PathLike[str], representatives: int = 5) -> ClusterResult:
    """The stored clustering, as the last ``cluster`` run left it."""
    with IndexStore.open(index_dir) as store:
        return _load(store, representatives)


def cluster_members(index_dir: str | os.PathLike[str], cluster: int) -> list[Member]:
    """All members of one stored cluster, nearest its centroid first."""
    with IndexStore.open(index_dir) as store:
        sizes = store.catalog.cluster_sizes()
        if not sizes:
            raise InputError(f"the index at {store.path} has not been clustered yet (run simsearch cluster -k N)")
        if cluster not in sizes:
            raise InputError(f"no cluster {cluster}; clusters are numbered 0 to {max(sizes)}")
        return [Member(r.path, round(d, 6), r.width, r.height) for r, d in store.catalog.cluster_members(cluster)]

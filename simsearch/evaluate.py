"""Retrieval quality of an embedding: Recall@K, MAP@R and k-means NMI, by exact search.

One implementation, used by ``simsearch eval``, by the training loop's validation and by the
benchmarks, so that every figure means the same thing:

* **Recall@K**: the fraction of queries with at least one same-class item among their K nearest
  neighbours (the metric-learning literature's "Recall@K", not the IR recall).
* **MAP@R** (Musgrave et al., "A Metric Learning Reality Check", 2020): with R the number of
  same-class items in the gallery for a query, ``(1/R) * sum_{i<=R} P(i) * rel(i)``, with P(i)
  the precision among the top i; averaged over queries.
* **NMI**: normalised mutual information (arithmetic mean of the entropies, as scikit-learn's
  default) between the labels and a spherical k-means clustering with k = number of classes.

Leave-one-out (no gallery): every item is a query against all the others. With a gallery: the
queries search the gallery only; items sharing an id (the same file) are never neighbours.
Queries with no same-class item in what they search are left out of Recall and MAP@R (counted
in ``skipped_queries``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

DEFAULT_KS = (1, 2, 4, 8)


@dataclass
class RetrievalMetrics:
    """Retrieval figures for one embedding of one labelled set."""

    recall: dict[int, float]
    map_at_r: float
    nmi: float | None
    n_queries: int
    n_gallery: int
    n_classes: int
    skipped_queries: int = 0
    map_at_r_se: float = 0.0  # standard error of MAP@R over the queries (std of their AP / sqrt(n))

    @property
    def recall_at_1(self) -> float:
        return self.recall.get(1, float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f"recall@{k}": round(float(v), 6) for k, v in sorted(self.recall.items())}
        d["map@r"] = round(float(self.map_at_r), 6)
        d["map@r_se"] = round(float(self.map_at_r_se), 6)
        d["nmi"] = None if self.nmi is None else round(float(self.nmi), 6)
        d.update(
            n_queries=self.n_queries,
            n_gallery=self.n_gallery,
            n_classes=self.n_classes,
            skipped_queries=self.skipped_queries,
        )
        return d


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-d array of vectors")
    return x


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    gallery: np.ndarray | None = None,
    gallery_labels: Sequence[Any] | np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    query_ids: Sequence[Any] | np.ndarray | None = None,
    gallery_ids: Sequence[Any] | np.ndarray | None = None,
    nmi: bool = True,
    seed: int = 1234,
    chunk: int = 1024,
) -> RetrievalMetrics:
    """Recall@K, MAP@R and NMI of ``embeddings`` (rows L2-normalised: similarity = dot product).

    Without ``gallery``: leave-one-out within ``embeddings``. With it: queries search the gallery;
    ``query_ids``/``gallery_ids`` mark items that are the same file, never counted as neighbours.
    """
    q = _as_2d(embeddings, "embeddings")
    q_lab = _encode_labels(labels, len(q), "labels")
    loo = gallery is None
    if loo:
        g, g_lab = q, q_lab
        q_ids = g_ids = np.arange(len(q))
    else:
        g = _as_2d(gallery, "gallery")
        if gallery_labels is None:
            raise InputError("gallery_labels are needed with a gallery")
        if g.shape[1] != q.shape[1]:
            raise InputError(f"query vectors are {q.shape[1]}-d but gallery vectors are {g.shape[1]}-d")
        all_lab = _encode_labels(list(labels) + list(gallery_labels), len(q) + len(g), "labels")
        q_lab, g_lab = all_lab[: len(q)], all_lab[len(q) :]
        q_ids = np.asarray(query_ids) if query_ids is not None else None
        g_ids = np.asarray(gallery_ids) if gallery_ids is not None else None
    if len(q) == 0 or len(g) == 0:
        raise InputError("nothing to evaluate: no vectors")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError("Recall@K needs K >= 1")

    same_file = _same_file_fn(q_ids, g_ids)
    g_counts = np.bincount(g_lab, minlength=int(max(q_lab.max(), g_lab.max())) + 1)
    hits = {k: 0 for k in ks}
    ap_sum = 0.0
    ap_sq = 0.0
    n_valid = 0
    for start in range(0, len(q), chunk):
        stop = min(start + chunk, len(q))
        sims = q[start:stop] @ g.T
        excluded = same_file(start, stop)
        if excluded is not None:
            sims[excluded] = -np.inf
        n_excl = excluded.sum(1) if excluded is not None else np.zeros(stop - start, int)
        for row in range(stop - start):
            label = q_lab[start + row]
            same_excluded = int((excluded[row] & (g_lab == label)).sum()) if excluded is not None else 0
            r = int(g_counts[label]) - same_excluded
            if r <= 0:
                continue
            n_valid += 1
            need = min(max(ks[-1], r), len(g) - int(n_excl[row]))
            order = _top(sims[row], need)
            rel = g_lab[order] == label
            for k in ks:
                if rel[:k].any():
                    hits[k] += 1
            rel_r = rel[:r]
            if rel_r.any():
                precision = np.cumsum(rel_r) / np.arange(1, len(rel_r) + 1)
                ap = float((precision * rel_r).sum()) / r
                ap_sum += ap
                ap_sq += ap * ap
    n_classes = len(np.unique(q_lab if loo else np.concatenate([q_lab, g_lab])))
    skipped = len(q) - n_valid
    if n_valid == 0:
        raise InputError("no query has another item of its class to find; every class needs at least 2 images")
    nmi_value = None
    if nmi:
        nmi_value = kmeans_nmi(q, q_lab, seed=seed)
    mean_ap = ap_sum / n_valid
    var_ap = max(ap_sq / n_valid - mean_ap * mean_ap, 0.0) * n_valid / max(n_valid - 1, 1)
    return RetrievalMetrics(
        recall={k: hits[k] / n_valid for k in ks},
        map_at_r=mean_ap,
        map_at_r_se=float(np.sqrt(var_ap / n_valid)),
        nmi=nmi_value,
        n_queries=n_valid,
        n_gallery=len(g),
        n_classes=n_classes,
        skipped_queries=skipped,
    )


def _encode_labels(labels: Sequence[Any] | np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if len(arr) != n:
        raise InputError(f"{name}: {len(arr)} labels for {n} vectors")
    _, codes = np.unique(arr, return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


def _same_file_fn(
    q_ids: np.ndarray | None, g_ids: np.ndarray | None
) -> Callable[[int, int], np.ndarray | None]:
    if q_ids is None or g_ids is None:
        return lambda start, stop: None
    return lambda start, stop: q_ids[start:stop, None] == g_ids[None, :]


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores, best first; ties broken by index (deterministic)."""
    if n >= len(scores):
        return np.lexsort((np.arange(len(scores)), -scores))
    part = np.argpartition(-scores, n - 1)[:n]
    return part[np.lexsort((part, -scores[part]))]


def nmi_score(labels_true: Sequence[Any] | np.ndarray, labels_pred: Sequence[Any] | np.ndarray) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default)."""
    _, a = np.unique(np.asarray(labels_true), return_inverse=True)
    _, b = np.unique(np.asarray(labels_pred), return_inverse=True)
    a, b = a.reshape(-1), b.reshape(-1)
    n = len(a)
    if n == 0 or len(b) != n:
        raise InputError("NMI needs two labelings of the same non-empty set")
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    p = joint / n
    pa, pb = p.sum(1), p.sum(0)
    h_a = -float(np.sum(pa[pa > 0] * np.log(pa[pa > 0])))
    h_b = -float(np.sum(pb[pb > 0] * np.log(pb[pb > 0])))
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])))
    if h_a == 0.0 and h_b == 0.0:
        return 1.0  # both single-cluster: identical (scikit-learn agrees)
    denom = (h_a + h_b) / 2.0
    return max(0.0, mi / denom) if denom > 0 else 0.0


def kmeans_nmi(embeddings: np.ndarray, labels: np.ndarray, seed: int = 1234, niter: int = 25) -> float | None:
    """NMI of a spherical k-means (k = number of classes) against the labels; None if k < 2."""
    from .cluster import kmeans

    k = len(np.unique(labels))
    if k < 2 or k > len(embeddings):
        return None
    _, assign, _, _ = kmeans(embeddings, k, niter=niter, seed=seed, device="cpu")
    return nmi_score(labels, assign)


# -- evaluating a model on labelled folders ---------------------------------------------------


@dataclass
class EvalResult:
    """What ``simsearch eval`` reports."""

    data: str
    gallery: str | None
    model: dict[str, Any]
    metrics: RetrievalMetrics
    n_images: int
    n_gallery_images: int | None
    unreadable: int
    classes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


def embed_labelled(
    model: Any,
    paths: Sequence[str],
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Any = None,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embed files in order: (vectors of the readable ones, their positions in ``paths``, errors)."""
    from .embed import Embedder

    embedder = Embedder(model, device=device, batch_size=batch_size, workers=workers, precision=precision)
    vectors, keep, errors = [np.zeros((0, model.dim), np.float32)], [], []
    pos = 0
    if progress is not None:
        progress.start(len(paths))
    try:
        for batch in embedder.embed_files(list(paths), progress=progress.advance if progress is not None else None):
            vectors.append(batch.vectors)
            for item in batch.items:
                if item.ok:
                    keep.append(pos)
                else:
                    errors.append(item.error or item.path)
                pos += 1
    finally:
        if progress is not None:
            progress.close()
    return np.concatenate(vectors), np.asarray(keep, dtype=np.int64), errors


def evaluate_folder(
    data: str | os.PathLike[str],
    model: str = "resnet50",
    weights: str = "imagenet",
    seed: int = 0,
    gallery: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    progress: Any = None,
    precision: str = "auto",
) -> EvalResult:
    """Embed a labelled folder (or CSV) with a model and measure its retrieval quality."""
    from .models import create_model
    from .labelled import load_labelled

    t0 = time.perf_counter()
    query_set = load_labelled(data)
    warnings = list(query_set.warnings)
    gallery_set = load_labelled(gallery) if gallery is not None else None
    if gallery_set is not None:
        warnings += gallery_set.warnings
    emb_model = create_model(model, weights, seed=seed)
    vecs, keep, errors = embed_labelled(emb_model, query_set.paths, device, batch_size, workers, progress, precision)
    for e in errors:
        log.warning("skipped unreadable image: %s", e)
    q_labels = [query_set.class_names[query_set.labels[i]] for i in keep]
    q_ids = [os.path.realpath(query_set.paths[i]) for i in keep]
    unreadable = len(errors)
    n_gallery = None
    if gallery_set is None:
        metrics = retrieval_metrics(vecs, q_labels, ks=ks)
    else:
        g_vecs, g_keep, g_errors = embed_labelled(emb_model, gallery_set.paths, device, batch_size, workers, progress, precision)
        for e in g_errors:
            log.warning("skipped unreadable gallery image: %s", e)
        unreadable += len(g_errors)
        g_labels = [gallery_set.class_names[gallery_set.labels[i]] for i in g_keep]
        g_ids = [os.path.realpath(gallery_set.paths[i]) for i in g_keep]
        n_gallery = len(g_keep)
        metrics = retrieval_metrics(vecs, q_labels, g_vecs, g_labels, ks=ks, query_ids=q_ids, gallery_ids=g_ids)
    if unreadable:
        warnings.append(f"{unreadable} unreadable image(s) skipped")
    if metrics.skipped_queries:
        warnings.append(
            f"{metrics.skipped_queries} query image(s) have no other image of their class to find and were left out"
        )
    return EvalResult(
        data=str(data),
        gallery=None if gallery is None else str(gallery),
        model=emb_model.describe(),
        metrics=metrics,
        n_images=len(keep),
        n_gallery_images=n_gallery,
        unreadable=unreadable,
        classes=len(set(q_labels)),
        seconds=round(time.perf_counter() - t0, 3),
        warnings=warnings,
    )


def format_metrics(m: RetrievalMetrics) -> str:
    """One line: R@1 0.9400  R@2 ...  MAP@R ...  NMI ..."""
    parts = [f"R@{k} {v:.4f}" for k, v in sorted(m.recall.items())]
    parts.append(f"MAP@R {m.map_at_r:.4f}")
    parts.append("NMI " + ("n/a" if m.nmi is None or math.isnan(m.nmi) else f"{m.nmi:.4f}"))
    return "  ".join(parts)

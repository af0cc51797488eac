"""Classification from the index: kNN votes of labelled neighbours, calibrated confidence, suspects, evaluation.

This module owns turning an index's given labels (see :mod:`simsearch.labels`) into a classifier:

* **Vote.** An image's label is a similarity-weighted vote of its ``k`` nearest *labelled*
  neighbours. The weight of a neighbour with cosine similarity ``s`` is ``exp(s / T)`` (the weighting
  of DINO's kNN classifier): close neighbours count much more than far ones. The raw score of a class
  is its share of the weight. Only the labelled vectors are searched: they are read once from the
  store into a flat (exact) FAISS index, and the images to classify are streamed through it in
  chunks, so memory is bounded by the labelled set plus one chunk, whatever the size of the index.
* **Settings chosen by the labels.** The cosine is taken either on the stored vectors or after a
  whitening fitted on the index's own vectors (:class:`Transform`); ``k`` and ``T`` come from a small
  grid. The combination with the best leave-one-out accuracy on the labelled images is used and
  recorded with the calibration; no held-out data is needed.
* **Calibration.** The raw vote share is not a probability. It is mapped to one by isotonic
  regression fitted on the labelled images themselves, leave-one-out (each image voted on by its
  neighbours with its own vote removed, as cleanlab does), and recorded in the index description
  (meta ``classifier``) with the chosen settings and a fingerprint of the labels it was fitted on;
  it is refitted when the labels, the index or the requested settings change. The calibration error
  reported is cross-fitted (each fold is scored by a calibration fitted on the other folds), so it is
  not flattered by fitting and scoring on the same images. When the index's model is a ``simsearch
  train`` checkpoint, the labelled images it was trained on (its recorded content hashes) still vote,
  but the settings, the calibration and the evaluation use the labelled images it never saw
  (at least :data:`MIN_HELD_OUT`): a model places its training images nearer their classes than new
  ones, and a calibration fitted on them was overconfident on new images.
* **Suspects.** Labelled images whose leave-one-out vote disagrees with their label, ranked by how
  little weight their own label gets (cleanlab's self-confidence), with the label the neighbours suggest.
* **Evaluation.** Leave-one-out accuracy for k in 1, 5, 10, 20, the accuracy/coverage curve over the
  confidence threshold, and the calibration error.

* **The trained head** (``--method head``, for an index built with a ``simsearch train``
  checkpoint): each image goes to the class whose recorded proxy (see
  :mod:`simsearch.models.checkpoint`) is nearest, calibrated on the given labels among its classes.
  ``auto`` uses it when it is at least as accurate as the kNN vote, and falls back to kNN for a
  checkpoint that records no proxies.

Nothing here imports torch unless IMAGE files from outside the stored vectors must be embedded, or
a checkpoint must be read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np

from .errors import InputError, WeightsError
from .store import IndexStore, utc_now

log = logging.getLogger(__name__)

TEMPERATURE = 0.07  # the default of vote_shares (DINO's); the classifier chooses its own from GRID_T
GRID_K = (5, 10, 20, 30, 50)  # the k and temperatures the leave-one-out selection tries
GRID_T = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15)
TRANSFORMS = ("cosine", "whitened")
WHITEN_DIMS = 512  # leading principal components kept by the whitening
WHITEN_SAMPLE = 20_000  # index vectors the whitening is fitted on, at most (seeded sample)
SETTINGS_VERSION = 3  # recorded classifiers of another version are refitted
MIN_HELD_OUT = 100  # labelled images a trained model never saw, needed to calibrate on them alone
EVAL_KS = (1, 5, 10, 20)
SEARCH_CHUNK = 4096  # images searched together: bounds the memory of a classification run
CALIBRATION_SAMPLE = 20_000  # labelled images the calibration is fitted on, at most (seeded sample)
ECE_BINS = 15
CALIBRATION_FOLDS = 5
CURVE_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
METHODS = ("knn", "head", "auto")
HEAD_TEMPERATURE = 0.05  # softmax over the cosines to the class proxies (the calibration maps it to a probability)


# -- the algorithm, on arrays -------------------------------------------------------------------
def vote_shares(sims: np.ndarray, neighbour_labels: np.ndarray, n_classes: int, temperature: float = TEMPERATURE) -> np.ndarray:
    """Each class's share of the similarity-weighted vote: (n, n_classes), rows summing to 1.

    ``sims``, ``neighbour_labels``: (n, k) similarities and class indices of the neighbours; a label
    of -1 marks no neighbour (fewer labelled images than k) and casts no vote.
    """
    n, k = sims.shape
    valid = neighbour_labels >= 0
    s = np.where(valid, sims, -np.inf).astype(np.float64)
    top = s.max(axis=1, keepdims=True) if k else np.zeros((n, 1))
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.where(valid, np.exp((s - top) / temperature), 0.0)  # shifted: shares are unchanged, no overflow
    cells = (np.arange(n)[:, None] * n_classes + neighbour_labels)[valid]
    shares = np.bincount(cells, weights[valid], minlength=n * n_classes).reshape(n, n_classes)
    total = shares.sum(axis=1, keepdims=True)
    return np.divide(shares, total, out=np.full_like(shares, 1.0 / max(n_classes, 1)), where=total > 0)


class LabelledNeighbours:
    """Exact inner-product search over the labelled vectors only (positions 0..n-1 = ``labels``)."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, labels) of each query's k nearest labelled vectors (label -1: none)."""
        sims, pos = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, np.where(pos >= 0, self.labels[np.maximum(pos, 0)], -1)

    def search_leave_one_out(self, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` for labelled vectors themselves, each one's own entry removed."""
        positions = np.asarray(positions, dtype=np.int64)
        return self.search_excluding(self.index.reconstruct_batch(positions), k, positions)

    def search_excluding(self, queries: np.ndarray, k: int, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search`, leaving out each query's own labelled vector (``own``: its position, -1: none)."""
        sims, pos = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k + 1)
        drop = pos == np.asarray(own)[:, None]
        # drop the query's own entry; where it has none (or a tie pushed it out of the k+1), the last one
        drop[~drop.any(axis=1), -1] = True
        drop &= np.cumsum(drop, axis=1) == 1
        n = len(queries)
        sims, pos = sims[~drop].reshape(n, k), pos[~drop].reshape(n, k)
        return sims, np.where(pos >= 0, self.labels[np.maximum(pos, 0)], -1)

    def leave_one_out_shares(
        self, positions: np.ndarray, k: int, temperature: float = TEMPERATURE, chunk: int = SEARCH_CHUNK
    ) -> np.ndarray:
        n_classes = int(self.labels.max()) + 1
        parts = []
        for start in range(0, len(positions), chunk):
            sims, labels = self.search_leave_one_out(positions[start : start + chunk], k)
            parts.append(vote_shares(sims, labels, n_classes, temperature))
        return np.concatenate(parts) if parts else np.zeros((0, n_classes))


def fit_isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x (pool adjacent violators).

    Returns knots (xs, ys) for ``np.interp``: the ends of each pooled block of x, at the block's mean y.
    """
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    # equal x values form one block from the start
    ux, first = np.unique(x, return_index=True)
    sums = np.add.reduceat(y, first)
    counts = np.diff(np.append(first, len(x))).astype(np.float64)
    lo: list[float] = []
    hi: list[float] = []
    s: list[float] = []
    c: list[float] = []
    for xv, sv, cv in zip(ux, sums, counts):
        lo.append(xv), hi.append(xv), s.append(sv), c.append(cv)
        while len(s) > 1 and s[-2] / c[-2] >= s[-1] / c[-1]:
            sv2, cv2, hv = s.pop(), c.pop(), hi.pop()
            lo.pop()
            s[-1] += sv2
            c[-1] += cv2
            hi[-1] = hv
    means = np.asarray(s) / np.asarray(c)
    xs = np.ravel(np.column_stack([lo, hi]))
    ys = np.repeat(means, 2)
    return xs, ys


@dataclass
class Calibration:
    """Raw top vote share -> probability that the predicted label is right (isotonic knots)."""

    xs: list[float]
    ys: list[float]

    @classmethod
    def fit(cls, raw: np.ndarray, correct: np.ndarray) -> "Calibration":
        xs, ys = fit_isotonic(raw, correct.astype(np.float64))
        return cls([round(float(v), 6) for v in xs], [round(float(v), 6) for v in ys])

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(raw, np.float64), self.xs, self.ys)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    if len(confidence) == 0:
        return 0.0
    which = np.minimum((np.asarray(confidence) * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        m = which == b
        total += m.mean() * abs(float(np.mean(correct[m])) - float(np.mean(confidence[m])))
    return total


def cross_fitted_confidence(raw: np.ndarray, correct: np.ndarray, folds: int = CALIBRATION_FOLDS, seed: int = 0) -> np.ndarray:
    """Each image's calibrated confidence from a calibration fitted on the other folds (honest ECE)."""
    fold = np.random.default_rng(seed).permutation(len(raw)) % folds
    out = np.zeros(len(raw))
    for f in range(folds):
        test = fold == f
        if test.any() and (~test).any():
            out[test] = Calibration.fit(raw[~test], correct[~test])(raw[test])
    return out


def accuracy_coverage(confidence: np.ndarray, correct: np.ndarray, thresholds: Sequence[float] = CURVE_THRESHOLDS) -> list[dict[str, float]]:
    """For each threshold: the share of images at or above it (coverage) and their accuracy."""
    out = []
    for t in thresholds:
        m = confidence >= t
        out.append({"threshold": t, "coverage": float(m.mean()), "accuracy": float(correct[m].mean()) if m.any() else None})
    return out


def accuracy_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Accuracy of the most confident ``coverage`` share of the images."""
    n = max(1, int(round(coverage * len(confidence))))
    order = np.argsort(-confidence, kind="stable")[:n]
    return float(correct[order].mean())


# -- the space the cosine is taken in --------------------------------------------------------------
def signed_sqrt(x: np.ndarray) -> np.ndarray:
    """sign(x) * sqrt(|x|): power normalisation, which evens out a few dominant feature channels."""
    return np.sign(x) * np.sqrt(np.abs(x))


@dataclass
class Transform:
    """How vectors are mapped before the cosine of the vote.

    ``cosine``: as stored. ``whitened``: signed square root, centred on the index's mean and
    projected on its leading principal components scaled to unit variance (PCA whitening), then
    L2-normalised. Whitening stops the few directions in which every image varies a lot from
    dominating the similarity (on Caltech-101 with the frozen backbone it lifts kNN accuracy by
    about two points). It is fitted on the index's own vectors, labelled or not.
    """

    kind: str = "cosine"
    mean: np.ndarray | None = None
    projection: np.ndarray | None = None  # (dim, dims): principal axes divided by their standard deviations

    @property
    def dims(self) -> int:
        return 0 if self.projection is None else int(self.projection.shape[1])

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float32)
        if self.kind == "cosine":
            return x
        assert self.mean is not None and self.projection is not None
        z = (signed_sqrt(x) - self.mean) @ self.projection
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return np.ascontiguousarray(z / np.maximum(norms, 1e-12), dtype=np.float32)


def fit_whitening(sample: np.ndarray, dims: int = WHITEN_DIMS, chunk: int = SEARCH_CHUNK) -> Transform | None:
    """The whitening of ``sample`` (rows: vectors); None when there are too few vectors to fit one.

    Components with a variance below 1e-6 of the largest are dropped (they are noise, and would be
    blown up by the scaling); at most ``dims`` are kept and fewer than the sample's rows.
    """
    n, dim = sample.shape
    if n < 3:
        return None
    total = np.zeros(dim)
    for start in range(0, n, chunk):
        total += signed_sqrt(sample[start : start + chunk].astype(np.float64)).sum(axis=0)
    mean = total / n
    cov = np.zeros((dim, dim))
    for start in range(0, n, chunk):
        z = signed_sqrt(sample[start : start + chunk].astype(np.float64)) - mean
        cov += z.T @ z
    eigenvalues, axes = np.linalg.eigh(cov / n)
    eigenvalues, axes = eigenvalues[::-1], axes[:, ::-1]
    if eigenvalues[0] <= 0:
        return None
    keep = int(min(dims, n - 1, np.count_nonzero(eigenvalues > eigenvalues[0] * 1e-6)))
    if keep < 2:
        return None
    projection = axes[:, :keep] / np.sqrt(eigenvalues[:keep])
    return Transform("whitened", mean.astype(np.float32), projection.astype(np.float32))


def whitening_sample(store: IndexStore, seed: int = 0) -> np.ndarray:
    """The index's vectors the whitening is fitted on: every ok row, or a seeded sample of WHITEN_SAMPLE."""
    ids = store.catalog.ok_ids()
    if len(ids) > WHITEN_SAMPLE:
        ids = np.sort(np.random.default_rng(seed).choice(ids, WHITEN_SAMPLE, replace=False))
    return store.vectors_of(ids)[1]


# -- reading labels and vectors from the store ----------------------------------------------------
@dataclass
class LabelledData:
    ids: np.ndarray  # row ids of the labelled ok images
    y: np.ndarray  # their class indices
    classes: list[str]
    vectors: np.ndarray  # their stored vectors
    fingerprint: str
    seen: np.ndarray | None = None  # which were training images of the index's model (None: not a trained model)

    def calibration_positions(self) -> tuple[np.ndarray, str]:
        """The labelled positions settings are chosen, calibrated and evaluated on, and what they are
        (see :func:`held_out_of_training`)."""
        return held_out_of_training(self.seen, len(self.ids), "labelled images", self.y)


def held_out_of_training(
    seen: np.ndarray | None, n: int, what: str, labels: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """Of ``n`` labelled images (``seen``: which the index's trained model was trained on; None: not
    a trained model), the positions to calibrate on and what they are (``what``, qualified): those
    the model never saw when at least :data:`MIN_HELD_OUT` of them (of two classes or more, when
    ``labels`` are given), else all, and then the confidence is optimistic."""
    everything = np.arange(n)
    if seen is None or not seen.any():
        return everything, what
    unseen = np.flatnonzero(~seen)
    if len(unseen) >= MIN_HELD_OUT and (labels is None or len(np.unique(labels[unseen])) >= 2):
        return unseen, f"{what} the model was not trained on"
    log.warning(
        "only %d of the %d %s are not training images of the index's model: the confidence is calibrated on "
        "images it was trained on and will be too high on new ones (label at least %d others)",
        len(unseen), n, what, MIN_HELD_OUT,
    )
    return everything, f"{what}, including the model's training images (optimistic)"


def load_labelled(store: IndexStore) -> LabelledData:
    """The given labels of ok rows with their stored vectors; an error when there is nothing to learn from."""
    labels = store.catalog.labels("given")
    if not labels:
        raise InputError(
            f"the index at {store.path} has no labels: classification needs labelled examples of at least two "
            "classes (simsearch labels import FOLDER_OF_CLASS_FOLDERS or CSV)"
        )
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise InputError(
            f"the index at {store.path} has labels of one class only ({classes[0]!r}): classification needs "
            "labelled examples of at least two classes (simsearch labels import ...)"
        )
    position = {c: i for i, c in enumerate(classes)}
    id_parts, vec_parts = [], []
    for ids, vectors in store.iter_vectors(np.fromiter(labels, dtype=np.int64)):
        id_parts.append(ids)
        vec_parts.append(vectors)
    ids = np.concatenate(id_parts)
    y = np.array([position[labels[int(i)]] for i in ids], dtype=np.int64)
    digest = hashlib.sha1(ids.tobytes() + y.tobytes() + "\n".join(classes).encode())
    digest.update(str(store.meta.get("updated_at")).encode())  # vectors re-embedded since: refit
    seen = training_images_among(store, ids)
    if seen is not None:
        digest.update(seen.tobytes())
    return LabelledData(ids, y, classes, np.concatenate(vec_parts), digest.hexdigest()[:16], seen)


def training_images_among(store: IndexStore, ids: np.ndarray) -> np.ndarray | None:
    """Which of the rows ``ids`` hold an image the index's model was trained on (by content hash);
    None when the model is not a ``simsearch train`` checkpoint recording them."""
    facts, _ = _index_checkpoint(store)
    trained = None if facts is None else facts["trained_on"]
    if trained is None:
        return None
    rows = store.catalog.rows_by_ids(ids.tolist())
    return np.array([rows[int(i)].hash in trained if int(i) in rows else False for i in ids], dtype=bool)


def _check_k(k: int | None, data: LabelledData) -> int | None:
    """``k`` as usable with these labels (None: chosen by leave-one-out)."""
    if k is None:
        return None
    if k < 1:
        raise InputError("--k must be at least 1")
    return min(k, len(data.ids) - 1) if len(data.ids) > 1 else 1


@dataclass
class CalibrationInfo:
    """The settings in use, how they were chosen, the calibration, and how well the classifier does
    leave-one-out on the labelled images."""

    method: str
    k: int
    temperature: float
    transform: str
    whiten_dims: int
    labelled: int
    classes: int
    fitted_on: int
    loo_accuracy: float | None  # the head: its accuracy on the labelled images of its classes (None: there are none)
    ece: float | None
    fingerprint: str
    fitted_at: str
    calibration: Calibration
    calibrated_on: str = "labelled images"  # or the labelled images a trained model never saw (see LabelledData)
    requested: dict[str, Any] = field(default_factory=dict)  # k / transform / temperature fixed by the caller
    selection: list[dict[str, Any]] = field(default_factory=list)  # the best leave-one-out accuracy of each transform
    version: int = SETTINGS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KnnClassifier:
    """A fitted kNN classifier: the chosen settings and calibration, the transform, the labelled vectors in its space."""

    info: CalibrationInfo
    transform: Transform
    neighbours: LabelledNeighbours
    data: LabelledData

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    @property
    def n_classes(self) -> int:
        return len(self.data.classes)

    @property
    def labelled_ids(self) -> np.ndarray:
        return self.data.ids

    def shares(self, vectors: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
        """Vote shares of stored-space ``vectors``; ``own``: labelled positions to leave out (-1: none)."""
        z = self.transform(vectors)
        if own is None:
            sims, labels = self.neighbours.search(z, self.info.k)
        else:
            sims, labels = self.neighbours.search_excluding(z, self.info.k, own)
        return vote_shares(sims, labels, self.n_classes, self.info.temperature)

    def leave_one_out_shares(self, positions: np.ndarray, k: int | None = None) -> np.ndarray:
        return self.neighbours.leave_one_out_shares(positions, k or self.info.k, self.info.temperature)


def _requested(k: int | None, transform: str, temperature: float | None) -> dict[str, Any]:
    if transform not in TRANSFORMS + ("auto",):
        raise InputError(f"unknown transform {transform!r}; use auto, cosine or whitened")
    if temperature is not None and temperature <= 0:
        raise InputError("the temperature must be positive")
    return {"k": k, "transform": transform, "temperature": temperature}


def _transforms(store: IndexStore, which: str, seed: int) -> dict[str, Transform]:
    """The candidate transforms (``which``: one kind, or auto for all that can be fitted)."""
    out: dict[str, Transform] = {}
    if which in ("auto", "cosine"):
        out["cosine"] = Transform()
    if which in ("auto", "whitened"):
        whitening = fit_whitening(whitening_sample(store, seed))
        if whitening is not None:
            out["whitened"] = whitening
        elif which == "whitened":
            raise InputError(f"the index at {store.path} has too few images to fit a whitening; use the cosine transform")
    return out


def fit_classifier(
    store: IndexStore,
    data: LabelledData,
    k: int | None = None,
    transform: str = "auto",
    temperature: float | None = None,
    seed: int = 0,
) -> KnnClassifier:
    """The recorded classifier when it was fitted on these labels with these requests; else choose and record one.

    Choosing: for each transform (cosine, whitened) and each k in GRID_K and temperature in GRID_T
    (or the ones given), the leave-one-out accuracy on the labelled images (a seeded sample of at
    most CALIBRATION_SAMPLE of them) is measured; the best is kept (ties: the first in that order),
    and the calibration is fitted on its leave-one-out votes (on the labelled images the index's trained
    model never saw, when there are enough; all of them vote). No held-out data is used: the labels
    choose their own settings.
    """
    requested = _requested(k, transform, temperature)
    recorded = store.meta.get("classifier")
    if (
        isinstance(recorded, dict)
        and recorded.get("version") == SETTINGS_VERSION
        and recorded.get("fingerprint") == data.fingerprint
        and recorded.get("requested") == requested
        and recorded.get("method") == "knn"
    ):
        fields = dict(recorded)
        fields["calibration"] = Calibration(**recorded["calibration"])
        info = CalibrationInfo(**fields)
        chosen = _transforms(store, info.transform, seed)[info.transform]
        return KnnClassifier(info, chosen, LabelledNeighbours(chosen(data.vectors), data.y), data)

    n_classes = len(data.classes)
    positions, calibrated_on = data.calibration_positions()
    if len(positions) > CALIBRATION_SAMPLE:
        positions = np.sort(np.random.default_rng(seed).choice(positions, CALIBRATION_SAMPLE, replace=False))
    ks = sorted({min(j, len(data.ids) - 1) for j in ((k,) if k is not None else GRID_K)})
    temperatures = (temperature,) if temperature is not None else GRID_T
    truth = data.y[positions]
    best: tuple[float, str, int, float] | None = None
    selection, spaces = [], {}
    for name, candidate in _transforms(store, transform, seed).items():
        neighbours = LabelledNeighbours(candidate(data.vectors), data.y)
        spaces[name] = (candidate, neighbours)
        sims, labels = _leave_one_out_neighbours(neighbours, positions, max(ks))
        best_here: tuple[float, str, int, float] | None = None
        for j in ks:
            for t in temperatures:
                hits = sum(
                    int((vote_shares(sims[s : s + SEARCH_CHUNK, :j], labels[s : s + SEARCH_CHUNK, :j], n_classes, t).argmax(axis=1)
                         == truth[s : s + SEARCH_CHUNK]).sum())
                    for s in range(0, len(positions), SEARCH_CHUNK)
                )
                score = (hits / len(positions), name, j, t)
                if best_here is None or score[0] > best_here[0]:
                    best_here = score
        assert best_here is not None
        selection.append({"transform": name, "k": best_here[2], "temperature": best_here[3], "loo_accuracy": round(best_here[0], 6)})
        if best is None or best_here[0] > best[0]:
            best = best_here
        log.info("leave-one-out accuracy with the %s transform: %.4f (k=%d, T=%g)", name, best_here[0], best_here[2], best_here[3])
    assert best is not None
    _, name, chosen_k, chosen_t = best
    chosen, neighbours = spaces[name]
    shares = neighbours.leave_one_out_shares(positions, chosen_k, chosen_t)
    raw = shares.max(axis=1)
    correct = shares.argmax(axis=1) == truth
    info = CalibrationInfo(
        method="knn",
        k=chosen_k,
        temperature=chosen_t,
        transform=name,
        whiten_dims=chosen.dims,
        labelled=len(data.ids),
        classes=n_classes,
        fitted_on=len(positions),
        loo_accuracy=round(float(correct.mean()), 6),
        ece=round(expected_calibration_error(cross_fitted_confidence(raw, correct, seed=seed), correct), 6),
        fingerprint=data.fingerprint,
        fitted_at=utc_now(),
        calibration=Calibration.fit(raw, correct),
        calibrated_on=calibrated_on,
        requested=requested,
        selection=selection,
    )
    store.record_classifier(info.to_dict())
    return KnnClassifier(info, chosen, neighbours, data)


def _leave_one_out_neighbours(neighbours: LabelledNeighbours, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Similarities and labels of the k nearest other labelled vectors of each labelled position."""
    sims, labels = [], []
    for start in range(0, len(positions), SEARCH_CHUNK):
        s, lab = neighbours.search_leave_one_out(positions[start : start + SEARCH_CHUNK], k)
        sims.append(s)
        labels.append(lab)
    return np.concatenate(sims), np.concatenate(labels)


# -- the trained head's class proxies (--method head) ------------------------------------------------
@dataclass
class HeadClasses:
    """The class vectors a ``simsearch train`` checkpoint records, in its embedding space."""

    names: list[str]
    proxies: np.ndarray  # (classes, dim), unit rows
    source: str  # the loss's proxies, or the class means of the training embeddings
    checkpoint: str


def _index_checkpoint(store: IndexStore) -> tuple[dict[str, Any] | None, str]:
    """What classification needs from the ``simsearch train`` checkpoint the index was built with
    (``head``: :func:`head_classes`, ``trained_on``: :func:`trained_on`; the file is read once per
    version of it, and only these are kept), and its path; or None and why there is none."""
    weights = str(store.meta.get("weights", ""))
    if not weights.startswith("checkpoint:"):
        return None, (
            f"--method head needs an index built with a simsearch train checkpoint as --weights; the index at "
            f"{store.path} was built with {store.meta.get('model')} ({weights}). Use --method knn"
        )
    source = str(store.meta.get("weights_source", ""))
    if not Path(source).is_file():
        return None, f"--method head reads the class proxies from the checkpoint the index was built with, {source}, which is not found"
    from .models.checkpoint import load_checkpoint
    from .models.weights import file_digest

    if not weights.endswith(":" + file_digest(source)):
        return None, f"--method head: the checkpoint {source} has changed since the index was built with it (re-index with it)"
    stat = os.stat(source)
    key = (source, stat.st_mtime_ns, stat.st_size)
    if _CHECKPOINT.get("key") != key:
        from .models.checkpoint import head_classes, trained_on

        state = load_checkpoint(source)
        facts: dict[str, Any] = {"trained_on": trained_on(state)}
        try:
            facts["head"] = head_classes(state, source)
        except WeightsError as exc:  # damaged proxies: an error for --method head only
            facts["head_error"] = exc
        _CHECKPOINT.clear()
        _CHECKPOINT.update(key=key, facts=facts)
    return _CHECKPOINT["facts"], source


_CHECKPOINT: dict[str, Any] = {}  # the last checkpoint read: classify's kNN and head paths both need it


def head_classes_of(store: IndexStore) -> tuple[HeadClasses | None, str]:
    """The class proxies of the checkpoint the index was built with; or None and why there are none."""
    facts, source = _index_checkpoint(store)
    if facts is None:
        return None, source
    if "head_error" in facts:
        raise facts["head_error"]
    found = facts["head"]
    if found is None:
        return None, (
            f"--method head needs the class proxies of the trained head, which the checkpoint {source} does not record "
            "(it was written by an older simsearch train): train again with this version, or use --method knn"
        )
    names, proxies, origin = found
    if proxies.shape[1] != int(store.meta["dim"]):
        return None, f"--method head: the checkpoint's proxies are {proxies.shape[1]}-d, the index holds {store.meta['dim']}-d vectors"
    return HeadClasses(names, proxies, origin, source), ""


@dataclass
class HeadClassifier:
    """Classification by the nearest class proxy: softmax of the cosines (temperature HEAD_TEMPERATURE),
    calibrated on the index's given labels that name one of the head's classes."""

    info: CalibrationInfo
    head: HeadClasses
    labelled_ids: np.ndarray  # given-labelled rows: not classified when classifying the index

    @property
    def classes(self) -> list[str]:
        return self.head.names

    def shares(self, vectors: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
        logits = np.asarray(vectors, np.float64) @ self.head.proxies.T.astype(np.float64) / HEAD_TEMPERATURE
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def fit_head_classifier(store: IndexStore, head: HeadClasses, seed: int = 0) -> HeadClassifier:
    """The head classifier, calibrated on the given labels among its classes (uncalibrated without any).

    The accuracy reported is the head's on those labelled images; the ones the model was trained on
    are left out when at least :data:`MIN_HELD_OUT` others remain (on its own training images the
    head is right far more often than on new ones).
    """
    labels = store.catalog.labels("given")
    position = {name: i for i, name in enumerate(head.names)}
    usable = np.array(sorted(i for i, label in labels.items() if label in position), dtype=np.int64)
    seen = training_images_among(store, usable) if len(usable) else None
    positions, calibrated_on = held_out_of_training(seen, len(usable), "labelled images of its classes")
    usable = usable[positions]
    ids, vectors = store.vectors_of(usable) if len(usable) else (np.zeros(0, np.int64), None)
    classifier = HeadClassifier(
        CalibrationInfo(
            method="head", k=0, temperature=HEAD_TEMPERATURE, transform="head proxies", whiten_dims=0,
            labelled=len(labels), classes=len(head.names), fitted_on=len(ids), loo_accuracy=None, ece=None,
            fingerprint="", fitted_at=utc_now(), calibration=Calibration([0.0, 1.0], [0.0, 1.0]),
            calibrated_on=calibrated_on, requested={"method": "head", "checkpoint": head.checkpoint, "proxies": head.source},
        ),
        head,
        np.fromiter(labels, dtype=np.int64),
    )
    if len(ids):
        assert vectors is not None
        shares = classifier.shares(vectors)
        raw = shares.max(axis=1)
        correct = shares.argmax(axis=1) == np.array([position[labels[int(i)]] for i in ids])
        classifier.info.calibration = Calibration.fit(raw, correct)
        classifier.info.loo_accuracy = round(float(correct.mean()), 6)
        classifier.info.ece = round(expected_calibration_error(cross_fitted_confidence(raw, correct, seed=seed), correct), 6)
    return classifier


def _choose_classifier(
    store: IndexStore, method: str, k: int | None, transform: str, temperature: float | None
) -> KnnClassifier | HeadClassifier:
    """``knn``: the kNN vote (needs labels). ``head``: the checkpoint's class proxies. ``auto``: the
    head when the index has one and it is at least as accurate on the labelled images of its
    classes as the kNN vote is leave-one-out (or when there are no labels); else kNN."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use knn, head or auto")
    head = None
    if method in ("head", "auto"):
        head, why = head_classes_of(store)
        if head is None and method == "head":
            raise InputError(why)
        if head is None:
            log.info("method auto: kNN (%s)", why)
    if head is not None:
        by_head = fit_head_classifier(store, head)
        if method == "head":
            return by_head
        try:
            data = load_labelled(store)
        except InputError:
            return by_head  # no labels to vote: the head needs none
        knn = fit_classifier(store, data, _check_k(k, data), transform, temperature)
        if by_head.info.fitted_on and (by_head.info.loo_accuracy or 0.0) >= knn.info.loo_accuracy:
            return by_head
        return knn
    data = load_labelled(store)
    return fit_classifier(store, data, _check_k(k, data), transform, temperature)


# -- classify -----------------------------------------------------------------------------------
@dataclass
class Prediction:
    """One image's predicted label (None: abstained, confidence below the threshold)."""

    path: str
    label: str | None
    confidence: float
    best: str  # the top class of the vote, even when abstaining
    vote_share: float  # its raw share of the vote, before calibration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClassifyResult:
    """Predictions for the unlabelled images of an index (or for IMAGE files), as compact arrays.

    ``predictions()`` yields them with their paths, a chunk at a time (an index of a million images
    is never held as a million Python objects).
    """

    index: str
    method: str
    k: int
    min_confidence: float
    classes: list[str]
    calibration: CalibrationInfo
    ids: np.ndarray  # row ids (-1 for IMAGE files outside the index)
    best: np.ndarray  # class index of the top vote
    vote_share: np.ndarray
    confidence: np.ndarray
    paths: list[str] | None = None  # for IMAGE arguments; None: look the ids up in the index
    written: int = 0
    seconds: float = 0.0

    @property
    def classified(self) -> int:
        return int((self.confidence >= self.min_confidence).sum())

    @property
    def abstained(self) -> int:
        return len(self.ids) - self.classified

    def predictions(self, chunk: int = SEARCH_CHUNK) -> Iterator[Prediction]:
        store = None if self.paths is not None else IndexStore.open(self.index)
        try:
            for start in range(0, len(self.ids), chunk):
                part = slice(start, start + chunk)
                if self.paths is not None:
                    names = self.paths[part]
                else:
                    assert store is not None
                    rows = store.catalog.rows_by_ids(self.ids[part].tolist())
                    names = [rows[int(i)].path if int(i) in rows else f"(id {int(i)}, gone)" for i in self.ids[part]]
                for name, b, share, conf in zip(names, self.best[part], self.vote_share[part], self.confidence[part]):
                    best = self.classes[int(b)]
                    yield Prediction(
                        name, best if conf >= self.min_confidence else None, round(float(conf), 4), best, round(float(share), 4)
                    )
        finally:
            if store is not None:
                store.close()

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.best[self.confidence >= self.min_confidence], minlength=len(self.classes))
        return {
            "index": self.index,
            "method": self.method,
            "k": self.k,
            "min_confidence": self.min_confidence,
            "images": len(self.ids),
            "classified": self.classified,
            "abstained": self.abstained,
            "written": self.written,
            "by_class": {c: int(n) for c, n in zip(self.classes, counts) if n},
            "calibration": {
                "transform": self.calibration.transform,
                "temperature": self.calibration.temperature,
                "loo_accuracy": self.calibration.loo_accuracy,
                "ece": self.calibration.ece,
                "labelled": self.calibration.labelled,
                "fitted_on": self.calibration.fitted_on,
                "calibrated_on": self.calibration.calibrated_on,
                "fitted_at": self.calibration.fitted_at,
            },
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return dict(self.summary(), predictions=[asdict(p) for p in self.predictions()])


def _classify_vectors(
    classifier: KnnClassifier | HeadClassifier, vectors: np.ndarray, own: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top class, raw share, calibrated confidence) per vector; ``own``: labelled positions to leave out."""
    shares = classifier.shares(vectors, own)
    best = shares.argmax(axis=1)
    raw = shares[np.arange(len(best)), best]
    return best.astype(np.int32), raw.astype(np.float32), classifier.info.calibration(raw).astype(np.float32)


def classify_index(
    index_dir: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]] = (),
    k: int | None = None,
    min_confidence: float = 0.0,
    method: str = "auto",
    write: bool = False,
    device: str = "auto",
    transform: str = "auto",
    temperature: float | None = None,
) -> ClassifyResult:
    """Predict a label for every unlabelled indexed image, or for each of ``images`` (which need not be indexed).

    Predictions with a calibrated confidence below ``min_confidence`` abstain. ``write`` replaces the
    index's predicted labels with the confident predictions (given labels are never touched).
    ``k``, ``transform`` and ``temperature``: None / auto are chosen by leave-one-out on the labels.
    """
    t0 = time.perf_counter()
    if not 0.0 <= min_confidence <= 1.0:
        raise InputError("--min-confidence must be between 0 and 1")
    if write and images:
        raise InputError("--write stores predictions for indexed images; give no IMAGE with it")
    with IndexStore.open(index_dir) as store:
        store.require_stored_vectors()  # the vote reads stored vectors; FAISS is not loaded
        classifier = _choose_classifier(store, method, k, transform, temperature)
        info = classifier.info
        classes = classifier.classes
        paths: list[str] | None = None
        if images:
            paths = [str(p) for p in images]
            ids, vectors = _embed_images(store, paths, device)
            # an indexed, labelled IMAGE is classified by its neighbours, not by its own label
            position = {int(i): n for n, i in enumerate(classifier.labelled_ids)}
            own = np.array([position.get(int(i), -1) for i in ids], dtype=np.int64)
            best, raw, conf = _classify_vectors(classifier, vectors, own)
        else:
            labelled = classifier.labelled_ids
            parts: list[tuple[np.ndarray, ...]] = []
            for chunk_ids, vectors in store.iter_vectors(chunk=SEARCH_CHUNK):
                keep = ~np.isin(chunk_ids, labelled, assume_unique=True)
                if keep.any():
                    parts.append((chunk_ids[keep],) + _classify_vectors(classifier, vectors[keep]))
            empty = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32))
            ids, best, raw, conf = (np.concatenate(c) for c in zip(*parts)) if parts else empty
        result = ClassifyResult(
            str(store.path), info.method, info.k, min_confidence, classes, info, ids, best, raw, conf, paths
        )
        if write:
            confident = conf >= min_confidence
            chosen = {int(i): classes[int(b)] for i, b in zip(ids[confident], best[confident])}
            store.write_predictions(chosen, {int(i): round(float(c), 6) for i, c in zip(ids[confident], conf[confident])})
            result.written = len(chosen)
    result.seconds = time.perf_counter() - t0
    return result


def _embed_images(store: IndexStore, paths: list[str], device: str) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, vectors) of IMAGE files: the stored vector of an indexed file (id), else the file
    embedded with the index's own model (id -1; only then is torch imported)."""
    from .images import DEFAULT_MAX_PIXELS, decode_image, read_bytes
    from .search import load_index_model

    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"image not found: {p}")
    ids = np.full(len(paths), -1, np.int64)
    known = store.catalog.ids_by_paths(os.path.abspath(p) for p in paths)
    vectors = np.zeros((len(paths), int(store.meta["dim"])), np.float32)
    todo = []
    for n, p in enumerate(paths):
        row_id = known.get(os.path.abspath(p))
        found, vec = store.vectors_of([row_id]) if row_id is not None else ([], None)
        if len(found):
            ids[n], vectors[n] = row_id, vec[0]
        else:
            todo.append(n)
    if todo:
        embedder = load_index_model(store, device=device)
        draft = int(store.meta["preprocessing"]["resize_size"])
        for start in range(0, len(todo), 64):
            part = todo[start : start + 64]
            decoded = [decode_image(read_bytes(paths[n]), paths[n], max_pixels=DEFAULT_MAX_PIXELS, draft_size=draft) for n in part]
            vectors[part] = embedder.embed_images(decoded)
    return ids, vectors


# -- suspects -----------------------------------------------------------------------------------
@dataclass
class Suspect:
    """A labelled image whose neighbours vote for another label."""

    rank: int
    path: str
    label: str
    suggested: str
    label_share: float  # the share of the vote its own label gets (low: strong disagreement)
    confidence: float  # calibrated confidence of the suggested label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_suspects(
    index_dir: str | os.PathLike[str],
    k: int | None = None,
    limit: int | None = None,
    transform: str = "auto",
    temperature: float | None = None,
) -> list[Suspect]:
    """Labelled images whose neighbours disagree with their label, most doubtful first."""
    with IndexStore.open(index_dir) as store:
        store.require_stored_vectors()  # the vote reads stored vectors; FAISS is not loaded
        data = load_labelled(store)
        classifier = fit_classifier(store, data, _check_k(k, data), transform, temperature)
        shares = classifier.leave_one_out_shares(np.arange(len(data.ids)))
        own = shares[np.arange(len(data.ids)), data.y]
        top = shares.argmax(axis=1)
        doubtful = np.flatnonzero(top != data.y)
        order = doubtful[np.lexsort((-shares[doubtful, top[doubtful]], own[doubtful]))]
        if limit is not None:
            order = order[:limit]
        rows = store.catalog.rows_by_ids(data.ids[order].tolist())
        conf = classifier.info.calibration(shares[order, top[order]])
        return [
            Suspect(
                r + 1, rows[int(data.ids[p])].path, data.classes[data.y[p]], data.classes[top[p]],
                round(float(own[p]), 4), round(float(c), 4),
            )
            for r, (p, c) in enumerate(zip(order, conf))
        ]


# -- evaluation ---------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """Leave-one-out quality of the kNN classifier on the index's labels."""

    labelled: int
    classes: int
    k: int
    accuracy_at_k: dict[int, float]
    curve: list[dict[str, Any]] = field(default_factory=list)
    accuracy_at_90_coverage: float = 0.0
    ece: float = 0.0
    transform: str = "cosine"
    temperature: float = TEMPERATURE
    selection: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    evaluated: int = 0  # labelled images scored (leave-one-out): all, or those a trained model never saw
    evaluated_on: str = "labelled images"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_labels(
    index_dir: str | os.PathLike[str],
    k: int | None = None,
    seed: int = 0,
    transform: str = "auto",
    temperature: float | None = None,
) -> EvalReport:
    """Leave-one-out accuracy for k in 1, 5, 10, 20 (with the classifier's transform and temperature);
    accuracy/coverage and cross-fitted ECE at the classifier's ``k``; on the labelled images a trained
    model never saw, when there are enough (see :meth:`LabelledData.calibration_positions`)."""
    t0 = time.perf_counter()
    with IndexStore.open(index_dir) as store:
        store.require_stored_vectors()  # the vote reads stored vectors; FAISS is not loaded
        data = load_labelled(store)
        classifier = fit_classifier(store, data, _check_k(k, data), transform, temperature, seed)
    info = classifier.info
    k = info.k
    ks = sorted({min(j, len(data.ids) - 1) for j in EVAL_KS} | {k})
    deepest = max(ks)
    n_classes = len(data.classes)
    correct_at = {j: 0 for j in ks}
    raw_k, correct_k = [], []
    positions, evaluated_on = data.calibration_positions()
    for start in range(0, len(positions), SEARCH_CHUNK):
        part = positions[start : start + SEARCH_CHUNK]
        sims, labels = classifier.neighbours.search_leave_one_out(part, deepest)
        for j in ks:
            shares = vote_shares(sims[:, :j], labels[:, :j], n_classes, info.temperature)
            hit = shares.argmax(axis=1) == data.y[part]
            correct_at[j] += int(hit.sum())
            if j == k:
                raw_k.append(shares.max(axis=1))
                correct_k.append(hit)
    raw, correct = np.concatenate(raw_k), np.concatenate(correct_k)
    conf = cross_fitted_confidence(raw, correct, seed=seed)
    n = len(positions)
    return EvalReport(
        labelled=len(data.ids),
        classes=n_classes,
        k=k,
        accuracy_at_k={j: round(correct_at[j] / n, 6) for j in ks},
        curve=[{kk: (round(v, 6) if isinstance(v, float) else v) for kk, v in row.items()} for row in accuracy_coverage(conf, correct)],
        accuracy_at_90_coverage=round(accuracy_at_coverage(conf, correct, 0.9), 6),
        ece=round(expected_calibration_error(conf, correct), 6),
        transform=info.transform,
        temperature=info.temperature,
        selection=info.selection,
        seconds=time.perf_counter() - t0,
        evaluated=n,
        evaluated_on=evaluated_on,
    )

"""Retrieval metrics against values computed by hand on tiny fixed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simsearch.errors import InputError
from simsearch.evaluate import kmeans_nmi, nmi_score, retrieval_metrics


def circle(*degrees: float) -> np.ndarray:
    """Unit vectors at the given angles: cosine similarity falls with angular distance."""
    r = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_leave_one_out_recall_and_map_at_r_by_hand():
    # angles 0, 15, 40, 50, 180; classes A B A B A. Neighbour orders (nearest first):
    #   x0: x1 x2 x3 x4   x1: x0 x2 x3 x4   x2: x3 x1 x0 x4   x3: x2 x1 x0 x4   x4: x3 x2 x1 x0
    x = circle(0, 15, 40, 50, 180)
    labels = ["A", "B", "A", "B", "A"]
    m = retrieval_metrics(x, labels, nmi=False)
    assert m.recall[1] == 0.0  # every nearest neighbour is of the other class
    assert m.recall[2] == pytest.approx(3 / 5)  # x0 (x2), x3 (x1), x4 (x2)
    assert m.recall[4] == 1.0 and m.recall[8] == 1.0
    # MAP@R: x0 R=2 top2 (B, A) -> (1/2)/2; x1 R=1 top1 A -> 0; x2 R=2 (B, B) -> 0; x3 R=1 -> 0;
    # x4 R=2 (B, A) -> (1/2)/2. Mean over 5 queries = 0.5 / 5.
    assert m.map_at_r == pytest.approx(0.1)
    assert (m.n_queries, m.n_gallery, m.n_classes, m.skipped_queries) == (5, 5, 2, 0)


def test_gallery_mode_by_hand():
    gallery = circle(10, 20, 30, 40, 50)
    g_labels = ["A", "B", "A", "A", "B"]
    queries = circle(0, 45)
    q_labels = ["A", "B"]
    m = retrieval_metrics(queries, q_labels, gallery, g_labels, nmi=False)
    # query A at 0 deg: order A B A A B, R=3 -> rel 1 0 1 -> (1 + 2/3) / 3
    # query B at 45 deg: order 40(A) 50(B) 30(A) 20(B) 10(A), R=2 -> rel 0 1 -> (1/2) / 2
    assert m.recall[1] == pytest.approx(0.5)
    assert m.recall[2] == 1.0
    assert m.map_at_r == pytest.approx(((1 + 2 / 3) / 3 + 0.25) / 2)
    assert m.n_gallery == 5


def test_gallery_items_of_the_same_file_are_not_neighbours():
    gallery = circle(0, 20, 60)
    queries = circle(0)
    # without ids, the query finds itself (same vector, class A) first
    assert retrieval_metrics(queries, ["A"], gallery, ["A", "B", "A"], nmi=False).recall[1] == 1.0
    # with ids, the copy of itself is excluded: nearest is B at 20 deg, then A at 60 deg; R = 1
    m = retrieval_metrics(
        queries, ["A"], gallery, ["A", "B", "A"], query_ids=["q.jpg"], gallery_ids=["q.jpg", "b.jpg", "a.jpg"], nmi=False
    )
    assert m.recall[1] == 0.0 and m.recall[2] == 1.0
    assert m.map_at_r == 0.0


def test_queries_without_a_positive_are_skipped_not_counted_as_misses():
    x = circle(0, 5, 90)
    m = retrieval_metrics(x, ["A", "A", "B"], nmi=False)
    assert m.skipped_queries == 1
    assert m.recall[1] == 1.0 and m.map_at_r == 1.0


def test_ties_are_broken_by_gallery_order_deterministically():
    x = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=np.float32)
    # query 0 sees three items tied at similarity 0: the first (label B) comes first
    m = retrieval_metrics(x[:1], ["A"], x[1:], ["B", "A", "A"], nmi=False)
    assert m.recall[1] == 0.0 and m.recall[2] == 1.0


def test_no_positive_anywhere_is_an_error():
    with pytest.raises(InputError):
        retrieval_metrics(circle(0, 90), ["A", "B"], nmi=False)


def test_nmi_by_hand():
    assert nmi_score([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert nmi_score([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # true 000111, predicted 001122: MI = (2/3) ln 2, H(true) = ln 2, H(pred) = ln 3
    expected = (2 / 3) * math.log(2) / ((math.log(2) + math.log(3)) / 2)
    assert nmi_score([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(expected)


def test_nmi_matches_scikit_learn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 200), rng.integers(0, 7, 200)
    assert nmi_score(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b))


def test_kmeans_nmi_on_separated_clusters_is_one():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:4] * 10
    x = np.concatenate([c + rng.normal(0, 0.1, (20, 8)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), 20)
    assert kmeans_nmi(x, labels) == pytest.approx(1.0)
    m = retrieval_metrics(x, labels)
    assert m.nmi == pytest.approx(1.0) and m.recall[1] == 1.0 and m.map_at_r == 1.0


def test_matches_brute_force_on_random_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 6, 120)
    m = retrieval_metrics(x, labels, nmi=False, chunk=17)  # several chunks
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    r1 = np.mean(labels[order[:, 0]] == labels)
    r4 = np.mean([(labels[order[i, :4]] == labels[i]).any() for i in range(120)])
    aps = []
    for i in range(120):
        r = int((labels == labels[i]).sum()) - 1
        rel = labels[order[i, :r]] == labels[i]
        aps.append(np.sum(np.cumsum(rel) / np.arange(1, r + 1) * rel) / r)
    assert m.recall[1] == pytest.approx(r1)
    assert m.recall[4] == pytest.approx(r4)
    assert m.map_at_r == pytest.approx(np.mean(aps))

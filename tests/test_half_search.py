"""The exact float16 search of a flat index (FBGEMM via torch), checked against numpy brute force and FAISS."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import unit_vectors

from simsearch.embed import half_search
from simsearch.embed.half_search import (
    MAX_CANDIDATES,
    HalfPackedIndex,
    half_gemm_unavailable,
)
from simsearch.store import VectorIndex

pytestmark = pytest.mark.skipif(half_gemm_unavailable() is not None, reason=str(half_gemm_unavailable()))

DIM = 64


def _index(x: np.ndarray, ids: np.ndarray | None = None, factory: str = "IDMap2,Flat") -> VectorIndex:
    index = VectorIndex(x.shape[1], factory)
    index.train(x)
    index.add(np.arange(len(x)) if ids is None else ids, x)
    return index


def _brute_force(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def _assert_same_neighbours(got: np.ndarray, want: np.ndarray, ids: np.ndarray, x: np.ndarray, q: np.ndarray) -> None:
    """Row by row the same ids, except that two whose true scores differ by less than float32 can
    tell apart may come in either order (as in FAISS's own tests, which allow such draws)."""
    true = dict(zip(ids.tolist(), range(len(ids))))
    for row in range(len(got)):
        for a, b in zip(got[row], want[row]):
            if a != b:
                sa, sb = (float(q[row].astype(np.float64) @ x[true[int(i)]].astype(np.float64)) for i in (a, b))
                assert abs(sa - sb) < 1e-6, (row, a, b, sa, sb)


@pytest.fixture
def removed():
    """2,000 vectors under sparse ids, a seventh removed again (FAISS's storage order then differs
    from the order they were added in): (index, ids, vectors) of what is left."""
    x = unit_vectors(2000, seed=3, dim=DIM)
    ids = np.random.default_rng(4).permutation(50_000)[:2000].astype(np.int64)
    index = _index(x, ids)
    index.remove(ids[::7])
    keep = np.ones(len(ids), bool)
    keep[::7] = False
    return index, ids[keep], x[keep]


@pytest.mark.parametrize("k", [1, 10, 100, 1714, 5000])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_search_equals_brute_force(removed, k, m) -> None:
    index, ids, x = removed
    packed = HalfPackedIndex(index)
    q = np.concatenate([x[:m - 1], unit_vectors(1, seed=9, dim=DIM)]) * 1.5  # stored vectors and another; norm 1.5
    scores, got = packed.search(q, k)
    want_scores, want = _brute_force(ids, x, q, min(k, len(ids)))
    assert scores.shape == got.shape == (m, min(k, len(ids)))
    _assert_same_neighbours(got, want, ids, x, q)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    assert scores.dtype == np.float32 and got.dtype == np.int64
    faiss_scores, faiss_ids = index.search(q, k)
    _assert_same_neighbours(got, faiss_ids, ids, x, q)
    np.testing.assert_allclose(scores, faiss_scores, rtol=0, atol=1e-5)
    assert packed.fallbacks == 0


def test_a_batch_over_max_queries_is_faiss_s_to_search(removed, monkeypatch) -> None:
    index, _, x = removed
    packed = HalfPackedIndex(index)
    monkeypatch.setattr(HalfPackedIndex, "_half_scores", lambda self, q: pytest.fail("not for a big batch"))
    q = x[: half_search.MAX_QUERIES + 1]
    scores, got = packed.search(q, 5)
    want_scores, want = index.search(q, 5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(scores, want_scores)


def test_score_error_stays_within_the_bound(removed) -> None:
    """What the proof of exactness rests on: every float16 score is within ``bound * |q|`` of the
    true one, for stored vectors and random directions of any norm."""
    index, _, x = removed
    packed = HalfPackedIndex(index)
    assert 0 < packed.bound < 1e-3
    q = np.concatenate([x[:50], 3.0 * unit_vectors(50, seed=11, dim=DIM)])
    approx = packed._half_scores(q).numpy().astype(np.float64)
    stored = np.asarray(index.stored()[1], dtype=np.float64)
    exact = q.astype(np.float64) @ stored.T
    worst = np.abs(approx - exact).max(axis=1) / np.linalg.norm(q, axis=1)
    assert worst.max() <= packed.bound
    assert worst.max() > packed.bound / 100  # float16 does round: the bound is not vacuous


def test_copies_of_one_vector_widen_the_candidates_then_go_to_faiss() -> None:
    """Equal scores cannot be told apart in float16: the search takes more candidates until the
    bound proves the top k (copies come in storage order, as FAISS's scan keeps them), and past
    MAX_CANDIDATES hands the query to FAISS."""
    rng = np.random.default_rng(5)
    x = unit_vectors(3000, seed=6, dim=DIM)
    copies = rng.choice(3000, 150, replace=False)
    x[copies] = x[copies[0]]
    index = _index(x)
    packed = HalfPackedIndex(index)
    scores, got = packed.search(x[copies[:1]], 10)
    np.testing.assert_array_equal(got[0], np.sort(copies)[:10])
    np.testing.assert_allclose(scores[0], 1.0, atol=1e-6)
    assert packed.fallbacks == 0

    many = np.repeat(unit_vectors(1, seed=7, dim=DIM), MAX_CANDIDATES + 100, axis=0)
    index = _index(np.concatenate([many, unit_vectors(500, seed=8, dim=DIM)]))
    packed = HalfPackedIndex(index)
    scores, got = packed.search(many[:1], 5)
    assert packed.fallbacks == 1
    faiss_scores, faiss_ids = index.search(many[:1], 5)
    np.testing.assert_array_equal(got, faiss_ids)
    np.testing.assert_array_equal(scores, faiss_scores)


def test_calibration_measures_how_often_the_first_candidates_suffice() -> None:
    """Spread-out vectors are proven at once; vectors crowded within the bound of each other (all
    near one direction) are not, which tells a caller that FAISS is the faster search for them."""
    spread = HalfPackedIndex(_index(unit_vectors(3000, seed=12, dim=DIM)))
    assert spread.proven_at_once == 1.0 and spread.widened == spread.fallbacks == 0
    base = unit_vectors(1, seed=13, dim=DIM)
    crowded = base + 2e-4 * unit_vectors(3000, seed=14, dim=DIM)
    crowded /= np.linalg.norm(crowded, axis=1, keepdims=True)
    packed = HalfPackedIndex(_index(crowded))
    assert packed.proven_at_once < half_search.MIN_PROVEN_AT_ONCE
    assert packed.widened == packed.fallbacks == 0  # counted afresh after calibrating
    ids = np.arange(3000)
    _, got = packed.search(crowded[:4], 10)  # still exact, through more candidates or FAISS
    _assert_same_neighbours(got, _brute_force(ids, crowded, crowded[:4], 10)[1], ids, crowded, crowded[:4])
    assert packed.widened == 4


def test_a_gemm_outside_the_bound_is_refused(removed, monkeypatch) -> None:
    index, _, _ = removed
    real = HalfPackedIndex._half_scores
    monkeypatch.setattr(HalfPackedIndex, "_half_scores", lambda self, q: real(self, q) + 1e-3)
    with pytest.raises(RuntimeError, match="more than the bound"):
        HalfPackedIndex(index)


def test_only_a_flat_layout_is_packed() -> None:
    x = unit_vectors(400, seed=2, dim=DIM)
    with pytest.raises(ValueError, match="not stored as is"):
        HalfPackedIndex(_index(x, factory="IDMap2,IVF4,Flat"))


def test_an_empty_index_answers_as_faiss() -> None:
    index = VectorIndex(DIM)
    packed = HalfPackedIndex(index)
    assert len(packed) == 0 and packed.nbytes == 0
    scores, ids = packed.search(unit_vectors(2, seed=1, dim=DIM), 3)
    faiss_scores, faiss_ids = index.search(unit_vectors(2, seed=1, dim=DIM), 3)
    np.testing.assert_array_equal(ids, faiss_ids)
    np.testing.assert_array_equal(scores, faiss_scores)


def test_no_fbgemm_says_why(monkeypatch) -> None:
    monkeypatch.setattr(half_search, "_quantized_engines", lambda: ["qnnpack"])
    assert "FBGEMM" in half_search.half_gemm_unavailable()
    with pytest.raises(RuntimeError, match="FBGEMM"):
        HalfPackedIndex(VectorIndex(DIM))


def test_stored_view_is_faiss_storage_without_a_copy(removed) -> None:
    index, _, _ = removed
    ids, view = index.stored_view()
    want_ids, want = index.stored()
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(view, want)
    assert not view.flags.writeable and not view.flags.owndata
    with pytest.raises(ValueError, match="not stored as is"):
        _index(unit_vectors(400, seed=2, dim=DIM), factory="IDMap2,IVF4,Flat").stored_view()

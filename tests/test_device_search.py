"""Exact search with the vectors on a torch device (the GPU query path), run on the CPU against numpy and FAISS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import simsearch.search as search_mod
from conftest import DIM, make_collection, make_image, run_index, unit_vectors
from simsearch.store import VectorIndex
from simsearch.embed.device_search import DeviceExactIndex, open_search
from simsearch.errors import InputError
from simsearch.search import Searcher

CPU = torch.device("cpu")


@pytest.fixture
def ann(populated) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    index, ids, x = populated
    gone = ids[::7]  # removals reorder the storage: the copy must follow FAISS's, not the insertion order
    index.remove(gone)
    keep = ~np.isin(ids, gone)
    return index, ids[keep], x[keep]


def test_stored_returns_what_faiss_holds(ann) -> None:
    index, ids, x = ann
    got_ids, got_x = index.stored()
    order = np.argsort(got_ids)
    ref = np.argsort(ids)
    np.testing.assert_array_equal(got_ids[order], ids[ref])
    np.testing.assert_array_equal(got_x[order], x[ref])


@pytest.mark.parametrize("k", [1, 10, 300])
def test_device_search_equals_numpy_brute_force(ann, k) -> None:
    index, ids, x = ann
    q = unit_vectors(37, seed=2)
    scores, got = DeviceExactIndex.from_index(index, CPU).search(q, k)
    kk = min(k, len(ids))
    assert scores.shape == got.shape == (37, kk)
    full = q @ x.T
    for row in range(len(q)):
        order = np.argsort(-full[row], kind="stable")[:kk]
        np.testing.assert_allclose(scores[row], full[row, order], atol=1e-5)
        np.testing.assert_array_equal(got[row], ids[order])  # random vectors: no ties


def test_device_search_matches_faiss(ann) -> None:
    index, _, _ = ann
    q = unit_vectors(64, seed=3)
    s_faiss, i_faiss = index.search(q, 8)
    s_dev, i_dev = DeviceExactIndex.from_index(index, CPU).search(q, 8)
    np.testing.assert_allclose(s_dev, s_faiss, atol=1e-5)
    assert (i_dev == i_faiss).mean() > 0.99  # ties aside


def test_empty_index_searches_like_faiss() -> None:
    index = VectorIndex(DIM)
    dev = DeviceExactIndex.from_index(index, CPU)
    q = unit_vectors(2, seed=4)
    for got, want in zip(dev.search(q, 5), index.search(q, 5)):
        np.testing.assert_array_equal(got, want)
    assert len(dev) == 0


def test_open_search_picks_the_backend(ann) -> None:
    index, _, _ = ann
    assert open_search(index, CPU, "auto") is index  # no GPU: FAISS on the CPU
    assert open_search(index, CPU, "faiss") is index
    assert isinstance(open_search(index, CPU, "torch"), DeviceExactIndex)
    with pytest.raises(InputError, match="unknown search backend"):
        open_search(index, CPU, "gpu")
    hnsw = VectorIndex(DIM, "IDMap2,HNSW16")
    hnsw.add(np.arange(20), unit_vectors(20, seed=5))
    assert not hnsw.is_exact and index.is_exact
    with pytest.raises(InputError, match="flat index"):
        open_search(hnsw, CPU, "torch")


def test_searcher_gives_the_same_results_on_either_backend(tmp_path: Path, monkeypatch) -> None:
    paths = make_collection(tmp_path / "photos", n=9)
    outside = make_image(tmp_path / "q" / "probe.png", color=(240, 200, 10), shape="triangle", seed=123)
    run_index(tmp_path / "photos", tmp_path / "idx")
    queries = [outside, paths[2], paths[5], outside, paths[0]]

    def run(search: str) -> list[dict]:
        with Searcher(tmp_path / "idx", device="cpu", search=search) as s:
            return [r.to_dict() for r in s.query(queries, k=4)]

    faiss_results = run("faiss")
    torch_results = run("torch")
    assert [r["query"] for r in torch_results] == [str(q) for q in queries]
    for a, b in zip(faiss_results, torch_results):
        assert [h["path"] for h in a["results"]] == [h["path"] for h in b["results"]]
        np.testing.assert_allclose([h["score"] for h in a["results"]], [h["score"] for h in b["results"]], atol=1e-5)
    assert str(paths[2]) not in [h["path"] for h in torch_results[1]["results"]]  # self still left out
    # queries go through in chunks: the same answers with a chunk of 2
    monkeypatch.setattr(search_mod, "QUERY_CHUNK", 2)
    assert run("torch") == torch_results

"""Approximate layouts (simsearch.store.layouts): every layout against brute force on seeded clustered
vectors, deletes and moves under each, the automatic switch as an index grows, a kill -9 during a
layout rebuild, and vectors imported from elsewhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from simsearch.errors import IndexMismatchError, InputError
from simsearch.store import IndexStore
from simsearch.store import layouts
from simsearch.store.exact import ExactSearch, exact_search_chunks
from simsearch.store.layouts import AnnRequest, LayoutSearch, choose_layout, maintain_layout, open_layout_search, recall_at
from simsearch.store.vector_index import VectorIndex
from simsearch.store.tombstones import tombstone_count

DIM = 32
IDENTITY = {"model": "synthetic", "weights": "synthetic-v1", "dim": DIM, "preprocessing": {"crop_size": 1}}
LAYOUTS = ["flat", "hnsw", "ivf", "ivfpq", "IVF8,SQ8"]


def clustered(n: int, seed: int, dim: int = DIM, clusters: int = 40) -> np.ndarray:
    """Unit vectors in Gaussian clusters of very different sizes (like real embeddings, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = rng.pareto(1.2, clusters) + 0.05
    which = rng.choice(clusters, size=n, p=weights / weights.sum())
    x = centers[which] + rng.standard_normal((n, dim)).astype(np.float32) * 0.45
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def records(n: int, start: int = 0) -> list[dict]:
    return [{"path": f"/synthetic/img{i:06d}.jpg", "size": 1000 + i, "mtime_ns": i} for i in range(start, start + n)]


def make_store(path: Path, n: int, seed: int = 0) -> tuple[IndexStore, np.ndarray]:
    store = IndexStore.open(path, create=True)
    store.lock_for_writing()
    x = clustered(n, seed)
    store.import_vectors(records(n), x, IDENTITY)
    store.save()
    return store, x


def brute(store: IndexStore, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact neighbours straight from numpy over every stored vector."""
    ids, vectors = store.all_vectors()
    scores = queries @ vectors.T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def near(x: np.ndarray, seed: int, every: int = 30) -> np.ndarray:
    """New points near stored ones (queries from the same distribution, not stored vectors)."""
    q = x[::every] + 0.15 * np.random.default_rng(seed).standard_normal((len(x[::every]), x.shape[1])).astype(np.float32) / np.sqrt(x.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_against_brute_force(tmp_path, layout):
    store, _ = make_store(tmp_path / "idx", 3000)
    try:
        info = maintain_layout(store, AnnRequest(layout, recall=0.95), force=True)
        assert info is not None and store.meta["ann_layout"]["factory"] == info["factory"]
        if layout != "flat":
            assert store.meta["faiss_factory"] != "IDMap2,Flat"
        assert info["recall_at_10"] >= 0.95  # measured on the index's own vectors at the tuned setting
        q = near(clustered(3000, seed=0), seed=5)
        truth = brute(store, q, 10)
        reopened = IndexStore.open(tmp_path / "idx")
        try:
            scores, found = open_layout_search(reopened).search(q, 10)
            assert recall_at(found, truth) >= 0.9, layout
            assert (found >= 0).all()
            assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
            exact_scores, exact_ids = ExactSearch(reopened, chunk=700).search(q, 10)
            assert (exact_ids == truth).all()  # --exact is exact whatever the layout
        finally:
            reopened.close()
    finally:
        store.close()


def test_exact_chunks_match_numpy_including_padding():
    x = clustered(50, seed=3)
    ids = np.arange(100, 150)
    chunks = [(ids[i : i + 7], x[i : i + 7]) for i in range(0, 50, 7)]
    q = clustered(5, seed=4)
    scores, found = exact_search_chunks(chunks, q, 60)
    order = np.argsort(-(q @ x.T), axis=1, kind="stable")
    assert (found[:, :50] == ids[order]).all()
    assert (found[:, 50:] == -1).all()


@pytest.mark.parametrize("layout", ["flat", "hnsw", "ivf", "ivfpq"])
def test_deletes_moves_and_updates_under_each_layout(tmp_path, layout):
    store, x = make_store(tmp_path / "idx", 2000)
    try:
        maintain_layout(store, AnnRequest(layout), force=True)
        rows = store.catalog.rows()
        removed = rows[:150]
        moved = rows[150:160]
        store.apply_changes(
            moves=[(r.id, {"path": r.path + ".moved", "size": r.size, "mtime_ns": r.mtime_ns}) for r in moved],
            removals=removed,
        )
        updated = rows[200:220]  # same row, new vector (a changed file)
        new_vectors = clustered(20, seed=7)
        store.commit(
            [{"path": r.path, "size": 1, "mtime_ns": 1, "status": "ok"} for r in updated], new_vectors, updated
        )
        store.save()
        assert store.check().ok
        if layout == "hnsw":
            assert tombstone_count(store.ann.index) == 150 + 20
        search = open_layout_search(store)
        # each updated row is found by its new vector, at rank 1
        _, found = search.search(new_vectors, 5)
        assert [int(f[0]) for f in found] == [r.id for r in updated]
        # removed ids never come back, and k live results always do
        q = near(x, seed=11)
        _, found = search.search(q, 10)
        assert not set(found.ravel().tolist()) & {r.id for r in removed}
        assert (found >= 0).all()
        assert recall_at(found, brute(store, q, 10)) >= 0.9
        # a moved row keeps its vector under its new path
        moved_row = store.catalog.row_by_path(moved[0].path + ".moved")
        _, found = search.search(x[moved[0].id - 1][None], 1)
        assert int(found[0, 0]) == moved_row.id
    finally:
        store.close()


def test_hnsw_is_rebuilt_when_tombstones_pass_the_fraction(tmp_path):
    store, _ = make_store(tmp_path / "idx", 1000)
    try:
        maintain_layout(store, AnnRequest("hnsw"), force=True)
        rows = store.catalog.rows()
        store.apply_changes(removals=rows[:100])
        store.save()
        assert maintain_layout(store) is None  # 10% dead: kept
        store.apply_changes(removals=rows[100:300])
        store.save()
        info = maintain_layout(store)
        assert info is not None and "dead" in info["reason"]
        assert tombstone_count(store.ann.index) == 0 and len(store.ann) == 700
        assert store.check().ok
    finally:
        store.close()


def test_automatic_choice_follows_size_and_budget():
    assert choose_layout(10_000, 512, AnnRequest())[0] == "flat"
    assert choose_layout(100_000, 512, AnnRequest())[0] == "hnsw"
    assert choose_layout(1_000_000, 512, AnnRequest())[0] == "ivfpq"  # a second fp32 copy would not fit 1 GiB
    assert choose_layout(1_000_000, 512, AnnRequest(memory=3 << 30))[0] == "hnsw"
    assert choose_layout(1_000_000, 512, AnnRequest(memory=int(2.1 * (1 << 30))))[0] == "ivf"
    name, factory, _ = choose_layout(1_000_000, 512, AnnRequest())
    assert factory == "IVF1024,PQ128x8"
    assert choose_layout(5, 8, AnnRequest("OPQ4,IVF2,PQ4x2"))[1] == "OPQ4,IVF2,PQ4x2"
    assert choose_layout(5, 8, AnnRequest("HNSW16"))[1] == "IDMap2,HNSW16"
    with pytest.raises(InputError):
        choose_layout(5, 8, AnnRequest("NoSuchLayout9"))
    assert layouts.parse_memory("1.5G") == int(1.5 * (1 << 30)) and layouts.parse_memory("512m") == 512 << 20


def test_layout_switches_automatically_as_the_index_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(layouts, "FLAT_MAX", 1000)
    store, _ = make_store(tmp_path / "idx", 600)
    try:
        assert maintain_layout(store) is None and store.meta["faiss_factory"] == "IDMap2,Flat"
        store.import_vectors(records(900, start=600), clustered(900, seed=1), IDENTITY)
        store.save()
        info = maintain_layout(store)  # 1500 vectors: past the flat threshold, fits the budget
        assert info["layout"] == "hnsw" and store.ann_path.name != "vectors.faiss"
        assert sorted(p.name for p in (tmp_path / "idx").glob("vectors*.faiss")) == [store.ann_path.name]
        store.import_vectors(records(500, start=1500), clustered(500, seed=2), IDENTITY)
        store.save()
        info = maintain_layout(store, AnnRequest(memory=100_000))  # a tight budget: compact codes
        assert info["layout"] == "ivfpq" and store.check().ok
        assert store.meta["ann_request"]["memory"] == 100_000  # recorded for the next runs
        assert len(store.ann) == 2000
    finally:
        store.close()


def test_layout_does_not_flip_back_and_forth_around_a_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(layouts, "FLAT_MAX", 1000)
    store, _ = make_store(tmp_path / "idx", 1100)
    try:
        assert maintain_layout(store)["layout"] == "hnsw"
        rows = store.catalog.rows()
        store.apply_changes(moves=[], removals=rows[:150])  # 950 left: below the threshold, within 20%
        store.save()
        assert maintain_layout(store) is None and store.meta["ann_layout"]["layout"] == "hnsw"
        assert layouts.needs_rebuild(store, AnnRequest(), hysteresis=False)[0]  # without it: a rebuild
        store.apply_changes(moves=[], removals=rows[150:400])  # 700 left: well below, back to exact
        store.save()
        assert maintain_layout(store)["layout"] == "flat" and store.check().ok
        q = clustered(3, seed=5)
        assert (open_layout_search(store).search(q, 5)[1] == brute(store, q, 5)).all()
    finally:
        store.close()


KILL_SCRIPT = """
import sys, time
import simsearch.store.vector_index as vector_index
from simsearch.store import IndexStore
from simsearch.store.layouts import AnnRequest, maintain_layout
real = vector_index.write_atomic
def slow(index, path):
    written = real(index, path)
    open(sys.argv[2], "w").close()   # the new file is written; the meta still names the old one
    time.sleep(60)
    return written
vector_index.write_atomic = slow
store = IndexStore.open(sys.argv[1])
store.lock_for_writing()
maintain_layout(store, AnnRequest("ivf"), force=True)
"""


def test_kill_9_during_a_layout_rebuild_leaves_the_old_layout_working(tmp_path):
    store, x = make_store(tmp_path / "idx", 1500)
    maintain_layout(store, AnnRequest("hnsw"), force=True)
    before = store.meta["ann_layout"]
    old_file = store.ann_path.name
    store.close()
    marker = tmp_path / "written"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "idx"), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list((tmp_path / "idx").glob("vectors*.faiss"))) == 2  # the orphan of the killed run
    with IndexStore.open(tmp_path / "idx") as store:
        assert store.meta["ann_layout"] == before and store.ann_path.name == old_file
        assert store.check().ok
        _, found = open_layout_search(store).search(x[:20], 1)
        assert found[:, 0].tolist() == list(range(1, 21))
        store.lock_for_writing()
        info = maintain_layout(store, AnnRequest("ivf"))
        assert info["layout"] == "ivf" and store.check().ok
        assert [p.name for p in (tmp_path / "idx").glob("vectors*.faiss")] == [store.ann_path.name]


def test_import_checks_identity_dim_and_replaces_by_path(tmp_path):
    store, x = make_store(tmp_path / "idx", 100)
    try:
        with pytest.raises(IndexMismatchError):
            store.import_vectors(records(1), x[:1], dict(IDENTITY, weights="other"))
        with pytest.raises(InputError):
            store.import_vectors(records(1), np.ones((1, DIM + 1), np.float32), IDENTITY)
        with pytest.raises(InputError):
            store.import_vectors(records(1), np.zeros((1, DIM), np.float32), IDENTITY)
        ids = store.import_vectors(records(2, start=99), np.stack([x[0] * 3, x[1]]), IDENTITY)
        store.save()
        assert ids[0] == 100 and store.catalog.counts()["ok"] == 101  # path 99 replaced in place, 100 added
        np.testing.assert_allclose(store.vectors_of([100])[1][0], x[0], atol=1e-3)  # normalised (float16 on disk)
        assert store.check().ok
    finally:
        store.close()


def test_import_normalises_chunk_by_chunk_whatever_the_dtype(tmp_path, monkeypatch):
    import simsearch.store.importing as importing

    monkeypatch.setattr(importing, "IMPORT_CHUNK", 7)  # 50 vectors: 8 chunks, the last one short
    x = clustered(50, seed=3)
    scaled = (x * np.linspace(0.5, 40, 50)[:, None]).astype(np.float16)  # norms far from 1, as float16
    store = IndexStore.open(tmp_path / "idx", create=True)
    try:
        store.lock_for_writing()
        with pytest.raises(InputError, match="zero or not finite"):
            bad = scaled.copy()
            bad[45] = np.inf  # in the last chunk: every chunk's norms are checked before anything is written
            store.import_vectors(records(50), bad, IDENTITY)
        assert store.catalog.counts()["ok"] == 0
        with pytest.raises(InputError, match="not numbers"):
            store.import_vectors(records(1), np.array([["a"] * DIM]), IDENTITY)
        ids = store.import_vectors(records(50), scaled, IDENTITY)
        store.save()
        got_ids, got = store.vectors_of(ids)
        assert got_ids.tolist() == sorted(ids) == ids
        expected = scaled.astype(np.float32) / np.linalg.norm(scaled.astype(np.float32), axis=1, keepdims=True)
        np.testing.assert_allclose(got, expected, atol=1e-3)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-3)
    finally:
        store.close()


def test_the_old_layout_is_not_held_in_memory_while_a_new_one_is_built(tmp_path, monkeypatch):
    store, x = make_store(tmp_path / "idx", 300)
    try:
        store.lock_for_writing()
        assert store.ann is not None and len(store.ann) == 300
        held_while_building = []
        real = layouts.build_layout
        monkeypatch.setattr(layouts, "build_layout", lambda st, *a, **kw: held_while_building.append(st._ann) or real(st, *a, **kw))
        info = maintain_layout(store, AnnRequest("ivf"))
        assert info["layout"] == "ivf" and held_while_building == [None]
        _, found = store.ann.search(x[:5], 1)
        assert found[:, 0].tolist() == [1, 2, 3, 4, 5] and store.check().ok
    finally:
        store.close()


def test_release_ann_only_drops_what_the_saved_file_holds(tmp_path):
    store, x = make_store(tmp_path / "idx", 50)
    try:
        store.lock_for_writing()
        store.import_vectors(records(1, start=50), x[:1] * 2, IDENTITY)  # committed, not saved yet
        assert not store.release_ann() and len(store.ann) == 51
        store.save()
        assert store.release_ann() and store._ann is None
        assert len(store.ann) == 51  # read again from the file on next use
        _, found = store.ann.search(x[:1], 2)
        assert sorted(found[0].tolist()) == [1, 51]
    finally:
        store.close()


def test_kmeans_on_a_sample_assigns_every_vector_to_its_nearest_centroid(tmp_path, monkeypatch):
    import simsearch.cluster as cluster

    store, x = make_store(tmp_path / "idx", 3000)
    store.close()
    monkeypatch.setattr(cluster, "POINTS_PER_CENTROID", 40)  # 40 * 20 = 800 of 3000 points train
    monkeypatch.setattr(cluster, "ASSIGN_CHUNK", 500)
    trained_on = []
    real = cluster.kmeans
    monkeypatch.setattr(cluster, "kmeans", lambda v, *a, **kw: trained_on.append(len(v)) or real(v, *a, **kw))
    result = cluster.cluster_index(tmp_path / "idx", k=20, device="cpu")
    assert trained_on == [800] and result.n == 3000
    with IndexStore.open(tmp_path / "idx") as store:
        centroids = np.stack(
            [np.frombuffer(r[0], np.float32) for r in store.catalog.db.execute("SELECT centroid FROM clusters ORDER BY cluster")]
        )
        members = dict(store.catalog.db.execute("SELECT image_id, cluster FROM cluster_members").fetchall())
    # brute force: every vector's nearest centroid
    nearest = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert [members[i + 1] for i in range(3000)] == nearest.tolist()
    assert sum(c.size for c in result.clusters) == 3000


# -- tuning: held-out queries, the cheapest setting that clears the target ----------------------------


def spread(n: int, seed: int, dim: int = DIM, clusters: int = 40) -> np.ndarray:
    """Like :func:`clustered` with wider clusters (neighbours closer in score: the knob matters)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = rng.pareto(1.2, clusters) + 0.05
    which = rng.choice(clusters, size=n, p=weights / weights.sum())
    x = centers[which] + rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("layout", "target"), [("hnsw", 0.98), ("ivf", 0.95)])
def test_tuned_recall_predicts_the_recall_of_new_queries(tmp_path, layout, target):
    """The recall a layout records is what new images get: the tuning queries were held out of it."""
    x = spread(5000, seed=3)
    stored, new = x[:4000], x[4000:]  # new images: same clusters, never stored
    store = IndexStore.open(tmp_path / "idx", create=True)
    try:
        store.lock_for_writing()
        store.import_vectors(records(4000), stored, IDENTITY)
        store.save()
        info = maintain_layout(store, AnnRequest(layout, recall=target), force=True)
        assert info["tune_queries"] == 400 and len(store.ann) == 4000  # held out, then added
        _, found = open_layout_search(store).search(new, 10)
        recall = recall_at(found, brute(store, new, 10))
        assert recall >= target - 0.005
        assert abs(info["recall_at_10"] - recall) <= 0.01, (info, recall)
        if layout == "hnsw":
            # stored vectors searched for themselves (the tuning before) over-predict: the graph
            # links each stored vector to its neighbours
            params, self_recall, _ = layouts.tune(store.ann, store, target)
            layouts.apply_params(store.ann.index, params)
            _, found = LayoutSearch(store.ann, store, params).search(new, 10)
            assert self_recall - recall_at(found, brute(store, new, 10)) > 0.01
    finally:
        store.close()


def _held_out_index(store: IndexStore, factory: str, held: np.ndarray) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    """A layout of every stored vector but ``held``; and the rest's ids and vectors."""
    ids, vectors = store.all_vectors()
    keep = ~np.isin(ids, held)
    ann = VectorIndex(DIM, factory)
    ann.train(vectors[keep])
    ann.add(ids[keep], vectors[keep])
    return ann, ids[keep], vectors[keep]


def _recall_and_se(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    per_query = np.array([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)])
    return float(per_query.mean()), float(per_query.std(ddof=1) / np.sqrt(len(per_query)))


def _tuned_on_held_out(store: IndexStore, n: int, seed: int, factory: str) -> tuple[Any, ...]:
    """Import ``n`` seeded vectors, tune ``factory`` with every tenth held out; what the checks need:
    (ann, ids, params, recall, se, held-out queries, their exact similarities, numpy's top 10)."""
    store.lock_for_writing()
    store.import_vectors(records(n), spread(n, seed=seed), IDENTITY)
    store.save()
    held = np.arange(1, n + 1, 10)
    ann, ids, vectors = _held_out_index(store, factory, held)
    params, recall, se = layouts.tune(ann, store, 0.95, held=held)
    _, q = store.vectors_of(held)
    exact = q @ vectors.T
    truth = ids[np.argsort(-exact, axis=1, kind="stable")[:, :10]]  # numpy brute force
    return ann, ids, params, recall, se, q, exact, truth


def test_tuning_keeps_the_smallest_nprobe_that_clears_the_target(tmp_path):
    store = IndexStore.open(tmp_path / "idx", create=True)
    try:
        ann, _, params, recall, se, q, _, truth = _tuned_on_held_out(store, 4000, 4, "IVF64,Flat")

        def measured(nprobe: int) -> tuple[float, float]:
            faiss.extract_index_ivf(ann.index).nprobe = nprobe
            return _recall_and_se(ann.index.search(q, 10)[1], truth)

        assert measured(params["nprobe"]) == pytest.approx((recall, se), abs=1e-9)
        assert recall - se >= 0.95
        grid = [v for v in layouts._NPROBE if v < 64]
        assert params["nprobe"] in grid[1:]  # the knob mattered on this data
        below, below_se = measured(grid[grid.index(params["nprobe"]) - 1])
        assert below - below_se < 0.95
    finally:
        store.close()


def test_tuning_a_lossy_layout_keeps_the_cheapest_pair_that_clears_the_target(tmp_path):
    """(nprobe, re-ranking depth): every pair the cost model ranks cheaper falls short, by numpy's count."""
    store = IndexStore.open(tmp_path / "idx", create=True)
    try:
        ann, ids, params, recall, se, q, exact, truth = _tuned_on_held_out(store, 3000, 5, "IVF16,PQ8x4")
        assert recall - se >= 0.95
        row_of = {int(i): r for r, i in enumerate(ids)}
        ivf = faiss.extract_index_ivf(ann.index)

        def cost(nprobe: int, depth: int) -> float:
            return nprobe * len(ann) / ivf.nlist * ivf.code_size + 10 * depth * layouts.RERANK_COST

        def measured(nprobe: int, depth: int) -> tuple[float, float]:
            ivf.nprobe = nprobe
            candidates = ann.index.search(q, 10 * depth)[1]
            found = [
                sorted((c for c in row if c >= 0), key=lambda c, r=r: (-exact[r, row_of[int(c)]], c))[:10]
                for r, row in enumerate(candidates)
            ]
            return _recall_and_se(np.array([f + [-1] * (10 - len(f)) for f in found]), truth)

        chosen = cost(params["nprobe"], params["rerank"])
        cheaper = [(n, d) for n in layouts._NPROBE if n <= 16 for d in layouts._RERANK if cost(n, d) < chosen]
        assert cheaper  # the choice was not trivial
        for n, d in cheaper:
            r, s = measured(n, d)
            assert r - s < 0.95, (n, d, r, s, params)
    finally:
        store.close()

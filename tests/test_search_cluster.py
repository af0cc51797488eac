"""Query results against numpy brute force over the stored vectors; k-means against nearest-centroid."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import fast_options, make_collection, make_image, run_index
from simsearch.cluster import cluster_index, cluster_members, kmeans, load_clusters
from simsearch.errors import EmptyIndexError, ImageError, IndexCorruptError, IndexNotFoundError, InputError
from simsearch.images import decode_image
from simsearch.search import load_index_model, query_images
from simsearch.store import IndexStore

N = 10


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("search")
    paths = make_collection(base / "photos", n=N)
    outside = make_image(base / "queries" / "probe.png", color=(240, 200, 10), shape="triangle", seed=123)
    run_index(base / "photos", base / "idx")
    return base / "idx", paths, outside


def stored(index_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    with IndexStore.open(index_dir) as store:
        ids, vectors = store.all_vectors()
        paths = {r.id: r.path for r in store.catalog.rows()}
    return ids, vectors, paths


def embed_query(index_dir: Path, path: Path) -> np.ndarray:
    """The query vector exactly as query_images makes it."""
    with IndexStore.open(index_dir) as store:
        embedder = load_index_model(store, device="cpu")
        draft = store.meta["preprocessing"]["resize_size"]
        return embedder.embed_images([decode_image(path.read_bytes(), str(path), draft_size=draft)])[0]


def brute(index_dir: Path, query: Path) -> list[tuple[str, float]]:
    ids, vectors, paths = stored(index_dir)
    scores = vectors @ embed_query(index_dir, query)
    order = np.argsort(-scores, kind="stable")
    return [(paths[int(ids[i])], float(scores[i])) for i in order]


def test_query_equals_brute_force_over_stored_vectors(built) -> None:
    index_dir, _, outside = built
    expected = brute(index_dir, outside)
    [result] = query_images([outside], index_dir, k=5, device="cpu")
    assert result.query == str(outside)
    assert [h.rank for h in result.results] == [1, 2, 3, 4, 5]
    got = [(h.path, h.score) for h in result.results]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected[:5]], atol=1e-5)
    score_of = dict(expected)
    for path, score in got:  # each hit's score is its true cosine similarity (tie order aside)
        assert abs(score_of[path] - score) < 1e-5
    assert all(h.width == 160 and h.height == 120 for h in result.results)


def test_k_larger_than_collection(built) -> None:
    index_dir, _, outside = built
    [result] = query_images([outside], index_dir, k=100, device="cpu")
    assert len(result.results) == N
    assert len({h.path for h in result.results}) == N


def test_threshold_filters_results(built) -> None:
    index_dir, _, outside = built
    expected = brute(index_dir, outside)
    threshold = (expected[2][1] + expected[3][1]) / 2  # between the 3rd and 4th best
    [result] = query_images([outside], index_dir, k=10, threshold=threshold, device="cpu")
    assert len(result.results) == 3
    assert all(h.score >= threshold for h in result.results)
    [none] = query_images([outside], index_dir, k=10, threshold=1.0, device="cpu")
    assert none.results == []


def test_indexed_query_excludes_itself_unless_include_self(built) -> None:
    index_dir, paths, _ = built
    target = paths[3]
    [excluded] = query_images([target], index_dir, k=N, device="cpu")
    assert str(target) not in [h.path for h in excluded.results]
    assert len(excluded.results) == N - 1
    [included] = query_images([target], index_dir, k=3, include_self=True, device="cpu")
    assert included.results[0].path == str(target)
    assert included.results[0].score > 0.9999
    assert len(included.results) == 3


def test_byte_identical_copy_outside_index_counts_as_self(built, tmp_path: Path) -> None:
    index_dir, paths, _ = built
    copy = tmp_path / "copy_of_it.jpg"
    shutil.copyfile(paths[4], copy)
    [excluded] = query_images([copy], index_dir, k=N, device="cpu")
    assert str(paths[4]) not in [h.path for h in excluded.results]
    [included] = query_images([copy], index_dir, k=1, include_self=True, device="cpu")
    assert included.results[0].path == str(paths[4]) and included.results[0].score > 0.9999


def test_several_queries_keep_their_order(built) -> None:
    index_dir, paths, outside = built
    results = query_images([outside, paths[0]], index_dir, k=2, device="cpu")
    assert [r.query for r in results] == [str(outside), str(paths[0])]
    assert set(results[1].to_dict()) == {"query", "results"}
    assert set(results[1].to_dict()["results"][0]) == {"rank", "score", "path", "width", "height"}


def test_query_errors(built, tmp_path: Path) -> None:
    index_dir, _, outside = built
    with pytest.raises(InputError, match="not found"):
        query_images([tmp_path / "missing.jpg"], index_dir, device="cpu")
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    with pytest.raises(ImageError, match="junk.jpg"):
        query_images([junk], index_dir, device="cpu")
    with pytest.raises(InputError):
        query_images([outside], index_dir, k=0, device="cpu")
    with pytest.raises(IndexNotFoundError):
        query_images([outside], tmp_path / "no_index", device="cpu")


def test_query_empty_index(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run_index(tmp_path / "empty", tmp_path / "idx")
    probe = make_image(tmp_path / "probe.jpg")
    with pytest.raises(EmptyIndexError, match="no images"):
        query_images([probe], tmp_path / "idx", device="cpu")


def test_query_of_an_out_of_step_index_answers_from_the_file_and_check_names_it(tmp_path: Path) -> None:
    """Queries scan nothing on open (a writer may be running): they answer from the FAISS file as
    it is; ``info --check`` finds the difference and ``--repair`` removes it."""
    from simsearch.indexer import repair_index
    from simsearch.store import index_info

    make_collection(tmp_path / "p", n=2)
    run_index(tmp_path / "p", tmp_path / "idx")
    with IndexStore.open(tmp_path / "idx") as store:
        lost = int(store.ann.ids()[0])
        store.ann.remove([lost])
        store.ann.save(store.ann_path)  # behind the store's back: not the file it recorded
    (result,) = query_images([tmp_path / "p" / "a" / "img000.jpg"], tmp_path / "idx", k=10, include_self=True, device="cpu")
    assert len(result.results) == 1
    info = index_info(tmp_path / "idx", check=True)
    assert info["consistent"] is False and info["check"]["missing_from_faiss"] == 1 and info["check"]["faiss_damaged"]
    repair_index(tmp_path / "idx")
    (result,) = query_images([tmp_path / "p" / "a" / "img000.jpg"], tmp_path / "idx", k=10, include_self=True, device="cpu")
    assert len(result.results) == 2


# -- clustering ---------------------------------------------------------------------------------


def test_kmeans_recovers_separated_groups_and_assigns_nearest_centroid() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(16, dtype=np.float32)[:3]
    x = np.concatenate([c + 0.05 * rng.standard_normal((30, 16)).astype(np.float32) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.repeat(np.arange(3), 30)
    centroids, assign, dist, objective = kmeans(x, 3, niter=20, seed=1)
    d = np.linalg.norm(x[:, None, :] - centroids[None, :, :], axis=2)
    assert assign.tolist() == d.argmin(axis=1).tolist()
    np.testing.assert_allclose(dist, d.min(axis=1), atol=1e-4)
    # the partition matches the truth up to relabelling
    pairs = set(zip(truth.tolist(), assign.tolist()))
    assert len(pairs) == 3 and len({a for _, a in pairs}) == 3
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)  # spherical
    with pytest.raises(InputError, match="at most"):
        kmeans(x[:2], 3)


def _stored_clustering(index_dir: Path):
    conn = sqlite3.connect(str(index_dir / "catalog.db"))
    try:
        clusters = conn.execute("SELECT cluster, size, centroid FROM clusters ORDER BY cluster").fetchall()
        members = conn.execute("SELECT image_id, cluster, distance FROM cluster_members").fetchall()
    finally:
        conn.close()
    centroids = np.stack([np.frombuffer(c[2], np.float32) for c in clusters])
    return [(c[0], c[1]) for c in clusters], centroids, {m[0]: (m[1], m[2]) for m in members}


def test_cluster_index_stores_nearest_centroid_assignments(built) -> None:
    index_dir, _, _ = built
    result = cluster_index(index_dir, k=3, niter=10, seed=7, representatives=2)
    ids, vectors, paths = stored(index_dir)
    sizes, centroids, members = _stored_clustering(index_dir)
    assert sorted(members) == sorted(ids.tolist())
    d = np.linalg.norm(vectors[:, None, :] - centroids[None, :, :], axis=2)
    for row, image_id in enumerate(ids.tolist()):
        cluster, distance = members[image_id]
        assert cluster == int(d[row].argmin())
        assert abs(distance - d[row].min()) < 1e-4
    counts = np.bincount([m[0] for m in members.values()], minlength=3)
    assert [s for _, s in sizes] == counts.tolist() and counts.sum() == N
    assert (result.k, result.n, result.seed, result.niter) == (3, N, 7, 10)
    assert sorted((c.cluster, c.size) for c in result.clusters) == sizes
    for c in result.clusters:
        reps = [m.distance for m in c.representatives]
        assert reps == sorted(reps) and len(reps) == min(2, c.size)
        in_cluster = sorted(members[i][1] for i in members if members[i][0] == c.cluster)
        np.testing.assert_allclose(reps, in_cluster[: len(reps)], atol=1e-5)  # the nearest ones
        full = cluster_members(index_dir, c.cluster)
        assert len(full) == c.size and [m.distance for m in full] == sorted(m.distance for m in full)
    assert load_clusters(index_dir, representatives=2).to_dict() == dict(result.to_dict(), seconds=0.0)


def test_reclustering_replaces_the_old_result(built) -> None:
    index_dir, _, _ = built
    cluster_index(index_dir, k=4, seed=1)
    cluster_index(index_dir, k=2, seed=2)
    sizes, centroids, members = _stored_clustering(index_dir)
    assert [c for c, _ in sizes] == [0, 1] and centroids.shape[0] == 2
    assert len(members) == N and {c for c, _ in members.values()} <= {0, 1}
    assert load_clusters(index_dir).k == 2
    with pytest.raises(InputError, match="no cluster 3"):
        cluster_members(index_dir, 3)


def test_cluster_errors(built, tmp_path: Path) -> None:
    index_dir, _, _ = built
    with pytest.raises(InputError, match=f"from {N} images"):
        cluster_index(index_dir, k=N + 1)
    (tmp_path / "empty").mkdir()
    run_index(tmp_path / "empty", tmp_path / "idx")
    with pytest.raises(EmptyIndexError):
        cluster_index(tmp_path / "idx", k=2)
    with pytest.raises(InputError, match="not been clustered"):
        load_clusters(tmp_path / "idx")
    with pytest.raises(InputError, match="not been clustered"):
        cluster_members(tmp_path / "idx", 0)


def test_indexed_duplicates_are_results_but_an_outside_copy_is_self(tmp_path: Path) -> None:
    root = tmp_path / "p"
    a = make_image(root / "a.jpg", color=(200, 30, 30), seed=1)
    b = root / "b_copy.jpg"
    shutil.copyfile(a, b)
    other = make_image(root / "c.jpg", color=(30, 30, 200), shape="stripes", seed=2)
    run_index(root, tmp_path / "idx")
    [from_a] = query_images([a], tmp_path / "idx", k=5, device="cpu")
    assert [h.path for h in from_a.results] == [str(b), str(other)]  # its duplicate first, itself excluded
    assert from_a.results[0].score > 0.9999
    outside = tmp_path / "outside.jpg"
    shutil.copyfile(a, outside)
    [from_outside] = query_images([outside], tmp_path / "idx", k=5, device="cpu")
    assert [h.path for h in from_outside.results] == [str(other)]
    with pytest.raises(InputError, match="folder"):
        query_images([root], tmp_path / "idx", device="cpu")


def test_deleted_faiss_file_asks_for_repair_not_reindex(tmp_path: Path) -> None:
    make_collection(tmp_path / "p", n=3)
    run_index(tmp_path / "p", tmp_path / "idx")
    (tmp_path / "idx" / "vectors.faiss").unlink()
    with pytest.raises(IndexCorruptError, match="--repair"):
        query_images([tmp_path / "p" / "a" / "img000.jpg"], tmp_path / "idx", device="cpu")
    with pytest.raises(IndexCorruptError, match="--repair"):
        cluster_index(tmp_path / "idx", k=2)


def test_cluster_sizes_follow_removed_files(tmp_path: Path) -> None:
    paths = make_collection(tmp_path / "p", n=5)
    run_index(tmp_path / "p", tmp_path / "idx")
    cluster_index(tmp_path / "idx", k=2, seed=3)
    paths[0].unlink()
    run_index(tmp_path / "p", tmp_path / "idx")
    result = load_clusters(tmp_path / "idx")
    assert sum(c.size for c in result.clusters) == 4
    for c in result.clusters:
        assert len(cluster_members(tmp_path / "idx", c.cluster)) == c.size


def test_a_model_that_cannot_be_built_is_the_query_s_error(tmp_path: Path) -> None:
    """The model builds on a thread while the index opens: its failure is raised by the query itself."""
    import torch

    from simsearch.errors import WeightsError
    from simsearch.models import create_model

    weights = tmp_path / "weights.pt"
    torch.save(create_model("resnet18", "random", seed=3).backbone.state_dict(), weights)
    make_collection(tmp_path / "p", n=2)
    run_index(tmp_path / "p", tmp_path / "idx", options=fast_options(weights=str(weights)))
    probe = make_image(tmp_path / "probe.png", color=(10, 20, 200), shape="triangle", seed=5)
    assert len(query_images([probe], tmp_path / "idx", k=1, device="cpu")[0].results) == 1
    weights.unlink()
    with pytest.raises(WeightsError, match="weights.pt"):
        query_images([probe], tmp_path / "idx", k=1, device="cpu")
    # an indexed, unchanged file needs no model: still answered
    indexed = min((tmp_path / "p").rglob("*.jpg"))
    assert query_images([indexed], tmp_path / "idx", k=1, device="cpu")[0].results

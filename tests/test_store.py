"""simsearch.store: the FAISS wrapper against numpy brute force, the catalog/FAISS consistency checks and repair."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from conftest import DIM, assert_consistent, unit_vectors
from simsearch.errors import IndexCorruptError, IndexMismatchError, IndexNotFoundError
from simsearch.store import FAISS_FILE, Catalog, IndexStore, VectorIndex

def brute_force(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = x @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], ids[order]


def test_search_equals_numpy_brute_force(populated) -> None:
    index, ids, x = populated
    queries = unit_vectors(7, seed=2)
    scores, got = index.search(queries, 15)
    assert scores.shape == got.shape == (7, 15)
    for q, s_row, id_row in zip(queries, scores, got):
        exp_scores, exp_ids = brute_force(ids, x, q, 15)
        np.testing.assert_allclose(s_row, exp_scores, atol=1e-5)
        assert id_row.tolist() == exp_ids.tolist()


def test_remove_by_id_then_search(populated) -> None:
    index, ids, x = populated
    drop = ids[::3]
    assert index.remove(drop) == len(drop)
    assert index.remove(np.array([], dtype=np.int64)) == 0
    keep = ~np.isin(ids, drop)
    assert len(index) == keep.sum()
    assert sorted(index.ids().tolist()) == sorted(ids[keep].tolist())
    q = unit_vectors(1, seed=3)[0]
    scores, got = index.search(q[None], 10)
    exp_scores, exp_ids = brute_force(ids[keep], x[keep], q, 10)
    assert got[0].tolist() == exp_ids.tolist()
    np.testing.assert_allclose(scores[0], exp_scores, atol=1e-5)


def test_k_larger_than_collection_and_empty_index() -> None:
    index = VectorIndex(DIM)
    scores, ids = index.search(unit_vectors(1, seed=4), 5)
    assert ids.tolist() == [[-1]]
    index.add(np.array([7, 9]), unit_vectors(2, seed=5))
    scores, ids = index.search(unit_vectors(1, seed=6), 50)
    assert sorted(ids[0].tolist()) == [7, 9]


def test_save_load_round_trip_is_atomic(tmp_path: Path, populated) -> None:
    index, ids, x = populated
    path = tmp_path / FAISS_FILE
    index.save(path)
    index.remove(ids[:10])
    index.save(path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [FAISS_FILE]  # no .tmp left behind
    loaded = VectorIndex.load(path)
    assert loaded.dim == DIM and len(loaded) == len(ids) - 10
    assert sorted(loaded.ids().tolist()) == sorted(ids[10:].tolist())
    q = unit_vectors(3, seed=7)
    for a, b in zip(index.search(q, 20), loaded.search(q, 20)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_ids_without_an_id_map(factory: str) -> None:
    """A layout with no ID map: a plain flat index numbers its vectors 0..n-1, an IVF one keeps the ids it was given."""
    x = unit_vectors(40, seed=8)
    index = VectorIndex(DIM, factory)
    index.train(x)
    if factory == "Flat":
        index.index.add(x)  # a flat index without an ID map cannot take ids
        expected = list(range(40))
    else:
        index.add(np.arange(500, 540), x)
        assert index.remove([500, 501]) == 2
        expected = list(range(502, 540))
    assert sorted(index.ids().tolist()) == expected
    assert len(index.ids()) == len(index)


def test_store_reads_the_recorded_layout(tmp_path: Path) -> None:
    """The FAISS layout comes from the catalog's faiss_factory, when the file is loaded and when it is recreated."""
    fill_store(tmp_path)
    with IndexStore.open(tmp_path) as store:
        store.set_meta({"faiss_factory": "IVF4,Flat"})
    (tmp_path / FAISS_FILE).unlink()
    with IndexStore.open(tmp_path) as store:
        assert store.ann.factory == "IVF4,Flat" and faiss.try_extract_index_ivf(store.ann.index) is not None
        store.ensure_identity(dict(DESCRIPTION, model="other"), rebuild=True)
        assert store.ann.factory == store.meta["faiss_factory"] == "IVF4,Flat"


def test_load_garbage_is_index_corrupt(tmp_path: Path) -> None:
    path = tmp_path / FAISS_FILE
    path.write_bytes(b"not a faiss index")
    with pytest.raises(IndexCorruptError):
        VectorIndex.load(path)


# -- IndexStore: catalog + FAISS ----------------------------------------------------------------

DESCRIPTION = {
    "model": "fake",
    "weights": "random:seed=0",
    "dim": DIM,
    "preprocessing": {"resize_size": 256, "crop_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"},
}


def fill_store(index_dir: Path, n: int = 20, failed: int = 2) -> dict[int, np.ndarray]:
    """A store with ``n`` ok rows (random vectors) and ``failed`` failed rows, saved consistently."""
    vectors = unit_vectors(n, seed=11)
    out = {}
    with IndexStore.open(index_dir, create=True) as store:
        store.ensure_identity(DESCRIPTION)
        records = [
            {"path": f"/p/{i}.jpg", "size": 10, "mtime_ns": 1, "hash": f"h{i}", "width": 4, "height": 3, "status": "ok", "error": None}
            for i in range(n)
        ] + [
            {"path": f"/p/bad{i}.jpg", "size": 0, "mtime_ns": 1, "hash": None, "width": None, "height": None, "status": "failed", "error": "empty"}
            for i in range(failed)
        ]
        # rows and vectors written durably, FAISS not touched (as a crash before its update leaves it)
        ids, as_stored = store.store_rows(records, vectors, [None] * len(records))
        out = dict(zip(ids[:n], as_stored))
        np.testing.assert_allclose(as_stored, vectors, atol=1e-3)  # float16 storage
        assert not store.check().ok  # rows written, FAISS not yet
        store.save(resync=True)  # rows were written behind FAISS's back: sync them, then write it
        assert store.check().ok
    assert_consistent(index_dir)
    return out


def test_missing_index_dir_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="simsearch index"):
        IndexStore.open(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path, create=True)
    with pytest.raises(RuntimeError):
        with catalog.transaction():
            catalog.insert_row({"path": "/a.jpg", "status": "ok"}, (0, 1234))
            raise RuntimeError("boom")
    assert catalog.rows() == [] and catalog.pending_ids().tolist() == []
    catalog.close()


def test_identity_mismatch_needs_rebuild(tmp_path: Path) -> None:
    fill_store(tmp_path)
    other = dict(DESCRIPTION, model="other")
    with IndexStore.open(tmp_path) as store:
        with pytest.raises(IndexMismatchError, match="--rebuild"):
            store.ensure_identity(other)
        assert store.catalog.counts()["ok"] == 20
        store.thumbnails.dir.mkdir()
        (store.thumbnails.dir / "1-h1.jpg").write_bytes(b"jpeg")
        store.ensure_identity(other, rebuild=True)
        assert store.catalog.counts() == {"ok": 0, "failed": 0}
        assert list(store.thumbnails.dir.iterdir()) == []
        assert store.catalog.identity()["model"] == "other"


def test_repair_after_faiss_file_deleted(tmp_path: Path) -> None:
    stored = fill_store(tmp_path)
    (tmp_path / FAISS_FILE).unlink()
    with IndexStore.open(tmp_path) as store:
        found = store.check()
        assert sorted(found.missing.tolist()) == sorted(stored) and len(found.extra) == 0
        with pytest.raises(IndexCorruptError, match="--repair"):
            store.require_consistent()
        store.repair()
    assert_consistent(tmp_path)


def test_repair_missing_and_stray_ids(tmp_path: Path) -> None:
    stored = fill_store(tmp_path)
    ids = sorted(stored)
    with IndexStore.open(tmp_path) as store:
        store.ann.remove(ids[:3])
        store.ann.add(np.array([9000, 9001]), unit_vectors(2, seed=12))
        store.ann.save(store.ann_path)  # the raw FAISS write, as a crash would leave it
    with IndexStore.open(tmp_path) as store:
        found = store.check()
        assert found.missing.tolist() == ids[:3]
        assert found.extra.tolist() == [9000, 9001]
        fixed = store.repair()
        assert fixed.count == 5
        assert store.check().ok
    assert_consistent(tmp_path)


def test_repair_stale_vector_under_same_id(tmp_path: Path) -> None:
    """A row whose vector changed after the FAISS file was written: same id, different vector."""
    stored = fill_store(tmp_path)
    victim = sorted(stored)[4]
    with IndexStore.open(tmp_path) as store:
        row = store.catalog.rows_by_ids([victim])[victim]
        record = {"path": row.path, "size": 11, "mtime_ns": 2, "hash": "new", "width": 4, "height": 3, "status": "ok", "error": None}
        _, (new_vector,) = store.store_rows([record], unit_vectors(1, seed=13), [row])
        # crash here: FAISS on disk still has the old vector for the same id
    with IndexStore.open(tmp_path) as store:
        found = store.check()
        assert found.stale.tolist() == [victim] and not found.ok
        store.repair()
        np.testing.assert_array_equal(store.ann.index.reconstruct(int(victim)), new_vector)
    assert_consistent(tmp_path)


def test_repair_duplicate_faiss_ids(tmp_path: Path) -> None:
    stored = fill_store(tmp_path)
    dup = sorted(stored)[0]
    with IndexStore.open(tmp_path) as store:
        store.ann.add(np.array([dup]), unit_vectors(1, seed=14))
        store.ann.save(store.ann_path)
    with IndexStore.open(tmp_path) as store:
        assert store.check().stale.tolist() == [dup]
        store.repair()
    assert_consistent(tmp_path)


def test_dim_disagreement_is_corrupt(tmp_path: Path) -> None:
    fill_store(tmp_path)
    faiss.write_index(faiss.index_factory(DIM + 1, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT), str(tmp_path / FAISS_FILE))
    with IndexStore.open(tmp_path) as store:  # opening reads nothing; using the FAISS file finds it
        with pytest.raises(IndexCorruptError, match="catalog says"):
            store.ann
        found = store.repair()  # a derived file: rebuilt from the stored vectors
        assert found.faiss_damaged and len(store.ann) == 20
    assert_consistent(tmp_path)


# -- the vector file: reading, slot reuse, float16 ---------------------------------------------

def test_iter_vectors_and_vectors_of_equal_what_was_committed(tmp_path: Path) -> None:
    from simsearch.store.vector_file import from_stored, to_stored

    x = unit_vectors(300, seed=31)
    with IndexStore.open(tmp_path, create=True) as store:
        store.lock_for_writing()
        store.ensure_identity(DESCRIPTION)
        records = [{"path": f"/v/{i}.jpg", "size": i, "mtime_ns": 1, "hash": f"v{i}", "width": 1, "height": 1,
                    "status": "ok", "error": None} for i in range(300)]
        ids = np.array(store.commit(records, x, [None] * 300))
        expected = from_stored(to_stored(x))
        chunks = list(store.iter_vectors(chunk=64))
        assert [len(c[0]) for c in chunks] == [64, 64, 64, 64, 44]
        got_ids = np.concatenate([c[0] for c in chunks])
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), expected)
        unmapped = list(store.iter_vectors(chunk=64, mapped=False))  # plain file reads: the same rows
        np.testing.assert_array_equal(np.concatenate([c[1] for c in unmapped]), expected)
        scattered = ids[[299, 0, 1, 2, 150, 151, 7]]  # runs of consecutive slots and single ones
        got = np.concatenate([c[1] for c in store.iter_vectors(scattered, mapped=False)])
        np.testing.assert_array_equal(got, expected[np.searchsorted(ids, np.sort(scattered))])
        pick = ids[[250, 3, 77]]
        found, vecs = store.vectors_of(list(pick) + [99999])  # an unknown id is left out
        assert found.tolist() == sorted(pick.tolist())
        np.testing.assert_array_equal(vecs, expected[np.searchsorted(ids, found)])
        # float16 costs almost nothing in cosine: each stored vector vs the original
        cos = (expected * x).sum(1) / np.linalg.norm(expected, axis=1)
        assert cos.min() > 0.9999


def test_deleted_and_replaced_slots_are_reused(tmp_path: Path) -> None:
    fill_store(tmp_path, n=20, failed=0)
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        rows = store.catalog.rows()
        size = store.vectors.count
        store.apply_changes(removals=rows[:5])
        new = [{"path": f"/n/{i}.jpg", "size": 1, "mtime_ns": 1, "hash": f"n{i}", "width": 1, "height": 1,
                "status": "ok", "error": None} for i in range(5)]
        x = unit_vectors(5, seed=41)
        new_ids = store.commit(new, x, [None] * 5)
        assert store.vectors.count == size  # the five freed slots took the five new vectors
        store.save()
        _, got = store.vectors_of(new_ids)
        np.testing.assert_allclose(got, x, atol=1e-3)
        assert store.check(verify_vectors=True).ok
    assert_consistent(tmp_path)


def test_unreferenced_tail_slots_are_cut_back(tmp_path: Path) -> None:
    """A crash between the vector file's fsync and the SQLite commit leaves unused slots at its end."""
    fill_store(tmp_path, n=10, failed=0)
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        store.vectors.write(np.array([10, 11, 12]), unit_vectors(3, seed=5))  # no row refers to them
        assert store.vectors.count == 13
        store.repair()
        assert store.vectors.count == 10
    assert_consistent(tmp_path)


def test_slots_of_ok_rows_by_their_own_index_and_without_it(tmp_path: Path) -> None:
    """Re-ranking reads candidates' slots through a covering index of ok rows; a catalog made
    before it answers the same (by the rows), and the next writer adds it."""
    import sqlite3

    from simsearch.store.catalog import OK_SLOT_INDEX

    fill_store(tmp_path, n=30, failed=3)
    with IndexStore.open(tmp_path) as store:
        rows = store.catalog.db.execute("SELECT id, status, slot FROM images").fetchall()
        ok = sorted(i for i, status, slot in rows if status == "ok" and slot is not None)
        failed = [i for i, status, _ in rows if status != "ok"]
        assert len(ok) == 30 and len(failed) == 3
        wanted = [ok[7], failed[0], ok[2], 10_000, ok[29], ok[2]]  # a failed row, an unknown id, a repeat
        ids, slots = store.catalog.slots_of(wanted)
        assert ids.tolist() == sorted({ok[7], ok[2], ok[29]})
        expected = dict(store.catalog.db.execute("SELECT id, slot FROM images").fetchall())
        assert slots.tolist() == [expected[i] for i in ids.tolist()]
        plan = store.catalog.db.execute(
            f"EXPLAIN QUERY PLAN SELECT id, slot FROM images INDEXED BY {OK_SLOT_INDEX} "
            "WHERE id IN (1, 2) AND status = 'ok' AND slot IS NOT NULL"
        ).fetchall()
        assert "COVERING INDEX" in str(plan)
        found, vectors = store.vectors_of(wanted)
        assert found.tolist() == ids.tolist()

    conn = sqlite3.connect(tmp_path / "catalog.db")
    conn.execute(f"DROP INDEX {OK_SLOT_INDEX}")  # as a catalog written before the index
    conn.commit()
    conn.close()
    with IndexStore.open(tmp_path, readonly=True) as store:
        again_ids, again = store.vectors_of(wanted)
        assert again_ids.tolist() == ids.tolist()
        np.testing.assert_array_equal(again, vectors)
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        assert store.catalog.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", [OK_SLOT_INDEX]
        ).fetchone()
        np.testing.assert_array_equal(store.vectors_of(wanted)[1], vectors)

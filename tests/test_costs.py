"""Costs what changed: an index run's start-of-run check, its catalog reads and its FAISS save are
O(changed), and still catch what a crash or damage left; the full scan runs only where intended.

The quick check (:meth:`IndexStore.quick_check`) must find: ids changed since the last save, a
FAISS file older than the catalog (put back from elsewhere, or saved before rows it does not
hold), and a vector file shorter than the catalog's slots. Each case is checked against the full
check and the consistency helper (FAISS ids and vectors == the catalog's ok rows and stored vectors).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    DIM,
    assert_consistent,
    make_collection,
    make_image,
    run_index,
    unit_vectors,
)

from simsearch.cli import cli
from simsearch.images import is_under
from simsearch.indexer import repair_index
from simsearch.store import VECTOR_FILE, Catalog, IndexStore, index_info
from simsearch.store.vector_file import HEADER_SIZE

DESCRIPTION = {"model": "synthetic", "weights": "seeded", "dim": DIM, "preprocessing": {}}


def record(i: int, status: str = "ok", folder: str = "/p") -> dict:
    return {"path": f"{folder}/{i}.jpg", "size": 100 + i, "mtime_ns": 1, "hash": f"h{i}", "width": 4, "height": 3,
            "status": status, "error": None if status == "ok" else "bad"}


def synthetic(index_dir: Path, n: int = 60, factory: str | None = None) -> np.ndarray:
    x = unit_vectors(n, seed=3)
    with IndexStore.open(index_dir, create=True) as store:
        store.lock_for_writing()
        store.ensure_identity(DESCRIPTION)
        if factory:
            from simsearch.store import VectorIndex

            store.set_meta({"faiss_factory": factory})
            store.ann = VectorIndex(DIM, factory)
            store.ann.train(x)
        store.commit([record(i) for i in range(n)], x, [None] * n)
        store.save()
    return x


class Calls:
    """Counts calls of the full check (and fails the test on a full read of the catalog's rows, if asked)."""

    def __init__(self, monkeypatch, forbid_full_reads: bool = False) -> None:
        self.check = 0
        real_check = IndexStore.check

        def check(store, *args, **kwargs):
            self.check += 1
            return real_check(store, *args, **kwargs)

        monkeypatch.setattr(IndexStore, "check", check)
        if forbid_full_reads:
            real_rows = Catalog.rows

            def rows(catalog, where=None, params=()):
                assert where is not None, "read every row of the catalog"
                return real_rows(catalog, where, params)

            def refuse(*a, **k):
                raise AssertionError("read every id of the catalog")

            monkeypatch.setattr(Catalog, "rows", rows)
            monkeypatch.setattr(Catalog, "ok_ids", refuse)


# -- where the full check runs ------------------------------------------------------------------

def test_full_check_only_under_info_check_and_repair(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "photos"
    make_collection(root, n=6)
    index_dir = tmp_path / "idx"
    run_index(root, index_dir)
    calls = Calls(monkeypatch, forbid_full_reads=True)

    make_image(root / "a" / "new.jpg", color=(10, 220, 30), shape="triangle", seed=40)
    summary = run_index(root / "a", index_dir)  # an incremental run over one folder
    assert (summary.added, summary.total_indexed) == (1, 7)
    runner = CliRunner()
    assert runner.invoke(cli, ["info", "--index", str(index_dir)]).exit_code == 0
    assert calls.check == 0

    monkeypatch.undo()
    calls = Calls(monkeypatch)
    assert runner.invoke(cli, ["info", "--check", "--index", str(index_dir)]).exit_code == 0
    assert calls.check == 1
    repair_index(index_dir)
    assert calls.check == 2
    assert_consistent(index_dir)


def test_a_run_reads_only_the_rows_under_its_folders(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "photos"
    make_collection(root, n=8)  # a/ and b/c/
    index_dir = tmp_path / "idx"
    run_index(root, index_dir)
    read: list[str] = []
    real = Catalog.rows_under

    def rows_under(catalog, folder):
        found = real(catalog, folder)
        read.extend(r.path for r in found)
        return found

    monkeypatch.setattr(Catalog, "rows_under", rows_under)
    (root / "b" / "c" / "img001.jpg").unlink()  # gone: its row goes, a/ is not touched
    summary = run_index(root / "b", index_dir)
    assert summary.removed == 1 and summary.unchanged == 3
    assert read and all(is_under(p, str(root / "b")) for p in read)
    assert index_info(index_dir)["indexed"] == 7
    assert_consistent(index_dir)


# -- what the quick check must catch --------------------------------------------------------------

def test_quick_check_repairs_what_a_crash_left_pending(tmp_path: Path) -> None:
    x = synthetic(tmp_path)
    with IndexStore.open(tmp_path) as store:  # committed, then killed before the save
        store.lock_for_writing()
        rows = store.catalog.rows()
        store.store_rows([record(0)], unit_vectors(1, seed=9), [rows[0]])  # a changed vector, same id
        store.apply_changes(removals=[rows[1]])
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        found = store.quick_check()
        assert sorted(found.stale.tolist()) == sorted([rows[0].id, rows[1].id]) and found.faiss_damaged is None
        fixed = store.repair(full=False)
        assert fixed.count == 2
    assert_consistent(tmp_path)
    assert len(x) == 60


def test_quick_check_finds_a_faiss_file_put_back_from_before(tmp_path: Path) -> None:
    """A FAISS file older than the catalog (an old copy restored over it): not the file saved."""
    synthetic(tmp_path)
    with IndexStore.open(tmp_path) as store:
        old = tmp_path / "old.faiss"
        shutil.copy(store.ann_path, old)
        store.lock_for_writing()
        rows = store.catalog.rows()
        # same size afterwards (a flat layout, one vector replaced): only the content differs
        store.commit([record(5)], unit_vectors(1, seed=77), [rows[5]])
        store.save()
        shutil.copy(old, store.ann_path)
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        found = store.quick_check()
        assert found.faiss_damaged and "checksum" in found.faiss_damaged
        store.repair(full=False)
    assert_consistent(tmp_path)
    assert index_info(tmp_path, check=True)["check"]["ok"]


def test_quick_check_finds_faiss_saved_before_rows_it_lacks(tmp_path: Path) -> None:
    """FAISS older than the catalog with nothing pending and its record intact (vectors dropped and
    the file saved through the store, as a buggy writer would): the vector count gives it away, and
    the full comparison finds which ids."""
    synthetic(tmp_path)
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        lost = store.catalog.ok_ids()[10:14]
        store.ann.remove(lost)
        store.save()
        assert not store.catalog.has_pending()
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        found = store.quick_check()
        assert sorted(found.missing.tolist()) == sorted(lost.tolist())
        store.repair(full=False)
    assert_consistent(tmp_path)


def test_quick_check_finds_a_vector_file_shorter_than_the_slots(tmp_path: Path) -> None:
    synthetic(tmp_path, n=30)
    os.truncate(tmp_path / VECTOR_FILE, HEADER_SIZE + 12 * DIM * 2)  # the last 18 rows' vectors gone
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        found = store.quick_check()
        assert len(found.damaged) == 18
        store.repair(full=False)
        assert store.catalog.counts() == {"ok": 12, "failed": 18}
    assert index_info(tmp_path, check=True)["check"]["ok"]
    assert_consistent(tmp_path)


def test_an_index_run_re_embeds_files_whose_vectors_were_cut_off(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_collection(root, n=6)
    index_dir = tmp_path / "idx"
    run_index(root, index_dir)
    with IndexStore.open(index_dir) as store:
        dim = store.vectors.dim
    os.truncate(index_dir / VECTOR_FILE, HEADER_SIZE + 4 * dim * 2)
    summary = run_index(root, index_dir)
    assert summary.repaired == 2 and summary.updated == 2 and summary.total_indexed == 6
    assert_consistent(index_dir)


def test_quick_check_with_a_layout_that_keeps_dead_slots(tmp_path: Path) -> None:
    """HNSW cannot delete: removed ids stay as dead slots, which the count comparison leaves out."""
    synthetic(tmp_path, factory="IDMap2,HNSW16,Flat")
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        store.apply_changes(removals=store.catalog.rows()[:5])
        store.save()
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        assert store.quick_check().ok
    assert index_info(tmp_path, check=True)["check"]["ok"]


# -- the save, the counts, the rows under a folder -------------------------------------------------

def test_a_save_with_nothing_changed_keeps_the_faiss_file(tmp_path: Path) -> None:
    synthetic(tmp_path)
    with IndexStore.open(tmp_path) as store:
        before = store.ann_path.stat()
        store.lock_for_writing()
        store.repair(full=False)
        store.save()
        after = store.ann_path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        store.commit([record(100)], unit_vectors(1, seed=5), [None])
        store.save()
        assert store.ann_path.stat().st_ino != before.st_ino
    assert_consistent(tmp_path)


def test_a_copied_index_is_checked_by_checksum_then_by_stamp(tmp_path: Path) -> None:
    synthetic(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # every stat stamp changes
    with IndexStore.open(tmp_path / "b") as store:
        assert not store._faiss_file_matches_stamp()
        store.lock_for_writing()
        assert store.quick_check().ok  # the CRC-32 agrees
        store.commit([record(100)], unit_vectors(1, seed=5), [None])
        store.save()
        assert store._faiss_file_matches_stamp()
    assert_consistent(tmp_path / "b")


def test_counts_match_a_group_by(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path, create=True)
    with catalog.transaction():
        catalog.insert_rows([record(i, "failed" if i % 7 == 0 else "ok") for i in range(50)],
                            [None if i % 7 == 0 else (i, 0) for i in range(50)])
    grouped = dict(catalog.db.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())
    assert catalog.counts() == grouped == {"ok": 42, "failed": 8}
    with catalog.transaction():
        catalog.db.execute("DELETE FROM images")
    assert catalog.counts() == {"ok": 0, "failed": 0}
    catalog.close()


@pytest.mark.parametrize("root", ["/a/b", "/a/b/", "/", "/a/b/x.jpg", "/a", "/a/b\udcff"])
def test_rows_under_a_folder_are_those_is_under_finds(tmp_path: Path, root: str) -> None:
    names = ["/a/b/x.jpg", "/a/b/c/y.jpg", "/a/b0/z.jpg", "/a/b.jpg", "/a/bb/w.jpg", "/a/b", "/a/c/v.jpg",
             "/a/b/\udcff.jpg", "/a/b\udcff/u.jpg", "/a/b/é.jpg", "/z/b/x.jpg", "/a/b!/t.jpg"]
    catalog = Catalog.open(tmp_path, create=True)
    with catalog.transaction():
        catalog.insert_rows([dict(record(i), path=p) for i, p in enumerate(names)], [(i, 0) for i in range(len(names))])
    normal = os.path.normpath(root) if root != "/" else "/"
    expected = sorted(r.real_path for r in catalog.rows() if is_under(r.real_path, normal))
    assert sorted(r.real_path for r in catalog.rows_under(normal)) == expected
    assert expected  # every case finds something
    catalog.close()


# -- readers map the FAISS file ----------------------------------------------------------------------

def test_a_mapped_reader_and_a_writer_on_the_same_store(tmp_path: Path) -> None:
    """A store opened for searching maps FAISS read-only; taking the write lock (or writing) loads it
    into memory first, so the write lands (FAISS would abort on a mapped index)."""
    x = synthetic(tmp_path, factory="IVF4,Flat")
    with IndexStore.open(tmp_path, map_faiss=True) as store:
        _, ids = store.ann.search(x[:5], 1)
        assert store._ann_mapped and ids[:, 0].tolist() == store.catalog.ok_ids()[:5].tolist()
        store.lock_for_writing()
        assert not store._ann_mapped
        store.commit([record(100)], unit_vectors(1, seed=5), [None])
        store.save()
    with IndexStore.open(tmp_path, map_faiss=True) as store:
        assert len(store.ann) == 61
        store.commit([record(101)], unit_vectors(1, seed=6), [None])  # a write without the lock
        store.save()
        assert not store._ann_mapped
    assert index_info(tmp_path, check=True)["check"]["ok"]

"""Incremental indexing (add / change / touch / delete / move / fail) and crash safety."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_consistent, catalog_state, fast_options, make_collection, make_image, run_index
from simsearch import embed as embed_module
from simsearch.errors import InputError
from simsearch.indexer import failed_files, index_folders
from simsearch.store import IndexStore


@pytest.fixture
def spy(monkeypatch):
    """Records every path the embedder is asked to embed."""
    calls: list[str] = []
    real = embed_module.Embedder.embed_files

    def embed_files(self, paths, progress=None):
        calls.extend(paths)
        return real(self, paths, progress=progress)

    monkeypatch.setattr(embed_module.Embedder, "embed_files", embed_files)
    return calls


@pytest.fixture
def indexed(tmp_path: Path):
    root = tmp_path / "photos"
    paths = make_collection(root, n=6)
    index_dir = tmp_path / "idx"
    summary = run_index(root, index_dir)
    return root, index_dir, paths, summary


def test_first_run_counts(indexed) -> None:
    root, index_dir, paths, summary = indexed
    assert (summary.added, summary.updated, summary.moved, summary.removed, summary.unchanged, summary.failed) == (6, 0, 0, 0, 0, 0)
    assert summary.total_indexed == 6 and summary.embedded == 6
    state = catalog_state(index_dir)
    assert sorted(state) == sorted(str(p) for p in paths)
    with IndexStore.open(index_dir) as store:
        rows = store.catalog.rows()
        assert {(r.width, r.height) for r in rows} == {(160, 120)}
        assert all(r.hash and r.size == os.path.getsize(r.path) for r in rows)
        ids, vectors = store.all_vectors()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)  # stored as float16
        assert store.meta["model"] == "resnet18" and store.meta["dim"] == 512
    assert_consistent(index_dir)


def test_second_run_is_all_unchanged_and_embeds_nothing(indexed, spy) -> None:
    root, index_dir, paths, _ = indexed
    before = catalog_state(index_dir)
    summary = run_index(root, index_dir)
    assert spy == []
    assert (summary.added, summary.updated, summary.moved, summary.removed, summary.unchanged) == (0, 0, 0, 0, 6)
    assert catalog_state(index_dir) == before
    assert_consistent(index_dir)


def test_modified_file_is_updated_in_place(indexed, spy) -> None:
    root, index_dir, paths, _ = indexed
    target = paths[2]
    before = catalog_state(index_dir)
    make_image(target, color=(10, 250, 10), shape="stripes", seed=99)  # new content, same path
    summary = run_index(root, index_dir)
    assert spy == [str(target)]
    assert (summary.updated, summary.added, summary.unchanged) == (1, 0, 5)
    after = catalog_state(index_dir)
    assert after[str(target)][0] == before[str(target)][0]  # id preserved
    assert after[str(target)][2] != before[str(target)][2]  # vector changed
    assert {p: v for p, v in after.items() if p != str(target)} == {p: v for p, v in before.items() if p != str(target)}
    assert_consistent(index_dir)


def test_same_size_new_content_is_caught_by_hash(tmp_path: Path, spy) -> None:
    root = tmp_path / "bmp"
    a = make_image(root / "a.bmp", color=(200, 0, 0))
    make_image(root / "b.bmp", color=(0, 0, 200), shape="triangle")
    run_index(root, tmp_path / "idx")
    size = a.stat().st_size
    make_image(a, color=(0, 200, 0), shape="stripes", seed=5)  # BMP: same size, other pixels
    assert a.stat().st_size == size
    spy.clear()
    summary = run_index(root, tmp_path / "idx")
    assert spy == [str(a)] and summary.updated == 1 and summary.unchanged == 1
    assert_consistent(tmp_path / "idx")


def test_touched_file_is_unchanged_and_not_embedded(indexed, spy) -> None:
    root, index_dir, paths, _ = indexed
    target = paths[1]
    before = catalog_state(index_dir)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    summary = run_index(root, index_dir)
    assert spy == []
    assert (summary.unchanged, summary.updated) == (6, 0)
    assert catalog_state(index_dir) == before
    with IndexStore.open(index_dir) as store:  # the new mtime is recorded, so the next run needs no hash
        assert store.catalog.row_by_path(str(target)).mtime_ns == target.stat().st_mtime_ns
    assert_consistent(index_dir)


def test_deleted_file_is_removed_from_sqlite_and_faiss(indexed, spy) -> None:
    root, index_dir, paths, _ = indexed
    before = catalog_state(index_dir)
    paths[3].unlink()
    summary = run_index(root, index_dir)
    assert spy == [] and (summary.removed, summary.unchanged) == (1, 5)
    after = catalog_state(index_dir)
    assert str(paths[3]) not in after and len(after) == 5
    with IndexStore.open(index_dir) as store:
        assert before[str(paths[3])][0] not in store.ann.ids().tolist()
        assert summary.total_indexed == len(store.ann) == 5
    assert_consistent(index_dir)


def test_moved_and_renamed_file_keeps_id_and_vector_without_embedding(indexed, spy) -> None:
    root, index_dir, paths, _ = indexed
    before = catalog_state(index_dir)
    new_path = root / "elsewhere" / "renamed.jpg"
    new_path.parent.mkdir()
    shutil.move(paths[0], new_path)
    summary = run_index(root, index_dir)
    assert spy == []  # the moved file was not re-embedded
    assert (summary.moved, summary.added, summary.removed, summary.unchanged) == (1, 0, 0, 5)
    after = catalog_state(index_dir)
    assert str(paths[0]) not in after
    assert after[str(new_path)] == before[str(paths[0])]  # same id, status and vector bytes
    assert_consistent(index_dir)


def test_add_new_files_alongside_existing(indexed, spy) -> None:
    root, index_dir, paths, _ = indexed
    new = make_image(root / "new" / "fresh.png", color=(1, 2, 250), shape="rectangle", seed=42)
    summary = run_index(root, index_dir)
    assert spy == [str(new)]
    assert (summary.added, summary.unchanged, summary.total_indexed) == (1, 6, 7)
    assert_consistent(index_dir)


def test_bad_files_are_recorded_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    make_collection(root, n=3)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("hello, I am not a picture")
    good = make_image(tmp_path / "full.jpg", size=(200, 200))
    (root / "cut.jpg").write_bytes(good.read_bytes()[:300])
    make_image(root / "huge.png", size=(400, 300))
    summary = run_index(root, tmp_path / "idx", options=fast_options(max_pixels=300 * 300))
    assert (summary.added, summary.failed, summary.total_indexed, summary.total_failed) == (3, 4, 3, 4)
    assert {Path(f["path"]).name for f in summary.failures} == {"empty.jpg", "text.png", "cut.jpg", "huge.png"}
    failed = {Path(f["path"]).name: f["error"] for f in failed_files(tmp_path / "idx")}
    assert set(failed) == {"empty.jpg", "text.png", "cut.jpg", "huge.png"}
    assert "empty" in failed["empty.jpg"]
    assert "--max-pixels" in failed["huge.png"]
    assert all(msg and "\n" not in msg and "BytesIO" not in msg for msg in failed.values())
    assert_consistent(tmp_path / "idx")

    # a second run does not retry them (nothing changed)...
    again = run_index(root, tmp_path / "idx", options=fast_options(max_pixels=300 * 300))
    assert (again.failed, again.unchanged, again.embedded) == (0, 7, 0)
    # ...until the pixel limit is raised; a fixed file is picked up as changed
    (root / "empty.jpg").unlink()
    make_image(root / "empty.jpg")
    raised = run_index(root, tmp_path / "idx", options=fast_options(max_pixels=10**6))
    assert (raised.updated, raised.failed, raised.total_indexed, raised.total_failed) == (2, 2, 5, 2)
    assert {Path(f["path"]).name for f in failed_files(tmp_path / "idx")} == {"text.png", "cut.jpg"}
    assert_consistent(tmp_path / "idx")


def test_single_file_root(tmp_path: Path) -> None:
    paths = make_collection(tmp_path / "photos", n=3)
    summary = run_index(paths[1], tmp_path / "idx")
    assert summary.added == 1 and list(catalog_state(tmp_path / "idx")) == [str(paths[1])]
    # indexing the folder later adds the others without touching the first
    summary = run_index(tmp_path / "photos", tmp_path / "idx")
    assert (summary.added, summary.unchanged) == (2, 1)
    assert_consistent(tmp_path / "idx")


def test_missing_root_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        run_index(tmp_path / "nope", tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_rows_outside_the_indexed_roots_are_kept(tmp_path: Path) -> None:
    make_collection(tmp_path / "one", n=2)
    make_collection(tmp_path / "two", n=2, seed=1)
    run_index([tmp_path / "one", tmp_path / "two"], tmp_path / "idx")
    summary = run_index(tmp_path / "one", tmp_path / "idx")
    assert (summary.removed, summary.unchanged, summary.total_indexed) == (0, 2, 4)


# -- interrupted runs ---------------------------------------------------------------------------


def _final_vectors(index_dir: Path) -> dict[str, np.ndarray]:
    return {p: np.frombuffer(v, np.float32) for p, (_, s, v) in catalog_state(index_dir).items() if s == "ok"}


def test_keyboard_interrupt_after_first_batch_then_resume(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "photos"
    make_collection(root, n=10)
    (root / "broken.jpg").write_bytes(b"nope")
    clean = tmp_path / "clean"
    run_index(root, clean)

    real_commit = IndexStore.commit
    commits = []

    def commit_then_interrupt(*args, **kwargs):
        real_commit(*args, **kwargs)
        commits.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexStore, "commit", commit_then_interrupt)
    index_dir = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        run_index(root, index_dir, options=fast_options(batch_size=3))
    assert len(catalog_state(index_dir)) == 3  # exactly the first committed batch
    assert_consistent(index_dir)  # Ctrl-C still saved FAISS on the way out

    monkeypatch.setattr(IndexStore, "commit", real_commit)
    summary = run_index(root, index_dir, options=fast_options(batch_size=3))
    # the walk lists broken.jpg (top level) first, so the committed first batch held it
    assert (summary.added, summary.failed, summary.unchanged, summary.total_failed) == (8, 0, 3, 1)
    final, reference = _final_vectors(index_dir), _final_vectors(clean)
    assert sorted(catalog_state(index_dir)) == sorted(catalog_state(clean))
    assert sorted(final) == sorted(reference)
    for path in final:
        np.testing.assert_allclose(final[path], reference[path], atol=1e-4)
    assert_consistent(index_dir)


def test_crash_before_faiss_save_with_changed_vectors(indexed, monkeypatch) -> None:
    """kill -9 semantics in-process: a batch committed to SQLite, FAISS never saved, and some of the
    batch's ids already existed in FAISS with other vectors (a modified file, and a new file that
    reuses the id of a deleted last row). The next run must notice and fix those vectors too."""
    root, index_dir, paths, _ = indexed
    state = catalog_state(index_dir)
    last = max(state, key=lambda p: state[p][0])
    Path(last).unlink()
    make_image(root / "a" / "aaa_new.jpg", color=(250, 250, 0), shape="triangle", seed=77)
    make_image(paths[0], color=(0, 250, 250), shape="stripes", seed=78)

    real_commit = IndexStore.commit

    def commit_then_die(*args, **kwargs):
        real_commit(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexStore, "commit", commit_then_die)
    monkeypatch.setattr(IndexStore, "save", lambda self, **kwargs: None)  # the process dies: nothing else is written
    with pytest.raises(KeyboardInterrupt):
        run_index(root, index_dir)
    monkeypatch.undo()

    with IndexStore.open(index_dir) as store:
        assert not store.check().ok  # the on-disk FAISS file is behind, and check() knows it
    summary = run_index(root, index_dir)
    assert summary.repaired > 0
    assert_consistent(index_dir)  # includes: FAISS vectors == stored vectors


def _count_rows(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for i in range(60):
        make_image(root / f"d{i % 3}" / f"p{i:02d}.jpg", size=(64, 48), color=(40 + 3 * i, 200 - 2 * i, (7 * i) % 255), seed=i)
    index_dir = tmp_path / "idx"
    cmd = [sys.executable, "-m", "simsearch", "index", str(root), "--index", str(index_dir), "--model", "resnet18",
           "--weights", "random", "--workers", "0", "--batch-size", "4", "--device", "cpu", "--quiet"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    db = index_dir / "catalog.db"
    deadline = time.monotonic() + 60
    try:
        while _count_rows(db) < 12:
            assert proc.poll() is None, f"index finished or died before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "no rows committed in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _count_rows(db)
    assert 12 <= killed_at < 60

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    state = catalog_state(index_dir)
    assert sorted(state) == sorted(str(p) for p in root.rglob("*.jpg"))  # nothing lost, no duplicates
    assert all(status == "ok" for _, status, _ in state.values())
    assert f"unchanged {killed_at}" in done.stdout
    assert_consistent(index_dir)


def test_file_names_that_are_not_utf8(tmp_path: Path, spy) -> None:
    root = tmp_path / "p"
    make_collection(root, n=2)
    odd = make_image(root / "tmp.jpg", color=(9, 9, 250), seed=8)
    odd_name = os.fsdecode(os.fsencode(str(root)) + b"/odd\xff name.jpg")  # as os.scandir reports it
    os.rename(odd, odd_name)
    broken_name = os.fsdecode(os.fsencode(str(root)) + b"/broken\xfe.jpg")
    Path(broken_name).write_bytes(b"not a jpeg")
    summary = run_index(root, tmp_path / "idx")  # must not abort the run
    assert (summary.added, summary.failed) == (3, 1)
    state = catalog_state(tmp_path / "idx")
    assert os.fsencode(odd_name) in state  # stored losslessly, as its bytes
    assert [Path(f["path"]).name for f in failed_files(tmp_path / "idx")] == ["broken\\xfe.jpg"]
    spy.clear()
    again = run_index(root, tmp_path / "idx")
    assert spy == [] and again.unchanged == 4  # found again under the same key: not re-embedded
    from simsearch.search import query_images

    [result] = query_images([odd_name], tmp_path / "idx", k=5, device="cpu")
    assert len(result.results) == 2 and all("odd" not in h.path for h in result.results)  # itself excluded
    os.unlink(odd_name)
    assert run_index(root, tmp_path / "idx").removed == 1
    assert_consistent(tmp_path / "idx")


def test_a_second_writer_is_refused_while_one_holds_the_index(tmp_path, collection):
    """Two index runs on one index would race; the second fails at once with a clear error."""
    import textwrap

    from simsearch.errors import IndexBusyError

    index_dir = tmp_path / "idx"
    IndexStore.open(index_dir, create=True).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from simsearch.store import IndexStore
                store = IndexStore.open({str(index_dir)!r})
                store.lock_for_writing()
                print("locked", flush=True)
                sys.stdin.read()  # hold the lock until the test closes stdin
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexBusyError, match="another process is writing"):
            index_folders([collection], index_dir, fast_options())
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    summary = index_folders([collection], index_dir, fast_options())  # free again once the holder exits
    assert summary.added == len(list(collection.rglob("*.jpg")))


def test_interrupt_between_commit_and_faiss_update_still_saves_a_consistent_file(indexed, monkeypatch) -> None:
    """Ctrl-C after a batch reached SQLite but before FAISS mirrored it: the save on the way out
    resyncs from the catalog, so the file on disk is right without waiting for a repair."""
    from simsearch.store import VectorIndex

    root, index_dir, paths, _ = indexed
    make_image(root / "a" / "zzz_new.jpg", color=(10, 250, 10), shape="ellipse", seed=91)
    make_image(paths[1], color=(250, 10, 250), shape="rectangle", seed=92)  # changed: same id, new vector

    real_add = VectorIndex.add
    calls = []

    def add_interrupted_once(self, ids, vectors):
        calls.append(len(ids))
        if len(calls) == 1:  # the batch's own mirror into FAISS: interrupted
            raise KeyboardInterrupt
        return real_add(self, ids, vectors)  # the resync on the way out

    monkeypatch.setattr(VectorIndex, "add", add_interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run_index(root, index_dir)
    monkeypatch.undo()
    assert len(calls) == 2
    assert_consistent(index_dir)  # FAISS on disk == the catalog, vectors included

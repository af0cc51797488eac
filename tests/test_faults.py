"""Fault injection: what a hostile collection or a broken disk does to an index, and what is lost.

One test per fault, named after it: odd inputs (file names, thin images, OS errors, FIFOs), and what
the index does when a reader meets a writer, a file is damaged, the disk fills, the folder is
read-only, or a migration is killed.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import DIM, FAST_ARGS, assert_consistent, catalog_state, make_collection, make_image, run_index, unit_vectors
from simsearch.cli import cli
from simsearch.errors import IndexCorruptError, IndexWriteError
from simsearch.indexer import repair_index
from simsearch.store import FAISS_FILE, VECTOR_FILE, IndexStore, index_info
from simsearch.store.vector_file import HEADER_SIZE, from_stored, to_stored

# -- input defects: file names, thin images, OS errors, FIFOs, repair counts, --rebuild ------------


@pytest.fixture
def no_hang():
    """Fail (instead of hanging forever) if something opens a FIFO for reading."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("timed out: something blocked (a FIFO opened?)"))
    signal.alarm(120)
    yield
    signal.alarm(0)


def _odd(folder: Path, name: bytes) -> str:
    """A path as os.scandir reports it (surrogate escapes for bytes that are not UTF-8)."""
    return os.fsdecode(os.fsencode(str(folder)) + b"/" + name)


def test_storable_path_is_lossless_and_collision_free() -> None:
    from simsearch.store import display_path, real_path, storable_path

    rng = random.Random(0)
    alphabet = [b"a", b"x", b"\\", b"f", b"\xff", b"\xfe", b"\xc3\xa9", b"\xc3", b"."]
    names = {b"/p/" + b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(3000)}
    names |= {b"/p/x\xff.jpg", b"/p/x\\xff.jpg"}
    keys = {}
    for raw in names:
        path = os.fsdecode(raw)
        key = storable_path(path)
        assert os.fsencode(real_path(key)) == raw  # the very bytes come back
        assert key not in keys, (raw, keys.get(key))  # brute force: no two names share a key
        keys[key] = raw
        if isinstance(key, str):
            assert key == path  # valid UTF-8 is stored exactly as before: no migration
        display_path(key).encode("utf-8")  # always printable
    assert storable_path("/p/x\\xff.jpg") == "/p/x\\xff.jpg"


def test_colliding_names(tmp_path: Path) -> None:
    root = tmp_path / "p"
    make_collection(root, n=3)
    odd = _odd(root, b"x\xff.jpg")
    os.rename(make_image(root / "t1.jpg", color=(9, 9, 250), seed=8), odd)
    literal = root / "x\\xff.jpg"  # prints exactly like the odd name
    make_image(literal, color=(250, 9, 9), seed=9, shape="stripes")
    summary = run_index(root, tmp_path / "idx")
    assert (summary.added, summary.failed) == (5, 0)
    state = catalog_state(tmp_path / "idx")
    assert os.fsencode(odd) in state and str(literal) in state
    assert_consistent(tmp_path / "idx")
    again = run_index(root, tmp_path / "idx")
    assert (again.unchanged, again.added, again.updated, again.removed) == (5, 0, 0, 0)

    from simsearch.search import query_images
    from simsearch.store import IndexStore

    with IndexStore.open(tmp_path / "idx") as store:
        ids = {row.real_path: row.id for row in store.catalog.rows()}
    for name, other in ((odd, str(literal)), (str(literal), odd)):
        [result] = query_images([name], tmp_path / "idx", k=10, device="cpu")
        got = {h.id for h in result.results}
        assert ids[name] not in got and ids[other] in got  # only the query itself is excluded

    os.unlink(odd)  # the odd one goes; the literal one stays
    gone = run_index(root, tmp_path / "idx")
    assert (gone.removed, gone.unchanged) == (1, 4)
    assert str(literal) in catalog_state(tmp_path / "idx")
    assert_consistent(tmp_path / "idx")


def test_constraint_error_fails_one_file(tmp_path: Path, monkeypatch) -> None:
    """The old lossy escaping, where two names collide: that file fails, the rest are indexed."""
    import simsearch.store.catalog as catalog

    def lossy(path: str):
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

    monkeypatch.setattr(catalog, "storable_path", lossy)
    root = tmp_path / "p"
    make_collection(root, n=3)
    os.rename(make_image(root / "t1.jpg", color=(9, 9, 250), seed=8), _odd(root, b"x\xff.jpg"))
    make_image(root / "x\\xff.jpg", color=(250, 9, 9), seed=9)
    summary = run_index(root, tmp_path / "idx")
    assert (summary.added, summary.failed) == (4, 1)
    [failure] = summary.failures
    assert "refused" in failure["error"] and "UNIQUE" in failure["error"]
    assert_consistent(tmp_path / "idx")


def test_thin_image_is_trimmed_like_the_full_resize() -> None:
    """Brute force: the crop of a trimmed thin image is the crop of the full resize (up to resampling)."""
    from simsearch.embed import preprocess_pil
    from simsearch.embed.decode import trim_thin
    from simsearch.models import Preprocessing

    prep = Preprocessing(resize_size=32, crop_size=28)
    rng = np.random.default_rng(0)
    for w, h in ((4000, 40), (30, 3000), (900, 9)):
        # smooth along the long side, so resampling phase barely matters
        ramp = np.linspace(0, 255, max(w, h))[:, None] * np.ones((1, min(w, h)))
        arr = (ramp if h > w else ramp.T) + rng.normal(0, 2, (h, w))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB")
        trimmed = trim_thin(img)
        assert max(trimmed.size) <= 32 * min(trimmed.size) and min(trimmed.size) == min(w, h)
        from torchvision.transforms import functional as F

        full = F.pil_to_tensor(F.center_crop(F.resize(img, [32], antialias=True), [28])).float()
        got = preprocess_pil(img, prep).float()
        assert got.shape == full.shape == (3, 28, 28)
        assert (got - full).abs().mean() < 3.0  # of 255
    square = Image.new("RGB", (50, 40))
    assert trim_thin(square) is square  # ordinary images are untouched


def test_thin_image_under_memory_cap(tmp_path: Path) -> None:
    """A 60000 x 1 PNG (about 12 GB to resize untrimmed) indexes and queries within an 8 GiB address space."""
    root = tmp_path / "p"
    make_collection(root, n=2)
    wide = root / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 60000, 3), dtype=np.uint8)).save(wide)
    tall = root / "tall.png"
    Image.new("RGB", (1, 60000), (10, 200, 30)).save(tall)
    cap = 8 << 30  # importing torch alone maps about 4 GB of address space

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "simsearch"]
    idx = str(tmp_path / "idx")
    done = subprocess.run(
        cli + ["index", str(root), "--index", idx, "-q", *FAST_ARGS],
        capture_output=True, text=True, env=env, preexec_fn=limited, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "failed 0" in done.stdout and "Traceback" not in done.stderr
    state = catalog_state(idx)
    assert state[str(wide)][1] == state[str(tall)][1] == "ok"
    found = subprocess.run(
        cli + ["query", str(wide), "--index", idx, "-k", "2", "--device", "cpu"],
        capture_output=True, text=True, env=env, preexec_fn=limited, timeout=600,
    )
    assert found.returncode == 0, found.stderr
    assert "Traceback" not in found.stderr and found.stdout.count("\n    ") + found.stdout.count("\n  ") >= 2


def test_memory_error_while_decoding_is_one_files_failure(tmp_path: Path, monkeypatch) -> None:
    """Whatever runs out of memory while decoding one file fails that file, in one line."""
    import simsearch.embed.decode as decode

    real = decode.preprocess_pil

    def greedy(img, prep):
        if img.size == (333, 111):
            raise MemoryError()
        return real(img, prep)

    monkeypatch.setattr(decode, "preprocess_pil", greedy)
    root = tmp_path / "p"
    make_collection(root, n=2)
    make_image(root / "greedy.png", size=(333, 111))
    summary = run_index(root, tmp_path / "idx")
    assert (summary.added, summary.failed) == (2, 1)
    [failure] = summary.failures
    assert "MemoryError" in failure["error"] and "\n" not in failure["error"]


def _unreadable(path: Path, monkeypatch):
    """Make ``path`` fail to open with EACCES (chmod where that works; root reads anything, so patch)."""
    import simsearch.images as images

    if os.geteuid() != 0:
        os.chmod(path, 0)
        return lambda: os.chmod(path, 0o644)
    real = images.open_regular

    def denied(p):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(images, "open_regular", denied)
    return lambda: monkeypatch.setattr(images, "open_regular", real)


def test_retry_after_os_error(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "p"
    make_collection(root, n=2)
    locked = make_image(root / "locked.jpg", seed=5)
    bad = root / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    fix = _unreadable(locked, monkeypatch)
    first = run_index(root, tmp_path / "idx")
    assert (first.added, first.failed) == (2, 2)
    assert any("Permission denied" in f["error"] for f in first.failures)
    fix()  # permission restored; size and mtime did not change
    second = run_index(root, tmp_path / "idx")
    assert (second.updated, second.failed, second.unchanged) == (1, 0, 3)  # bad.jpg is not retried
    state = catalog_state(tmp_path / "idx")
    assert state[str(locked)][1] == "ok" and state[str(bad)][1] == "failed"
    assert run_index(root, tmp_path / "idx").unchanged == 4
    assert_consistent(tmp_path / "idx")


def test_fifo_in_folder_is_listed_as_skipped(tmp_path: Path, no_hang) -> None:
    root = tmp_path / "p"
    make_collection(root, n=2)
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "notes")  # not an image name: not a candidate at all
    summary = run_index(root, tmp_path / "idx")
    assert (summary.added, summary.failed) == (2, 0)
    assert summary.skipped == [
        {"path": str(root / "pipe.jpg"), "reason": f"{root / 'pipe.jpg'} is a FIFO (named pipe), not a regular file"}
    ]
    assert str(root / "pipe.jpg") not in catalog_state(tmp_path / "idx")
    only = run_index([root / "pipe.jpg"], tmp_path / "idx")  # a FIFO given as the folder
    assert [s["path"] for s in only.skipped] == [str(root / "pipe.jpg")]


def test_fifo_as_query(tmp_path: Path, no_hang) -> None:
    root = tmp_path / "p"
    make_collection(root, n=2)
    run_index(root, tmp_path / "idx")
    fifo = tmp_path / "q.jpg"
    os.mkfifo(fifo)
    from simsearch.errors import InputError
    from simsearch.search import query_images

    with pytest.raises(InputError, match="is a FIFO \\(named pipe\\), not a regular file"):
        query_images([fifo], tmp_path / "idx", device="cpu")
    with pytest.raises(InputError, match="not found"):
        query_images([tmp_path / "missing.jpg"], tmp_path / "idx", device="cpu")


def test_fifo_swapped_in_after_the_walk_is_not_opened(tmp_path: Path, no_hang) -> None:
    from simsearch.errors import ImageError
    from simsearch.images import read_bytes

    os.mkfifo(tmp_path / "late.jpg")
    with pytest.raises(ImageError, match="FIFO"):
        read_bytes(tmp_path / "late.jpg")


def test_repaired_counts_each_id_once(tmp_path: Path) -> None:
    from simsearch.indexer import repair_index
    from simsearch.store import IndexStore

    root = tmp_path / "p"
    make_collection(root, n=6)
    run_index(root, tmp_path / "idx")
    with IndexStore.open(tmp_path / "idx") as store:  # a crash after a commit, before the save
        lost = store.catalog.ok_ids()[:4]
        store.ann.remove(lost)
        store.ann.save(store.ann_path)
        with store.catalog.transaction():
            store.catalog._mark_pending([int(i) for i in lost])
        found = store.check()
        assert len(found.missing) == 4 and len(found.stale) == 4  # both lists hold the same ids
    assert repair_index(tmp_path / "idx").repaired == 4
    assert_consistent(tmp_path / "idx")


def test_rebuild_with_the_same_model_starts_over(tmp_path: Path) -> None:
    root = tmp_path / "p"
    make_collection(root, n=3)
    run_index(root, tmp_path / "idx")
    before = catalog_state(tmp_path / "idx")
    (root / "a" / "img000.jpg").unlink()
    again = run_index([root / "b"], tmp_path / "idx", rebuild=True)  # same model; another folder
    assert (again.added, again.unchanged, again.total_indexed) == (1, 0, 1)
    after = catalog_state(tmp_path / "idx")
    assert sorted(after) == [str(root / "b" / "c" / "img001.jpg")] and len(before) == 3
    assert_consistent(tmp_path / "idx")

# -- the store: readers during writes, damaged files, full disks, read-only indexes, migration ----------

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "v1_index"

DESCRIPTION = {
    "model": "fake",
    "weights": "random:seed=0",
    "dim": DIM,
    "preprocessing": {"resize_size": 256, "crop_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"},
}


def record(i: int, status: str = "ok") -> dict:
    return {"path": f"/p/{i}.jpg", "size": 100 + i, "mtime_ns": 1, "hash": f"h{i}", "width": 4, "height": 3,
            "status": status, "error": None if status == "ok" else "bad"}


def synthetic_index(index_dir: Path, n: int = 400) -> np.ndarray:
    """An index of ``n`` seeded unit vectors written through the store, saved; returns them as stored."""
    x = unit_vectors(n, seed=21)
    with IndexStore.open(index_dir, create=True) as store:
        store.lock_for_writing()
        store.ensure_identity(DESCRIPTION)
        store.commit([record(i) for i in range(n)], x, [None] * n)
        store.save()
    return from_stored(to_stored(x))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"SIMSEARCH_INDEX": None}, catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in result.stderr, err
    for fragment in fragments:
        assert fragment in err, err


def finds_itself(index_dir: Path, x: np.ndarray) -> int:
    """How many stored vectors are their own nearest neighbour in the FAISS file on disk."""
    with IndexStore.open(index_dir) as store:
        ids = np.array(sorted(r.id for r in store.catalog.rows("status = 'ok'")))
        _, got = store.ann.search(x[: len(ids)], 1)
        return int((got[:, 0] == ids[: len(x)]).sum())


# -- readers during writes ----------------------------------------------------------------------

def test_queries_during_an_index_run_never_fail(tmp_path: Path) -> None:
    """A writer (another process) commits and saves batch after batch; queries in a loop meanwhile
    all answer, only with rows that exist, and the searchable count only grows."""
    from simsearch.search import Searcher

    first, more = tmp_path / "first", tmp_path / "more"
    make_collection(first, n=6, seed=1)
    paths = make_collection(more, n=48, seed=2)
    index_dir = tmp_path / "idx"
    run_index(first, index_dir)
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
            from conftest import fast_options, run_index
            run_index([{str(first)!r}, {str(more)!r}], {str(index_dir)!r},
                      options=fast_options(batch_size=2), save_interval=0)
        """)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stderr=subprocess.PIPE,
    )
    errors, searchable, rounds = [], [], 0
    try:
        while writer.poll() is None or rounds < 3:
            rounds += 1
            try:
                info = index_info(index_dir)
                searchable.append(info["searchable"])
                with Searcher(index_dir, device="cpu") as searcher:
                    (result,) = searcher.query([paths[rounds % len(paths)]], k=5, include_self=True)
                    with IndexStore.open(index_dir) as store:
                        for hit in result.results:
                            assert store.catalog.row_by_path(hit.path) is not None
            except Exception as exc:  # noqa: BLE001 - every failure is what this test counts
                errors.append(repr(exc))
    finally:
        _, err = writer.communicate(timeout=600)
    assert writer.returncode == 0, err.decode()[-2000:]
    assert errors == []
    assert rounds >= 3 and searchable == sorted(searchable) and searchable[-1] == 54
    assert_consistent(index_dir)


def test_hits_on_rows_deleted_or_changed_after_the_save_are_dropped(tmp_path: Path) -> None:
    synthetic_index(tmp_path, n=30)
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        rows = store.catalog.rows()
        store.apply_changes(removals=[rows[0]])  # deleted, not saved
        store.store_rows([record(1)], unit_vectors(1, seed=5), [rows[1]])  # new vector, not saved
    with IndexStore.open(tmp_path) as reader:
        assert reader.catalog.rows_by_ids([rows[0].id]) == {}
        assert not reader.searchable_row(reader.catalog.rows_by_ids([rows[1].id])[rows[1].id])
        assert reader.searchable_row(reader.catalog.rows_by_ids([rows[2].id])[rows[2].id])
        assert len(reader.ann) == 30  # the saved file, as it was


def test_open_and_info_read_no_vectors(tmp_path: Path, monkeypatch) -> None:
    synthetic_index(tmp_path, n=50)
    from simsearch.store import vector_index

    def refuse(*a, **k):
        raise AssertionError("read the FAISS file")

    monkeypatch.setattr(vector_index.VectorIndex, "load", classmethod(refuse))
    monkeypatch.setattr(IndexStore, "check", refuse)
    data = index_info(tmp_path)
    assert data["searchable"] == data["indexed"] == 50 and data["consistent"] is True


# -- damaged files ------------------------------------------------------------------------------

def test_truncated_faiss_file_is_rebuilt_by_repair(tmp_path: Path) -> None:
    x = synthetic_index(tmp_path)
    faiss_file = tmp_path / FAISS_FILE
    os.truncate(faiss_file, faiss_file.stat().st_size // 3)
    found = index_info(tmp_path, check=True)["check"]
    assert not found["ok"] and found["faiss_damaged"]
    summary = repair_index(tmp_path)
    assert summary.repaired >= 1 and summary.total_indexed == 400 and summary.failures == []
    assert_consistent(tmp_path)
    assert finds_itself(tmp_path, x) == 400


def test_overwritten_faiss_bytes_are_detected_and_rebuilt(tmp_path: Path) -> None:
    x = synthetic_index(tmp_path)
    faiss_file = tmp_path / FAISS_FILE
    with open(faiss_file, "r+b") as f:
        f.seek(faiss_file.stat().st_size // 3)
        f.write(np.random.default_rng(0).bytes(8192))
    result = invoke("info", "--check", "--json", "--index", tmp_path)
    assert result.exit_code == 1 and "index --repair" in result.stderr
    assert json.loads(result.stdout)["check"]["faiss_damaged"]
    repair_index(tmp_path)
    assert index_info(tmp_path, check=True)["check"]["ok"]
    assert finds_itself(tmp_path, x) == 400


def test_damaged_vector_file_rows_are_named_and_reembedded(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    paths = make_collection(root, n=6)
    index_dir = tmp_path / "idx"
    run_index(root, index_dir)
    with IndexStore.open(index_dir) as store:
        victim = store.catalog.rows()[2]
        slot = store.catalog.db.execute("SELECT slot FROM images WHERE id = ?", [victim.id]).fetchone()[0]
        row_bytes = store.vectors.row_bytes
    with open(index_dir / VECTOR_FILE, "r+b") as f:
        f.seek(HEADER_SIZE + slot * row_bytes + 100)
        f.write(b"\x7b" * 64)
    assert index_info(index_dir, check=True)["check"]["damaged_paths"] == [victim.path]
    result = invoke("index", "--repair", "--index", index_dir)
    assert result.exit_code == 0 and victim.path in result.stderr and "cannot be recovered" in result.stderr
    assert index_info(index_dir, check=True)["check"]["ok"]  # marked failed, out of FAISS
    summary = run_index(root, index_dir)
    assert summary.updated == 1 and summary.total_indexed == 6 and summary.total_failed == 0
    assert_consistent(index_dir)


def test_empty_catalog_beside_vectors_is_refused(tmp_path: Path) -> None:
    synthetic_index(tmp_path, n=20)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("vectors")}
    (tmp_path / "catalog.db").write_bytes(b"")
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(IndexCorruptError, match="refusing"):
        repair_index(tmp_path)
    assert_one_line_error(invoke("index", "--repair", "--index", tmp_path), "refusing")
    (tmp_path / "catalog.db").unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        repair_index(tmp_path)
    with pytest.raises(IndexCorruptError, match="missing"):
        IndexStore.open(tmp_path, create=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("vectors")} == before


# -- disk full, read-only ---------------------------------------------------------------------

def test_disk_full_during_an_index_run_is_one_line_and_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    """The vector file's write raises ENOSPC on the third batch: one line, exit 1, no temporary
    file, the index opens consistent, and a run after making room completes."""
    from simsearch.store import vector_file

    root = tmp_path / "imgs"
    make_collection(root, n=12)
    index_dir = tmp_path / "idx"
    real_write, calls = vector_file.VectorFile.write, []

    def full(self, slots, rows16):
        calls.append(len(slots))
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, slots, rows16)

    monkeypatch.setattr(vector_file.VectorFile, "write", full)
    result = invoke("index", root, "--index", index_dir, "--model", "resnet18", "--weights", "random",
                    "--device", "cpu", "--workers", "0", "--batch-size", "4", "--quiet")
    assert_one_line_error(result, "No space left on device", str(index_dir))
    assert not [p for p in index_dir.iterdir() if p.name.endswith(".tmp")]
    assert_consistent(index_dir)
    with IndexStore.open(index_dir) as store:
        assert store.catalog.counts()["ok"] == 8  # the two batches committed before the disk filled
    monkeypatch.setattr(vector_file.VectorFile, "write", real_write)
    summary = run_index(root, index_dir)
    assert summary.added == 4 and summary.total_indexed == 12
    assert_consistent(index_dir)


def test_disk_full_while_saving_faiss_leaves_no_tmp_file(tmp_path: Path, monkeypatch) -> None:
    import faiss

    from simsearch.store import vector_index

    x = synthetic_index(tmp_path, n=50)
    before = (tmp_path / FAISS_FILE).read_bytes()
    real_write = faiss.write_index

    def full(index, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Error in faiss::FileIOWriter ... \nwrite error: No space left on device")

    monkeypatch.setattr(vector_index.faiss, "write_index", full)
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        store.commit([record(100)], unit_vectors(1, seed=3), [None])
        with pytest.raises(IndexWriteError, match="No space left"):
            from simsearch.store import storage_errors

            with storage_errors(tmp_path):
                store.save()
    monkeypatch.setattr(vector_index.faiss, "write_index", real_write)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert (tmp_path / FAISS_FILE).read_bytes() == before  # the file as it was
    assert finds_itself(tmp_path, x) == 50
    repair_index(tmp_path)  # the committed row is pending and is mirrored now
    assert_consistent(tmp_path)


def test_disk_full_on_a_small_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        root = tmp_path / "imgs"
        make_collection(root, n=150, seed=4)
        result = subprocess.run(
            [sys.executable, "-m", "simsearch", "index", str(root), "--index", str(mnt / "idx"), "--model", "resnet18",
             "--weights", "random", "--device", "cpu", "--workers", "0", "--quiet"],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert result.returncode == 1, result.stderr
        err = result.stderr.strip()
        assert "\n" not in err and "Traceback" not in err and "cannot write the index" in err, err
        assert not [p for p in (mnt / "idx").iterdir() if p.name.endswith(".tmp")]
        with IndexStore.open(mnt / "idx") as store:
            assert store.catalog.integrity_errors() == []
        # make room (move the index where there is some): a re-run completes it, nothing lost
        shutil.copytree(mnt / "idx", tmp_path / "idx")
        summary = run_index(root, tmp_path / "idx")
        assert summary.total_indexed == 150 and summary.total_failed == 0
        assert_consistent(tmp_path / "idx")
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # still busy: detach it


def test_read_only_index_answers_info_and_query(tmp_path: Path, monkeypatch) -> None:
    """An index the user may read but not write: info and query work and nothing is written
    (SQLite opened with mode=ro, no WAL or shared-memory file made, no migration, no save)."""
    from simsearch.search import query_images
    from simsearch.store import index_store

    root = tmp_path / "imgs"
    paths = make_collection(root, n=6)
    index_dir = tmp_path / "idx"
    run_index(root, index_dir)
    for p in index_dir.iterdir():
        os.chmod(p, 0o444)
    os.chmod(index_dir, 0o555)
    try:
        if os.geteuid() == 0:  # permissions do not bind root: make the store see what a user would
            monkeypatch.setattr(index_store, "_writable", lambda path: False)
        before = {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()}
        info = index_info(index_dir)
        assert info["read_only"] is True and info["indexed"] == 6 and info["consistent"] is True
        (result,) = query_images([paths[0]], index_dir, k=3, include_self=True, device="cpu")
        assert result.results[0].path == str(paths[0])
        result = invoke("info", "--json", "--index", index_dir)
        assert result.exit_code == 0 and json.loads(result.stdout)["read_only"] is True
        assert {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()} == before
    finally:
        os.chmod(index_dir, 0o755)


# -- migration from schema version 1 -----------------------------------------------------------

def v1_vectors() -> dict[str, np.ndarray]:
    conn = sqlite3.connect(str(FIXTURE_V1 / "catalog.db"))
    try:
        return {p: np.frombuffer(v, np.float32) for p, v in conn.execute(
            "SELECT path, vector FROM images WHERE vector IS NOT NULL")}
    finally:
        conn.close()


def assert_migrated(index_dir: Path) -> None:
    expected = v1_vectors()
    with IndexStore.open(index_dir) as store:
        assert store.meta["schema_version"] == 2
        rows = {r.id: r for r in store.catalog.rows()}
        ids, x = store.all_vectors()
        assert sorted(rows[i].path for i in ids) == sorted(expected)
        for i, v in zip(ids, x):
            np.testing.assert_array_equal(v, from_stored(to_stored(expected[rows[i].path])[None, :])[0])
        assert [r.path for r in rows.values() if not r.ok] == ["/photos/bad.jpg"]
        assert store.vectors.count == len(expected)  # no slot written twice
        assert "vector" not in {c.name for c in store.catalog.db["images"].columns} or store.catalog.db.execute(
            "SELECT count(*) FROM images WHERE vector IS NOT NULL").fetchone()[0] == 0
        assert store.check(verify_vectors=True, verify_catalog=True).ok
    assert_consistent(index_dir)


def test_version_1_index_migrates_on_open(tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    shutil.copytree(FIXTURE_V1, index_dir)
    assert_migrated(index_dir)
    # the blobs' pages given back (the file itself may not shrink: newer tables, such as labels, take pages)
    conn = sqlite3.connect(index_dir / "catalog.db")
    try:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    finally:
        conn.close()
    assert index_info(index_dir)["schema_version"] == 2


@pytest.mark.parametrize(
    "module, owner, name, call",
    [
        ("simsearch.store.vector_file", "VectorFile", "write", 1),  # before the first chunk's vectors
        ("simsearch.store.vector_file", "VectorFile", "write", 3),  # chunks 1-2 moved
        ("simsearch.store.catalog", "Catalog", "migrate_v1_set_slots", 2),  # vectors written, rows not yet
        ("simsearch.store.catalog", "Catalog", "migrate_v1_finish", 1),  # every row moved, version not recorded
        ("simsearch.store.index_store", "IndexStore", "repair", 1),  # version 2, FAISS not yet rebuilt
        ("simsearch.store.vector_index", None, "write_atomic", 1),  # during the FAISS save
    ],
)
def test_kill_9_during_migration_then_reopen_finishes_it(
    tmp_path: Path, module: str, owner: str | None, name: str, call: int
) -> None:
    index_dir = tmp_path / "idx"
    shutil.copytree(FIXTURE_V1, index_dir)
    code = textwrap.dedent(f"""
        import importlib, os, signal
        import simsearch.store.index_store as store_mod
        store_mod.MIGRATE_CHUNK = 8
        mod = importlib.import_module({module!r})
        owner = getattr(mod, {owner!r}) if {owner!r} else mod
        real, calls = getattr(owner, {name!r}), []
        def killer(*a, **k):
            calls.append(1)
            if len(calls) == {call}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(owner, {name!r}, killer)
        from simsearch.store import IndexStore
        IndexStore.open({str(index_dir)!r}).close()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert_migrated(index_dir)


def test_deleted_vector_file_rows_are_marked_for_reembedding(tmp_path: Path) -> None:
    """A vector file removed or cut short: the rows past its end are found by the next run's check,
    marked for re-embedding, and new vectors never land in slots those rows still name."""
    synthetic_index(tmp_path, n=30)
    os.truncate(tmp_path / VECTOR_FILE, HEADER_SIZE + 10 * DIM * 2)  # 20 rows' vectors gone
    with IndexStore.open(tmp_path) as store:
        store.lock_for_writing()
        found = store.repair()
        assert len(found.damaged) == 20 and store.catalog.counts() == {"ok": 10, "failed": 20}
        x = unit_vectors(5, seed=9)
        store.commit([record(100 + i) for i in range(5)], x, [None] * 5)
        store.save()
        assert store.vectors.count == 15
        assert store.check(verify_vectors=True).ok
    assert_consistent(tmp_path)

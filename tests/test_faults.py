"""Fault injection: what a hostile collection or a broken disk does to an index, and what is lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_ARGS, assert_consistent, catalog_state, make_collection, make_image, run_index

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

"""Shared fixtures: generated images and a tiny random-weight model, so tests need no dataset or download."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle", "stripes")
DIM = 24  # width of the seeded random vectors the FAISS tests use


def unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Seeded random L2-normalised float32 vectors (no ties between their inner products)."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="session", autouse=True)
def fp32_by_default():
    """``--precision auto`` means fp32 in every test, whatever this CPU's bf16 support (tests that
    exercise bf16 ask for it): the same numbers on any CI machine. Session-scoped, so that module
    and session fixtures that index are covered too."""
    import simsearch.embed.device

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simsearch.embed.device, "cpu_has_native_bf16", lambda: False)
        yield


@pytest.fixture
def populated():
    """A flat VectorIndex of 300 vectors under sparse, unordered ids: (index, ids, vectors)."""
    from simsearch.store import VectorIndex

    x = unit_vectors(300, seed=0)
    ids = np.random.default_rng(1).permutation(10_000)[:300].astype(np.int64)
    index = VectorIndex(DIM)
    index.add(ids, x)
    return index, ids, x


def make_image(
    path: Path,
    size: tuple[int, int] = (160, 120),
    color: tuple[int, int, int] = (200, 40, 40),
    shape: str = "ellipse",
    seed: int = 0,
    fmt: str | None = None,
) -> Path:
    """Draw a coloured shape on a noisy background and save it (format from the suffix unless ``fmt``)."""
    rng = np.random.default_rng(seed)
    w, h = size
    background = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    if shape == "ellipse":
        draw.ellipse(box, fill=color)
    elif shape == "rectangle":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(w // 2, h // 8), (w // 8, 7 * h // 8), (7 * w // 8, 7 * h // 8)], fill=color)
    elif shape == "stripes":
        for x in range(0, w, 12):
            draw.rectangle((x, 0, x + 5, h), fill=color)
    else:
        raise ValueError(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_collection(root: Path, n: int = 12, ext: str = ".jpg", seed: int = 0) -> list[Path]:
    """``n`` distinct images spread over two sub-folders."""
    rnd = random.Random(seed)
    paths = []
    for i in range(n):
        color = (rnd.randint(60, 255), rnd.randint(60, 255), rnd.randint(60, 255))
        sub = "a" if i % 2 == 0 else "b/c"
        paths.append(
            make_image(root / sub / f"img{i:03d}{ext}", color=color, shape=SHAPES[i % len(SHAPES)], seed=seed * 1000 + i)
        )
    return paths


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_collection(root)
    return root


@pytest.fixture(scope="session")
def tiny_model():
    """A seeded random-weight ResNet-18 (512-d); shared across tests because building it costs ~0.3 s."""
    from simsearch.models import create_model

    return create_model("resnet18", "random", seed=0)


# -- helpers shared by the core tests (index / query / cluster) ---------------------------------

FAST_ARGS = ["--model", "resnet18", "--weights", "random", "--workers", "0", "--device", "cpu", "--batch-size", "8"]


def fast_options(**overrides):
    """EmbedOptions for a seeded random ResNet-18 on CPU in-process (no worker processes): fast and offline."""
    from simsearch.indexer import EmbedOptions

    values = dict(model="resnet18", weights="random", seed=0, device="cpu", batch_size=8, workers=0)
    values.update(overrides)
    return EmbedOptions(**values)


def run_index(roots, index_dir, **kwargs):
    """index_folders with :func:`fast_options` (``options=`` overrides them)."""
    from simsearch.indexer import index_folders

    if not isinstance(roots, (list, tuple)):
        roots = [roots]
    options = kwargs.pop("options", None) or fast_options()
    return index_folders(roots, index_dir, options, **kwargs)


def catalog_state(index_dir) -> dict[str, tuple[int, str, bytes | None]]:
    """path -> (id, status, stored vector bytes) straight from SQLite and the vector file, for
    before/after comparisons."""
    import sqlite3

    from simsearch.store.vector_file import DTYPE, HEADER_SIZE

    conn = sqlite3.connect(str(Path(index_dir) / "catalog.db"))
    try:
        dim = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        rows = conn.execute("SELECT id, path, status, slot FROM images").fetchall()
    finally:
        conn.close()
    data = (Path(index_dir) / "vectors.f16").read_bytes() if (Path(index_dir) / "vectors.f16").exists() else b""
    width = int(dim[0]) * DTYPE.itemsize if dim else 0
    return {
        p: (i, s, None if slot is None else data[HEADER_SIZE + slot * width : HEADER_SIZE + (slot + 1) * width])
        for i, p, s, slot in rows
    }


def assert_consistent(index_dir) -> None:
    """FAISS holds exactly the ok rows' ids, once each, with exactly their stored vectors; nothing pending."""
    import faiss

    from simsearch.store import IndexStore

    with IndexStore.open(index_dir) as store:
        ok_ids = store.catalog.ok_ids()
        found = store.check()
        assert found.ok, f"inconsistent: missing={found.missing} extra={found.extra} stale={found.stale}"
        # the FAISS file on disk, not the in-memory copy
        index = faiss.read_index(str(store.ann_path)) if store.ann_path.exists() else None
        ann_ids = (
            np.sort(faiss.vector_to_array(faiss.downcast_index(index).id_map)) if index is not None else np.zeros(0)
        )
        assert ann_ids.tolist() == sorted(ok_ids.tolist())
        if len(ok_ids):
            ids, vectors = store.all_vectors()
            got = np.stack([index.reconstruct(int(i)) for i in ids])
            np.testing.assert_allclose(got, vectors, rtol=0, atol=0)
        rows = store.catalog.rows()
        assert len({r.real_path for r in rows}) == len(rows)


# -- the browser tests' one Chromium ---------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's package: Playwright's own browser download is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright; missing on CI (``CI=true``) is a failure, elsewhere a skip."""
    import os

    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[test]')"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (required on CI)")
        pytest.skip(reason)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()

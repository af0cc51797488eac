"""Shared fixtures: generated images and a tiny random-weight model, so tests need no dataset or download."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle", "stripes")


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

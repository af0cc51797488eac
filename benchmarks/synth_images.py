"""Synthetic photo-like JPEGs for benchmarks and tests: 1/f ("natural") colour noise plus shapes.

Flat colours compress to almost nothing and decode unrealistically fast; natural images have a
roughly 1/f amplitude spectrum, which this imitates, so file sizes and decode costs land near
real photos (about 100 KB for 500x375 at the default quality, 3-5 MB for 12 MP).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def natural_array(width: int, height: int, seed: int, grain: float = 7.0) -> np.ndarray:
    """An (height, width, 3) uint8 image with a 1/f spectrum, soft shapes and a little sensor grain."""
    rng = np.random.default_rng(seed)
    # 1/f colour noise at a working resolution of at most ~1 MP, upscaled (photos are smooth at
    # the pixel scale); grain added at full size provides the fine detail
    scale = max(1.0, (width * height / 1.0e6) ** 0.5)
    w, h = max(8, int(width / scale)), max(8, int(height / scale))
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** np.float32(-rng.uniform(0.9, 1.3))
    amp[0, 0] = 0.0
    phase = rng.uniform(0, 2 * np.pi, size=(3, *amp.shape)).astype(np.float32)
    spectrum = amp * (np.cos(phase) + 1j * np.sin(phase))
    fields = np.fft.irfft2(spectrum, s=(h, w), axes=(1, 2)).astype(np.float32)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-9
    mix = (rng.normal(size=(3, 3)) * 0.35 + np.eye(3)).astype(np.float32)  # correlated colour channels
    base = np.tensordot(fields, mix, axes=([0], [1]))  # (h, w, 3)
    base = 128 + 40 * base + rng.uniform(-40, 40, size=3).astype(np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(w / 10, w / 2), y0 + rng.uniform(h / 10, h / 2)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    if (w, h) != (width, height):
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    if grain:
        arr = arr + (rng.standard_normal(size=arr.shape[:2], dtype=np.float32) * np.float32(grain))[..., None]
    return np.clip(arr, 0, 255).astype(np.uint8)


def write_jpeg(path: str | os.PathLike[str], width: int, height: int, seed: int, quality: int = 92, grain: float = 7.0) -> int:
    """Write one synthetic JPEG; returns its size in bytes."""
    arr = natural_array(width, height, seed, grain=grain)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, "JPEG", quality=quality)
    return os.path.getsize(path)


def _job(args: tuple[str, int, int, int, int, float]) -> int:
    path, w, h, seed, quality, grain = args
    return write_jpeg(path, w, h, seed, quality, grain)


def make_folder(
    folder: str | os.PathLike[str],
    n: int,
    size: tuple[int, int] = (500, 375),
    quality: int = 92,
    grain: float = 7.0,
    processes: int | None = None,
    per_dir: int = 1000,
    seed: int = 0,
) -> list[str]:
    """``n`` JPEGs under ``folder`` (sub-folders of ``per_dir``), generated in parallel processes.

    A quarter are portrait (size swapped), like a real collection. Existing files are kept, so a
    second call with the same arguments costs nothing.
    """
    folder = Path(folder)
    jobs = []
    paths = []
    for i in range(n):
        w, h = size if i % 4 else size[::-1]
        p = folder / f"d{i // per_dir:03d}" / f"img{i:06d}.jpg"
        paths.append(str(p))
        if not p.exists():
            jobs.append((str(p), w, h, seed * 1_000_003 + i, quality, grain))
    if jobs:
        procs = processes or os.cpu_count() or 1
        if procs == 1 or len(jobs) < 4:
            for j in jobs:
                _job(j)
        else:
            with ProcessPoolExecutor(procs) as pool:
                list(pool.map(_job, jobs, chunksize=max(1, len(jobs) // (procs * 8))))
    return paths

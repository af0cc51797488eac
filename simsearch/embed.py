"""Turning images into L2-normalised float32 vectors, in batches, on the chosen device.

Decoding runs in DataLoader worker processes that hand back *uint8* crops (4x less to copy
than float); normalisation happens on the device, right before the forward pass, so the CPU
and GPU decode paths share it. On CUDA the forward runs under autocast (bf16, or fp16 where
bf16 is unsupported) with channels_last memory format.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ImageError, InputError
from .images import DEFAULT_MAX_PIXELS, content_hash, decode_image, read_bytes
from .models import EmbeddingModel, Preprocessing

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (full fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def preprocess_pil(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Resize the shorter side, centre-crop, return a uint8 CHW tensor (normalised later, on device)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(img, [prep.resize_size], interpolation=InterpolationMode(prep.interpolation), antialias=True)
    img = F.center_crop(img, [prep.crop_size])
    return F.pil_to_tensor(img)


def normalize_batch(batch: torch.Tensor, prep: Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> float, scaled to [0, 1] and normalised with the preprocessing's mean/std."""
    mean = torch.tensor(prep.mean, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return ((batch.float() - mean) / std).to(dtype)


@dataclass
class DecodedItem:
    """The outcome of reading one file: metadata always, an error instead of pixels on failure."""

    path: str
    hash: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class EmbeddedBatch:
    """One batch of files: ``items`` in input order; ``vectors`` has one row per ``ok`` item, in order."""

    items: list[DecodedItem]
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], prep: Preprocessing, max_pixels: int | None, draft: bool) -> None:
        self.paths = list(paths)
        self.prep = prep
        self.max_pixels = max_pixels
        self.draft = draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, DecodedItem]:
        path = self.paths[i]
        item = DecodedItem(path)
        try:
            data = read_bytes(path)
            item.hash = content_hash(data)
            img = decode_image(
                data, path, max_pixels=self.max_pixels, draft_size=self.prep.resize_size if self.draft else None
            )
            item.width, item.height = _original_size(data, img)
            return preprocess_pil(img, self.prep), item
        except ImageError as exc:
            item.error = str(exc)
            return None, item
        except Exception as exc:  # never let one file kill a worker and the whole run
            item.error = f"{path}: unexpected decoding failure: {exc!r}"
            return None, item


def _original_size(data: bytes, img: Image.Image) -> tuple[int, int]:
    """Width/height of the upright full-size image, even when it was decoded at a draft scale."""
    with Image.open(io.BytesIO(data)) as raw:
        w, h = raw.size
        orientation = raw.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _collate(samples: list[tuple[torch.Tensor | None, DecodedItem]]) -> tuple[torch.Tensor, list[DecodedItem]]:
    tensors = [t for t, _ in samples if t is not None]
    items = [item for _, item in samples]
    batch = torch.stack(tensors) if tensors else torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    return batch, items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class Embedder:
    """Runs an :class:`EmbeddingModel` over files or images, batch by batch."""

    def __init__(
        self,
        model: EmbeddingModel,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device)
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        self.workers = default_workers() if workers is None else workers
        self.max_pixels = max_pixels
        self.draft = draft
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.prep = model.preprocessing

    @property
    def dim(self) -> int:
        return self.model.dim

    @torch.inference_mode()
    def embed_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a uint8 NCHW batch of preprocessed crops."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        x = batch.to(self.device, non_blocking=True)
        x = normalize_batch(x, self.prep)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=self.dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        return out.float().cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed already-decoded RGB images (used for queries)."""
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out.append(self.embed_uint8(torch.stack([preprocess_pil(im, self.prep) for im in chunk])))
        return np.concatenate(out)

    def embed_files(
        self, paths: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> Iterator[EmbeddedBatch]:
        """Decode files in parallel workers and yield embedded batches in input order."""
        if not paths:
            return
        dataset = _FileDataset(paths, self.prep, self.max_pixels, self.draft)
        workers = min(self.workers, max(1, len(paths) // self.batch_size)) if self.workers else 0
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=4 if workers else None,
        )
        for batch, items in loader:
            vectors = self.embed_uint8(batch)
            if progress is not None:
                progress(len(items))
            yield EmbeddedBatch(items, vectors)

"""Decoding for training: augmentation, the image dataset and its loaders.

The labelled sets these read are in :mod:`simsearch.labelled`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..embed import CropDecoder, build_loader
from ..errors import ImageError
from ..images import DEFAULT_MAX_PIXELS, read_bytes
from ..models import Preprocessing


def build_augmentation(prep: Preprocessing, scale: tuple[float, float] = (0.25, 1.0)) -> Callable[[Any], Any]:
    """Random resized crop, horizontal flip and colour jitter, ending in a uint8 CHW tensor."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    return T.Compose(
        [
            T.RandomResizedCrop(prep.crop_size, scale=scale, interpolation=InterpolationMode(prep.interpolation), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            T.Lambda(F.pil_to_tensor),
        ]
    )


class ImageDataset(torch.utils.data.Dataset):
    """Decode (robustly) and crop: random augmentation for training, centre crop otherwise.

    Items are ``(uint8 CHW tensor or None, label, index, error or None)``; a file that fails is
    returned with its error instead of killing the worker.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        prep: Preprocessing,
        augment: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.prep = prep
        self.max_pixels = max_pixels
        self.transform = build_augmentation(prep) if augment else None
        # the one decode path (its centre crop, or the augmentation in its place)
        self.decoder = CropDecoder(prep, max_pixels=max_pixels, crop=self.transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int, str | None]:
        path = self.paths[i]
        try:
            x, _ = self.decoder.decode(read_bytes(path), path)
            return x, int(self.labels[i]), i, None
        except ImageError as exc:  # unexpected failures arrive as ImageError too
            return None, int(self.labels[i]), i, str(exc)


def collate(samples: list[tuple[torch.Tensor | None, int, int, str | None]]) -> dict[str, Any]:
    ok = [s for s in samples if s[0] is not None]
    return {
        "images": torch.stack([s[0] for s in ok]) if ok else torch.zeros((0, 3, 1, 1), dtype=torch.uint8),
        "labels": torch.tensor([s[1] for s in ok], dtype=torch.int64),
        "index": torch.tensor([s[2] for s in ok], dtype=torch.int64),
        "errors": [(s[2], s[3]) for s in samples if s[0] is None],
    }


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    sampler: Any = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches of :class:`ImageDataset` items (see :func:`collate`), from the shared loader builder."""
    return build_loader(
        dataset, workers, batch_size=batch_size, sampler=sampler, shuffle=shuffle, collate_fn=collate,
        pin_memory=pin_memory, drop_last=drop_last, seed=seed,
    )

"""The frozen network's outputs, computed once: pooled features (and trunk activations) per image.

:func:`scan` is the first pass of a run: it decodes every image (finding the unreadable ones
before any training) and, when a phase needs them, caches what the frozen backbone computes, so
that the head phase trains in milliseconds per epoch and ``cache_trunk`` fine-tuning skips the trunk.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..labelled import LabelledSet
from .callbacks import TrainCallback
from .config import TrainConfig
from .data import ImageDataset, make_loader
from .runtime import autocast_context, batch_to_device

log = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """Per-image outputs of the frozen network, in dataset order, on the CPU."""

    features: torch.Tensor  # (N, D) frozen pooled features, float32
    trunk: torch.Tensor | None  # (N, C, H, W) frozen trunk activations of the centre crops, float16
    views: torch.Tensor | None = None  # (N, V, C, H, W) the same for V augmented views, float16

    def select(self, indices: np.ndarray) -> "FeatureCache":
        """The cache of the chosen items only."""
        return FeatureCache(
            self.features[indices],
            None if self.trunk is None else self.trunk[indices],
            None if self.views is None else self.views[indices],
        )


def scan(
    model: Any,
    trunk: nn.Module,
    top: nn.Module,
    dataset: LabelledSet,
    device: torch.device,
    config: TrainConfig,
    workers: int,
    cb: TrainCallback,
    features: bool,
    trunk_acts: bool,
) -> tuple[FeatureCache | None, set[int]]:
    """Decode every image once; with ``features``/``trunk_acts`` also run the frozen network.

    Returns the cache (None when neither was asked for) and the indices of unreadable images.
    """
    n = len(dataset)
    ds = ImageDataset(dataset.paths, dataset.labels, model.preprocessing, augment=False, max_pixels=config.max_pixels)
    batch = max(config.batch_size, 64 if device.type == "cuda" else 32)
    loader = make_loader(ds, batch, workers, pin_memory=device.type == "cuda", seed=config.seed)
    bad: set[int] = set()
    feats = torch.zeros((n, model.spec.dim), dtype=torch.float32) if features or trunk_acts else None
    acts: torch.Tensor | None = None
    if trunk_acts:
        shape = trunk_shape(model, trunk, device)
        check_cache_size(n, shape, config)
        acts = torch.zeros((n, *shape), dtype=torch.float16)
    trunk.to(device, memory_format=torch.channels_last).eval()
    top.to(device, memory_format=torch.channels_last).eval()
    cb.on_extract_start(n, "frozen features" if feats is not None else "checking images")
    try:
        with torch.inference_mode():
            for b in loader:
                for i, err in b["errors"]:
                    bad.add(int(i))
                    log.warning("skipped unreadable image: %s", err)
                if feats is not None and len(b["index"]):
                    x = batch_to_device(b["images"], model, device)
                    with autocast_context(device):
                        a = trunk(x)
                        f = top(a)
                    feats[b["index"]] = f.float().cpu()
                    if acts is not None:
                        acts[b["index"]] = a.half().cpu()
                cb.on_extract_advance(len(b["index"]) + len(b["errors"]))
    finally:
        cb.on_extract_end()
    if feats is None:
        return None, bad
    return FeatureCache(feats, acts), bad


def cache_gb(n: int, shape: tuple[int, ...], config: TrainConfig) -> float:
    """GB of float16 activations a trunk cache holds: centre crops of ``n`` images, views of the training share."""
    train_share = 1.0 if config.val_classes is not None else 1.0 - config.val_fraction
    return n * (1 + train_share * config.views) * math.prod(shape) * 2 / 1e9


def check_cache_size(n: int, shape: tuple[int, ...], config: TrainConfig) -> None:
    """Refuse a trunk cache over ``cache_max_gb``."""
    gb = cache_gb(n, shape, config)
    if gb > config.cache_max_gb:
        raise InputError(
            f"--cache-trunk with --views {config.views} would hold about {gb:.1f} GB of activations "
            f"(limit {config.cache_max_gb} GB); use fewer --views, unfreeze fewer stages, or fine-tune on "
            "images (--no-cache-trunk)"
        )


def cache_fits(model: Any, trunk: nn.Module, n: int, device: torch.device, config: TrainConfig) -> bool:
    """Whether the trunk cache of ``n`` images fits in ``cache_max_gb`` (the default ``cache_trunk``)."""
    gb = cache_gb(n, trunk_shape(model, trunk, device), config)
    fits = gb <= config.cache_max_gb
    log.info(
        "fine-tuning on %s: the trunk cache would hold %.1f GB (limit %.1f GB)",
        "cached trunk activations" if fits else "images", gb, config.cache_max_gb,
    )
    return fits


def augmented_views(
    model: Any,
    trunk: nn.Module,
    data: LabelledSet,
    device: torch.device,
    config: TrainConfig,
    workers: int,
    cb: TrainCallback,
) -> torch.Tensor:
    """The frozen trunk's activations of ``config.views`` augmented views of every image: (N, V, C, H, W).

    Each view is a random resized crop, flip and colour jitter of the image (the augmentation image
    fine-tuning uses), drawn once; what the trunk computes for it is then exact for every epoch that
    uses it, so fine-tuning on a CPU pays the trunk ``views`` times instead of once per epoch.
    """
    n, v = len(data), config.views
    shape = trunk_shape(model, trunk, device)
    out = torch.zeros((n, v, *shape), dtype=torch.float16)
    ds = ImageDataset(data.paths, data.labels, model.preprocessing, augment=True, max_pixels=config.max_pixels)
    batch = max(config.batch_size, 64 if device.type == "cuda" else 32)
    trunk.to(device, memory_format=torch.channels_last).eval()
    cb.on_extract_start(n * v, f"{v} augmented views")
    try:
        with torch.inference_mode():
            for view in range(v):
                # a seed per view (and run): each view is another draw of the augmentation
                loader = make_loader(ds, batch, workers, pin_memory=device.type == "cuda", seed=config.seed * 7919 + 101 + view)
                for b in loader:
                    if len(b["index"]):
                        x = batch_to_device(b["images"], model, device)
                        with autocast_context(device):
                            out[b["index"], view] = trunk(x).half().cpu()
                    cb.on_extract_advance(len(b["index"]) + len(b["errors"]))
    finally:
        cb.on_extract_end()
    return out


def trunk_shape(model: Any, trunk: nn.Module, device: torch.device) -> tuple[int, ...]:
    """The shape of one image's trunk activations at the model's crop size."""
    c = model.preprocessing.crop_size
    trunk.to(device).eval()
    with torch.inference_mode():
        x = torch.zeros((1, model.conv_in, c, c), device=device)
        return tuple(trunk(x).shape[1:])

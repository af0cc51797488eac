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
    trunk: torch.Tensor | None  # (N, C, H, W) frozen trunk activations, float16

    def select(self, indices: np.ndarray) -> "FeatureCache":
        """The cache of the chosen items only."""
        return FeatureCache(self.features[indices], None if self.trunk is None else self.trunk[indices])


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
        gb = n * math.prod(shape) * 2 / 1e9
        if gb > config.cache_max_gb:
            raise InputError(
                f"--cache-trunk would hold {gb:.1f} GB of activations (limit {config.cache_max_gb} GB); "
                "unfreeze fewer stages, use fewer images, or fine-tune on images (no --cache-trunk)"
            )
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


def trunk_shape(model: Any, trunk: nn.Module, device: torch.device) -> tuple[int, ...]:
    """The shape of one image's trunk activations at the model's crop size."""
    c = model.preprocessing.crop_size
    trunk.to(device).eval()
    with torch.inference_mode():
        x = torch.zeros((1, model.conv_in, c, c), device=device)
        return tuple(trunk(x).shape[1:])

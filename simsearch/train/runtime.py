"""Device, precision, workers and seeding for training: the helpers every training pass shares.

Training uses the embedding layer's precision policy (:func:`simsearch.embed.autocast_dtype`) and
its batch normalisation, so a model trains in the numeric setting it is later indexed in.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from ..embed import autocast_dtype, default_workers, normalize_batch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # pytorch-metric-learning's samplers draw from np.random
    torch.manual_seed(seed)


def train_workers(workers: int | None, device: torch.device) -> int:
    """Decoding workers for training: as given, else a few (more on a GPU, which waits for them)."""
    if workers is not None:
        return workers
    return min(default_workers(), 8 if device.type == "cuda" else 2)


def autocast_context(device: torch.device) -> AbstractContextManager[Any]:
    """Mixed precision on a GPU as the precision policy says; a no-op context elsewhere."""
    dtype = autocast_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


def batch_to_device(images: torch.Tensor, model: Any, device: torch.device) -> torch.Tensor:
    """A uint8 image batch as the model's normalised, channels-last input on ``device``."""
    x = normalize_batch(images.to(device, non_blocking=True), model.preprocessing)
    x = model.adapt_input(x)
    return x.contiguous(memory_format=torch.channels_last)  # the fast layout on CPU (oneDNN) and GPU

"""Validating a training run: embeddings of the validation set and their retrieval figures.

The figures come from :func:`simsearch.evaluate.retrieval_metrics`, the code ``simsearch eval``
uses, so a validation Recall@1 means what an evaluation's does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluate import retrieval_metrics
from ..labelled import LabelledSet
from .config import TrainConfig
from .data import ImageDataset, make_loader
from .runtime import autocast_context, batch_to_device


def validation_metrics(embeddings: torch.Tensor, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """Recall@K, MAP@R and NMI of L2-normalised embeddings, as a dict."""
    return retrieval_metrics(embeddings.float().cpu().numpy(), labels, nmi=True, seed=seed).to_dict()


def embed_set(
    model: Any,
    trunk: nn.Module,
    top: nn.Module,
    head: nn.Module | None,
    data: LabelledSet,
    device: torch.device,
    workers: int,
    config: TrainConfig,
) -> tuple[torch.Tensor, np.ndarray]:
    """Centre-crop embeddings of a labelled set with the current modules (eval mode)."""
    ds = ImageDataset(data.paths, data.labels, model.preprocessing, augment=False, max_pixels=config.max_pixels)
    loader = make_loader(ds, max(config.batch_size, 32), workers, pin_memory=device.type == "cuda", seed=config.seed)
    out, labels = [], []
    trunk.eval()
    top.eval()
    if head is not None:
        head.eval()
    with torch.inference_mode():
        for b in loader:
            if not len(b["index"]):
                continue
            x = batch_to_device(b["images"], model, device)
            with autocast_context(device):
                f = top(trunk(x))
                if head is not None:
                    f = head(f)
            out.append(nn.functional.normalize(f.float(), dim=1).cpu())
            labels.append(b["labels"].numpy())
    return torch.cat(out), np.concatenate(labels)


def embed_trunk_activations(top: nn.Module, head: nn.Module, acts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """L2-normalised embeddings from cached trunk activations (``top`` and ``head`` in eval mode)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(acts), 256):
            a = acts[start : start + 256].to(device).float()
            with autocast_context(device):
                out.append(head(top(a)).float())
    return nn.functional.normalize(torch.cat(out), dim=1)

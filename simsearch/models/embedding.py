"""The embedding model: a backbone's pooled features, an optional metric head, L2 normalisation.

Also the gray-level variants: a model that turns any input gray (replicated to RGB), and the
adaptation of an RGB network's first convolution to one channel.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .registry import BackboneSpec, Preprocessing

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights: colour -> gray for 1-channel models


class EmbeddingModel(nn.Module):
    """Backbone (pooled features) plus an optional metric head, with L2-normalised output.

    ``in_chans=1`` makes a gray-level model: whatever RGB batch comes in (normalised with
    ``preprocessing``) is turned into gray first, so colour and gray files embed alike. The gray
    image is then either replicated to the 3 channels of an RGB backbone, or, when the backbone's
    first convolution was adapted to 1 channel (``conv_in=1``, see :func:`adapt_first_conv_to_gray`), fed
    as one channel.
    """

    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        weights_id: str,
        head: nn.Module | None = None,
        dim: int | None = None,
        preprocessing: Preprocessing | None = None,
        in_chans: int = 3,
        conv_in: int = 3,
    ) -> None:
        super().__init__()
        if in_chans not in (1, 3) or conv_in not in (1, 3) or (conv_in == 1 and in_chans != 1):
            raise InputError(f"unsupported channels: in_chans={in_chans}, first conv input={conv_in}")
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.weights_id = weights_id
        self.dim = dim if dim is not None else spec.dim
        self.preprocessing = preprocessing or spec.preprocessing
        self.in_chans = in_chans
        self.conv_in = conv_in
        self.twin: Twin | None = None  # a second top + head whose embedding joins this one's (see Twin)
        self._split: tuple[nn.Module, nn.Module] | None = None  # (trunk, top) of the backbone, with a twin

    @property
    def model_name(self) -> str:
        return self.spec.name

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised RGB batch to what the backbone takes (identity for RGB models)."""
        if self.in_chans == 3:
            return x
        if x.shape[1] == 1 and self.conv_in == 1:
            return x  # already one normalised gray channel
        return self._gray(x)

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.preprocessing.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        gray = ((x * std + mean) * luma).sum(1, keepdim=True)  # back to [0, 1], then BT.601 luma
        if self.conv_in == 1:
            return (gray - mean.mean()) / std.mean()
        return (gray - mean) / std  # replicated to 3 channels, each with its own mean/std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, before the head and before normalisation."""
        f = self.backbone(self.adapt_input(x))
        return torch.flatten(f, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.twin is not None and self._split is not None:
            trunk, top = self._split
            a = trunk(self.adapt_input(x))
            main = torch.flatten(top(a), 1)
            if self.head is not None:
                main = self.head(main)
            return self.twin.join(main, a)
        f = self.features(x)
        if self.head is not None:
            f = self.head(f)
        return nn.functional.normalize(f.float(), dim=1)

    def describe(self) -> dict[str, Any]:
        """What an index records about the model that made its vectors."""
        return {
            "model": self.model_name,
            "weights": self.weights_id,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
        }


class Twin(nn.Module):
    """A second top (the backbone's last ``stages``, with other weights) and head on the same trunk.

    What ``simsearch train`` keeps by default: the fine-tuned model with the head-only model as its
    twin. Each model's L2-normalised embedding is weighted, ``sqrt(weight)`` for the main one and
    ``sqrt(1 - weight)`` for the twin's, and the two are concatenated: a unit vector whose cosine
    with another is ``weight`` x the main model's cosine + ``(1 - weight)`` x the twin's. Fine-tuning
    gains on the classes it was trained on and loses on others; this keeps most of the gain and
    none of the loss (``benchmarks/README.md``, bench_ensemble.py). The trunk runs once; the top
    stages twice.
    """

    def __init__(self, top: nn.Module, head: nn.Module, stages: int, weight: float) -> None:
        super().__init__()
        if not 0.0 < weight < 1.0:
            raise InputError(f"a twin's weight must be between 0 and 1, not {weight}")
        self.top = top
        self.head = head
        self.stages = int(stages)
        self.weight = float(weight)

    def join(self, main: torch.Tensor, trunk_out: torch.Tensor) -> torch.Tensor:
        """The joined embedding of the main model's head output and the twin's, from the trunk's output."""
        return join_embeddings(main, self.head(torch.flatten(self.top(trunk_out), 1)), self.weight)


def join_embeddings(main: torch.Tensor, other: torch.Tensor, weight: float) -> torch.Tensor:
    """Two models' embeddings (or class vectors) of the same rows as one unit vector each: both
    L2-normalised, weighted ``sqrt(weight)`` and ``sqrt(1 - weight)``, concatenated; its cosine
    with another is ``weight`` x the first model's cosine + ``(1 - weight)`` x the second's."""
    return torch.cat(
        [
            nn.functional.normalize(main.float(), dim=1) * weight**0.5,
            nn.functional.normalize(other.float(), dim=1) * (1.0 - weight) ** 0.5,
        ],
        dim=1,
    )


def gray_preprocessing(prep: Preprocessing) -> Preprocessing:
    """One mean/std for all channels (the mean of the three), as a 1-channel first conv needs."""
    m = sum(prep.mean) / 3.0
    s = sum(prep.std) / 3.0
    return Preprocessing(prep.resize_size, prep.crop_size, (m, m, m), (s, s, s), prep.interpolation)


def adapt_first_conv_to_gray(model: EmbeddingModel) -> EmbeddingModel:
    """Turn an RGB model into a 1-channel one whose first conv sums the pretrained RGB filters.

    For a gray image, sum_c w_c * (g - m) / s with the averaged mean/std approximates what the
    RGB network computed on the replicated gray image, so pretrained weights keep working.
    """
    net = model.backbone
    name = model.spec.first_conv
    try:
        conv = net.get_submodule(name)
    except AttributeError:
        raise InputError(f"{model.model_name} has no first convolution {name!r} to adapt") from None
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1:
        raise InputError(f"{model.model_name}: {name} is not a 3-channel convolution; cannot adapt it")
    new = copy.deepcopy(conv)
    new.in_channels = 1
    new.weight = nn.Parameter(conv.weight.detach().sum(dim=1, keepdim=True).clone())
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, new)
    model.in_chans = 1
    model.conv_in = 1
    model.preprocessing = gray_preprocessing(model.preprocessing)
    return model

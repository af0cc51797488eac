"""The backbone registry: names, feature dims, preprocessing and how to build each network.

The lowest module of :mod:`simsearch.models`: it imports no backbone. The backbone modules
(:mod:`.resnet`, :mod:`.lite0`) call :func:`register` when they are imported, and the package's
``__init__`` imports them, so every name is registered once the package is imported, whatever
module was asked for first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded RGB image becomes the model's input tensor (recorded in every index)."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            resize_size=int(d["resize_size"]),
            crop_size=int(d["crop_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
        )


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about one backbone."""

    name: str
    dim: int
    build: Callable[[], nn.Module]  # returns the pooled-feature network (no classifier)
    preprocessing: Preprocessing
    imagenet_weights: Callable[[], Any] | None = None  # returns a weights.ImagenetWeights entry
    load_imagenet: Callable[[nn.Module], str] | None = None  # custom pretrained loader -> identity
    stages: tuple[str, ...] = field(default_factory=tuple)  # top-level modules, input to output
    first_conv: str = "conv1"
    # The forward pass as an ordered list of (name, module), stages included (for splitting a
    # backbone into a frozen trunk and a trainable top); None when the backbone cannot be split.
    sequence: Callable[[nn.Module], list[tuple[str, nn.Module]]] | None = None
    # How many of ``stages`` fine-tuning unfreezes by default: the network's top stage, as a share of
    # its compute (a ResNet's layer4; EfficientNet-Lite0's last block with its 1x1 head conv, which
    # alone would be a linear map of frozen features).
    top_stages: int = 1


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (later registration of the same name replaces it)."""
    _REGISTRY[spec.name] = spec
    return spec


def available_models() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registered backbone ``name``; an :class:`InputError` naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown model {name!r}; choose one of: {', '.join(available_models())}"
        ) from None

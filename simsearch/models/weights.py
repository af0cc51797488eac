"""Reading weights: ImageNet weights from torchvision's download cache, state dict files, digests.

``"imagenet"`` is loaded through torchvision's download cache (``torch.hub.get_dir()/checkpoints``,
read by torch.hub: torchvision itself is not imported);
offline with no cached file is a :class:`WeightsError` that says which file to put where. A
backbone with its own pretrained loader (``BackboneSpec.load_imagenet``) uses that instead.
A weights file is identified by its content digest, so an index knows exactly which file made it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from ..images import hash_file
from .registry import BackboneSpec


@dataclass(frozen=True)
class ImagenetWeights:
    """One of torchvision's ImageNet weights files, named as torchvision names it.

    ``enum`` and ``name`` are torchvision's weights enum and member (``ResNet50_Weights``,
    ``IMAGENET1K_V2``): the identity an index records is ``imagenet:{enum}.{name}``.
    """

    enum: str
    name: str
    url: str

    @property
    def label(self) -> str:
        return f"{self.enum}.{self.name}"

    def get_state_dict(self, progress: bool = False, check_hash: bool = True) -> dict[str, Any]:
        """The state dict, from torch.hub's cache (downloaded there first when missing), as torchvision reads it."""
        return torch.hub.load_state_dict_from_url(self.url, progress=progress, check_hash=check_hash)


def file_digest(path: str | os.PathLike[str], length: int = 16) -> str:
    """The first ``length`` hex digits of the file's content hash (the one indexing uses)."""
    return hash_file(path)[:length]


def imagenet_cache_path(weights: ImagenetWeights) -> Path:
    """Where torchvision's download cache keeps the file of a weights entry."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _offline() -> bool:
    return os.environ.get("SIMSEARCH_OFFLINE", "") not in ("", "0", "false", "no")


def load_imagenet(spec: BackboneSpec, net: nn.Module) -> str:
    """Load ``spec``'s ImageNet weights into ``net``; returns the weights identity an index records."""
    if spec.load_imagenet is not None:
        return spec.load_imagenet(net)
    if spec.imagenet_weights is None:
        raise WeightsError(f"{spec.name} has no ImageNet weights in the registry")
    weights = spec.imagenet_weights()
    cached = imagenet_cache_path(weights)
    if not cached.exists() and _offline():
        raise WeightsError(_missing_weights_message(spec.name, weights, cached, "SIMSEARCH_OFFLINE is set"))
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # network errors come in many types (URLError, socket, ssl, http)
        if cached.exists():
            raise WeightsError(f"could not load cached ImageNet weights {cached}: {exc}") from exc
        raise WeightsError(_missing_weights_message(spec.name, weights, cached, str(exc))) from exc
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    net.load_state_dict(state, strict=True)
    return f"imagenet:{weights.label}"


def _missing_weights_message(name: str, weights: ImagenetWeights, cached: Path, reason: str) -> str:
    return (
        f"ImageNet weights for {name} are not in torchvision's cache and could not be downloaded "
        f"({reason}). Download {weights.url} on a machine with internet access and copy it to "
        f"{cached} (or set TORCH_HOME to a folder holding hub/checkpoints/{cached.name}); "
        f"or use --weights random, or --weights PATH for a state dict or simsearch checkpoint."
    )


def load_weights_file(path: str | os.PathLike[str], what: str = "weights file") -> Any:
    """``torch.load`` of a weights file (tensors only), any failure a :class:`WeightsError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"could not read {what} {path}: {exc}") from exc


def clean_backbone_state(state: dict[str, Any]) -> dict[str, Any]:
    """Accept plain torchvision state dicts, ``backbone.``-prefixed ones and DataParallel ones."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc."):
            continue
        out[k] = v
    return out


def load_backbone_file(spec: BackboneSpec, net: nn.Module, path: Path, state: Any) -> None:
    """Load a backbone state dict read from ``path`` into ``net`` (a ``state_dict`` entry is unwrapped)."""
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        net.load_state_dict(clean_backbone_state(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(f"{path} does not fit {spec.name}: {first}") from exc

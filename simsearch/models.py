"""Backbone registry and factory: the one place that knows model names, dims and preprocessing.

``create_model(name, weights)`` returns an :class:`EmbeddingModel` whose forward pass maps a
normalised image batch to L2-normalised float32 embeddings. Weights are resolved here:

* ``"imagenet"``: torchvision's weights enum, loaded through its download cache
  (``torch.hub.get_dir()/checkpoints``); offline with no cached file is a :class:`WeightsError`
  that says which file to put where.
* ``"random"``: seeded random initialisation, for tests and offline trials.
* a path: a torchvision state dict for the backbone, or a simsearch training checkpoint
  (backbone + metric head), see :mod:`simsearch.train.checkpoint`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import InputError, WeightsError

log = logging.getLogger(__name__)

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
    imagenet_weights: Callable[[], Any] | None = None  # returns a torchvision WeightsEnum member
    load_imagenet: Callable[[nn.Module], str] | None = None  # custom pretrained loader -> identity
    stages: tuple[str, ...] = field(default_factory=tuple)  # top-level modules, input to output
    first_conv: str = "conv1"
    # The forward pass as an ordered list of (name, module), stages included (for splitting a
    # backbone into a frozen trunk and a trainable top); None when the backbone cannot be split.
    sequence: Callable[[nn.Module], list[tuple[str, nn.Module]]] | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (later registration of the same name replaces it)."""
    _REGISTRY[spec.name] = spec
    return spec


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown model {name!r}; choose one of: {', '.join(available_models())}"
        ) from None


def _torchvision_resnet(name: str) -> nn.Module:
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    net.fc = nn.Identity()  # type: ignore[assignment]
    return net


def _resnet_preprocessing(weights: Any) -> Preprocessing:
    t = weights.transforms()
    return Preprocessing(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=str(t.interpolation.value),
    )


def _resnet_sequence(net: nn.Module) -> list[tuple[str, nn.Module]]:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    return [(n, getattr(net, n)) for n in names] + [("flatten", nn.Flatten(1))]


def _register_resnets() -> None:
    import torchvision

    dims = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
    for name, dim in dims.items():
        enum = torchvision.models.get_model_weights(name)
        register(
            BackboneSpec(
                name=name,
                dim=dim,
                build=lambda n=name: _torchvision_resnet(n),
                preprocessing=_resnet_preprocessing(enum.DEFAULT),
                imagenet_weights=lambda e=enum: e.DEFAULT,
                stages=("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
                sequence=_resnet_sequence,
            )
        )


_register_resnets()


def _register_optional_backbones() -> None:
    try:
        from . import lite0  # noqa: F401  (registers efficientnet_lite0 when its extra is present)
    except ImportError:
        pass  # the extra is not installed: the ResNets are all there is
    except Exception as exc:  # a broken optional package must not take the ResNets down with it
        log.warning("efficientnet_lite0 is not available: %s", exc)


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
    import copy

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


def backbone_sequence(model: EmbeddingModel) -> list[tuple[str, nn.Module]]:
    """The backbone's forward pass as ordered (name, module) pairs (see BackboneSpec.sequence)."""
    if model.spec.sequence is None:
        raise InputError(f"{model.model_name} cannot be split into stages")
    return model.spec.sequence(model.backbone)


def split_backbone(model: EmbeddingModel, n_top: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(trunk, top): the backbone cut before its top ``n_top`` stages; modules are shared, not copied.

    ``top(trunk(model.adapt_input(x)))`` equals ``model.features(x)``.
    """
    first_top = top_stages(model, n_top)[0]
    seq = backbone_sequence(model)
    names = [n for n, _ in seq]
    cut = names.index(first_top)
    return nn.Sequential(*[m for _, m in seq[:cut]]), nn.Sequential(*[m for _, m in seq[cut:]])


def top_stages(model: EmbeddingModel, n_top: int) -> list[str]:
    """Names of the top ``n_top`` stages (the ones fine-tuning unfreezes)."""
    stages = model.spec.stages
    if not 1 <= n_top <= len(stages):
        raise InputError(f"--unfreeze must be between 1 and {len(stages)} for {model.model_name} ({', '.join(stages)})")
    return list(stages[len(stages) - n_top :])


def imagenet_cache_path(weights: Any) -> Path:
    """Where torchvision's download cache keeps the file for a weights enum member."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _offline() -> bool:
    return os.environ.get("SIMSEARCH_OFFLINE", "") not in ("", "0", "false", "no")


def _load_imagenet(spec: BackboneSpec, net: nn.Module) -> str:
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
    return f"imagenet:{type(weights).__name__}.{weights.name}"


def _missing_weights_message(name: str, weights: Any, cached: Path, reason: str) -> str:
    return (
        f"ImageNet weights for {name} are not in torchvision's cache and could not be downloaded "
        f"({reason}). Download {weights.url} on a machine with internet access and copy it to "
        f"{cached} (or set TORCH_HOME to a folder holding hub/checkpoints/{cached.name}); "
        f"or use --weights random, or --weights PATH for a state dict or simsearch checkpoint."
    )


def file_digest(path: str | os.PathLike[str], length: int = 16) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _load_state_dict_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"could not read weights file {path}: {exc}") from exc


def _clean_backbone_state(state: dict[str, Any]) -> dict[str, Any]:
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


def create_model(
    name: str = "resnet50",
    weights: str | os.PathLike[str] = "imagenet",
    seed: int = 0,
    in_chans: int = 3,
    adapt_first_conv: bool = False,
) -> EmbeddingModel:
    """Build an embedding model by registry name; ``weights`` is imagenet, random or a file path.

    A path to a simsearch training checkpoint carries its own backbone name, channels and head,
    which win over ``name``/``in_chans`` (the checkpoint knows what it holds).
    ``in_chans=1`` makes a gray-level model (gray replicated to RGB), and with
    ``adapt_first_conv`` its first convolution takes one channel (see :func:`adapt_first_conv_to_gray`).
    """
    if in_chans not in (1, 3):
        raise InputError(f"--in-chans must be 1 or 3, not {in_chans}")
    if adapt_first_conv and in_chans != 1:
        raise InputError("--adapt-first-conv needs --in-chans 1")
    weights = str(weights)
    if weights not in ("imagenet", "random"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights must be 'imagenet', 'random' or a path to a weights file; {weights!r} is none of these"
            )
        state = _load_state_dict_file(path)
        if isinstance(state, dict) and state.get("format") == "simsearch-checkpoint":
            from .train.checkpoint import model_from_checkpoint

            if name != state.get("backbone", {}).get("name", name):
                log.info("%s holds a %s checkpoint; using that, not %s", path, state["backbone"]["name"], name)
            return model_from_checkpoint(state, path)
        spec = get_spec(name)
        net = spec.build()
        if not isinstance(state, dict):
            raise WeightsError(f"{path} does not hold a state dict")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            net.load_state_dict(_clean_backbone_state(state), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise WeightsError(f"{path} does not fit {name}: {first}") from exc
        model = EmbeddingModel(net, spec, f"file:{path.name}:{file_digest(path)}")
    else:
        spec = get_spec(name)
        if weights == "random":
            torch.manual_seed(seed)
            net = spec.build()
            weights_id = f"random:seed={seed}"
        else:
            net = spec.build()
            weights_id = _load_imagenet(spec, net)
        model = EmbeddingModel(net, spec, weights_id)
    if in_chans == 1:
        model.in_chans = 1
        if adapt_first_conv:
            adapt_first_conv_to_gray(model)
    model.eval()
    return model


_register_optional_backbones()

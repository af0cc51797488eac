"""torchvision's ResNets (18 to 152) as registered backbones: pooled features, stages, preprocessing.

Importing this module registers them; their ImageNet weights come from torchvision's weights
enums, read by :func:`simsearch.models.weights.load_imagenet`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import BackboneSpec, Preprocessing, register

DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


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

    for name, dim in DIMS.items():
        enum = torchvision.models.get_model_weights(name)
        register(
            BackboneSpec(
                name=name,
                dim=dim,
                build=lambda n=name: _torchvision_resnet(n),
                preprocessing=_resnet_preprocessing(enum.DEFAULT),
                imagenet_weights=lambda e=enum: e.DEFAULT,
                stages=STAGES,
                sequence=_resnet_sequence,
            )
        )


_register_resnets()

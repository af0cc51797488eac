"""The ResNets (18 to 152) as registered backbones: pooled features, stages, preprocessing.

The networks are torchvision's ResNet architecture written out here with ``torch.nn`` alone: the
same modules, names and state-dict keys, built in the same order with the same initialisation (so a
seeded random model and a torchvision state dict give the same vectors), but importing torchvision
costs as much CPU time as importing torch itself (its ``ops`` package pulls in ``torch._dynamo``),
and a cold ``simsearch query`` of a new image pays for every import. The ImageNet weights are
torchvision's files, read through torch.hub's cache (:func:`simsearch.models.weights.load_imagenet`);
:data:`IMAGENET_WEIGHTS` names each backbone's default entry the way torchvision does, which is the
identity an index records. A test checks all of it against torchvision itself.

Importing this module registers the ResNets.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, Preprocessing, register
from .weights import ImagenetWeights

STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_DOWNLOADS = "https://download.pytorch.org/models/"

# name -> (block, blocks per stage, torchvision's default ImageNet weights, resize size of their preprocessing)
_CONFIGS: dict[str, tuple[str, tuple[int, int, int, int], ImagenetWeights, int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), ImagenetWeights("ResNet18_Weights", "IMAGENET1K_V1", _DOWNLOADS + "resnet18-f37072fd.pth"), 256),
    "resnet34": ("basic", (3, 4, 6, 3), ImagenetWeights("ResNet34_Weights", "IMAGENET1K_V1", _DOWNLOADS + "resnet34-b627a593.pth"), 256),
    "resnet50": ("bottleneck", (3, 4, 6, 3), ImagenetWeights("ResNet50_Weights", "IMAGENET1K_V2", _DOWNLOADS + "resnet50-11ad3fa6.pth"), 232),
    "resnet101": ("bottleneck", (3, 4, 23, 3), ImagenetWeights("ResNet101_Weights", "IMAGENET1K_V2", _DOWNLOADS + "resnet101-cd907fc2.pth"), 232),
    "resnet152": ("bottleneck", (3, 8, 36, 3), ImagenetWeights("ResNet152_Weights", "IMAGENET1K_V2", _DOWNLOADS + "resnet152-f82ba261.pth"), 232),
}
IMAGENET_WEIGHTS = {name: cfg[2] for name, cfg in _CONFIGS.items()}
DIMS = {name: 512 if cfg[0] == "basic" else 2048 for name, cfg in _CONFIGS.items()}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (strided), 1x1 up, and a shortcut (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` without its classifier: ``fc`` is an identity, forward -> pooled features.

    The classifier is still created (then replaced) so that a seeded random initialisation draws
    the same numbers as torchvision's, in the same order.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc: nn.Module = nn.Linear(512 * block.expansion, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        self.fc = nn.Identity()

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet(name: str) -> ResNet:
    """A ResNet by registry name (``resnet18`` ... ``resnet152``), classifier removed."""
    block, layers, _, _ = _CONFIGS[name]
    return ResNet(BasicBlock if block == "basic" else Bottleneck, layers)


def _resnet_sequence(net: nn.Module) -> list[tuple[str, nn.Module]]:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    return [(n, getattr(net, n)) for n in names] + [("flatten", nn.Flatten(1))]


def _register_resnets() -> None:
    for name, (_, _, weights, resize) in _CONFIGS.items():
        register(
            BackboneSpec(
                name=name,
                dim=DIMS[name],
                build=lambda n=name: build_resnet(n),
                # torchvision's ImageClassification preset of these weights
                preprocessing=Preprocessing(resize, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
                imagenet_weights=lambda w=weights: w,
                stages=STAGES,
                sequence=_resnet_sequence,
            )
        )


_register_resnets()

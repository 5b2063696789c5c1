"""The networks of the STE paper's experiments ([P1] §5): LeNet-5, VGG-11 and ResNet-20.

As in the paper, every ReLU follows a BatchNorm (``bn_affine=False`` gives BatchNorm without scale
and shift, so the activation's input is ~N(0, 1) and a fixed quantization step fits it). Every
activation is its own ``nn.ReLU`` instance, called at exactly one place in ``forward``, so the
quantization rewrite can swap each one independently. Layers followed by a BatchNorm carry no bias
(the BatchNorm's mean subtraction would cancel it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QatSteError

__all__ = [
    "LeNet5",
    "VGG11",
    "ResNet20",
    "BasicBlock",
    "ZeroPadShortcut",
    "VGG11_CONFIG",
    "lenet5",
    "vgg11",
    "resnet20",
    "ZOO_MODELS",
    "create_zoo_model",
    "list_zoo_models",
]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise QatSteError(f"{name} must be a positive integer, got {value!r}", f"pass e.g. {name}=10")


# --------------------------------------------------------------------------------------------
# LeNet-5
# --------------------------------------------------------------------------------------------


class LeNet5(nn.Module):
    """LeNet-5 with BatchNorm before each ReLU:
    conv 6@5x5 (pad 2) -> BN -> ReLU -> maxpool 2, conv 16@5x5 -> BN -> ReLU -> maxpool 2,
    fc 120 -> BN -> ReLU, fc 84 -> BN -> ReLU, fc num_classes.

    ``image_size`` (28 or 32, any >= 12) fixes the flattened size: 16x5x5 for 28, 16x6x6 for 32.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, bn_affine: bool = True, image_size: int = 28
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        side = ((image_size // 2) - 4) // 2  # conv1 keeps the size, pool halves, conv2 -4, pool halves
        if side < 1:
            raise QatSteError(
                f"LeNet-5 needs images of at least 12x12, got image_size={image_size}",
                "use image_size=28 (MNIST) or 32 (MNIST padded with pad_to=32)",
            )
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6, affine=bn_affine)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(16, affine=bn_affine)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120, bias=False)
        self.bn3 = nn.BatchNorm1d(120, affine=bn_affine)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.bn4 = nn.BatchNorm1d(84, affine=bn_affine)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.flatten(x)
        x = self.relu3(self.bn3(self.fc1(x)))
        x = self.relu4(self.bn4(self.fc2(x)))
        return self.fc3(x)


# --------------------------------------------------------------------------------------------
# VGG-11
# --------------------------------------------------------------------------------------------

VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 for 32x32 inputs: per entry of ``VGG11_CONFIG`` a conv 3x3 (pad 1) -> BN -> ReLU, or
    ("M") a 2x2 max-pool; five pools take 32x32 to 1x1, then Linear(512, num_classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, bn_affine: bool = True) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in VGG11_CONFIG:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, int(entry), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(entry), affine=bn_affine),
                    nn.ReLU(),
                ]
                channels = int(entry)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


# --------------------------------------------------------------------------------------------
# ResNet-20
# --------------------------------------------------------------------------------------------


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016): keep every ``stride``-th pixel and zero-pad the extra
    channels, split evenly before and after. No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise QatSteError(
                f"a zero-padding shortcut cannot shrink {in_channels} to {out_channels} channels",
                "use out_channels >= in_channels",
            )
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN, plus the shortcut, then ReLU after the add."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bn_affine: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, affine=bn_affine)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, affine=bn_affine)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: conv 16@3x3 -> BN -> ReLU, three stages of three BasicBlocks (16, 32, 64
    channels; stride 2 entering stages 2 and 3, option-A shortcuts), global average pool,
    Linear(64, num_classes). Conv and linear weights use Kaiming-normal init."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, bn_affine: bool = True) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, affine=bn_affine)
        self.relu1 = nn.ReLU()
        self.layer1 = self._stage(16, 16, stride=1, bn_affine=bn_affine)
        self.layer2 = self._stage(16, 32, stride=2, bn_affine=bn_affine)
        self.layer3 = self._stage(32, 64, stride=2, bn_affine=bn_affine)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int, bn_affine: bool, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride, bn_affine)]
        layers += [BasicBlock(out_channels, out_channels, 1, bn_affine) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


# --------------------------------------------------------------------------------------------
# Constructors and registry
# --------------------------------------------------------------------------------------------


def lenet5(num_classes: int = 10, in_channels: int = 1, bn_affine: bool = True, image_size: int = 28) -> LeNet5:
    """LeNet-5 with BatchNorm before each ReLU, for 28x28 or 32x32 inputs."""
    return LeNet5(num_classes, in_channels, bn_affine, image_size)


def vgg11(num_classes: int = 10, in_channels: int = 3, bn_affine: bool = True) -> VGG11:
    """VGG-11 with BatchNorm before each ReLU, for 32x32 inputs."""
    return VGG11(num_classes, in_channels, bn_affine)


def resnet20(num_classes: int = 10, in_channels: int = 3, bn_affine: bool = True) -> ResNet20:
    """CIFAR ResNet-20 (option-A shortcuts, ReLU after the add), for 32x32 inputs."""
    return ResNet20(num_classes, in_channels, bn_affine)


# The registry: name -> constructor. Add entries here (or at runtime) to make models creatable by name.
ZOO_MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "vgg11": vgg11,
    "resnet20": resnet20,
}


def list_zoo_models() -> list[str]:
    """Names accepted by :func:`create_zoo_model`, sorted."""
    return sorted(ZOO_MODELS)


def create_zoo_model(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model by name, e.g. ``create_zoo_model("resnet20", num_classes=10, bn_affine=False)``."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ZOO_MODELS:
        raise QatSteError(
            f"unknown zoo model {name!r}",
            f"use one of {', '.join(list_zoo_models())}",
        )
    constructor = ZOO_MODELS[key]
    parameters = inspect.signature(constructor).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise QatSteError(
            f"zoo model {key!r} does not take argument(s) {', '.join(unknown)}",
            f"its arguments are: {', '.join(parameters)}",
        )
    return constructor(**kwargs)

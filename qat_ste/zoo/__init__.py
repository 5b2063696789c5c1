"""Model zoo: the networks of the STE paper's experiments (LeNet-5, VGG-11, ResNet-20)."""

from .models import (
    VGG11,
    VGG11_CONFIG,
    ZOO_MODELS,
    BasicBlock,
    LeNet5,
    ResNet20,
    ZeroPadShortcut,
    create_zoo_model,
    lenet5,
    list_zoo_models,
    resnet20,
    vgg11,
)

__all__ = [
    "VGG11_CONFIG",
    "ZOO_MODELS",
    "VGG11",
    "BasicBlock",
    "LeNet5",
    "ResNet20",
    "ZeroPadShortcut",
    "create_zoo_model",
    "lenet5",
    "list_zoo_models",
    "resnet20",
    "vgg11",
]

"""Models by name for a data set: ``zoo:NAME``, ``torchvision:NAME``, ``timm:NAME``.

Models are always built with random weights; pretrained weights come only from a local file
(:func:`~qat_ste.train.pretrained.load_weights_file`, re-exported here). Nothing here downloads
anything: a request for hub or pretrained weights is refused with a message saying how to pass a
file instead.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import QatSteError
from .pretrained import _WEIGHTS_FIX, HUB_WORDS, load_weights_file

__all__ = [
    "MODEL_SOURCES", "ModelSpec", "parse_model_spec", "build_model", "default_image_size", "data_options",
    "load_weights_file", "HUB_WORDS",
]

MODEL_SOURCES = ("zoo", "torchvision", "timm")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``source:name`` model reference."""

    source: str
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``zoo:lenet5`` / ``torchvision:resnet18`` / ``timm:resnet18`` (a bare name means zoo).
    Suffixes such as ``@pretrained`` and hub references are refused."""
    if not isinstance(text, str) or not text.strip():
        raise QatSteError("empty model name", "pass e.g. --model zoo:lenet5, torchvision:resnet18 or timm:resnet18")
    raw = text.strip()
    if "@" in raw:
        raise QatSteError(f"model {raw!r} asks for downloaded weights ({raw[raw.index('@'):]})", _WEIGHTS_FIX)
    source, sep, name = raw.partition(":")
    if not sep:
        source, name = "zoo", raw
    source = source.strip().lower()
    name = name.strip()
    if source in ("hf-hub", "hf_hub", "hf", "http", "https", "local-dir"):
        raise QatSteError(f"model {raw!r} refers to a hub or URL, which qat-ste does not load", _WEIGHTS_FIX)
    if source not in MODEL_SOURCES:
        raise QatSteError(f"unknown model source {source!r} in {raw!r}",
                          "write the model as zoo:NAME, torchvision:NAME or timm:NAME (qat-ste list-models)")
    if not name or "/" in name or ":" in name:
        raise QatSteError(f"model name {name!r} in {raw!r} is not a plain model name",
                          "write e.g. torchvision:resnet18; hub repositories are not loaded")
    return ModelSpec(source, name)


#: data sets whose images have one fixed size (served as they are by default)
NATIVE_IMAGE_SIZE = {"mnist": 28, "cifar10": 32}


def default_image_size(spec: ModelSpec, dataset: str | None = None, preprocess: str = "auto") -> int:
    """The input side used when the user gives none: the data set's own for MNIST (28) and
    CIFAR-10 (32); for a streamed image folder the model's own resolution (timm: its pretrained
    config's input size; torchvision: the named weights' crop, else 224); otherwise 28 for LeNet-5
    and 32 for every other model."""
    name = (dataset or "").partition(":")[0].strip().lower()
    if name in NATIVE_IMAGE_SIZE:
        return NATIVE_IMAGE_SIZE[name]
    if name == "imagefolder" and spec.source != "zoo":
        return _native_resolution(spec, preprocess)
    return 28 if spec.source == "zoo" and spec.name.lower() == "lenet5" else 32


#: the side of ImageNet-style models without a configuration of their own (resize 256, crop 224)
IMAGENET_SIZE = 224


def _native_resolution(spec: ModelSpec, preprocess: str) -> int:
    """The input side a torchvision or timm model was made for (see default_image_size)."""
    if preprocess and preprocess != "auto":
        from ..data.transforms import resolve_preprocess

        return resolve_preprocess(None, None, preprocess).size
    if spec.source == "timm":
        try:
            from timm.models import get_pretrained_cfg
        except ImportError:
            return IMAGENET_SIZE
        config = get_pretrained_cfg(spec.name)
        size = getattr(config, "input_size", None) if config is not None else None
        return int(size[-1]) if size else IMAGENET_SIZE
    return IMAGENET_SIZE


def data_options(dataset: str, image_size: int) -> dict[str, Any]:
    """``load_dataset`` options that serve ``image_size`` x ``image_size`` images from ``dataset``
    (the spec's name part), or a QatSteError when that data set cannot be served at that size."""
    name = dataset.partition(":")[0].strip().lower()
    if image_size < 4:
        raise QatSteError(f"--image-size {image_size} is too small", "use e.g. 28 or 32")
    if name == "digits":
        return {} if image_size == 8 else {"resize": image_size}
    if name == "synthetic":
        return {"size": image_size}
    if name == "imagefolder":
        return {"size": image_size}
    if name == "mnist":
        if image_size < 28:
            raise QatSteError(f"MNIST images are 28x28 and cannot be served at {image_size}x{image_size}",
                              "use --image-size 28 or larger (larger sizes zero-pad)")
        return {} if image_size == 28 else {"pad_to": image_size}
    if name == "cifar10":
        if image_size != 32:
            raise QatSteError(f"CIFAR-10 images are 32x32, not {image_size}x{image_size}", "use --image-size 32")
        return {}
    return {}


def _accepts(fn: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the model's first Conv2d ``in_channels`` inputs (a fresh, randomly initialised layer)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            if module.groups != 1:
                raise QatSteError(f"the first convolution {name} is grouped; cannot change its input channels",
                                  "use data with the model's channel count")
            geometry: dict[str, Any] = {"kernel_size": module.kernel_size, "stride": module.stride,
                                        "padding": module.padding, "dilation": module.dilation}
            new = nn.Conv2d(in_channels, module.out_channels, **geometry, groups=1, bias=module.bias is not None,
                            padding_mode=module.padding_mode)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return
    raise QatSteError("the model has no Conv2d layer whose input channels could be adapted",
                      "use data with the model's channel count")


def _unknown_model(spec: ModelSpec, known: list[str]) -> QatSteError:
    close = difflib.get_close_matches(spec.name, known, n=4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return QatSteError(f"unknown {spec.source} model {spec.name!r}",
                       f"{hint}qat-ste list-models shows the zoo; torchvision/timm names come from those libraries")


def build_model(spec: ModelSpec, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A randomly initialised ``spec`` model with ``num_classes`` outputs and ``in_channels`` inputs."""
    if spec.source == "zoo":
        from ..zoo import ZOO_MODELS, create_zoo_model

        key = spec.name.lower()
        if key not in ZOO_MODELS:
            raise _unknown_model(spec, sorted(ZOO_MODELS))
        kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}
        if _accepts(ZOO_MODELS[key], "image_size"):
            kwargs["image_size"] = image_size
        return create_zoo_model(key, **kwargs)
    if spec.source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if spec.name not in names:
            raise _unknown_model(spec, names)
        try:
            model = torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes,
                                                 image_size=image_size)
        except TypeError:  # only some models (ViT, Swin...) take image_size
            model = torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes)
        _replace_first_conv(model, in_channels)
        return model
    try:
        import timm
    except ImportError:
        raise QatSteError("timm models need the timm package, which is not installed",
                          "pip install 'qat_ste[timm]' (or timm)") from None
    if not timm.is_model(spec.name):
        raise _unknown_model(spec, timm.list_models())
    base: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    try:
        return timm.create_model(spec.name, img_size=image_size, **base)
    except TypeError:  # CNNs take no img_size
        return timm.create_model(spec.name, **base)

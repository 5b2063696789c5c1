"""Model-aware preprocessing for streamed image files: the transforms a model was trained with.

- timm models: ``timm.data.resolve_data_config(model=...)`` (input size, interpolation, crop_pct,
  mean/std of the model's pretrained config) and ``timm.data.create_transform`` (timm's train
  transform with ``is_training=True``, its resize + center-crop eval transform otherwise).
- torchvision weights named by the user (``ResNet18_Weights.IMAGENET1K_V1``): the weights' own
  ``transforms()`` for evaluation (built locally, nothing is downloaded), and RandomResizedCrop +
  horizontal flip with the same interpolation and mean/std for training.
- other torchvision (and unknown) models: the usual ImageNet recipe scaled to the input side,
  resize to side / 0.875 then center crop (256 / 224), and RandomResizedCrop + flip for training.
- small models (the zoo): a plain resize to the side (no crop), and for training a random crop with
  4 pixels of padding + flip, as the in-memory data sets do.

timm and torchvision are imported only when a preprocessing is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import QatSteError
from .info import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PREPROCESS_KINDS", "Preprocess", "model_kind", "resolve_preprocess"]

#: the preprocessing families: timm's data config, the ImageNet resize/crop, the zoo's plain resize
PREPROCESS_KINDS = ("timm", "torchvision", "small")


@dataclass(frozen=True)
class Preprocess:
    """The transforms of one model (each maps a PIL image to a normalised float C x H x W tensor)
    and what they do, for the log line and the data set's info."""

    kind: str  # "timm", "torchvision" (ImageNet recipe or named weights), "small"
    size: int  # side of the square images the model receives
    interpolation: str
    crop_pct: float | None  # eval: center crop of side / crop_pct; None: plain resize
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    train: Callable[[Any], Any]
    eval: Callable[[Any], Any]
    source: str = ""  # e.g. the torchvision weights' name

    def describe(self) -> str:
        """E.g. ``timm preprocessing 224 px bicubic crop_pct 0.95``."""
        what = f"{self.kind} preprocessing" + (f" ({self.source})" if self.source else "")
        crop = f"crop_pct {self.crop_pct:g}" if self.crop_pct is not None else "no crop"
        return f"{what} {self.size} px {self.interpolation} {crop}"

    def transform(self, augment: bool) -> Callable[[Any], Any]:
        """The training transform (``augment``) or the evaluation one."""
        return self.train if augment else self.eval


def model_kind(model: nn.Module) -> str:
    """``timm`` for a model timm built (it carries a pretrained config), ``small`` for a qat_ste zoo
    model, else ``torchvision`` (the ImageNet recipe)."""
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        return "timm"
    if type(model).__module__.startswith("qat_ste.zoo"):
        return "small"
    return "torchvision"


def resolve_preprocess(model: nn.Module | None, image_size: int | None = None, preprocess: str = "auto", *,
                       kind: str | None = None, channels: int = 3) -> Preprocess:
    """The preprocessing of ``model`` (see the module doc). ``preprocess``: ``auto`` or a torchvision
    weights name. ``image_size``: the side served (default: the model's own, 224 outside timm and
    the zoo; the zoo needs it). ``kind`` overrides the detection from the model object."""
    if channels not in (1, 3):
        raise QatSteError(f"channels must be 1 or 3, got {channels}", "use 3 (RGB) or 1 (grey)")
    if image_size is not None and int(image_size) < 4:
        raise QatSteError(f"image size {image_size} is too small", "use e.g. 32 or 224")
    if not isinstance(preprocess, str) or not preprocess.strip():
        raise QatSteError(f"preprocess must be 'auto' or a torchvision weights name, got {preprocess!r}",
                          "use --preprocess auto or e.g. --preprocess ResNet18_Weights.IMAGENET1K_V1")
    if preprocess.strip() != "auto":
        return _weights_preprocess(preprocess.strip(), image_size, channels)
    kind = kind or (model_kind(model) if model is not None else "torchvision")
    if kind not in PREPROCESS_KINDS:
        raise QatSteError(f"unknown preprocessing kind {kind!r}", f"use one of {', '.join(PREPROCESS_KINDS)}")
    if kind == "timm":
        if model is None:
            raise QatSteError("timm preprocessing needs the model (its pretrained config)", "pass the timm model")
        return _timm_preprocess(model, image_size, channels)
    if kind == "small":
        if image_size is None:
            raise QatSteError("the small-model preprocessing needs an image size", "pass image_size, e.g. 32")
        return _small_preprocess(int(image_size), channels)
    return _imagenet_preprocess(int(image_size or 224), channels, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


def _stats(mean: Any, std: Any, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel statistics for ``channels`` (one grey channel gets the mean of three)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if channels == 1 and len(mean) != 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def _timm_preprocess(model: nn.Module, image_size: int | None, channels: int) -> Preprocess:
    from timm.data import create_transform, resolve_data_config

    overrides: dict[str, Any] = {}
    if image_size is not None:
        overrides["input_size"] = (channels, int(image_size), int(image_size))
    config = resolve_data_config(overrides, model=model)
    config["mean"], config["std"] = _stats(config["mean"], config["std"], channels)
    side = int(config["input_size"][-1])
    if int(config["input_size"][-2]) != side:
        raise QatSteError(f"the timm model's input size {config['input_size'][1:]} is not square",
                          "pass --image-size N to serve N x N images")
    return Preprocess(kind="timm", size=side, interpolation=str(config["interpolation"]),
                      crop_pct=float(config["crop_pct"]), mean=config["mean"], std=config["std"],
                      channels=channels, train=create_transform(**config, is_training=True),
                      eval=create_transform(**config, is_training=False))


def _imagenet_train(size: int, interpolation: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size, interpolation=interpolation), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(mean, std)])


def _imagenet_preprocess(size: int, channels: int, interpolation: str, mean: Any, std: Any) -> Preprocess:
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    mean, std = _stats(mean, std, channels)
    resize = int(round(size / 0.875))
    evaluation = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), T.ToTensor(),
                            T.Normalize(mean, std)])
    return Preprocess(kind="torchvision", size=size, interpolation=interpolation, crop_pct=0.875, mean=mean,
                      std=std, channels=channels, train=_imagenet_train(size, mode, mean, std), eval=evaluation)


def _small_preprocess(size: int, channels: int) -> Preprocess:
    from torchvision import transforms as T

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)
    train = T.Compose([resize, T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                       T.Normalize(mean, std)])
    evaluation = T.Compose([resize, T.ToTensor(), T.Normalize(mean, std)])
    return Preprocess(kind="small", size=size, interpolation="bilinear", crop_pct=None, mean=mean, std=std,
                      channels=channels, train=train, eval=evaluation)


def _weights_preprocess(name: str, image_size: int | None, channels: int) -> Preprocess:
    """The transforms of torchvision weights ``name`` (an enum member such as
    ``ResNet18_Weights.IMAGENET1K_V1``); ``image_size`` rescales crop and resize alike."""
    import torchvision
    from torchvision import transforms as T

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise QatSteError(f"--preprocess {name!r} is not a torchvision weights name",
                          "write it as ENUM.MEMBER, e.g. ResNet18_Weights.IMAGENET1K_V1 (see "
                          "torchvision.models.get_model_weights(NAME)), or use --preprocess auto") from None
    reference = weights.transforms()
    crop, resize = getattr(reference, "crop_size", None), getattr(reference, "resize_size", None)
    if not crop or not resize or not hasattr(reference, "mean"):
        raise QatSteError(f"the transforms of {name} are not an image classification preprocessing",
                          "name image classification weights, or use --preprocess auto")
    side = int(image_size) if image_size is not None else int(crop[0])
    evaluation = reference
    if side != int(crop[0]):
        evaluation = weights.transforms(crop_size=side, resize_size=int(round(side * resize[0] / crop[0])))
    mean, std = _stats(reference.mean, reference.std, channels)
    if channels == 1:
        evaluation = T.Compose([T.Resize(evaluation.resize_size, interpolation=reference.interpolation),
                                T.CenterCrop(side), T.ToTensor(), T.Normalize(mean, std)])
    interpolation = reference.interpolation
    return Preprocess(kind="torchvision", size=side, interpolation=str(interpolation.value),
                      crop_pct=float(crop[0]) / float(resize[0]), mean=mean, std=std, channels=channels,
                      train=_imagenet_train(side, interpolation, mean, std), eval=evaluation, source=name)

"""What every data set shares: :class:`DatasetInfo` (classes, channels, size, mean/std), the
standard statistics, the split names, seed mixing and the stratified split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import QatSteError

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DatasetInfo", "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_MEAN", "MNIST_STD",
           "SPLITS", "stratified_split"]

# Standard per-channel statistics of the training sets (pixel values scaled to [0, 1]).
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# ImageFolder has no statistics of its own: default to the usual ImageNet ones (or 0.5/0.5 for grey).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------
# Metadata and the in-memory data set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder needs to know about a data set."""

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]  # (height, width) of the images as served
    mean: tuple[float, ...]  # per channel, for pixel values in [0, 1]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return (self.channels, self.image_size[0], self.image_size[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, e.g. to store next to a checkpoint."""
        return asdict(self)


def _check_split(split: str) -> bool:
    """Return True for the held-out split (val/test), False for train."""
    if split not in SPLITS:
        raise QatSteError(
            f"unknown split {split!r}",
            f"use one of {', '.join(SPLITS)} ('val' and 'test' both mean the held-out part)",
        )
    return split != "train"



def _mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (deterministic, order-sensitive)."""
    h = 0xCBF29CE484222325
    for part in parts:
        h = ((h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool, batch_size: int, rank: int,
                world_size: int) -> torch.Tensor:
    """The indices (of ``n`` samples) that ``rank`` visits in ``epoch``, in order: a permutation seeded
    by (seed, epoch) (or 0..n-1), cut to whole global batches with ``drop_last``, else padded by
    repetition to a multiple of ``world_size``, then every ``world_size``-th position from ``rank``.
    The in-memory and the streaming loaders share it, so both visit the same samples."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(seed, epoch)))
    else:
        order = torch.arange(n)
    w = world_size
    if drop_last:
        order = order[: (n // (batch_size * w)) * batch_size * w]
    else:
        total = math.ceil(n / w) * w
        if total > n:
            order = order.repeat(math.ceil(total / n))[:total]
    return order[rank::w]


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val), holding out round(val_fraction * n_c) of each class c.

    Deterministic for a given seed; both index arrays come back sorted.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise QatSteError(f"val_fraction must be in [0, 1), got {val_fraction}", "use e.g. 0.2")
    labels = np.asarray(labels)
    rng = np.random.default_rng(int(seed))
    train_parts, val_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        held = int(math.floor(len(members) * float(val_fraction) + 0.5))
        val_parts.append(members[:held])
        train_parts.append(members[held:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


def _require_two_classes(found: int, where: str, what: str, fix: str) -> None:
    """Refuse a data set with fewer than 2 classes: a classifier learns nothing from one (it scores 100 %)."""
    if found < 2:
        raise QatSteError(f"{found} class{'' if found == 1 else 'es'} found in {where}: a classifier needs at "
                          f"least 2 {what}", fix)

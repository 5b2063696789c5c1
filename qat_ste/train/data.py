"""Image data sets held in memory, and a fast, shardable, resumable batch iterator.

Every data set here is a :class:`TensorImageDataset`: images as one ``uint8`` tensor
(N x C x H x W), labels as one ``int64`` tensor (N), and a :class:`DatasetInfo` that says how many
classes, channels and pixels there are and which mean/std normalises them. Images stay ``uint8``
until a batch is drawn (4x less memory and host-to-device traffic than float); the batch is then
optionally augmented (random crop with zero padding + horizontal flip, done on the whole batch with
one gather) and normalised to float. Small sets like these fit in memory, so a GPU is not starved by
Python-level decoding.

Entry point: ``load_dataset(spec, split, **options)`` with ``spec`` one of

- ``digits``             scikit-learn's bundled 8x8 digits (no download), 80/20 stratified split
- ``synthetic``          seeded Gaussian-blob images with class-dependent patterns
- ``mnist:FOLDER``       the four MNIST IDX files (``*-ubyte`` or ``*-ubyte.gz``)
- ``cifar10:FOLDER``     the ``cifar-10-batches-py`` folder (or its parent)
- ``imagefolder:FOLDER`` one subfolder of images per class (optionally under train/ and val/)

Splits: ``train``, and ``val`` or ``test`` (synonyms: the held-out part; MNIST's t10k files,
CIFAR-10's ``test_batch``, the 20 % held out of digits).

Batches: :class:`TensorLoader` shuffles with its own ``torch.Generator`` (seeded from seed + epoch),
shards each epoch across DDP ranks, and can save and restore its position mid-epoch. The data sets
also implement ``__len__``/``__getitem__`` so a standard ``torch.utils.data.DataLoader`` works too.
"""

from __future__ import annotations

import gzip
import inspect
import math
import pickle
import re
import struct
import types
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QatSteError

__all__ = [
    "DatasetInfo",
    "TensorImageDataset",
    "TensorLoader",
    "KNOWN_DATASETS",
    "load_dataset",
    "parse_dataset_spec",
    "load_mnist",
    "load_cifar10",
    "load_imagefolder",
    "load_digits",
    "make_synthetic",
    "read_idx",
    "random_crop_flip",
    "stratified_split",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]

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


class TensorImageDataset(torch.utils.data.Dataset):
    """Images (uint8, N x C x H x W) and labels (int64, N) held in memory.

    ``dataset[i]`` returns ``(float image C x H x W, int label)``, normalised with ``info.mean`` and
    ``info.std`` (and augmented with the global torch RNG when ``augment`` is on), so a standard
    DataLoader works. :meth:`get_batch` does the same for many indices at once and is what
    :class:`TensorLoader` uses.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        augment: bool = False,
        crop_padding: int = 4,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise QatSteError(
                "images must be a uint8 tensor shaped N x C x H x W",
                "convert them with torch.as_tensor(array, dtype=torch.uint8) and permute to N x C x H x W",
            )
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise QatSteError(
                f"labels must be a 1-D tensor with one entry per image ({images.shape[0]})",
                "pass one integer class label per image",
            )
        if images.shape[1] != info.channels or tuple(images.shape[2:]) != tuple(info.image_size):
            raise QatSteError(
                f"images are {tuple(images.shape[1:])} but the data set info says {info.input_shape}",
                "make DatasetInfo.channels and image_size match the image tensor",
            )
        if len(info.mean) != info.channels or len(info.std) != info.channels or min(info.std) <= 0:
            raise QatSteError(
                f"mean/std must have one entry per channel ({info.channels}) and std must be > 0",
                "give per-channel mean and std for pixel values in [0, 1]",
            )
        labels = labels.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
            raise QatSteError(
                f"labels range over {int(labels.min())}..{int(labels.max())}, "
                f"outside 0..{info.num_classes - 1}",
                "give labels in 0..num_classes-1 or raise num_classes",
            )
        if crop_padding < 0:
            raise QatSteError(f"crop_padding must be >= 0, got {crop_padding}", "use e.g. 4")
        self.images = images
        self.labels = labels
        self.info = info
        self.augment = bool(augment)
        self.crop_padding = int(crop_padding)
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        image = self.images[index : index + 1]
        if self.augment:
            image = random_crop_flip(image, self.crop_padding)
        return self.normalize(image)[0], int(self.labels[index])

    def __repr__(self) -> str:
        i = self.info
        return (
            f"TensorImageDataset({i.name!r}, n={len(self)}, shape={i.input_shape}, "
            f"classes={i.num_classes}, augment={self.augment})"
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (... x C x H x W) -> float32, scaled to [0, 1] then (x - mean) / std."""
        if self._mean.device != images.device:  # move once, not a host-to-device copy per batch
            self._mean, self._std = self._mean.to(images.device), self._std.to(images.device)
        return images.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std)

    def get_batch(
        self,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, (augment,) and normalise a batch: returns (float images, int64 labels).

        The uint8 images are moved to ``device`` before augmentation and normalisation, so those
        run on the accelerator. ``generator`` (a CPU generator) makes the augmentation reproducible.
        """
        indices = indices.to(self.images.device)
        images = self.images.index_select(0, indices)
        labels = self.labels.index_select(0, indices)
        if device is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        if self.augment:
            images = random_crop_flip(images, self.crop_padding, generator)
        return self.normalize(images), labels

    def class_counts(self) -> torch.Tensor:
        """Number of images per class (int64, length num_classes)."""
        return torch.bincount(self.labels.cpu(), minlength=self.info.num_classes)

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """A copy whose tensors live on ``device`` (e.g. the whole set on the GPU)."""
        return TensorImageDataset(
            self.images.to(device), self.labels.to(device), self.info, self.augment, self.crop_padding
        )

    def with_augment(self, augment: bool) -> TensorImageDataset:
        """The same data (shared, not copied) with augmentation switched on or off."""
        return TensorImageDataset(self.images, self.labels, self.info, augment, self.crop_padding)


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop (same size, after zero-padding each side by ``padding``) + horizontal flip with
    probability 1/2, per image, on a whole N x C x H x W batch with a single gather.

    Random numbers come from ``generator`` (CPU) or the global torch RNG, then move to the images'
    device, so the result does not depend on where the images live.
    """
    n, c, h, w = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offsets[:, 0:1] + torch.arange(h, device=device)  # n x h
    cols = offsets[:, 1:2] + torch.arange(w, device=device)  # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is just reversed column order
    batch_index = torch.arange(n, device=device)[:, None, None, None]
    channel_index = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------------
# Batch iterator
# --------------------------------------------------------------------------------------------


def _mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (deterministic, order-sensitive)."""
    h = 0xCBF29CE484222325
    for part in parts:
        h = ((h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class TensorLoader:
    """Fast batch iterator over a :class:`TensorImageDataset`, yielding (float images, labels).

    - Shuffling uses a private ``torch.Generator`` seeded from ``(seed, epoch)``: the order of an
      epoch depends only on those two numbers.
    - DDP sharding: with ``world_size`` > 1, rank ``r`` takes positions ``r, r + W, r + 2W, ...``
      of the epoch's permutation. The ranks' k-th batches together are exactly block k of the
      permutation (positions ``k*B*W .. (k+1)*B*W - 1``), so the global batch order is the same as
      one process with batch ``B*W``. Without ``drop_last`` the permutation is padded by repeating
      its start until it divides evenly (as ``DistributedSampler`` does), so every rank runs the
      same number of steps; with ``drop_last`` the incomplete last global batch is dropped.
    - Position: the loader remembers (epoch, next batch). Breaking out of a loop and iterating again
      continues where it stopped; after a full pass it moves to the next epoch by itself.
      :meth:`state_dict`/:meth:`load_state_dict` save and restore the position, so a resumed run
      sees exactly the batches (and augmentations) it would have seen.
    - Augmentation randomness is seeded per batch from (seed, epoch, batch, rank): resuming
      mid-epoch reproduces it.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(dataset, TensorImageDataset):
            raise QatSteError(
                f"TensorLoader needs a TensorImageDataset, got {type(dataset).__name__}",
                "load the data with qat_ste.train.data.load_dataset, or use torch.utils.data.DataLoader",
            )
        if int(batch_size) < 1:
            raise QatSteError(f"batch_size must be >= 1, got {batch_size}", "use a positive batch size")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise QatSteError(
                f"rank {rank} is not in 0..world_size-1 (world_size {world_size})",
                "pass the process's rank and the number of processes (torch.distributed.get_rank/"
                "get_world_size)",
            )
        if len(dataset) == 0:
            raise QatSteError("the data set is empty", "check the data folder and split")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0
        self.batch_index = 0  # index of the next batch to yield within self.epoch
        if len(self) == 0:
            raise QatSteError(
                f"drop_last leaves no batch: {len(dataset)} images < batch {self.batch_size} x "
                f"{self.world_size} rank(s)",
                "use a smaller batch size or drop_last=False",
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n, b, w = len(self.dataset), self.batch_size, self.world_size
        if self.drop_last:
            return n // (b * w)
        return math.ceil(math.ceil(n / w) / b)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch. Calling it with the current epoch keeps the current
        position, so a loader restored mid-epoch by :meth:`load_state_dict` is not rewound."""
        epoch = int(epoch)
        if epoch < 0:
            raise QatSteError(f"epoch must be >= 0, got {epoch}", "count epochs from 0")
        if epoch != self.epoch:
            self.epoch = epoch
            self.batch_index = 0

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """The data set indices this rank visits in ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        n, w = len(self.dataset), self.world_size
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: (n // (self.batch_size * w)) * self.batch_size * w]
        else:
            total = math.ceil(n / w) * w
            if total > n:
                order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank :: w]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.batch_index >= len(self):  # the previous pass ended exactly at the last batch
            self.epoch += 1
            self.batch_index = 0
        indices = self.epoch_indices()
        epoch = self.epoch
        while self.epoch == epoch and self.batch_index < len(self):
            k = self.batch_index
            batch = indices[k * self.batch_size : (k + 1) * self.batch_size]
            generator = None
            if self.dataset.augment:
                generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, k, self.rank, 1))
            images, labels = self.dataset.get_batch(batch, generator, self.device)
            self.batch_index = k + 1
            yield images, labels
        if self.epoch == epoch and self.batch_index >= len(self):
            self.epoch += 1
            self.batch_index = 0

    def state_dict(self) -> dict[str, int | bool]:
        """The loader's position and the settings that must match on resume."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "dataset_len": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (settings must match; rank may differ)."""
        missing = [k for k in ("epoch", "batch_index") if k not in state]
        if missing:
            raise QatSteError(
                f"loader state lacks {', '.join(missing)}",
                "pass the dict that TensorLoader.state_dict() returned",
            )
        for key in ("seed", "batch_size", "world_size", "shuffle", "drop_last", "dataset_len"):
            if key in state and state[key] != self.state_dict()[key]:
                raise QatSteError(
                    f"loader state was saved with {key}={state[key]!r}, this loader has "
                    f"{key}={self.state_dict()[key]!r}",
                    "resume with the same data, batch size, world size, seed, shuffle and drop_last, "
                    "or start the epoch afresh",
                )
        epoch, batch_index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= batch_index <= len(self):
            raise QatSteError(
                f"loader state position (epoch {epoch}, batch {batch_index}) is out of range "
                f"(0..{len(self)} batches per epoch)",
                "pass the dict that TensorLoader.state_dict() returned",
            )
        self.epoch, self.batch_index = epoch, batch_index


# --------------------------------------------------------------------------------------------
# IDX files (MNIST)
# --------------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """Read a file, gunzipping it when it starts with the gzip signature."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise QatSteError(f"cannot read {path}: {error.strerror or error}", "check the path and permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise QatSteError(
                f"{path} is a truncated or corrupt gzip file ({error})",
                "copy the file again from its source (compare its size and md5)",
            ) from None
    return raw


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzipped or raw) into a numpy array in native byte order.

    Header: two zero bytes, a type byte (0x08 = uint8, ...), a dimension count, then one big-endian
    uint32 per dimension. ``expected_magic`` (e.g. 0x803 for MNIST images, 0x801 for labels) is the
    first four bytes read as a big-endian integer.
    """
    path = Path(path)
    raw = _read_bytes(path)
    fix = "copy the file again from its source (compare its size and md5)"
    if len(raw) < 4:
        raise QatSteError(f"{path} is truncated: {len(raw)} bytes, too short for an IDX header", fix)
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise QatSteError(
            f"{path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x}",
            "check that this is the right IDX file (images start 0x00000803, labels 0x00000801) "
            "and that it is not corrupt",
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise QatSteError(f"{path} is not an IDX file (magic number 0x{magic:08x})", fix)
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise QatSteError(f"{path} is truncated inside its IDX header", fix)
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) < expected:
        raise QatSteError(
            f"{path} is truncated: {len(raw)} bytes, its header {tuple(dims)} needs {expected}", fix
        )
    if len(raw) > expected:
        raise QatSteError(
            f"{path} is corrupt: {len(raw) - expected} bytes after the data its header "
            f"{tuple(dims)} describes",
            fix,
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


_MNIST_FILES = {
    False: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    True: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_ALL = _MNIST_FILES[False] + _MNIST_FILES[True]
_MNIST_FIX = (
    "point --data mnist:FOLDER at a folder holding the four MNIST IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, each optionally .gz)"
)


def _find_idx(folder: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some copies are named train-images.idx3-ubyte
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def _mnist_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise QatSteError(f"MNIST folder {folder} does not exist or is not a folder", _MNIST_FIX)
    for candidate in (folder, folder / "raw", folder / "MNIST" / "raw"):  # also torchvision's layout
        if candidate.is_dir() and any(_find_idx(candidate, stem) for stem in _MNIST_ALL):
            return candidate
    return folder


def load_mnist(
    folder: str | Path, split: str = "train", pad_to: int | None = None, augment: bool | None = None
) -> TensorImageDataset:
    """MNIST from its IDX files in ``folder``: 60000 (train) or 10000 (test) 1 x 28 x 28 images.

    ``pad_to=32`` zero-pads the images to 32 x 32 (LeNet-5's original input size); normalisation
    keeps MNIST's standard mean/std. ``augment`` (default off) adds crop (padding 4) + flip.
    """
    held_out = _check_split(split)
    folder = _mnist_folder(Path(folder).expanduser())
    stems = _MNIST_FILES[held_out]
    found = [_find_idx(folder, stem) for stem in stems]
    missing = [stem for stem, path in zip(stems, found, strict=True) if path is None]
    if missing:
        raise QatSteError(
            f"expected the four MNIST IDX files in {folder}; missing {', '.join(missing)} (.gz or raw)",
            _MNIST_FIX,
        )
    image_path, label_path = (path for path in found if path is not None)
    images = read_idx(image_path, expected_magic=0x803)
    labels = read_idx(label_path, expected_magic=0x801)
    if images.shape[0] != labels.shape[0]:
        raise QatSteError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels",
            "use image and label files from the same MNIST split",
        )
    if labels.size and labels.max() > 9:
        raise QatSteError(
            f"{label_path} has label {int(labels.max())}; MNIST labels are 0..9",
            "check that this is an MNIST label file and that it is not corrupt",
        )
    _require_two_classes(len(np.unique(labels)), str(label_path), "classes (MNIST has the digits 0..9)",
                         "use the complete MNIST label file of this split")
    tensor = torch.from_numpy(images).unsqueeze(1)  # N x 1 x H x W
    height, width = tensor.shape[2:]
    if pad_to is not None:
        pad_to = int(pad_to)
        if pad_to < max(height, width):
            raise QatSteError(
                f"pad_to={pad_to} is smaller than the {height}x{width} images",
                f"use pad_to >= {max(height, width)} (e.g. 32) or leave it unset",
            )
        top, left = (pad_to - height) // 2, (pad_to - width) // 2
        tensor = F.pad(tensor, (left, pad_to - width - left, top, pad_to - height - top))
    info = DatasetInfo(
        name="mnist",
        num_classes=10,
        channels=1,
        image_size=(int(tensor.shape[2]), int(tensor.shape[3])),
        mean=MNIST_MEAN,
        std=MNIST_STD,
        class_names=DIGIT_CLASSES,
    )
    return TensorImageDataset(
        tensor.contiguous(), torch.from_numpy(labels.astype(np.int64)), info, bool(augment)
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# --------------------------------------------------------------------------------------------

_CIFAR_FIX = (
    "point --data cifar10:FOLDER at the extracted cifar-10-batches-py folder (data_batch_1..5, "
    "test_batch) or at its parent"
)


class _RefusedPickle(pickle.UnpicklingError):
    """A data file asked to load something other than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (what the CIFAR batches hold), nothing executable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _RefusedPickle(f"{module}.{name}")


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            content = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise QatSteError(f"cannot read {path}: {error.strerror or error}", "check the path and permissions") from None
    except _RefusedPickle as error:
        raise QatSteError(
            f"{path} asks to load {error}, not only numpy arrays; refusing to unpickle it",
            "use the genuine CIFAR-10 python batches (cifar-10-python.tar.gz)",
        ) from None
    except Exception as error:  # noqa: BLE001 - truncated or corrupt pickles raise many different types
        raise QatSteError(
            f"{path} is not a readable CIFAR-10 batch (truncated or corrupt: {type(error).__name__}: {error})",
            "extract cifar-10-python.tar.gz again",
        ) from None
    if not isinstance(content, dict):
        raise QatSteError(f"{path} does not hold a CIFAR-10 batch dict", "extract cifar-10-python.tar.gz again")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}


def _cifar_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise QatSteError(f"CIFAR-10 folder {folder} does not exist or is not a folder", _CIFAR_FIX)
    if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
        return folder
    if (folder / "cifar-10-batches-py").is_dir():
        return folder / "cifar-10-batches-py"
    raise QatSteError(
        f"{folder} holds neither the CIFAR-10 batch files nor a cifar-10-batches-py folder", _CIFAR_FIX
    )


def load_cifar10(folder: str | Path, split: str = "train", augment: bool | None = None) -> TensorImageDataset:
    """CIFAR-10 from ``cifar-10-batches-py`` (or its parent): 50000 train / 10000 test 3x32x32 images.

    ``augment`` defaults to the standard CIFAR recipe: random crop 32 with padding 4 + horizontal
    flip for ``train``, none for ``val``/``test``.
    """
    held_out = _check_split(split)
    folder = _cifar_folder(Path(folder).expanduser())
    names = ["test_batch"] if held_out else [f"data_batch_{i}" for i in range(1, 6)]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise QatSteError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}", _CIFAR_FIX)
    image_parts, label_parts = [], []
    for name in names:
        path = folder / name
        batch = _load_cifar_pickle(path)
        if "data" not in batch or "labels" not in batch:
            raise QatSteError(f"{path} lacks the 'data' or 'labels' entry", "extract cifar-10-python.tar.gz again")
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise QatSteError(
                f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072",
                "extract cifar-10-python.tar.gz again",
            )
        if labels.shape[0] != data.shape[0]:
            raise QatSteError(
                f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels",
                "extract cifar-10-python.tar.gz again",
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise QatSteError(f"{path} has labels outside 0..9", "extract cifar-10-python.tar.gz again")
        image_parts.append(data.reshape(-1, 3, 32, 32))
        label_parts.append(labels)
    _require_two_classes(len(np.unique(np.concatenate(label_parts))), f"{folder} ({', '.join(names)})",
                         "classes (CIFAR-10 has 10)", "extract cifar-10-python.tar.gz again")
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = _load_cifar_pickle(meta_path)
        names_in_meta = meta.get("label_names")
        if isinstance(names_in_meta, list) and len(names_in_meta) == 10:
            class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names_in_meta)
    info = DatasetInfo(
        name="cifar10",
        num_classes=10,
        channels=3,
        image_size=(32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        class_names=class_names,
    )
    return TensorImageDataset(torch.from_numpy(np.concatenate(image_parts)),
                              torch.from_numpy(np.concatenate(label_parts)), info,
                              (not held_out) if augment is None else bool(augment))


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "test"),
    "test": ("test", "val", "valid", "validation"),
}
_IMAGEFOLDER_FIX = (
    "point --data imagefolder:FOLDER at a folder with one subfolder of images per class "
    "(optionally inside train/ and val/ subfolders)"
)


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


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as a uint8 C x H x W array; any file PIL cannot decode (damaged, not an image, or a
    decompression bomb, whether PIL warns or refuses) raises QatSteError naming it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL warns at 1-2x its limit
            with Image.open(path) as opened:
                image = opened.convert(mode)
                if image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _decompression_bomb(path, error) from None
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise many types (OSError, SyntaxError, TypeError)
        detail = str(error).strip() or type(error).__name__
        raise QatSteError(f"cannot read image {path} ({detail[:300]})", "replace or delete the file") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decompression_bomb(path: Path, error: Exception) -> QatSteError:
    """The error for an image with more pixels than PIL's decompression-bomb limit."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit_text = f"{int(limit):,} pixels" if limit else "its limit"
    return QatSteError(
        f"cannot read image {path}: it has {pixels}, more than PIL's decompression-bomb limit of {limit_text} "
        "(PIL.Image.MAX_IMAGE_PIXELS)",
        f"remove the file, or resize it to at most {limit_text}",
    )


def _require_two_classes(found: int, where: str, what: str, fix: str) -> None:
    """Refuse a data set with fewer than 2 classes: a classifier learns nothing from one (it scores 100 %)."""
    if found < 2:
        raise QatSteError(f"{found} class{'' if found == 1 else 'es'} found in {where}: a classifier needs at "
                          f"least 2 {what}", fix)


def _imagefolder_classes(root: Path, split: str) -> tuple[list[str], Path, bool]:
    """(class names, the folder holding the split's class folders, whether the split is taken by
    ``val_fraction``) of an image folder; fewer than 2 classes are refused."""
    if (root / "train").is_dir():  # split layout
        chosen = next((root / name for name in _SPLIT_FOLDERS[split] if (root / name).is_dir()), None)
        if chosen is None:
            raise QatSteError(
                f"{root} has a train/ folder but no {'/'.join(_SPLIT_FOLDERS[split])} folder for split {split!r}",
                f"add {root / _SPLIT_FOLDERS[split][0]}/<class>/ folders, or use a flat FOLDER/<class>/ layout",
            )
        classes = _class_folders(root / "train")
        unknown = sorted(set(_class_folders(chosen)) - set(classes))
        if unknown:
            raise QatSteError(
                f"{chosen} has classes {', '.join(unknown)} that {root / 'train'} lacks",
                "use the same class subfolders in every split",
            )
        source, split_by_fraction = chosen, False
    else:
        classes = _class_folders(root)
        source, split_by_fraction = root, True
    if not classes:
        raise QatSteError(f"{source} has no class subfolders", _IMAGEFOLDER_FIX)
    _require_two_classes(len(classes), str(root / "train" if not split_by_fraction else root), "class folders",
                         "add a subfolder of images for each further class")
    return classes, source, split_by_fraction


def _imagefolder_files(source: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The image files under ``source/<class>/`` and their class indices."""
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = source / name
        if not class_dir.is_dir():
            continue  # a class missing from a held-out split simply has no images there
        found = _image_files(class_dir)
        if not found:
            raise QatSteError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})",
                "add images or remove the empty folder",
            )
        files.extend(found)
        labels.extend([index] * len(found))
    return files, labels


def load_imagefolder(
    folder: str | Path,
    split: str = "train",
    size: int | tuple[int, int] = 32,
    channels: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool | None = None,
) -> TensorImageDataset:
    """Images in class subfolders, decoded with PIL and resized (bilinear, no crop) to ``size``.

    Layouts: ``FOLDER/train/<class>/*`` with ``FOLDER/val/<class>/*`` (or test/), or flat
    ``FOLDER/<class>/*``, which is split per class with ``val_fraction`` and ``seed``. Classes are
    the sorted subfolder names (of train/ when present). ``mean``/``std`` default to ImageNet's
    (3 channels) or 0.5/0.5 (1 channel). ``augment`` (default off) adds crop (padding 4) + flip.
    """
    held_out = _check_split(split)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise QatSteError(f"image folder {root} does not exist or is not a folder", _IMAGEFOLDER_FIX)
    if channels not in (1, 3):
        raise QatSteError(f"channels must be 1 or 3, got {channels}", "use channels=3 (RGB) or 1 (grey)")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise QatSteError(f"size must be positive, got {size}", "use e.g. size=32")

    classes, source, split_by_fraction = _imagefolder_classes(root, split)
    files, labels = _imagefolder_files(source, classes)
    if split_by_fraction:
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        keep = val_idx if held_out else train_idx
        if len(keep) == 0:
            raise QatSteError(
                f"the {split} split of {root} is empty (val_fraction={val_fraction})",
                "raise val_fraction, add images, or use train/ and val/ subfolders",
            )
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]
    if not files:
        raise QatSteError(f"no images found under {source}", _IMAGEFOLDER_FIX)

    mode = "RGB" if channels == 3 else "L"
    images = np.stack([_read_image(path, mode, (height, width)) for path in files])
    if mean is None or std is None:
        mean = IMAGENET_MEAN if channels == 3 else (0.5,)
        std = IMAGENET_STD if channels == 3 else (0.5,)
    info = DatasetInfo(
        name=f"imagefolder:{root.name}",
        num_classes=len(classes),
        channels=channels,
        image_size=(height, width),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        class_names=tuple(classes),
    )
    return TensorImageDataset(
        torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), info, bool(augment)
    )


# --------------------------------------------------------------------------------------------
# scikit-learn digits (bundled, no download)
# --------------------------------------------------------------------------------------------


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images, for pixel values scaled to [0, 1]."""
    values = images.to(torch.float64).div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(values.mean(1).tolist()), tuple(values.std(1).clamp_min(1e-6).tolist())


def _resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = F.interpolate(images.to(torch.float32), size=size, mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def load_digits(
    split: str = "train",
    resize: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    augment: bool | None = None,
) -> TensorImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), no download needed.

    Pixel values 0..16 are scaled to 0..255. The split holds out ``val_fraction`` of each class,
    chosen with ``seed`` (defaults: 1438 train / 359 val). ``resize`` (e.g. 28 or 32) upscales
    bilinearly. Mean/std are measured on the train split (after resizing).
    """
    held_out = _check_split(split)
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise QatSteError(
            "the digits data set needs scikit-learn, which is not installed",
            "pip install 'qat_ste[data]' (or scikit-learn), or use --data synthetic",
        ) from None
    bunch = sklearn_load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255)
    images = torch.from_numpy(pixels.astype(np.uint8)).unsqueeze(1)  # 1797 x 1 x 8 x 8
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    if resize is not None and int(resize) != 8:
        if int(resize) < 1:
            raise QatSteError(f"resize must be positive, got {resize}", "use e.g. resize=28 or 32")
        images = _resize_uint8(images, (int(resize), int(resize)))
    train_idx, val_idx = stratified_split(labels.numpy(), val_fraction, seed)
    if held_out and len(val_idx) == 0:
        raise QatSteError(f"val_fraction={val_fraction} leaves no held-out digits", "use e.g. 0.2")
    mean, std = _mean_std(images[torch.from_numpy(train_idx)])
    keep = torch.from_numpy(val_idx if held_out else train_idx)
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        channels=1,
        image_size=(int(images.shape[2]), int(images.shape[3])),
        mean=mean,
        std=std,
        class_names=DIGIT_CLASSES,
    )
    return TensorImageDataset(images[keep].contiguous(), labels[keep], info, bool(augment))


# --------------------------------------------------------------------------------------------
# Synthetic blobs
# --------------------------------------------------------------------------------------------

_BLOBS_PER_CLASS = 3


def _synthetic_images(
    n: int, num_classes: int, size: tuple[int, int], channels: int, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images from the class patterns of ``seed``; ``stream`` picks an independent sample."""
    height, width = size
    patterns = torch.Generator().manual_seed(_mix_seed(seed, 0x5EED))
    k = _BLOBS_PER_CLASS
    centers = 0.15 + 0.7 * torch.rand(num_classes, k, 2, generator=patterns)  # (y, x) in [0, 1]
    widths = 0.06 + 0.10 * torch.rand(num_classes, k, generator=patterns)
    colours = 0.3 + 0.7 * torch.rand(num_classes, k, channels, generator=patterns)

    sample = torch.Generator().manual_seed(_mix_seed(seed, stream))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=sample)]
    jitter = 0.1 * (torch.rand(n, k, 2, generator=sample) - 0.5)
    contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=sample)
    noise = 0.08 * torch.randn(n, channels, height, width, generator=sample)

    where = centers[labels] + jitter  # n x k x 2
    spread = 2.0 * widths[labels][..., None] ** 2  # n x k x 1
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    along_y = torch.exp(-((ys - where[..., 0:1]) ** 2) / spread)  # n x k x h
    along_x = torch.exp(-((xs - where[..., 1:2]) ** 2) / spread)  # n x k x w
    blobs = along_y[..., :, None] * along_x[..., None, :]  # n x k x h x w
    picture = torch.einsum("nkhw,nkc->nchw", blobs, colours[labels]) * contrast + noise
    images = (20.0 + 200.0 * picture).round().clamp(0, 255).to(torch.uint8)
    return images, labels


def make_synthetic(
    split: str = "train",
    num_classes: int = 10,
    size: int | tuple[int, int] = 32,
    channels: int = 3,
    n: int | None = None,
    seed: int = 0,
    augment: bool | None = None,
) -> TensorImageDataset:
    """Seeded Gaussian-blob images: each class has its own blob positions, widths and colours;
    samples jitter the blobs, vary contrast and add noise. A small net learns them in seconds.

    ``n`` images per split (default 2048 train, 512 val/test); train and held-out samples are
    independent draws from the same class patterns. Mean/std come from a fixed reference sample,
    the same for every split and ``n``.
    """
    held_out = _check_split(split)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if int(num_classes) < 2 or int(channels) < 1 or height < 4 or width < 4:
        raise QatSteError(
            f"synthetic data needs num_classes >= 2, channels >= 1 and size >= 4 "
            f"(got {num_classes}, {channels}, {size})",
            "use e.g. num_classes=10, channels=3, size=32",
        )
    n = (512 if held_out else 2048) if n is None else int(n)
    if n < 1:
        raise QatSteError(f"n must be >= 1, got {n}", "use e.g. n=2048")
    args = (int(num_classes), (height, width), int(channels), int(seed))
    images, labels = _synthetic_images(n, *args, stream=2 if held_out else 1)
    reference, _ = _synthetic_images(512, *args, stream=3)
    mean, std = _mean_std(reference)
    info = DatasetInfo(
        name="synthetic",
        num_classes=int(num_classes),
        channels=int(channels),
        image_size=(height, width),
        mean=mean,
        std=std,
        class_names=tuple(f"class{i}" for i in range(int(num_classes))),
    )
    return TensorImageDataset(images, labels, info, bool(augment))


# --------------------------------------------------------------------------------------------
# Single entry point
# --------------------------------------------------------------------------------------------

# name -> (loader, whether the spec needs ":FOLDER"). Read-only.
_DATASET_LOADERS: types.MappingProxyType[str, tuple[Callable[..., TensorImageDataset], bool]] = (
    types.MappingProxyType(
        {
            "digits": (load_digits, False),
            "synthetic": (make_synthetic, False),
            "mnist": (load_mnist, True),
            "cifar10": (load_cifar10, True),
            "imagefolder": (load_imagefolder, True),
        }
    )
)
KNOWN_DATASETS = ("digits", "synthetic", "mnist:FOLDER", "cifar10:FOLDER", "imagefolder:FOLDER")


def parse_dataset_spec(spec: str) -> tuple[str, Path | None]:
    """Split ``name[:FOLDER]`` into (lower-case name, folder or None); checks the name."""
    if not isinstance(spec, str) or not spec.strip():
        raise QatSteError(
            f"data set spec must be a non-empty string, got {spec!r}", f"use one of {', '.join(KNOWN_DATASETS)}"
        )
    name, _, folder = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _DATASET_LOADERS:
        raise QatSteError(f"unknown data set {name!r} (from {spec!r})", f"use one of {', '.join(KNOWN_DATASETS)}")
    needs_folder = _DATASET_LOADERS[name][1]
    if needs_folder and not folder.strip():
        raise QatSteError(f"data set {name!r} needs a folder", f"write it as {name}:FOLDER")
    if not needs_folder and folder.strip():
        raise QatSteError(f"data set {name!r} takes no folder (got {folder!r})", f"write just {name}")
    return name, (Path(folder.strip()).expanduser() if needs_folder else None)


def load_dataset(spec: str, split: str = "train", **options: Any) -> TensorImageDataset:
    """Load a data set by spec (``digits``, ``synthetic``, ``mnist:FOLDER``, ``cifar10:FOLDER``,
    ``imagefolder:FOLDER``) and split (``train``, ``val``, ``test``); ``options`` go to the loader
    (e.g. ``pad_to=32`` for MNIST, ``resize=28`` for digits, ``augment=True``). The result's
    ``.info`` is the :class:`DatasetInfo`.
    """
    name, folder = parse_dataset_spec(spec)
    loader, needs_folder = _DATASET_LOADERS[name]
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("folder", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise QatSteError(
            f"data set {name!r} does not take option(s) {', '.join(unknown)}",
            f"its options are: {', '.join(accepted)}",
        )
    if needs_folder:
        return loader(folder, split, **options)
    return loader(split, **options)

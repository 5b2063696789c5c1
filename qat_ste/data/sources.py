"""The in-memory data sets by name: ``digits``, ``synthetic``, ``mnist:FOLDER``, ``cifar10:FOLDER``,
``imagefolder:FOLDER`` (decoded whole and resized, see :mod:`qat_ste.data.stream` for streaming),
and :func:`load_dataset` / :func:`parse_dataset_spec`."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QatSteError
from .folders import check_folder, imagefolder_split
from .info import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DIGIT_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetInfo,
    _check_split,
    _mix_seed,
    _require_two_classes,
    stratified_split,
)
from .readers import _load_cifar_pickle, _read_image, read_idx
from .tensor import TensorImageDataset

__all__ = ["KNOWN_DATASETS", "load_cifar10", "load_dataset", "load_digits", "load_imagefolder", "load_mnist",
           "make_synthetic", "parse_dataset_spec"]


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
    _check_split(split)
    root = check_folder(folder)
    if channels not in (1, 3):
        raise QatSteError(f"channels must be 1 or 3, got {channels}", "use channels=3 (RGB) or 1 (grey)")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise QatSteError(f"size must be positive, got {size}", "use e.g. size=32")
    listing = imagefolder_split(root, split, val_fraction, seed)
    classes, labels = listing.classes, listing.labels
    files = [listing.source / name for name in listing.files]

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

"""The data sets and loaders, now in :mod:`qat_ste.data`; this module keeps the old import path
(``from qat_ste.train.data import load_dataset, TensorLoader, ...``) working."""

from __future__ import annotations

from ..data.folders import imagefolder_classes, imagefolder_split
from ..data.info import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetInfo,
    stratified_split,
)
from ..data.loaders import StreamLoader, make_loader, resolve_workers
from ..data.readers import IMAGE_EXTENSIONS, read_idx
from ..data.sources import (
    KNOWN_DATASETS,
    load_cifar10,
    load_dataset,
    load_digits,
    load_imagefolder,
    load_mnist,
    make_synthetic,
    parse_dataset_spec,
)
from ..data.stream import StreamImageDataset, stream_imagefolder
from ..data.tensor import TensorImageDataset, TensorLoader, random_crop_flip

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
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "StreamImageDataset",
    "StreamLoader",
    "imagefolder_classes",
    "imagefolder_split",
    "make_loader",
    "resolve_workers",
    "stream_imagefolder",
]

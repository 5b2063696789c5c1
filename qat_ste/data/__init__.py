"""Data: in-memory data sets (digits, synthetic, MNIST, CIFAR-10, image folders decoded whole) and
streamed image folders (decoded in worker processes with the model's own preprocessing).

    from qat_ste.data import load_dataset, stream_imagefolder, resolve_preprocess, make_loader

One job per module: ``info`` (DatasetInfo, statistics, splits), ``readers`` (IDX, CIFAR pickles,
image files), ``folders`` (the image-folder layout), ``tensor`` (TensorImageDataset, TensorLoader:
the in-memory path), ``sources`` (data sets by name, ``load_dataset``), ``transforms`` (model-aware
preprocessing), ``stream`` (the streamed data set), ``loaders`` (the streaming loader). timm and
torchvision are imported only when a preprocessing is built.
"""

from .folders import imagefolder_classes, imagefolder_split
from .info import DatasetInfo
from .loaders import StreamLoader, make_loader, resolve_workers
from .sources import KNOWN_DATASETS, load_dataset, parse_dataset_spec
from .stream import StreamImageDataset, stream_imagefolder
from .tensor import TensorImageDataset, TensorLoader
from .transforms import Preprocess, resolve_preprocess

__all__ = ["KNOWN_DATASETS", "DatasetInfo", "Preprocess", "StreamImageDataset", "StreamLoader", "TensorImageDataset",
           "TensorLoader", "imagefolder_classes", "imagefolder_split", "load_dataset", "make_loader",
           "parse_dataset_spec", "resolve_preprocess", "resolve_workers", "stream_imagefolder"]

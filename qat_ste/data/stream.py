"""The streamed image folder: a map-style data set over the files of one split, decoded and
preprocessed when a sample is drawn (in the loader's worker processes).

Memory: the file list is the only per-image state, and it is held as two numpy arrays (the UTF-8
bytes of all relative paths and their offsets) plus one label array, not as Python objects, so
forked workers do not copy it page by page as reference counts change; nothing decoded is kept.

Randomness: the streaming loader asks for ``dataset[(seed, epoch, index)]``; the training transform
then draws from Python's ``random`` and torch's CPU generator seeded from those three numbers (and
put back afterwards), so an image's augmentation does not depend on which worker decodes it, nor on
what ran before: a resumed run sees the same. A plain integer key (a standard DataLoader) draws
from the process's generators as usual.

A file that cannot be decoded (damaged, not an image, over PIL's decompression-bomb limit, gone) is
replaced by the next readable file of the split (index + 1, + 2, ...), with a warning naming it once
per process: the number of samples and batches stays the same and the replacement is the same in
every run, so exact resume holds.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QatSteError
from .folders import imagefolder_split
from .info import DatasetInfo, _mix_seed
from .readers import _read_error
from .transforms import Preprocess

__all__ = ["StreamImageDataset", "stream_imagefolder"]


class _PackedPaths:
    """Relative paths in one uint8 buffer with int64 offsets (no Python object per file)."""

    def __init__(self, names: Sequence[str]) -> None:
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.buffer[start:end].tobytes().decode("utf-8", "surrogateescape")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and torch's CPU generator for one sample; restore both after."""
    python_state = random.getstate()
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.default_generator.set_state(torch_state)


def _warn(message: str) -> None:
    """A warning from the main process; in a loader worker (whose warnings machinery may be a copy
    of a test harness's or silenced) a line on stderr."""
    if torch.utils.data.get_worker_info() is None:
        warnings.warn(message, stacklevel=3)
    else:
        print(f"qat-ste: warning: {message}", file=sys.stderr, flush=True)


class StreamImageDataset(torch.utils.data.Dataset):
    """Image files decoded on the fly: ``dataset[i]`` (or ``dataset[(seed, epoch, i)]``, what the
    streaming loader's sampler sends) is ``(float image C x H x W, int label)`` after the
    preprocessing's training transform (``augment``) or its evaluation transform."""

    def __init__(self, root: str | Path, files: Sequence[str] | _PackedPaths, labels: Sequence[int] | np.ndarray,
                 info: DatasetInfo, preprocess: Preprocess, augment: bool = False,
                 workers: int | None = None) -> None:
        paths = files if isinstance(files, _PackedPaths) else _PackedPaths(files)
        label_array = np.asarray(labels, dtype=np.int64)
        if len(paths) != len(label_array):
            raise QatSteError(f"{len(paths)} files but {len(label_array)} labels", "pass one label per file")
        if len(paths) == 0:
            raise QatSteError(f"no images in {root}", "check the data folder and split")
        if label_array.min() < 0 or label_array.max() >= info.num_classes:
            raise QatSteError(f"labels outside 0..{info.num_classes - 1}", "give labels in 0..num_classes-1")
        self.root = str(root)
        self._paths = paths
        self._labels = label_array
        self.info = info
        self.preprocess = preprocess
        self.augment = bool(augment)
        self.workers = workers  # the loaders' default worker count (None: automatic)
        self._mode = "RGB" if preprocess.channels == 3 else "L"
        self._warned: set[int] = set()  # files this process already warned about

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return (f"StreamImageDataset({self.info.name!r}, n={len(self)}, {self.preprocess.describe()}, "
                f"augment={self.augment})")

    def path(self, index: int) -> Path:
        """The file of sample ``index``."""
        return Path(self.root) / self._paths[int(index)]

    @property
    def labels(self) -> torch.Tensor:
        """The label of every sample (int64)."""
        return torch.from_numpy(self._labels)

    def class_counts(self) -> torch.Tensor:
        """Number of images per class (int64, length num_classes)."""
        return torch.bincount(self.labels, minlength=self.info.num_classes)

    def with_augment(self, augment: bool) -> StreamImageDataset:
        """The same files (shared, not copied) with the training or the evaluation transform."""
        return StreamImageDataset(self.root, self._paths, self._labels, self.info, self.preprocess, augment,
                                  self.workers)

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        seeds = (int(key[0]), int(key[1])) if isinstance(key, tuple) else None
        index = int(key[2]) if isinstance(key, tuple) else int(key)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        image, label = self._decode_readable(index)
        if not self.augment:
            return self.preprocess.eval(image), label
        if seeds is None:
            return self.preprocess.train(image), label
        with _seeded(_mix_seed(*seeds, index, 2)):
            return self.preprocess.train(image), label

    def get_batch(self, indices: torch.Tensor, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None, *, seed: int = 0, epoch: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch in this process: (float images, int64 labels) on ``device``, augmented (when
        on) as the streaming loader with ``seed`` would in ``epoch``. ``generator`` is accepted for
        TensorImageDataset's signature and not used: augmentation is seeded per sample."""
        samples = [self[(seed, epoch, int(i))] for i in indices.tolist()]
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        return images, labels

    def _decode_readable(self, index: int) -> tuple[Any, int]:
        """The image (PIL, in the preprocessing's mode) and label of ``index``, or of the next
        readable file when it cannot be decoded (warned once per file and process)."""
        n = len(self)
        for step in range(n):
            candidate = (index + step) % n
            try:
                return self._decode(candidate), int(self._labels[candidate])
            except QatSteError as error:
                if candidate not in self._warned:
                    self._warned.add(candidate)
                    _warn(f"{error.problem}; every sample drawing it gets the next readable image of the split "
                          f"instead (fix: {error.fix})")
        raise QatSteError(f"no image under {self.root} could be read", "check the data folder")

    def _decode(self, index: int) -> Any:
        from PIL import Image

        path = self.path(index)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    if opened.mode == "P" and "transparency" in opened.info:
                        return opened.convert("RGBA").convert(self._mode)
                    return opened.convert(self._mode)
        except Exception as error:  # noqa: BLE001 - PIL's decoders raise many types
            raise _read_error(path, error) from None


def stream_imagefolder(folder: str | Path, split: str, preprocess: Preprocess, *, val_fraction: float = 0.2,
                       seed: int = 0, augment: bool | None = None, workers: int | None = None) -> StreamImageDataset:
    """The ``split`` of an image folder (layouts and errors as :func:`~qat_ste.data.sources.load_imagefolder`;
    a flat folder is split per class with ``val_fraction`` and ``seed``) streamed with ``preprocess``;
    ``augment`` defaults to on for ``train``; ``workers``: the loaders' default worker count."""
    listing = imagefolder_split(folder, split, val_fraction, seed)
    info = DatasetInfo(name=f"imagefolder:{listing.root.name}", num_classes=len(listing.classes),
                       channels=preprocess.channels, image_size=(preprocess.size, preprocess.size),
                       mean=preprocess.mean, std=preprocess.std, class_names=listing.classes)
    paths = _PackedPaths(listing.files)
    labels = np.asarray(listing.labels, dtype=np.int64)
    return StreamImageDataset(listing.source, paths, labels, info, preprocess,
                              split == "train" if augment is None else bool(augment), workers)

"""The in-memory path: :class:`TensorImageDataset` (uint8 images and labels held as tensors, batches
augmented and normalised on the device) and :class:`TensorLoader` (seeded, shardable, resumable)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import QatSteError
from .info import DatasetInfo, _mix_seed, epoch_order

__all__ = ["TensorImageDataset", "TensorLoader", "random_crop_flip"]


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
        return epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                           drop_last=self.drop_last, batch_size=self.batch_size, rank=self.rank,
                           world_size=self.world_size)

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


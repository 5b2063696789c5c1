"""The streaming loader: batches of a :class:`~qat_ste.data.stream.StreamImageDataset` decoded in
worker processes by torchdata's ``StatefulDataLoader``, behind the same small protocol as
:class:`~qat_ste.data.tensor.TensorLoader` (``set_epoch``, ``batch_index``, ``len``, iteration,
``state_dict``/``load_state_dict``, ``dataset``), so the training loop takes either.

- Order: :class:`EpochSampler` visits the same positions as TensorLoader: a permutation seeded from
  (seed, epoch), padded (or cut with ``drop_last``) to whole global batches, rank ``r`` of ``W``
  taking positions ``r, r + W, ...`` (each rank its shard; the ranks' k-th batches form global
  batch k). It sends ``(epoch, index)`` to the workers, so persistent workers know the epoch.
- Augmentation is seeded per sample from (seed, epoch, index) in the data set, not by worker.
- Resume: the position is (epoch, batch); mid-epoch the StatefulDataLoader's own state is saved
  too and restored through its ``load_state_dict`` (the sampler is stateful, so nothing decoded is
  replayed); with a different worker count the sampler alone starts at the saved batch.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import QatSteError
from .info import epoch_order
from .stream import StreamImageDataset
from .tensor import TensorImageDataset, TensorLoader

__all__ = ["EpochSampler", "ImageDataset", "StreamLoader", "TrainLoader", "eval_batches", "make_loader",
           "resolve_workers"]

#: the most worker processes chosen automatically
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """The worker count: ``None`` means min(8, CPUs available to the process); 0 loads in the
    main process; a negative or non-integer count is refused."""
    if workers is None:
        return min(MAX_AUTO_WORKERS, available_cpus())
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise QatSteError(f"--workers must be a whole number >= 0, got {workers!r}",
                          "use 0 (decode in the training process), a positive count, or leave it out (automatic)")
    return workers


class EpochSampler(torch.utils.data.Sampler):
    """This rank's ``(seed, epoch, index)`` keys of an epoch, in order; stateful (how many it yielded)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool, rank: int,
                 world_size: int) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = int(n), int(batch_size), bool(shuffle), int(seed)
        self.drop_last, self.rank, self.world_size = bool(drop_last), int(rank), int(world_size)
        self.epoch = 0
        self.yielded = 0  # keys of the current pass handed out so far
        self._start = 0  # where the next pass starts (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass visits."""
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> torch.Tensor:
        """The data set indices this rank visits in ``epoch`` (TensorLoader's order)."""
        return epoch_order(self.n, seed=self.seed, epoch=epoch, shuffle=self.shuffle, drop_last=self.drop_last,
                           batch_size=self.batch_size, rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        n, w = self.n, self.world_size
        return (n // (self.batch_size * w)) * self.batch_size if self.drop_last else math.ceil(n / w)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        start, self._start = self._start, 0
        epoch = self.epoch
        self.yielded = start
        for chunk in self.indices(epoch)[start:].split(4096):  # no Python int per image held at once
            for index in chunk.tolist():
                self.yielded += 1
                yield self.seed, epoch, index

    def state_dict(self) -> dict[str, int]:
        """Epoch and keys yielded (what StatefulDataLoader snapshots)."""
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next pass of ``state['epoch']`` after ``state['yielded']`` keys."""
        self.epoch, self._start = int(state["epoch"]), int(state["yielded"])


class StreamLoader:
    """Batches of a streamed data set, decoded by ``workers`` processes (see the module doc); the
    TensorLoader protocol, so ``train()`` and ``evaluate()`` take it."""

    def __init__(self, dataset: StreamImageDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 device: torch.device | str | None = None, workers: int | None = None,
                 persistent: bool = True, prefetch_factor: int = 2) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader  # type: ignore[import-untyped]

        if not isinstance(dataset, StreamImageDataset):
            raise QatSteError(f"StreamLoader needs a StreamImageDataset, got {type(dataset).__name__}",
                              "stream the folder with qat_ste.data.stream_imagefolder")
        if int(batch_size) < 1:
            raise QatSteError(f"batch_size must be >= 1, got {batch_size}", "use a positive batch size")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise QatSteError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})",
                              "pass the process's rank and the number of processes")
        self.dataset = dataset
        self.batch_size, self.seed, self.shuffle, self.drop_last = int(batch_size), int(seed), bool(shuffle), \
            bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device) if device is not None else None
        self.workers = resolve_workers(workers if workers is not None else dataset.workers)
        self.epoch = 0
        self.batch_index = 0
        if len(self) == 0:
            raise QatSteError(f"drop_last leaves no batch: {len(dataset)} images < batch {self.batch_size} x "
                              f"{self.world_size} rank(s)", "use a smaller batch size or drop_last=False")
        self.sampler = EpochSampler(len(dataset), self.batch_size, shuffle=self.shuffle, seed=self.seed,
                                    drop_last=self.drop_last, rank=self.rank, world_size=self.world_size)
        options: dict[str, Any] = {}
        if self.workers > 0:
            options = {"persistent_workers": bool(persistent), "prefetch_factor": int(prefetch_factor),
                       "worker_init_fn": ignore_stop_signals}
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.14
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self._loader = StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler,
                                              num_workers=self.workers,
                                              pin_memory=self.device is not None and self.device.type == "cuda",
                                              **options)
        # workers outlive a SIGTERM for a while (see ignore_stop_signals): at interpreter exit shut
        # them down before multiprocessing's own exit handler terminates and joins them
        atexit.register(_shut_down_workers, weakref.ref(self._loader))
        self._passes = 0  # odd while a pass runs; changed when it ends or the position is set
        self._pending: dict[str, Any] | None = None  # its state to restore before the next pass

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n, b, w = len(self.dataset), self.batch_size, self.world_size
        return n // (b * w) if self.drop_last else math.ceil(math.ceil(n / w) / b)

    def __repr__(self) -> str:
        return (f"StreamLoader({len(self.dataset)} files, batch {self.batch_size}, {self.workers} worker(s), "
                f"rank {self.rank}/{self.world_size})")

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; the current epoch keeps its position."""
        epoch = int(epoch)
        if epoch < 0:
            raise QatSteError(f"epoch must be >= 0, got {epoch}", "count epochs from 0")
        if epoch != self.epoch:
            self.epoch, self.batch_index, self._pending = epoch, 0, None
            self._passes += self._passes % 2  # a running pass ends

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.batch_index >= len(self):  # the previous pass ended exactly at the last batch
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._pending = None
        epoch = self.epoch
        self.sampler.set_epoch(epoch)
        if self._pending is not None:  # resuming mid-epoch: the StatefulDataLoader's own state
            self._loader.load_state_dict(self._pending)
        else:  # the sampler starts at the position (0, or the batch a broken-off pass reached)
            self.sampler.load_state_dict({"epoch": epoch, "yielded": self.batch_index * self.batch_size})
        self._pending = None
        self._passes += 1 if self._passes % 2 == 0 else 2  # the next odd number: a new pass
        this_pass = self._passes
        try:
            for images, labels in self._loader:
                if self.device is not None:
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                self.batch_index += 1
                yield images, labels
                if self._passes != this_pass:  # set_epoch / load_state_dict / a new pass meanwhile
                    return
        finally:
            if self._passes == this_pass:
                self._passes += 1  # this pass is over: state_dict no longer asks the loader
        if self.epoch == epoch and self.batch_index >= len(self):
            self.epoch, self.batch_index = epoch + 1, 0

    @property
    def _live(self) -> bool:
        """Whether a pass is running (its StatefulDataLoader state is the position)."""
        return self._passes % 2 == 1

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, next batch), the settings that must match on resume, and mid-epoch
        the StatefulDataLoader's state (plain values)."""
        inner = None
        if self._live and 0 < self.batch_index < len(self):
            inner = self._loader.state_dict()
        elif self._pending is not None:
            inner = self._pending
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "dataset_len": len(self.dataset), "workers": self.workers,
                "dataloader": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (settings must match; rank and worker
        count may differ)."""
        if any(k not in state for k in ("epoch", "batch_index")):
            raise QatSteError("loader state lacks epoch or batch_index", "pass the dict that state_dict() returned")
        mine = {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "dataset_len": len(self.dataset)}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise QatSteError(f"loader state was saved with {key}={state[key]!r}, this loader has {key}={value!r}",
                                  "resume with the same data, batch size, world size, seed, shuffle and drop_last, "
                                  "or start the epoch afresh")
        epoch, batch_index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= batch_index <= len(self):
            raise QatSteError(f"loader state position (epoch {epoch}, batch {batch_index}) is out of range "
                              f"(0..{len(self)} batches per epoch)", "pass the dict that state_dict() returned")
        self.epoch, self.batch_index = epoch, batch_index
        self._passes += self._passes % 2  # a running pass ends
        inner = state.get("dataloader")
        usable = inner is not None and state.get("workers") == self.workers and 0 < batch_index < len(self)
        self._pending = inner if usable else None


#: what the training loop iterates: an in-memory or a streaming loader (the same protocol)
TrainLoader = TensorLoader | StreamLoader
#: a data set either loader reads
ImageDataset = TensorImageDataset | StreamImageDataset


def make_loader(dataset: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                rank: int = 0, world_size: int = 1, device: torch.device | str | None = None,
                workers: int | None = None, persistent: bool = True) -> TensorLoader | StreamLoader:
    """A TensorLoader for an in-memory data set, a StreamLoader for a streamed one."""
    if isinstance(dataset, StreamImageDataset):
        return StreamLoader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                            world_size=world_size, device=device, workers=workers, persistent=persistent)
    return TensorLoader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                        world_size=world_size, device=device)


#: seconds a loader worker outlives a SIGTERM (unless the loader shuts it down first)
WORKER_STOP_GRACE_S = 20


def ignore_stop_signals(worker_id: int) -> None:
    """Worker start: a SIGTERM does not kill a loader worker at once. A scheduler (SLURM, Kubernetes)
    signals the whole process group; a worker that died of it would end the run with a "worker
    killed" error (raised by torch in the main process, possibly mid-step) instead of the main
    process's orderly stop (finish the step, save last.pt, exit 143). The worker leaves with exit
    code 0 after :data:`WORKER_STOP_GRACE_S` seconds, or earlier when the loader shuts it down or
    the main process exits. SIGINT keeps torch's handling (a worker ends quietly on Ctrl-C)."""
    signal.signal(signal.SIGALRM, _leave)
    signal.signal(signal.SIGTERM, _leave_later)


def _shut_down_workers(loader_ref: weakref.ref) -> None:
    loader = loader_ref()
    shut_down = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if callable(shut_down):
        shut_down()


def _leave_later(signum: int, frame: Any) -> None:
    signal.alarm(WORKER_STOP_GRACE_S)


def _leave(signum: int, frame: Any) -> None:
    os._exit(0)


def eval_batches(dataset: StreamImageDataset, batch_size: int, device: torch.device | None = None, rank: int = 0,
                 world: int = 1, workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The un-augmented batches of samples ``rank, rank + world, ...`` (each sample once over all
    ranks), decoded by ``workers`` processes (default: the data set's)."""
    plain = dataset.with_augment(False)
    count = resolve_workers(workers if workers is not None else dataset.workers)
    subset = torch.utils.data.Subset(plain, range(rank, len(plain), world))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=count,
                                         pin_memory=device is not None and device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals if count else None)
    for images, labels in loader:
        if device is not None:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        yield images, labels

"""Data-parallel setup: detect a ``torchrun`` launch, start the process group, pick the device.

Under ``torchrun --nproc_per_node N`` every process sees ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``). :func:`setup_distributed` starts the
process group once (NCCL when the process trains on a CUDA device, gloo on CPU) and tells the
caller whether it did, so that only the code that started the group ends it.
"""

from __future__ import annotations

import atexit
import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import QatSteError

__all__ = ["DistInfo", "env_world", "resolve_device", "setup_distributed", "teardown_distributed",
           "all_reduce_sum", "gather_to_main", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # this code called init_process_group (and so must destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise QatSteError(f"environment variable {name}={value!r} is not an integer",
                          "launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) outside it."""
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local = _env_int("LOCAL_RANK")
    return rank, world, rank if local is None else local


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; a bare ``cuda`` gets
    the local rank's index too. Asking for CUDA without it is an error."""
    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise QatSteError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise QatSteError(f"device {device!r} was asked for but CUDA is not available here",
                              "use --device cpu (or auto)")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return resolved


def setup_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if the environment asks for one (and it is not running yet).

    Returns the rank, world size and whether this call started the group. A group the caller has
    already initialised is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(rank, world, env_world()[2] if world > 1 else 0, started_here=False)
    rank, world, local = env_world()
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise QatSteError("WORLD_SIZE > 1 but this torch build has no torch.distributed",
                          "run a single process, or install a torch build with distributed support")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, started_here=True)


def teardown_distributed(info: DistInfo) -> None:
    """End of a run: a process group that :func:`setup_distributed` started stays up for the next run
    in this process (e.g. the float and quantized stages of one torchrun job) and is destroyed when
    the process exits. Destroying it and starting another on the same MASTER_PORT within one process
    was seen to hang the new group's first collective (gloo, torch 2.14) in most runs."""
    if info.started_here:
        _destroy_at_exit()


@functools.cache
def _destroy_at_exit() -> None:
    """Register (once per process) the destruction of the default group at interpreter exit."""
    atexit.register(_destroy_group)


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_device(tensor: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (a no-op in a single process); returns it on its own device."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    device = _reduce_device(tensor)
    work = tensor.to(device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def gather_to_main(value: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``value`` as a list on rank 0 (None elsewhere); ``[value]`` without DDP."""
    if not info.distributed:
        return [value]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (a no-op without DDP)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()

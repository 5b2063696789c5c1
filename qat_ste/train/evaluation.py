"""Evaluation: mean cross-entropy and top-1 accuracy of a classifier over a data set, on one
process or split over the ranks of a data-parallel run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.loaders import StreamLoader, eval_batches
from ..data.stream import StreamImageDataset
from ..data.tensor import TensorImageDataset, TensorLoader
from ..errors import QatSteError
from ..nn_utils import logits_of, preserve_modes
from ..validation import check_choice
from .config import AMP_MODES, check_int
from .distributed import all_reduce_sum, resolve_device
from .precision import autocast, input_dtype, prepare_inputs, resolve_amp, upcast

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TensorImageDataset | TensorLoader | StreamImageDataset | StreamLoader | Iterable[Any],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    *,
    amp: str = "off",
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy ``loss``, top-1 ``accuracy`` and the number of images ``n``.

    ``data``: a TensorImageDataset (under an initialised process group each rank takes every
    world-th image and the sums are reduced, so the result covers the whole set exactly once), a
    TensorLoader, a StreamImageDataset or StreamLoader (its data set's evaluation transform, decoded
    by worker processes, each rank its share), or any iterable of (images, labels). A data set's
    augmentation is not applied.
    ``device``: default the model's. ``amp``: ``off`` (default), ``bf16``, ``fp16`` or ``auto``
    (bf16 on CUDA). Every module's train/eval mode is restored afterwards.
    """
    check_int("batch_size", batch_size, 1)
    target = resolve_device(device) if device is not None else _model_device(model)
    amp = resolve_amp(check_choice("amp", amp, AMP_MODES), target)
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sums = torch.zeros(3, dtype=torch.float64, device=target)
    dtype = input_dtype(model, amp)
    with preserve_modes(model, training=False):
        for images, labels in _eval_batches(data, batch_size, target, rank, world):
            images, labels = prepare_inputs(images, labels, target, channels_last, dtype)
            with autocast(target, amp):
                logits = logits_of(model(images))
            sums[0] += F.cross_entropy(upcast(logits), labels, reduction="sum").double()
            sums[1] += (logits.argmax(1) == labels).sum().double()
            sums[2] += labels.numel()
    if distributed:
        sums = all_reduce_sum(sums)
    loss, correct, n = sums.tolist()
    if n == 0:
        raise QatSteError("evaluate() got no images", "pass a non-empty data set")
    return {"loss": loss / n, "accuracy": correct / n, "n": int(n)}


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _eval_batches(data: Any, batch_size: int, device: torch.device, rank: int, world: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (images, labels) batches of ``data`` this rank evaluates, never augmented; a
    TensorLoader's position is put back afterwards."""
    if isinstance(data, TensorImageDataset):
        data = data.with_augment(False) if data.augment else data  # never evaluate augmented images
        indices = torch.arange(rank, len(data), world)  # each rank its share, no padding
        for start in range(0, len(indices), batch_size):
            yield data.get_batch(indices[start:start + batch_size], None, device)
    elif isinstance(data, StreamImageDataset):
        yield from eval_batches(data, batch_size, device, rank, world)
    elif isinstance(data, StreamLoader):
        yield from eval_batches(data.dataset, batch_size, device, rank, world, workers=data.workers)
    elif isinstance(data, TensorLoader):
        position = data.state_dict()
        try:
            yield from data
        finally:
            data.load_state_dict(position)
    else:
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise QatSteError("evaluate() needs batches of (images, labels)",
                                  "pass a TensorImageDataset, a TensorLoader or a DataLoader of (x, y)")
            yield batch[0], batch[1]

"""Number formats and memory layout shared by the training step and evaluation: which autocast
mode (``amp``), ``torch.compile`` and channels-last memory format a run uses, the autocast
context, and the inputs moved to the device in the form the model takes."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn

from ..errors import QatSteError
from .config import AUTO, TrainConfig

__all__ = ["autocast", "input_dtype", "prepare_inputs", "resolve_amp", "resolve_flags", "upcast"]


def resolve_amp(amp: str, device: torch.device) -> str:
    """``amp`` with ``auto`` replaced: bf16 on a CUDA device that supports it, else off."""
    if amp == AUTO:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return amp


def resolve_flags(config: TrainConfig, device: torch.device) -> tuple[str, bool, bool]:
    """(amp, compile, channels_last) of a run on ``device``; ``auto`` means on with CUDA."""
    cuda = device.type == "cuda"
    amp = resolve_amp(config.amp, device)
    if amp == "fp16" and not cuda:
        raise QatSteError("amp='fp16' needs a CUDA device", "use amp='off' (or 'bf16') on CPU")
    compile_ = cuda if config.compile == AUTO else bool(config.compile)
    channels_last = cuda if config.channels_last == AUTO else bool(config.channels_last)
    return amp, compile_, channels_last


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """The autocast context of ``amp`` (bf16 / fp16), or a no-op context when it is off."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (bf16/fp16 autocast outputs are upcast)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def input_dtype(model: nn.Module, amp: str) -> torch.dtype | None:
    """The dtype float inputs are cast to: the model's own when it is not float32 (e.g. a model
    converted with .double()) and autocast is off; None keeps the inputs as they are."""
    if amp != "off":
        return None
    dtype = param_dtype(model)
    return None if dtype == torch.float32 else dtype


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def prepare_inputs(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device``: images cast to ``dtype`` (if given) and in channels-last layout (if asked)."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if dtype is not None and images.is_floating_point():
        images = images.to(dtype)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels

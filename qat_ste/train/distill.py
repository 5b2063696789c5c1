"""Knowledge distillation from a float teacher into the quantized student.

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with ``w = distill_weight`` and ``T = distill_temperature`` (the T^2 keeps the soft term's gradient
on the scale of the hard one's). CE is the run's criterion (label smoothing included); KL is averaged
over the batch. ``T = 2`` by default: a trained teacher's softmax is nearly one-hot, so at ``T = 1``
the soft term adds little to the labels; ``T = 2`` lets the other classes' probabilities through
(2-bit MobileNetV2 on MNIST, one epoch at lr 0.002: 96.7 % at T = 2, 96.3 % at T = 1, 96.2 % without).
The teacher is frozen: eval mode, ``requires_grad`` off, run under ``torch.no_grad``
(in bf16 on CUDA), so the gradient reaches only the student. It is not wrapped in DDP (each rank
runs its own copy on its own batch) and never saved in checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QatSteError
from ..nn_utils import logits_of

__all__ = ["Teacher", "check_distill", "distillation_loss"]


def check_distill(weight: Any, temperature: Any) -> None:
    """Validate ``distill_weight`` (in [0, 1]) and ``distill_temperature`` (> 0)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise QatSteError(f"distill_weight={weight!r} must be a number in [0, 1]",
                          "pass e.g. distill_weight=0.5 (0: no distillation, 1: the teacher's outputs only)")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature <= 0):
        raise QatSteError(f"distill_temperature={temperature!r} must be a number > 0", "pass e.g. 1.0")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, hard_loss: torch.Tensor, weight: float,
                      temperature: float) -> torch.Tensor:
    """``(1 - weight) * hard_loss + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    the KL summed over classes and averaged over the batch (logits of shape (N, C))."""
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard_loss + weight * (t * t) * soft


class Teacher:
    """A frozen float model whose logits the student learns from."""

    def __init__(self, model: nn.Module, device: torch.device, channels_last: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise QatSteError(f"teacher must be a torch.nn.Module, got {type(model).__name__}",
                              "pass the float model (a frozen copy of it) as teacher=")
        model.eval()
        model.requires_grad_(False)
        self.dtype = torch.bfloat16 if device.type == "cuda" else None
        model.to(device=device, dtype=self.dtype)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits for a batch (already on the device)."""
        if self.model.training:  # someone switched it back: the teacher always runs in eval mode
            self.model.eval()
        if self.dtype is not None and images.is_floating_point():
            images = images.to(self.dtype)
        return logits_of(self.model(images)).float()

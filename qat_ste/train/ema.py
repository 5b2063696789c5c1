"""An exponential moving average (EMA) of a model's weights, for fine-tuning.

``ema = decay * ema + (1 - decay) * value`` for every floating-point entry of the model's state dict
(parameters, the quantizers' steps, BatchNorm's running statistics), updated after each optimizer
step; integer entries (BatchNorm's step counters, quantizer flags) are copied. Under DDP the EMA is
of the unwrapped model, identical on every rank (the ranks' weights are).

The training loop evaluates the EMA weights (swapped in with :meth:`WeightEma.applied`), picks
``best.pt`` by their accuracy and leaves them in the model when the run completes. The EMA's state
travels in the checkpoint inside the optimizer's state dict (entry :data:`STATE_KEY`, added and taken
out by hooks on the optimizer), so a resumed run continues the same average.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from ..errors import QatSteError

__all__ = ["STATE_KEY", "WeightEma", "check_decay", "checkpoint_weights"]

#: the entry of the optimizer's state dict that carries the EMA through checkpoints
STATE_KEY = "qat_ste_ema"


def check_decay(decay: Any) -> float:
    """Validate an EMA decay: a number in (0, 1)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise QatSteError(f"ema_decay={decay!r} must be a number between 0 and 1 (exclusive)",
                          "pass e.g. ema_decay=0.999 (--ema 0.999), or None to train without an EMA")
    return float(decay)


class WeightEma:
    """The EMA of ``model``'s state dict, started from its current values."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = model
        self.decay = check_decay(decay)
        self.updates = 0
        self.tensors: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the model's current weights (call after each optimizer step)."""
        self.updates += 1
        own = self.model.state_dict()
        floats = [(self.tensors[k], v.detach()) for k, v in own.items() if v.is_floating_point()]
        if floats:
            averages, values = zip(*floats, strict=True)
            torch._foreach_lerp_(list(averages), list(values), 1.0 - self.decay)
        for key, value in own.items():
            if not value.is_floating_point():
                self.tensors[key].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the EMA values into ``model`` (default: the averaged model), in place."""
        target = model if model is not None else self.model
        for key, value in target.state_dict().items():
            value.copy_(self.tensors[key])

    @contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The model holds the EMA values inside the block and its own ones again after it."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.copy_to()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for key, value in self.model.state_dict().items():
                    value.copy_(saved[key])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: the decay, the number of updates and the averaged tensors."""
        return {"decay": self.decay, "updates": self.updates, "tensors": dict(self.tensors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a :meth:`state_dict` (the tensors must match the model's keys and shapes)."""
        tensors = state.get("tensors") if isinstance(state, dict) else None
        if not isinstance(tensors, dict) or set(tensors) != set(self.tensors) or any(
                tuple(tensors[k].shape) != tuple(v.shape) for k, v in self.tensors.items()):
            raise QatSteError("the checkpoint's EMA weights do not fit this model",
                              "resume with the same model and quantization as the interrupted run")
        with torch.no_grad():
            for key, value in self.tensors.items():
                value.copy_(tensors[key])
        self.updates = int(state.get("updates", 0))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Carry this EMA in ``optimizer.state_dict()`` and take it back in ``load_state_dict``."""
        optimizer.register_state_dict_post_hook(self._save_hook)
        optimizer.register_load_state_dict_pre_hook(self._load_hook)

    def _save_hook(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state[STATE_KEY] = self.state_dict()
        return state

    def _load_hook(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        saved = state.pop(STATE_KEY, None)
        if saved is None:
            warnings.warn("the checkpoint holds no EMA weights (it was written without ema_decay); the EMA "
                          "starts from the resumed weights", stacklevel=2)
        else:
            self.load_state_dict(saved)
        return state


def checkpoint_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a training checkpoint stands for: its EMA weights when the run kept an EMA
    (what the run evaluated and left in the model), else its ``model`` entry."""
    optimizer = state.get("optimizer")
    saved = optimizer.get(STATE_KEY) if isinstance(optimizer, dict) else None
    if isinstance(saved, dict) and isinstance(saved.get("tensors"), dict):
        return saved["tensors"]
    return state["model"]

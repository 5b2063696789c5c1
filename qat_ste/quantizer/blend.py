"""BCGD's weight update as an optimizer hook (Yin et al. 2019, [P3]).

BCGD trains the float weights ``w`` of a layer whose forward uses ``Q(w)`` with

    w <- (1 - rho) * w + rho * Q(w) - lr * g,     g = dL/dQ(w)

The forward already computes with ``Q(w)`` and the straight-through backward of the weight quantizer
makes ``w.grad`` equal the gradient at ``Q(w)``; what remains is the blend ``(1 - rho) w + rho Q(w)``.
:class:`WeightBlender` does it in place, under ``no_grad``, in an ``optimizer.register_step_pre_hook``:
it runs right before the optimizer's own step, whatever the optimizer and the training loop. For plain
SGD (no momentum, no weight decay) the result is exactly the formula above; with momentum, weight decay,
Adam(W)... it is "blend, then the optimizer's step on the blended weights" (the optimizer's update uses
the gradient taken at ``Q(w)``, and AdamW's decoupled decay acts on the blended weights).
BinaryConnect is ``rho = 0``: no blend, plain STE on the weights.

The blender holds no state (``rho`` is a constant), so a resumed run continues bit for bit; the blend
is deterministic, so data-parallel ranks with identical weights and (all-reduced) gradients stay
identical. A step that the optimizer skips (GradScaler on inf/NaN gradients) is not blended either.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..errors import QatSteError
from .weight import WeightQuantizer, quant_weight_layers


class WeightBlender:
    """Blends every quantized weight of ``model`` toward its quantized value before optimizer steps.

    ``rho``: the blending factor for every layer; None takes each layer's own (``quantize()`` sets it from
    ``QuantConfig.bcgd_rho`` for ``weight_method="bcgd"`` and 0 for ``binaryconnect``); with None, layers
    whose own rho is 0 are left out. Call :meth:`attach` once per optimizer, or :meth:`blend` yourself right
    before ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, rho: float | None = None) -> None:
        if rho is not None and (isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1):
            raise QatSteError(f"rho={rho!r}: BCGD's blending factor must be a number in [0, 1]",
                              "pass e.g. rho=1e-5 (the paper's value), or None for each layer's own")
        self.layers: list[tuple[torch.Tensor, WeightQuantizer, float]] = []
        for _, m in quant_weight_layers(model):
            layer_rho = float(m.weight_quantizer.rho if rho is None else rho)
            if layer_rho > 0 or rho is not None:
                self.layers.append((m.weight, m.weight_quantizer, layer_rho))

    def __bool__(self) -> bool:
        return bool(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def blend(self, only: set[int] | None = None) -> None:
        """``w <- (1 - rho) w + rho Q(w)`` for every layer (with ``only``: the weights whose id is in it)."""
        for w, quantizer, rho in self.layers:
            if only is not None and id(w) not in only:
                continue
            q = quantizer.quantize(w)
            w.mul_(1.0 - rho).add_(q, alpha=rho)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Blend the weights this optimizer is about to update (those with a gradient)."""
        stepping = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        self.blend(stepping)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`blend` before each ``optimizer.step()`` (on the weights the step updates: those in
        the optimizer with a gradient). Returns the hook's handle (``.remove()`` detaches it)."""
        return optimizer.register_step_pre_hook(self._pre_step)


def attach_bcgd(model: nn.Module, optimizer: torch.optim.Optimizer) -> WeightBlender | None:
    """Attach a :class:`WeightBlender` with each layer's own rho to ``optimizer`` when ``model`` has
    quantized weights trained with BCGD (rho > 0); None (nothing attached) otherwise."""
    blender = WeightBlender(model)
    if not blender:
        return None
    blender.attach(optimizer)
    return blender

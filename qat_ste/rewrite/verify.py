"""Checking a rewrite against an independent count of activation calls at run time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import QuantConfig
from ..nn_utils import preserve_modes
from ..quantizer.module import QuantAct
from .census import CallEvent, count_activation_calls


@dataclass
class CoverageResult:
    """Sites the rewrite made against activation calls counted on the float model."""

    counted: int           # activation calls of the selected kinds in one float forward pass
    quantized_calls: int   # QuantAct invocations in one forward pass of the quantized model
    distinct_sites: int    # distinct QuantActs invoked (fewer than calls only where a whole block is
                           # reused, e.g. weight tying: its quantizers are shared like its weights)
    left_float: int        # selected-kind activation calls the quantized model still makes in float

    @property
    def ok(self) -> bool:
        return self.counted == self.quantized_calls and self.left_float == 0


def check_coverage(float_model: nn.Module, qmodel: nn.Module, *inputs: Any,
                   config: QuantConfig | None = None, training: bool = False) -> CoverageResult:
    """Run both models once (eval mode, or training mode for branches such as auxiliary heads)
    without gradients and compare the counts (see :class:`CoverageResult`)."""
    cfg = config or QuantConfig()

    def selected(event: CallEvent) -> bool:
        return cfg.kind_enabled(event.kind.name, event.kind.family)

    float_events = [e for e in _census_in_mode(float_model, inputs, training) if selected(e)]
    calls: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, a, o: calls.append(id(mod)))
             for m in qmodel.modules() if isinstance(m, QuantAct)]
    try:
        left = [e for e in _census_in_mode(qmodel, inputs, training) if selected(e)]
    finally:
        for h in hooks:
            h.remove()
    return CoverageResult(len(float_events), len(calls), len(set(calls)), len(left))


def _census_in_mode(model: nn.Module, inputs: tuple, training: bool) -> list:
    with preserve_modes(model, training=training), torch.no_grad():
        return count_activation_calls(model, *inputs)

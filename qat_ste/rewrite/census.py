"""Counting activation calls at run time, independently of the rewrite.

A forward pass under a TorchFunctionMode (functional calls) and forward hooks (module calls and
the module stack) lists every activation call in execution order, with the module whose own
``forward`` made it. The rewrite uses the list for the sites it cannot see statically and for
execution order; the coverage tool compares it with the sites the rewrite made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..kinds import ActivationKind, function_kind, function_name, method_kind, module_kind
from ..quantizer.module import INSIDE_QUANT_ACT, QuantAct


@dataclass(frozen=True)
class CallEvent:
    """One activation call seen at run time."""

    owner: str          # path of the module whose own forward made the call ("" = the model)
    target: str         # activation module path (module calls) or function name (functional)
    kind: ActivationKind
    is_module: bool
    index: int          # how many calls of the same target this owner made before, in this pass


def classify_torch_function(func: Any, args: tuple, kwargs: dict) -> tuple[str, ActivationKind] | None:
    """(readable name, kind) if ``func`` as seen by a TorchFunctionMode is an activation call."""
    kind = function_kind(func, args, kwargs)
    if kind is not None:
        return function_name(func), kind
    name = getattr(func, "__name__", None)
    if isinstance(name, str) and getattr(torch.Tensor, name, None) is func:
        kind = method_kind(name)
        if kind is not None:
            return function_name(name), kind
    return None


class _CensusMode(TorchFunctionMode):
    def __init__(self, census: _Census) -> None:
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.census
        if not INSIDE_QUANT_ACT.get() and c.stack and not c.stack_is_activation[-1]:
            hit = classify_torch_function(func, args, kwargs)
            if hit is not None:
                c.record(c.stack[-1], hit[0], hit[1], is_module=False)
        return func(*args, **kwargs)


class _Census:
    def __init__(self, model: nn.Module) -> None:
        self.paths: dict[int, str] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), name)
        self.stack: list[str] = []
        self.stack_is_activation: list[bool] = []
        self.events: list[CallEvent] = []
        self.counts: dict[tuple[str, str], int] = {}

    def record(self, owner: str, target: str, kind: ActivationKind, is_module: bool) -> None:
        key = (owner, target)
        index = self.counts.get(key, 0)
        self.counts[key] = index + 1
        self.events.append(CallEvent(owner, target, kind, is_module, index))

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        kind = module_kind(module) if not isinstance(module, QuantAct) else None
        is_act = kind is not None or isinstance(module, QuantAct)
        if kind is not None and self.stack and not self.stack_is_activation[-1]:
            self.record(self.stack[-1], self.paths.get(id(module), "?"), kind, is_module=True)
        self.stack.append(self.paths.get(id(module), "?"))
        self.stack_is_activation.append(is_act)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()
        self.stack_is_activation.pop()


def count_activation_calls(model: nn.Module, *inputs: Any, **kwargs: Any) -> list[CallEvent]:
    """Run ``model(*inputs)`` once (no grad) and list every activation call in execution order."""
    census = _Census(model)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(census.pre_hook))
        handles.append(m.register_forward_hook(census.post_hook, always_call=True))
    try:
        with torch.no_grad(), _CensusMode(census):
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return census.events

"""Runtime call-site dispatch for modules FX cannot trace.

The module's class is swapped for a subclass whose forward runs the original one inside a frame:
a TorchFunctionMode hands the frame's direct functional activation calls (k-th ``F.relu``, ...)
to the quantizers registered for them, and a shared activation module called by the owner is
replaced by a dispatcher that picks the quantizer of its k-th call. "Direct" means not inside a
child module: forward hooks on the owner's descendants keep the nesting depth.

This path is correct in eager mode but, unlike the FX rewrite, torch.compile sees the mode: the
report marks such sites ``runtime fallback``.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, cast

import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..quantizer.module import INSIDE_QUANT_ACT
from .activations import strip_inplace
from .census import classify_torch_function

_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("qat_ste_depth", default=0)
_FRAME: contextvars.ContextVar[_Frame | None] = contextvars.ContextVar("qat_ste_frame", default=None)


class _Frame:
    def __init__(self, owner: Any) -> None:
        self.owner = owner  # a module with the dynamic attributes _qat_runtime_sites and its quantizers
        self.depth = _DEPTH.get()
        self.counts: dict[str, int] = {}

    def next_index(self, key: str) -> int:
        i = self.counts.get(key, 0)
        self.counts[key] = i + 1
        return i


def _enter_child(module: Any, args: Any) -> None:
    module._qat_depth_token = _DEPTH.set(_DEPTH.get() + 1)


def _leave_child(module: nn.Module, args: Any, output: Any) -> None:
    token = module.__dict__.pop("_qat_depth_token", None)
    if token is not None:
        _DEPTH.reset(token)


class _DispatchMode(TorchFunctionMode):
    def __init__(self, frame: _Frame) -> None:
        super().__init__()
        self.frame = frame

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not INSIDE_QUANT_ACT.get() and _DEPTH.get() == self.frame.depth:
            hit = classify_torch_function(func, args, kwargs)
            if hit is not None:
                name = hit[0]
                index = self.frame.next_index(name)
                attr = self.frame.owner._qat_runtime_sites.get(f"{name}@{index}")
                if attr is not None:
                    fn, a, k = strip_inplace(func, tuple(args), dict(kwargs))
                    return getattr(self.frame.owner, attr)(*a, **k)
        return func(*args, **kwargs)


def _runtime_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    frame = _Frame(self)
    token = _FRAME.set(frame)
    try:
        with _DispatchMode(frame):
            return self._qat_base_class.forward(self, *args, **kwargs)
    finally:
        _FRAME.reset(token)


class CallOrderDispatch(nn.Module):
    """Stands for an activation module shared by call sites of a fallback owner.

    The k-th call inside the owner's forward goes to the owner's quantizer ``per_call[k]`` (an
    attribute name; None: that call stays float), any other call to the original module.
    """

    def __init__(self, key: str, per_call: list[str | None], original: nn.Module) -> None:
        super().__init__()
        self.key = key
        self.per_call = list(per_call)
        self.original = original

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        frame = _FRAME.get()
        if frame is not None and getattr(frame.owner, "_qat_runtime_sites", None) is not None:
            index = frame.next_index(self.key)
            attr = self.per_call[index] if index < len(self.per_call) else None
            if attr is not None and hasattr(frame.owner, attr):
                return getattr(frame.owner, attr)(x, *args, **kwargs)
        return self.original(x, *args, **kwargs)


def _forward_like(base: type) -> Any:
    """``_runtime_forward`` presenting ``base.forward``'s signature (parameter names and count), so
    that torch.export binds inputs and dynamic shapes to the same parameters as for the original."""
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _runtime_forward(self, *args, **kwargs)

    try:
        cast(Any, forward).__signature__ = inspect.signature(cast(Any, base).forward)
    except (TypeError, ValueError):  # no introspectable signature: keep (*args, **kwargs)
        pass
    forward.__doc__ = cast(Any, base).forward.__doc__
    return forward


def install_runtime_dispatch(owner: nn.Module, functional_sites: dict[str, str]) -> None:
    """Swap ``owner``'s class so its direct functional activation calls reach its quantizers.

    ``functional_sites`` maps ``"F.relu@0"`` (function name @ call index) to the attribute name of
    the QuantAct registered on the owner. The new forward keeps the original's signature.
    """
    base = type(owner)
    cast(Any, owner)._qat_runtime_sites = dict(functional_sites)
    owner.__class__ = type(base.__name__, (base,), {
        "forward": _forward_like(base), "_qat_base_class": base, "__module__": base.__module__})
    for child in owner.modules():
        if child is not owner and not getattr(child, "_qat_depth_hooked", False):
            child.register_forward_pre_hook(_enter_child)
            child.register_forward_hook(_leave_child, always_call=True)
            cast(Any, child)._qat_depth_hooked = True

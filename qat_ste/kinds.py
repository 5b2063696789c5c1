"""Which calls are activations: a registry of module classes, functions and Tensor methods, by kind.

A *kind* says how a call is quantized:

- family ``relu``: the whole activation becomes the staircase of the ReLU (ReLU, ReLU6,
  Hardtanh(0, c)); the STE acts on the activation's input.
- family ``generic``: the activation's output ``y = f(x)`` is quantized on a grid over [lo, hi]
  (a zero point where f goes negative); the STE acts on y and autograd multiplies by f'(x).
- family ``gate``: Sigmoid, Hardsigmoid, Softmax; left float unless gates are asked for.
- family ``point``: not an activation; the quantization points ``integer_graph=True`` adds (identity,
  then the grid), placed by the rewrite, never found in a model.

This is a base module: it imports nothing from qat_ste. timm's activation classes are recognised
without importing timm: a timm activation module can only exist once timm's activation modules are
loaded, so they are looked up in ``sys.modules`` when a module is classified.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ActivationKind:
    """How one kind of activation is quantized."""

    name: str                 # e.g. "relu", "gelu", "sigmoid"
    family: str               # "relu", "generic" or "gate"
    lower: float | None = 0.0  # lowest value the function takes (None: unbounded below)
    upper: float | None = None  # a cap on the output (ReLU6: 6), None if unbounded


def _k(name: str, family: str = "generic", lower: float | None = 0.0, upper: float | None = None) -> ActivationKind:
    return ActivationKind(name, family, lower, upper)


RELU = _k("relu", "relu")
RELU6 = _k("relu6", "relu", 0.0, 6.0)
GELU = _k("gelu", lower=-0.1700)
SILU = _k("silu", lower=-0.2785)
HARDSWISH = _k("hardswish", lower=-0.375)
MISH = _k("mish", lower=-0.3089)
HARDMISH = _k("hardmish", lower=-0.5)
QUICKGELU = _k("quick_gelu", lower=-0.1640)
SELU = _k("selu", lower=-1.7581)
LEAKY_RELU = _k("leaky_relu", lower=None)
PRELU = _k("prelu", lower=None)
TANH = _k("tanh", lower=-1.0, upper=1.0)
SIGMOID = _k("sigmoid", "gate", 0.0, 1.0)
HARDSIGMOID = _k("hardsigmoid", "gate", 0.0, 1.0)
SOFTMAX = _k("softmax", "gate", 0.0, 1.0)
#: a quantization point of the integer graph (not an activation: the identity on an 8-bit grid with a
#: zero point, where an integer op reads a tensor that is not yet codes); not in KIND_NAMES
POINT = _k("point", "point", None, None)

#: every kind name, for the ``kinds=`` option of quantize()
KIND_NAMES = (
    "relu", "relu6", "hardtanh", "gelu", "silu", "hardswish", "mish", "hardmish", "quick_gelu",
    "elu", "celu", "selu", "leaky_relu", "prelu", "tanh", "sigmoid", "hardsigmoid", "softmax",
)
GATE_KINDS = ("sigmoid", "hardsigmoid", "softmax")

#: the kind of an instance of an activation class (its arguments: ``m.min_val``, ``m.alpha``...)
KindOfModule = Callable[[Any], ActivationKind]


def _hardtanh_kind(min_val: float, max_val: float, name: str = "hardtanh") -> ActivationKind:
    if min_val == 0.0:
        return _k(name, "relu", 0.0, float(max_val))
    return _k(name, "generic", float(min_val), float(max_val))


_TORCH_MODULE_KINDS: tuple[tuple[type, KindOfModule], ...] = (
    (nn.ReLU, lambda m: RELU),
    (nn.ReLU6, lambda m: RELU6),  # before Hardtanh: it subclasses it
    (nn.Hardtanh, lambda m: _hardtanh_kind(m.min_val, m.max_val)),
    (nn.GELU, lambda m: GELU),
    (nn.SiLU, lambda m: SILU),
    (nn.Hardswish, lambda m: HARDSWISH),
    (nn.Mish, lambda m: MISH),
    (nn.ELU, lambda m: _k("elu", lower=-float(m.alpha))),
    (nn.CELU, lambda m: _k("celu", lower=-float(m.alpha))),
    (nn.SELU, lambda m: SELU),
    (nn.LeakyReLU, lambda m: LEAKY_RELU if m.negative_slope > 0 else RELU),
    (nn.PReLU, lambda m: PRELU),
    (nn.Tanh, lambda m: TANH),
    (nn.Sigmoid, lambda m: SIGMOID),
    (nn.Hardsigmoid, lambda m: HARDSIGMOID),
    (nn.Softmax, lambda m: SOFTMAX),
)

#: timm's activation classes (not subclasses of torch's), by module and class name
_TIMM_CLASS_KINDS: dict[str, tuple[tuple[str, ActivationKind], ...]] = {
    "timm.layers.activations": (
        ("GELU", GELU), ("GELUTanh", GELU), ("QuickGELU", QUICKGELU), ("Swish", SILU), ("Mish", MISH),
        ("HardSwish", HARDSWISH), ("HardMish", HARDMISH), ("Tanh", TANH), ("Sigmoid", SIGMOID),
        ("HardSigmoid", HARDSIGMOID),
    ),
    "timm.layers.activations_me": (
        ("SwishMe", SILU), ("MishMe", MISH), ("HardSwishMe", HARDSWISH), ("HardMishMe", HARDMISH),
        ("HardSigmoidMe", HARDSIGMOID),
    ),
}


def _constant_module(kind: ActivationKind) -> KindOfModule:
    return lambda m: kind


@functools.lru_cache(maxsize=8)
def _timm_table(loaded: tuple[ModuleType, ...]) -> tuple[tuple[type, KindOfModule], ...]:
    table: list[tuple[type, KindOfModule]] = []
    for module in loaded:
        for cls_name, kind in _TIMM_CLASS_KINDS[module.__name__]:
            cls = getattr(module, cls_name, None)
            if isinstance(cls, type):
                table.append((cls, _constant_module(kind)))
    return tuple(table)


def module_kind_table() -> tuple[tuple[type, KindOfModule], ...]:
    """(class, kind of an instance) for every known activation class: torch's, and timm's when loaded."""
    loaded = tuple(sys.modules[name] for name in _TIMM_CLASS_KINDS if name in sys.modules)
    return _TORCH_MODULE_KINDS + _timm_table(loaded) if loaded else _TORCH_MODULE_KINDS


def module_kind(module: nn.Module) -> ActivationKind | None:
    """The activation kind of a module instance, or None if it is not an activation."""
    table = module_kind_table()
    for cls, kind_of in table:
        if type(module) is cls:
            return kind_of(module)
    for cls, kind_of in table:  # user subclasses of known activations
        if isinstance(module, cls):
            return kind_of(module)
    return None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _constant(kind: ActivationKind) -> Callable[[tuple, dict], ActivationKind]:
    return lambda args, kwargs: kind


def _hardtanh_call(args: tuple, kwargs: dict) -> ActivationKind:
    return _hardtanh_kind(float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0)))


def _elu_call(name: str) -> Callable[[tuple, dict], ActivationKind]:
    return lambda args, kwargs: _k(name, lower=-float(_arg(args, kwargs, 1, "alpha", 1.0)))


def _leaky_call(args: tuple, kwargs: dict) -> ActivationKind:
    return LEAKY_RELU if float(_arg(args, kwargs, 1, "negative_slope", 0.01)) > 0 else RELU


_FUNCTION_KINDS: dict[Any, Callable[[tuple, dict], ActivationKind]] = {
    F.relu: _constant(RELU), F.relu_: _constant(RELU), torch.relu: _constant(RELU), torch.relu_: _constant(RELU),
    F.relu6: _constant(RELU6), F.hardtanh: _hardtanh_call, F.hardtanh_: _hardtanh_call,
    F.gelu: _constant(GELU), F.silu: _constant(SILU), F.hardswish: _constant(HARDSWISH), F.mish: _constant(MISH),
    F.elu: _elu_call("elu"), F.elu_: _elu_call("elu"), F.celu: _elu_call("celu"),
    F.selu: _constant(SELU), torch.selu: _constant(SELU),
    F.leaky_relu: _leaky_call, F.leaky_relu_: _leaky_call, F.prelu: _constant(PRELU), torch.prelu: _constant(PRELU),
    torch.tanh: _constant(TANH), F.tanh: _constant(TANH),
    torch.sigmoid: _constant(SIGMOID), F.sigmoid: _constant(SIGMOID), F.hardsigmoid: _constant(HARDSIGMOID),
    F.softmax: _constant(SOFTMAX), torch.softmax: _constant(SOFTMAX),
}

#: Tensor methods (call_method targets in FX, Tensor.* in a TorchFunctionMode)
_METHOD_KINDS: dict[str, ActivationKind] = {
    "relu": RELU, "relu_": RELU, "sigmoid": SIGMOID, "sigmoid_": SIGMOID, "tanh": TANH,
    "tanh_": TANH, "softmax": SOFTMAX,
}


def function_kind(fn: Any, args: tuple = (), kwargs: dict | None = None) -> ActivationKind | None:
    """The activation kind of a functional call (``F.relu``, ``torch.sigmoid``...), or None."""
    kind_of = _FUNCTION_KINDS.get(fn)
    return kind_of(args, kwargs or {}) if kind_of is not None else None


def method_kind(name: str) -> ActivationKind | None:
    """The activation kind of a Tensor method call by name (``x.relu()``), or None."""
    return _METHOD_KINDS.get(name)


def _readable_names() -> dict[Any, str]:
    """'F.gelu' / 'torch.relu' for every activation function (F first: many F.* are torch builtins)."""
    names: dict[Any, str] = {}
    for fn in _FUNCTION_KINDS:
        for prefix, space in (("F", F), ("torch", torch)):
            hit = next((n for n in dir(space) if getattr(space, n, None) is fn), None)
            if hit is not None:
                names[fn] = f"{prefix}.{hit}"
                break
    return names


_READABLE_NAMES = _readable_names()


def function_name(fn: Any) -> str:
    """A short readable name for a function or method target: 'F.relu', 'torch.relu', 'Tensor.relu'."""
    if isinstance(fn, str):
        return f"Tensor.{fn}"
    return _READABLE_NAMES.get(fn, getattr(fn, "__name__", repr(fn)))

"""Which calls are activations: a registry of module classes and functions, by kind.

A *kind* says how a call is quantized:

- family ``relu``: the whole activation becomes the staircase of the ReLU (ReLU, ReLU6,
  Hardtanh(0, c)); the STE acts on the activation's input.
- family ``generic``: the activation's output ``y = f(x)`` is quantized on a grid over [lo, hi]
  (a zero point where f goes negative); the STE acts on y and autograd multiplies by f'(x).
- family ``gate``: Sigmoid, Hardsigmoid, Softmax; left float unless gates are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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


def _k(name: str, family: str = "generic", lower: float | None = 0.0, upper: float | None = None):
    return ActivationKind(name, family, lower, upper)


RELU = _k("relu", "relu")
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

#: every kind name, for the ``kinds=`` option of quantize()
KIND_NAMES = (
    "relu", "relu6", "hardtanh", "gelu", "silu", "hardswish", "mish", "hardmish", "quick_gelu",
    "elu", "celu", "selu", "leaky_relu", "prelu", "tanh", "sigmoid", "hardsigmoid", "softmax",
)
GATE_KINDS = ("sigmoid", "hardsigmoid", "softmax")


def _hardtanh_kind(min_val: float, max_val: float, name: str = "hardtanh") -> ActivationKind:
    if min_val == 0.0:
        return _k(name, "relu", 0.0, float(max_val))
    return _k(name, "generic", float(min_val), float(max_val))


def _module_kinds() -> list[tuple[type, Callable[[nn.Module], ActivationKind]]]:
    table: list[tuple[type, Callable[[nn.Module], ActivationKind]]] = [
        (nn.ReLU, lambda m: RELU),
        (nn.ReLU6, lambda m: _k("relu6", "relu", 0.0, 6.0)),  # before Hardtanh: it subclasses it
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
    ]
    try:  # timm's activation layers are not subclasses of torch's
        from timm.layers import activations as ta
        from timm.layers import activations_me as tme
    except ImportError:
        return table
    table += [
        (ta.GELU, lambda m: GELU), (ta.GELUTanh, lambda m: GELU), (ta.QuickGELU, lambda m: QUICKGELU),
        (ta.Swish, lambda m: SILU), (tme.SwishMe, lambda m: SILU),
        (ta.Mish, lambda m: MISH), (tme.MishMe, lambda m: MISH),
        (ta.HardSwish, lambda m: HARDSWISH), (tme.HardSwishMe, lambda m: HARDSWISH),
        (ta.HardMish, lambda m: HARDMISH), (tme.HardMishMe, lambda m: HARDMISH),
        (ta.Tanh, lambda m: TANH),
        (ta.Sigmoid, lambda m: SIGMOID),
        (ta.HardSigmoid, lambda m: HARDSIGMOID), (tme.HardSigmoidMe, lambda m: HARDSIGMOID),
    ]
    return table


_MODULE_KINDS = _module_kinds()


def module_kind(module: nn.Module) -> ActivationKind | None:
    """The activation kind of a module instance, or None if it is not an activation."""
    for cls, kind_of in _MODULE_KINDS:
        if type(module) is cls:
            return kind_of(module)
    for cls, kind_of in _MODULE_KINDS:  # user subclasses of known activations
        if isinstance(module, cls):
            return kind_of(module)
    return None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _fn_table() -> dict[Any, Callable[[tuple, dict], ActivationKind]]:
    relu6 = lambda a, k: _k("relu6", "relu", 0.0, 6.0)  # noqa: E731
    hardtanh = lambda a, k: _hardtanh_kind(  # noqa: E731
        float(_arg(a, k, 1, "min_val", -1.0)), float(_arg(a, k, 2, "max_val", 1.0)))
    elu = lambda a, k: _k("elu", lower=-float(_arg(a, k, 1, "alpha", 1.0)))  # noqa: E731
    celu = lambda a, k: _k("celu", lower=-float(_arg(a, k, 1, "alpha", 1.0)))  # noqa: E731
    leaky = lambda a, k: LEAKY_RELU if float(_arg(a, k, 1, "negative_slope", 0.01)) > 0 else RELU  # noqa: E731
    const = lambda kind: (lambda a, k: kind)  # noqa: E731
    table: dict[Any, Callable[[tuple, dict], ActivationKind]] = {
        F.relu: const(RELU), F.relu_: const(RELU), torch.relu: const(RELU), torch.relu_: const(RELU),
        F.relu6: relu6, F.hardtanh: hardtanh, F.hardtanh_: hardtanh,
        F.gelu: const(GELU), F.silu: const(SILU), F.hardswish: const(HARDSWISH), F.mish: const(MISH),
        F.elu: elu, F.elu_: elu, F.celu: celu, F.selu: const(SELU), torch.selu: const(SELU),
        F.leaky_relu: leaky, F.leaky_relu_: leaky, F.prelu: const(PRELU), torch.prelu: const(PRELU),
        torch.tanh: const(TANH), F.tanh: const(TANH),
        torch.sigmoid: const(SIGMOID), F.sigmoid: const(SIGMOID), F.hardsigmoid: const(HARDSIGMOID),
        F.softmax: const(SOFTMAX), torch.softmax: const(SOFTMAX),
    }
    return table


_FUNCTION_KINDS = _fn_table()

#: Tensor methods (call_method targets in FX, Tensor.* in a TorchFunctionMode)
_METHOD_KINDS: dict[str, ActivationKind] = {
    "relu": RELU, "relu_": RELU, "sigmoid": SIGMOID, "sigmoid_": SIGMOID, "tanh": TANH,
    "tanh_": TANH, "softmax": SOFTMAX,
}

#: functions and methods that modify their input in place
INPLACE_FUNCTIONS = {F.relu_, torch.relu_, F.hardtanh_, F.elu_, F.leaky_relu_}
INPLACE_METHODS = {"relu_", "sigmoid_", "tanh_"}


def function_kind(fn: Any, args: tuple = (), kwargs: dict | None = None) -> ActivationKind | None:
    """The activation kind of a functional call (``F.relu``, ``torch.sigmoid``...), or None."""
    kind_of = _FUNCTION_KINDS.get(fn)
    return kind_of(args, kwargs or {}) if kind_of is not None else None


def method_kind(name: str) -> ActivationKind | None:
    """The activation kind of a Tensor method call by name (``x.relu()``), or None."""
    return _METHOD_KINDS.get(name)


def is_inplace_call(fn_or_method: Any, kwargs: dict | None = None, args: tuple = ()) -> bool:
    """Whether this activation call modifies its input in place."""
    if isinstance(fn_or_method, str):
        return fn_or_method in INPLACE_METHODS
    if fn_or_method in INPLACE_FUNCTIONS:
        return True
    kwargs = kwargs or {}
    if kwargs.get("inplace", False) is True:
        return True
    # F.relu(x, True) / F.hardtanh(x, lo, hi, True) / F.elu(x, a, True) / F.leaky_relu(x, s, True)
    positions = {F.relu: 1, F.relu6: 1, F.silu: 1, F.hardswish: 1, F.mish: 1, F.selu: 1,
                 F.hardtanh: 3, F.elu: 2, F.celu: 2, F.leaky_relu: 2}
    i = positions.get(fn_or_method)
    return i is not None and len(args) > i and args[i] is True


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


def strip_inplace(fn: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """The out-of-place equivalent of an activation call (same function, ``inplace`` removed)."""
    out_of_place = {F.relu_: F.relu, torch.relu_: torch.relu, F.hardtanh_: F.hardtanh,
                    F.elu_: F.elu, F.leaky_relu_: F.leaky_relu}
    fn = out_of_place.get(fn, fn)
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    positions = {F.relu: 1, F.relu6: 1, F.silu: 1, F.hardswish: 1, F.mish: 1, F.selu: 1,
                 F.hardtanh: 3, F.elu: 2, F.celu: 2, F.leaky_relu: 2}
    i = positions.get(fn)
    if i is not None and len(args) > i:
        args = args[:i]
    return fn, args, kwargs

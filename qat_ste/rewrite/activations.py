"""The rewrite's view of activation calls: in-place variants and their out-of-place equivalents.

The kind registry itself (which modules, functions and Tensor methods are activations, and how
each is quantized) lives in :mod:`qat_ste.kinds`; its names stay readable from this module (a
module ``__getattr__``) for code that imported them from here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import kinds

#: in-place activation functions and the out-of-place function each stands for
OUT_OF_PLACE: dict[Any, Any] = {
    F.relu_: F.relu, torch.relu_: torch.relu, F.hardtanh_: F.hardtanh, F.elu_: F.elu, F.leaky_relu_: F.leaky_relu,
}
#: the position of the ``inplace`` flag among the positional arguments, per function:
#: F.relu(x, True), F.hardtanh(x, lo, hi, True), F.elu(x, a, True), F.leaky_relu(x, s, True)
INPLACE_ARG_POSITION: dict[Any, int] = {
    F.relu: 1, F.relu6: 1, F.silu: 1, F.hardswish: 1, F.mish: 1, F.selu: 1,
    F.hardtanh: 3, F.elu: 2, F.celu: 2, F.leaky_relu: 2,
}
#: functions and methods that modify their input in place
INPLACE_FUNCTIONS = frozenset(OUT_OF_PLACE)
INPLACE_METHODS = frozenset({"relu_", "sigmoid_", "tanh_"})


def __getattr__(name: str) -> Any:
    """The kind registry's names (``RELU``, ``module_kind``...) for code that imported them from here;
    they live in :mod:`qat_ste.kinds`."""
    if not name.startswith("__") and hasattr(kinds, name):
        return getattr(kinds, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_inplace_call(fn_or_method: Any, kwargs: dict | None = None, args: tuple = ()) -> bool:
    """Whether this activation call modifies its input in place."""
    if isinstance(fn_or_method, str):
        return fn_or_method in INPLACE_METHODS
    if fn_or_method in INPLACE_FUNCTIONS:
        return True
    if (kwargs or {}).get("inplace", False) is True:
        return True
    i = INPLACE_ARG_POSITION.get(fn_or_method)
    return i is not None and len(args) > i and args[i] is True


def strip_inplace(fn: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """The out-of-place equivalent of an activation call (same function, ``inplace`` removed)."""
    fn = OUT_OF_PLACE.get(fn, fn)
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    i = INPLACE_ARG_POSITION.get(fn)
    if i is not None and len(args) > i:
        args = args[:i]
    return fn, args, kwargs

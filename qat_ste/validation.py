"""Validators for user-facing options, shared by QuantConfig and QuantAct (a base module: it
imports nothing from qat_ste but the error type). Each returns the value it accepts and raises
:class:`~qat_ste.errors.QatSteError` naming the option, the value and the fix otherwise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import QatSteError


def check_bits(bits: Any) -> int:
    """Validate a bit width (an int 1..8, not a bool)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise QatSteError(f"bits={bits!r} is not supported: activations are quantized to 1..8 bits",
                          "pass an integer bit width from 1 to 8, e.g. bits=4")
    return bits


def check_step_init(value: Any, name: str = "step_init") -> float | None:
    """Validate a given initial step: None (calibrate / the fixed-mode default) or a finite number > 0.

    ``name`` is the option as the caller spelled it (``step_init``, or the deprecated ``alpha_init``).
    """
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise QatSteError(f"{name}={value!r}: the step must be a finite number > 0",
                          f"pass a positive step, or {name}=None to calibrate it")
    return float(value)


#: the former name of :func:`check_step_init`
check_alpha_init = check_step_init


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Validate that ``value`` is one of ``choices``; the error lists them."""
    if not isinstance(value, str) or value not in choices:
        raise QatSteError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}",
                          f"pass {name.replace(' ', '_')}= one of those")
    return value

"""The step alpha: the papers' constants, and initialisation from calibration samples.

Every initialiser turns a sample of the quantizer's input (``channels x n``) into a range
``(lo, hi)`` per channel; the step is then ``alpha = (hi - lo) / L`` and the zero point
``z = round(-lo / alpha)``. Working in ranges lets data-parallel ranks average them before the
step is set, so that all ranks start identical.
"""

from __future__ import annotations

import math

import torch

from ..errors import QatSteError
from .functional import quantize_codes

#: MSE-optimal step of the nearest-rounding b-bit quantized ReLU for half-Gaussian N(0,1) input
#: (bits 1-4 as given in the reference; 5-8 from the same 1-D fit, tools/../tests recompute them).
HALF_GAUSSIAN_STEP = {1: 1.2236, 2: 0.6509, 3: 0.3532, 4: 0.1932, 5: 0.1055, 6: 0.0573, 7: 0.0309, 8: 0.0165}
#: the same fit for ceil rounding (sigma(x) = step * min(ceil(x / step), L) for x > 0), computed by
#: :func:`mse_optimal_step` (1 bit: sqrt(2/pi), the half-normal mean); tests recompute every entry
HALF_GAUSSIAN_CEIL_STEP = {1: 0.7979, 2: 0.4866, 3: 0.2893, 4: 0.1666, 5: 0.0938, 6: 0.0520, 7: 0.0284,
                           8: 0.0154}
#: the constants of the authors' code ([P1], used there with ceil rounding; not MSE-optimal for ceil:
#: +32 % error at 2 bits, +15 % at 4 bits): the ``paper_ceil`` choice
AUTHORS_STEP = {2: 0.6511, 4: 0.1946}
#: what :func:`fixed_step` accepts: a rounding mode, or the authors' ceil constants
FIXED_STEP_CHOICES = ("nearest", "ceil", "paper_ceil")

INIT_METHODS = ("percentile", "mse", "gaussian", "lsq", "max")
ALPHA_MIN = 1e-4
BCGD_RANGE = (1e-3, 5.0)


def fixed_step(bits: int, rounding: str = "nearest") -> float:
    """[P1]'s fixed step for ``bits``: the MSE-optimal step for half-Gaussian input with ``rounding``
    (``nearest`` or ``ceil``), or with ``paper_ceil`` the authors' constants (2 and 4 bits, used with
    ceil rounding)."""
    if rounding == "paper_ceil":
        if bits not in AUTHORS_STEP:
            raise QatSteError(f"the authors' code has no fixed step for {bits} bits (paper_ceil: only 2 and 4)",
                              "use rounding 'ceil' for the MSE-optimal ceil step, or bits 2 or 4")
        return AUTHORS_STEP[bits]
    table = {"nearest": HALF_GAUSSIAN_STEP, "ceil": HALF_GAUSSIAN_CEIL_STEP}.get(rounding)
    if table is None:
        raise QatSteError(f"unknown fixed-step choice {rounding!r}", f"use one of {', '.join(FIXED_STEP_CHOICES)}")
    if bits not in table:
        raise QatSteError(f"no fixed step for {bits} bits", "use 1 to 8 bits")
    return table[bits]


def _gauss_segment(lo: float, hi: float, level: float) -> float:
    """The integral of ``(x - level)^2 phi(x)`` over ``[lo, hi]`` (phi the N(0,1) density), closed form."""
    def antiderivative(x: float) -> float:
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) if math.isfinite(x) else 1.0
        phi = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) if math.isfinite(x) else 0.0
        return (cdf - x * phi if math.isfinite(x) else cdf) + 2.0 * level * phi + level * level * cdf
    return antiderivative(hi) - antiderivative(lo)


def half_gaussian_mse(step: float, bits: int, rounding: str = "nearest") -> float:
    """``E (sigma(X) - X)^2`` for half-normal ``X`` and the b-bit quantized ReLU with ``step`` and
    ``rounding`` (``nearest``: levels k for x in ((k-1/2) step, (k+1/2) step]; ``ceil``: level k for x in
    ((k-1) step, k step]; the top level takes everything above)."""
    levels = 2 ** bits - 1
    total = 0.0
    for k in range(levels + 1):
        if rounding == "nearest":
            lo, hi = max((k - 0.5) * step, 0.0), (k + 0.5) * step if k < levels else math.inf
        elif rounding == "ceil":
            if k == 0:
                continue  # x <= 0 maps to 0 exactly: no error on the half-normal's support
            lo, hi = (k - 1) * step, k * step if k < levels else math.inf
        else:
            raise QatSteError(f"unknown rounding {rounding!r}", "use 'nearest' or 'ceil'")
        total += 2.0 * _gauss_segment(lo, hi, k * step)
    return total


def mse_optimal_step(bits: int, rounding: str = "nearest", tol: float = 1e-9) -> float:
    """The step minimizing :func:`half_gaussian_mse` (a scan over (0, 3], then golden-section search)."""
    grid = [0.001 * 1.02 ** i for i in range(400) if 0.001 * 1.02 ** i <= 3.0]
    errors = [half_gaussian_mse(a, bits, rounding) for a in grid]
    best = min(range(len(grid)), key=errors.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    while hi - lo > tol:
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if half_gaussian_mse(a, bits, rounding) < half_gaussian_mse(b, bits, rounding):
            hi = b
        else:
            lo = a
    return 0.5 * (lo + hi)


def _quant_error(x: torch.Tensor, target: torch.Tensor, lo: torch.Tensor, alpha: torch.Tensor, levels: int):
    """Mean squared quantization error per channel; ``x``, ``target``: ``channels x n``; ``lo``,
    ``alpha``: ``(channels,)``."""
    lo, alpha = lo[:, None], alpha[:, None]  # one value per row of x
    z = zero_point_for(lo, alpha, levels)
    q = quantize_codes(x, alpha, z, levels)
    return ((q - z) * alpha - target).pow(2).mean(dim=-1)


def range_from_samples(
    samples: torch.Tensor,
    levels: int,
    method: str = "mse",
    *,
    relu_family: bool,
    cap: float | None = None,
    bits: int | None = None,
    percentile: float = 99.99,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel range ``(lo, hi)`` from ``samples`` (``channels x n``) with ``method``.

    ``relu_family`` means the quantizer replaces a ReLU-like function (lo = 0 and the target of the
    MSE fit is ``clamp(x, 0, cap)``); otherwise the samples are the activation's outputs and lo is
    their low end (0 if they never go negative).
    """
    if method not in INIT_METHODS:
        raise QatSteError(f"unknown alpha initialisation {method!r}; known: {', '.join(INIT_METHODS)}",
                          "pass one of those as init=")
    x = samples.float()
    if x.numel() == 0:
        raise QatSteError("no calibration samples reached this quantizer",
                          "feed batches that run through every quantized activation")
    target = torch.clamp(x, min=0.0, max=cap) if relu_family else x
    if relu_family:
        lo = torch.zeros(x.shape[0])
    else:
        q_lo = torch.quantile(x, (100.0 - percentile) / 100.0, dim=-1) if method == "percentile" else x.amin(-1)
        lo = torch.clamp(q_lo, max=0.0)
    pos = target - lo[:, None]
    if method == "max":
        span = pos.amax(-1)
    elif method == "percentile":
        span = torch.quantile(pos, percentile / 100.0, dim=-1)
    elif method == "gaussian":
        span = levels * HALF_GAUSSIAN_STEP[bits or 4] * x.std(dim=-1)
    elif method == "lsq":
        span = levels * 2.0 * x.abs().mean(-1) / levels ** 0.5
    else:  # mse: grid search over the span, per channel
        top = pos.amax(-1).clamp(min=1e-8)
        fractions = torch.linspace(0.05, 1.0, 96)
        errors = torch.stack([
            _quant_error(x, target, lo, (f * top / levels).clamp(min=1e-8), levels)[None]
            for f in fractions]).squeeze(1)  # (grid, channels)
        span = fractions[errors.argmin(0)] * top
    if cap is not None:
        span = torch.clamp(span, max=cap - lo)
    span = torch.clamp(span, min=levels * ALPHA_MIN)
    return lo, lo + span


def step_and_zero_point(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha = (hi - lo)/L`` and the integer zero point ``round(-lo/alpha)`` clamped to [0, L]."""
    alpha = torch.clamp((hi - lo) / levels, min=ALPHA_MIN)
    return alpha, zero_point_for(lo, alpha, levels)


def zero_point_for(lo: torch.Tensor, alpha: torch.Tensor, levels: int) -> torch.Tensor:
    """The integer zero point that puts ``lo`` on the grid: ``round(-lo/alpha)`` clamped to [0, L]."""
    return torch.clamp(torch.round(-lo / alpha), 0, levels)

"""The step alpha: the papers' constants, and initialisation from calibration samples.

Every initialiser turns a sample of the quantizer's input (``channels x n``) into a range
``(lo, hi)`` per channel; the step is then ``alpha = (hi - lo) / L`` and the zero point
``z = round(-lo / alpha)``. Working in ranges lets data-parallel ranks average them before the
step is set, so that all ranks start identical.
"""

from __future__ import annotations

import torch

from ..errors import QatSteError
from .functional import quantize_codes

#: MSE-optimal step of the nearest-rounding b-bit quantized ReLU for half-Gaussian N(0,1) input
#: (bits 1-4 as given in the reference; 5-8 from the same 1-D fit, tools/../tests recompute them).
HALF_GAUSSIAN_STEP = {1: 1.2236, 2: 0.6509, 3: 0.3532, 4: 0.1932, 5: 0.1055, 6: 0.0573, 7: 0.0309, 8: 0.0165}
#: the constants of the authors' code ([P1], used with ceil rounding)
AUTHORS_STEP = {2: 0.6511, 4: 0.1946}

INIT_METHODS = ("percentile", "mse", "gaussian", "lsq", "max")
ALPHA_MIN = 1e-4
BCGD_RANGE = (1e-3, 5.0)


def fixed_step(bits: int, rounding: str = "nearest") -> float:
    """The papers' fixed step for ``bits`` ([P1]'s half-Gaussian fit; the authors' value with ceil)."""
    if rounding == "ceil" and bits in AUTHORS_STEP:
        return AUTHORS_STEP[bits]
    return HALF_GAUSSIAN_STEP[bits]


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

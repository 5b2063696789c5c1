"""The fake quantizer: exact forward, STE backward, and the step-size (alpha) gradients.

Uniform grid with ``L = 2**bits - 1`` and an integer zero point ``z`` (0 for the ReLU family):

    code q = clamp(round(u / alpha) + z, 0, L)        y = (q - z) * alpha

``u / alpha`` is a true division (multiplying by 1/alpha disagrees with ONNX's QuantizeLinear on
near-ties), computed in float32 whatever the input dtype. Rounding is ``nearest`` (half to even, as
ONNX) or ``ceil`` (the authors' code). The backward pass never relies on ``torch.clamp``'s boundary
subgradient: the STE's ``mu'(u)`` is the whole input gradient, and the alpha gradient follows the
chosen mode:

- ``lsq``:  dy/dalpha = (q - z) - u/alpha for lo < u < hi, -z for u <= lo, L - z for u >= hi, times
            g = 1/sqrt(N L) (LSQ's clip condition -Q_N < u/alpha < Q_P is on the unrounded u/alpha)
- ``pact``: dy/dalpha = (L - z) * 1{u >= hi}   (PACT's 1{x >= clip} with clip = hi = (L - z) alpha)
- ``bcgd``: dy/dalpha ~ -z below lo, (L + 1)/2 - z inside, L - z above hi; the summed gradient is
            scaled by 0.01 and clamped to [-1, 1] ([P3]; for z = 0 this is 0, 2^(b-1), L)
- ``fixed``: no gradient.
"""

from __future__ import annotations

import math

import torch

from ..ste import STE

ROUNDING_MODES = ("nearest", "ceil")
ALPHA_MODES = ("fixed", "lsq", "pact", "bcgd")


def quantize_codes(
    u: torch.Tensor, alpha: torch.Tensor, zero_point: torch.Tensor, levels: int, rounding: str = "nearest"
) -> torch.Tensor:
    """Integer codes in ``[0, levels]`` (as float32) of ``u`` on the grid (alpha, zero_point)."""
    r = u.float() / alpha.float()
    t = torch.round(r) if rounding == "nearest" else torch.ceil(r)
    return torch.clamp(t + zero_point, 0, levels)


def _alpha_derivative(
    mode: str, u: torch.Tensor, r: torch.Tensor, t: torch.Tensor, z: torch.Tensor, levels: int,
    lo: torch.Tensor, hi: torch.Tensor,
) -> torch.Tensor:
    """dy/dalpha per element for ``mode``; ``r = u/alpha`` and ``t`` its rounded value (unclamped)."""
    if mode == "lsq":
        # Esser et al. eq. 3: t - r where -Q_N < u/alpha < Q_P (Q_N = z, Q_P = L - z, tested on the
        # unrounded ratio), -Q_N below, Q_P above; clamp(t, -Q_N, Q_P) is t inside and the bound outside
        inside = (r > -z) & (r < levels - z)
        return torch.clamp(t, -z, levels - z).sub_(r * inside)
    if mode == "pact":
        return (u >= hi).to(u.dtype) * (levels - z)
    if mode == "bcgd":
        inside = (levels + 1) / 2 - z
        return torch.where(u <= lo, -z, torch.where(u <= hi, inside, levels - z))
    raise AssertionError(mode)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, alpha, zero_point, levels, ste, alpha_mode, rounding, grad_scale):
        a = alpha.float()
        t = u.float() / a  # a fresh tensor: the rest runs in place (4 passes in all)
        t = t.round_() if rounding == "nearest" else t.ceil_()
        # clamp(t + z, 0, L) - z == clamp(t, -z, L - z) for an integer z
        y = t.clamp_(-zero_point, levels - zero_point).mul_(a)
        ctx.save_for_backward(u, alpha, zero_point)
        ctx.levels, ctx.ste, ctx.alpha_mode, ctx.rounding, ctx.grad_scale = (
            levels, ste, alpha_mode, rounding, grad_scale)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        u, alpha, z = ctx.saved_tensors
        uf = u.float()
        a = alpha.float()
        lo = -z * a
        hi = (ctx.levels - z) * a
        g = grad_y.float()
        grad_u = (g * ctx.ste(uf, lo, hi)).to(u.dtype) if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1] and ctx.alpha_mode != "fixed":
            r = uf / a
            t = torch.round(r) if ctx.rounding == "nearest" else torch.ceil(r)
            d = _alpha_derivative(ctx.alpha_mode, uf, r, t, z, ctx.levels, lo, hi)
            grad_alpha = (g * d).sum_to_size(alpha.shape)
            if ctx.alpha_mode == "lsq":
                grad_alpha = grad_alpha * ctx.grad_scale
            elif ctx.alpha_mode == "bcgd":
                grad_alpha = torch.clamp(0.01 * grad_alpha, -1.0, 1.0)
            grad_alpha = grad_alpha.to(alpha.dtype)
        return grad_u, grad_alpha, None, None, None, None, None, None


def fake_quantize(
    u: torch.Tensor,
    alpha: torch.Tensor,
    zero_point: torch.Tensor,
    levels: int,
    ste: STE,
    alpha_mode: str = "fixed",
    rounding: str = "nearest",
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Quantize ``u`` to ``(q - z) * alpha`` with an STE backward (see the module docstring).

    ``alpha`` and ``zero_point`` broadcast against ``u`` (scalars, or per-channel views).
    """
    return _FakeQuantize.apply(u, alpha, zero_point, levels, ste, alpha_mode, rounding, grad_scale)


def lsq_grad_scale(u: torch.Tensor, levels: int, channels: int = 1) -> float:
    """LSQ's gradient scale g = 1/sqrt(N * L), N = features per sample (per channel if per-channel)."""
    per_sample = u.numel() // max(u.shape[0], 1) if u.dim() > 1 else u.numel()
    n = max(per_sample // max(channels, 1), 1)
    return 1.0 / math.sqrt(n * levels)

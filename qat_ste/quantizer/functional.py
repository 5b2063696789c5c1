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

Backward memory (the built-in STEs identity, relu and clipped_relu): the input is not kept. The
forward pass saves, per element, only what the backward pass reads, bit-packed:

- ``fixed``: the STE mask, 1 bit (nothing for identity);
- ``pact`` / ``bcgd``: a 2-bit region code (pact: below or NaN / inside / at hi / above; bcgd:
  below / inside / NaN / above), which gives both the STE mask and dy/dalpha exactly;
- ``lsq``: one byte: inside the range the rounding residual round(u/alpha) - u/alpha (for ceil
  minus 1/2) quantized to a multiple of 1/252 (an error of at most 1/504 per element, the only
  approximation, see tools/bench_lean_backward.py), outside it the region (below, above, NaN);
  plus the 1-bit STE mask for relu and clipped_relu.

log_tailed_relu (its tail needs u above hi) and user-registered STEs keep the input and compute
everything from it exactly. The input gradient is bit-identical either way. The Triton kernels
(:mod:`.ops`, ``kernel="triton"``, or ``"auto"`` on CUDA) save the same state.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch

from ..errors import QatSteError
from ..ste import STE, builtin_name

ROUNDING_MODES = ("nearest", "ceil")
ALPHA_MODES = ("fixed", "lsq", "pact", "bcgd")
#: which implementation runs the quantizer: Triton on CUDA tensors (auto), always Triton, always torch
KERNELS = ("auto", "triton", "torch")
#: whether the triton package can be imported (found without importing it)
TRITON_FOUND = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: lsq's byte codes outside the range (residual codes are 0..252, the residual times 252 plus 126)
LSQ_BELOW, LSQ_ABOVE, LSQ_NAN = 253, 254, 255


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
    """dy/dalpha per element for ``mode`` from the input (``r = u/alpha``, ``t`` its rounded value)."""
    if mode == "lsq":
        # Esser et al. eq. 3: t - r where -Q_N < u/alpha < Q_P (Q_N = z, Q_P = L - z, tested on the
        # unrounded ratio), -Q_N below, Q_P above (clamp(t) is the bound outside; also for r = +-inf)
        inside = (r > -z) & (r < levels - z)
        return torch.where(inside, t - r, torch.clamp(t, -z, levels - z))
    if mode == "pact":
        return (u >= hi).to(u.dtype) * (levels - z)
    if mode == "bcgd":
        inside = (levels + 1) / 2 - z
        return torch.where(u <= lo, -z, torch.where(u <= hi, inside, levels - z))
    raise AssertionError(mode)


# ---- the lean state: bit packing and the per-mode codes ---------------------------------------------


def _pack(s: torch.Tensor, bits: int) -> torch.Tensor:
    """``s`` (uint8 values < 2**bits) packed ``8 // bits`` to a byte, first element in the low bits.

    Eight bytes are read as one int64 and folded with shifts (the bytes hold 0..3, so no bit
    crosses into the next group): one vectorised pass instead of eight strided ones."""
    flat = s.reshape(-1)  # a fresh tensor: storage offset 0, so the int64 view is aligned
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if sys.byteorder != "little":  # the folding below reads the first byte as the low one
        groups = flat.view(-1, 8 // bits)
        out = groups[:, 0].clone()
        for i in range(1, 8 // bits):
            out |= groups[:, i] << (i * bits)
        return out
    x = flat.view(torch.int64)
    if bits == 1:
        x = x | (x >> 7)
        x = x | (x >> 14)
        x = x | (x >> 28)
        return (x & 0xFF).to(torch.uint8)
    x = x | (x >> 6)  # 2 bits: four per byte, two bytes per int64
    x = x | (x >> 12)
    return torch.stack([x & 0xFF, (x >> 32) & 0xFF], dim=1).reshape(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """The uint8 values of :func:`_pack`, shaped ``shape``."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    values = ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    return values[:math.prod(shape)].reshape(shape)


def _region_code(mode: str, ste: str, uf: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(uint8 state, bits) saved for the STE mask and, for pact/bcgd, the step gradient's region."""
    u8 = torch.uint8
    if mode == "pact":  # 0 below or NaN, 1 inside, 2 at hi, 3 above
        return (uf > lo).view(u8) + (uf >= hi).view(u8) + (uf > hi).view(u8), 2
    if mode == "bcgd":  # 0 below, 1 inside (lo, hi], 2 NaN, 3 above
        return (uf > lo).view(u8) + 2 * ((uf > hi) | uf.isnan()).view(u8), 2
    if ste == "identity":
        return uf.new_empty(0, dtype=u8), 0
    mask = uf > lo if ste == "relu" else (uf > lo) & (uf <= hi)
    return mask.view(u8), 1


def _lsq_code(r: torch.Tensor, t: torch.Tensor, z: torch.Tensor, levels: int, ceil: bool) -> torch.Tensor:
    """lsq's byte per element: round(252 * residual) + 126 inside the range (0..252), else 253
    below, 254 above, 255 NaN (the Triton kernel's rule, operation for operation)."""
    below, above = r <= -z, r >= levels - z
    e = t - r
    if ceil:
        e.sub_(0.5)
    # inside the range round(252 e) + 126 is 0..252 exactly; NaN/Inf (outside) are zeroed first so
    # that the conversion to uint8 is defined, and replaced by their codes after it
    code = e.mul_(252.0).round_().add_(126.0).nan_to_num_(0.0, 0.0, 0.0).clamp_(0.0, 252.0).to(torch.uint8)
    u8 = torch.uint8  # the region codes (at most one of them per element) exceed every residual code
    outside = below.view(u8) * LSQ_BELOW + above.view(u8) * LSQ_ABOVE + r.isnan().view(u8) * LSQ_NAN
    return torch.maximum(code, outside)


def _lookup(table: torch.Tensor, state: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``table[channel, state]`` per element: ``table`` is (channels, K) float32, one row per value
    of ``z`` (a scalar, or a per-channel view that broadcasts against ``state``)."""
    index = state.to(torch.int32)
    if table.shape[0] > 1:
        rows = torch.arange(table.shape[0], dtype=torch.int32, device=z.device) * table.shape[1]
        index = index + rows.view(z.shape)
    return table.reshape(-1).index_select(0, index.reshape(-1)).view(state.shape)


def _ste_from_state(ste: str, mode: str, s: torch.Tensor | None) -> torch.Tensor:
    """mu'(u) (float32 0/1) from the saved state of relu / clipped_relu."""
    assert s is not None
    if mode == "pact":
        m = s >= 1 if ste == "relu" else (s == 1) | (s == 2)
    elif mode == "bcgd":
        m = (s == 1) | (s == 3) if ste == "relu" else s == 1
    else:
        m = s.bool()
    return m.to(torch.float32)


def _alpha_from_state(mode: str, s: torch.Tensor | None, code: torch.Tensor | None, z: torch.Tensor, levels: int,
                      ceil: bool) -> torch.Tensor:
    """dy/dalpha per element from the saved state, looked up in a table per channel: pact/bcgd's
    2-bit region codes (exact), lsq's byte codes (the residual to 1/504 inside the range)."""
    state = code if mode == "lsq" else s
    assert state is not None
    return _lookup(_alpha_table(mode, z, levels, ceil), state, z)


def _alpha_table(mode: str, z: torch.Tensor, levels: int, ceil: bool) -> torch.Tensor:
    """dy/dalpha for each value of the saved state, one row per channel (the Triton kernel's values)."""
    zc = z.detach().float().reshape(-1, 1)
    top = levels - zc
    if mode == "pact":  # codes 0 below or NaN, 1 inside, 2 at hi, 3 above
        zero = torch.zeros_like(zc)
        return torch.cat([zero, zero, top, top], dim=1)
    if mode == "bcgd":  # codes 0 below, 1 inside, 2 NaN, 3 above
        return torch.cat([-zc, (levels + 1.0) * 0.5 - zc, top, top], dim=1)
    resid = (torch.arange(253, dtype=torch.float32, device=z.device) - 126.0) * (1.0 / 252.0)
    if ceil:
        resid = resid + 0.5
    return torch.cat([resid.expand(zc.shape[0], 253), -zc, top, torch.full_like(zc, math.nan)], dim=1)


# ---- the torch path -----------------------------------------------------------------------------------


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, alpha, zero_point, levels, ste, alpha_mode, rounding, grad_scale):
        a = alpha.float()
        r = u.float() / a
        t = r.round() if rounding == "nearest" else r.ceil()
        # clamp(t + z, 0, L) - z == clamp(t, -z, L - z) for an integer z
        y = t.clamp(-zero_point, levels - zero_point).mul_(a)
        lean = builtin_name(ste) in ("identity", "relu", "clipped_relu")
        ctx.levels, ctx.ste, ctx.alpha_mode, ctx.rounding, ctx.grad_scale = (
            levels, ste, alpha_mode, rounding, grad_scale)
        ctx.lean, ctx.shape, ctx.dtype = lean, u.shape, u.dtype
        if not lean:
            ctx.save_for_backward(u, alpha, zero_point)
            return y.to(u.dtype)
        uf = u.float()
        s, bits = _region_code(alpha_mode, ste.name, uf, -zero_point * a, (levels - zero_point) * a)
        code = _lsq_code(r, t, zero_point, levels, rounding == "ceil") if alpha_mode == "lsq" else None
        ctx.bits = bits
        ctx.save_for_backward(_pack(s, bits) if bits else None, code, alpha, zero_point)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.lean:
            return _lean_backward(ctx, grad_y)
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
            grad_alpha = _finish_alpha_grad(ctx, (g * d).sum_to_size(alpha.shape), alpha)
        return grad_u, grad_alpha, None, None, None, None, None, None


def _finish_alpha_grad(ctx, grad_alpha: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The summed step gradient scaled (lsq) or scaled and clamped (bcgd), in alpha's dtype."""
    if ctx.alpha_mode == "lsq":
        grad_alpha = grad_alpha * ctx.grad_scale
    elif ctx.alpha_mode == "bcgd":
        grad_alpha = torch.clamp(0.01 * grad_alpha, -1.0, 1.0)
    return grad_alpha.to(alpha.dtype)


def _lean_backward(ctx, grad_y: torch.Tensor) -> tuple:
    packed, code, alpha, z = ctx.saved_tensors
    ste, mode = ctx.ste.name, ctx.alpha_mode
    s = _unpack(packed, ctx.bits, ctx.shape) if ctx.bits else None
    g = grad_y.float()
    grad_u = None
    if ctx.needs_input_grad[0]:
        grad_u = g.to(ctx.dtype) if ste == "identity" else (g * _ste_from_state(ste, mode, s)).to(ctx.dtype)
    grad_alpha = None
    if ctx.needs_input_grad[1] and mode != "fixed":
        d = _alpha_from_state(mode, s, code, z, ctx.levels, ctx.rounding == "ceil")
        grad_alpha = _finish_alpha_grad(ctx, (g * d).sum_to_size(alpha.shape), alpha)
    return grad_u, grad_alpha, None, None, None, None, None, None


# ---- dispatch -----------------------------------------------------------------------------------------


def check_kernel(kernel: object) -> str:
    """Validate a ``kernel`` option (``auto``, ``triton`` or ``torch``)."""
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise QatSteError(f"unknown kernel {kernel!r}; choose one of: {', '.join(KERNELS)}",
                          "pass kernel='auto' (Triton on CUDA tensors, torch elsewhere), 'triton' or 'torch'")
    return kernel


def interpreter_on() -> bool:
    """Whether Triton's interpreter is requested (TRITON_INTERPRET=1): its kernels then run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def implementation(kernel: str, ste: STE, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Which implementation runs: ``"triton"``, ``"torch"`` or ``"torch (user STE)"`` (a user STE
    always runs in torch). ``kernel="triton"`` where Triton cannot run raises QatSteError."""
    if kernel == "torch":
        return "torch"
    if builtin_name(ste) is None:
        return "torch (user STE)"
    usable = device.type == "cuda" or (kernel == "triton" and interpreter_on())
    if kernel == "auto":
        return "triton" if TRITON_FOUND and usable and dtype in TRITON_DTYPES else "torch"
    if not TRITON_FOUND:
        raise QatSteError("kernel='triton' needs the triton package, which is not importable here",
                          "install triton (CUDA builds of torch bring it), or use kernel='auto' or 'torch'")
    if not usable:
        raise QatSteError(f"kernel='triton' got a tensor on {device.type}: the Triton kernels run on CUDA "
                          "devices, or on CPU only under Triton's interpreter",
                          "use kernel='auto' or 'torch' here, or set TRITON_INTERPRET=1 in the environment "
                          "before the first quantized forward pass")
    if dtype not in TRITON_DTYPES:
        raise QatSteError(f"kernel='triton' got a {dtype} tensor; the Triton kernels take float32, bfloat16 "
                          "and float16", "use kernel='auto' or 'torch' for this dtype")
    return "triton"


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its storage span without gaps or overlaps (any order of the dimensions)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _channel_axis(u: torch.Tensor, alpha: torch.Tensor) -> int | None:
    """The axis along which a per-channel ``alpha`` varies (-1: one step), None if not one axis of u."""
    if alpha.numel() == 1:
        return -1
    axes = [d for d in range(alpha.dim()) if alpha.shape[d] != 1]
    if alpha.dim() != u.dim() or len(axes) != 1 or alpha.shape[axes[0]] != u.shape[axes[0]]:
        return None
    return axes[0]


def _forward_only(u, alpha, zero_point, levels, rounding):
    """The torch path's forward without autograd (nothing saved): the same operations, the same bits."""
    a = alpha.float()
    t = u.float() / a
    t = t.round_() if rounding == "nearest" else t.ceil_()
    return t.clamp_(-zero_point, levels - zero_point).mul_(a).to(u.dtype)


def _triton_fake_quantize(u, alpha, zero_point, levels, ste, alpha_mode, rounding, grad_scale):
    axis = _channel_axis(u, alpha)
    if axis is None or zero_point.numel() not in (1, alpha.numel()):
        return None
    from . import ops

    if not _is_dense(u):
        u = u.contiguous()
    a = alpha.reshape(-1)
    zp = zero_point.reshape(-1).expand(a.numel()).contiguous()
    save = torch.is_grad_enabled() and (u.requires_grad or alpha.requires_grad)
    y, _, _ = ops.fake_quant(u, a, zp, levels, ops.STE_IDS[ste.name], ops.MODE_IDS[alpha_mode],
                             rounding == "ceil", axis, float(grad_scale), save)
    return y


def fake_quantize(
    u: torch.Tensor,
    alpha: torch.Tensor,
    zero_point: torch.Tensor,
    levels: int,
    ste: STE,
    alpha_mode: str = "fixed",
    rounding: str = "nearest",
    grad_scale: float = 1.0,
    kernel: str = "auto",
) -> torch.Tensor:
    """Quantize ``u`` to ``(q - z) * alpha`` with an STE backward (see the module docstring).

    ``alpha`` and ``zero_point`` broadcast against ``u`` (scalars, or per-channel views along one
    axis). ``kernel``: ``auto`` (the fused Triton kernels on CUDA tensors, torch elsewhere),
    ``triton`` or ``torch``; both give the same forward and input gradient bit for bit.
    """
    if implementation(kernel, ste, u.device, u.dtype) == "triton":
        y = _triton_fake_quantize(u, alpha, zero_point, levels, ste, alpha_mode, rounding, grad_scale)
        if y is not None:
            return y
    if not (torch.is_grad_enabled() and (u.requires_grad or alpha.requires_grad)):
        return _forward_only(u, alpha, zero_point, levels, rounding)  # evaluation: no state to save
    return _FakeQuantize.apply(u, alpha, zero_point, levels, ste, alpha_mode, rounding, grad_scale)


def lsq_grad_scale(u: torch.Tensor, levels: int, channels: int = 1) -> float:
    """LSQ's gradient scale g = 1/sqrt(N * L), N = features per sample (per channel if per-channel)."""
    per_sample = u.numel() // max(u.shape[0], 1) if u.dim() > 1 else u.numel()
    n = max(per_sample // max(channels, 1), 1)
    return 1.0 / math.sqrt(n * levels)

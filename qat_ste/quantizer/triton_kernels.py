"""Fused Triton kernels of the fake quantizer: one forward pass, one backward pass.

Imported lazily (by :mod:`qat_ste.quantizer.ops`) the first time the Triton path runs: with
``TRITON_INTERPRET=1`` set before that import, ``triton.jit`` builds interpreted kernels that run on
CPU tensors (the tests use this); without it they compile for the GPU.

Forward (``fq_forward_kernel``): one program per ``BLOCK`` consecutive storage offsets of a dense
input (any memory format). ``r = u / alpha`` is an IEEE division (``tl.math.div_rn``, correctly
rounded, where Triton's ``/`` on fp32 is an approximate division on the GPU), rounded half to even
(libdevice ``rint`` on the GPU, an exact add-and-subtract of 1.5 * 2**23 in the interpreter) or up
(``ceil``), clamped to [-z, L - z] with NaN kept, times alpha, in the torch path's order, so the
output is bit-identical. What the backward pass needs is written next to it (see
:mod:`qat_ste.quantizer.functional` for the layout of the saved state):

- ``bits``: 1 bit per element (the STE mask) or 2 bits per element (the region code of pact/bcgd),
  packed little-end first into bytes by storage offset;
- ``code``: for lsq, one byte per element: the rounding residual quantized to 1/252 inside the
  range, or a region code outside it.

Backward (``fq_backward_kernel``): a 2-D tile over (positions within a channel, channels); it writes
the input gradient and one partial sum of the step gradient per (tile row block, channel), summed
afterwards by one small torch reduction (per tensor: one channel spanning everything).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

#: tl.sum's combine function, given to tl.reduce directly: tl.sum itself is a @triton.jit function of
#: triton's standard library, decorated (compiled, not interpreted) when triton was first imported,
#: which may be before TRITON_INTERPRET was set; the interpreter reduces with numpy for this combine
_SUM = tl.standard._sum_combine
#: the byte codes of the lsq state (residual codes are 0..252)
LSQ_BELOW, LSQ_ABOVE, LSQ_NAN = 253, 254, 255
#: the residual u/alpha - round(u/alpha) in [-1/2, 1/2] is stored as round(e * RESIDUAL_SCALE)
RESIDUAL_SCALE = 252.0


@triton.jit
def _round_half_even(r, LIBDEVICE: tl.constexpr):
    """rint(r), exactly (ties to even, the sign of zero kept, NaN/Inf passed through)."""
    if LIBDEVICE:
        t = libdevice.rint(r)
    else:
        a = tl.abs(r)
        ta = (a + 12582912.0) - 12582912.0  # 1.5 * 2**23: exact rounding of |r| < 2**22
        neg = r.to(tl.int32, bitcast=True) < 0
        t = tl.where(a < 4194304.0, tl.where(neg, -ta, ta), r)
    return t


@triton.jit
def _cast_out(x, ptr, NATIVE: tl.constexpr):
    """float32 ``x`` in the element type of ``ptr``, rounded to nearest even. The interpreter's own
    float32 -> bfloat16 conversion truncates, so there bfloat16 is rounded here on the bits."""
    if NATIVE or ptr.dtype.element_ty != tl.bfloat16:
        out = x.to(ptr.dtype.element_ty)
    else:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def _channel_params(alpha_ptr, zp_ptr, chan, PER_CHANNEL: tl.constexpr):
    """The step and zero point of each element (float32), per channel or per tensor."""
    if PER_CHANNEL:
        a = tl.load(alpha_ptr + chan).to(tl.float32)
        z = tl.load(zp_ptr + chan).to(tl.float32)
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
        z = tl.load(zp_ptr).to(tl.float32)
    return a, z


@triton.jit
def _region_bits(u, lo, hi, STE: tl.constexpr, MODE: tl.constexpr):
    """The packed-bit state of each element: the STE mask (1 bit) or the pact/bcgd region (2 bits)."""
    if MODE == 2:  # pact: 0 below or NaN, 1 strictly inside, 2 at hi, 3 above
        s = tl.where(u > hi, 3, tl.where(u == hi, 2, tl.where(u > lo, 1, 0)))
    elif MODE == 3:  # bcgd: 0 below, 1 inside (lo, hi], 2 NaN, 3 above
        s = tl.where(u > hi, 3, tl.where(u > lo, 1, tl.where(u <= lo, 0, 2)))
    elif STE == 1:  # relu
        s = tl.where(u > lo, 1, 0)
    else:  # clipped_relu
        s = tl.where((u > lo) & (u <= hi), 1, 0)
    return s.to(tl.uint8)


@triton.jit
def fq_forward_kernel(
    u_ptr, y_ptr, bits_ptr, code_ptr, alpha_ptr, zp_ptr, n, ch_stride, channels, levels,
    PER_CHANNEL: tl.constexpr, CEIL: tl.constexpr, STE: tl.constexpr, MODE: tl.constexpr,
    BITS: tl.constexpr, LSQ_CODE: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = clamp(round(u / alpha), -z, L - z) * alpha over one block, and the saved state."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    u = tl.load(u_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        a, z = _channel_params(alpha_ptr, zp_ptr, (offs // ch_stride) % channels, PER_CHANNEL)
    else:
        a, z = _channel_params(alpha_ptr, zp_ptr, offs, PER_CHANNEL)
    r = tl.math.div_rn(u, a)
    if CEIL:
        t = tl.math.ceil(r)
    else:
        t = _round_half_even(r, LIBDEVICE)
    top = levels - z
    c = tl.where(t < -z, -z, t)
    c = tl.where(c > top, top, c)
    c = tl.where(t != t, t, c)  # NaN stays NaN, as torch.clamp
    tl.store(y_ptr + offs, _cast_out(c * a, y_ptr, LIBDEVICE), mask=inb)
    if BITS > 0:
        per_byte: tl.constexpr = 8 // BITS
        s = _region_bits(u, -z * a, top * a, STE, MODE)
        s = tl.where(inb, s, 0)
        grid2 = tl.reshape(s, (BLOCK // per_byte, per_byte))
        shifts = (tl.arange(0, per_byte) * BITS).to(tl.uint8)
        packed = tl.reduce((grid2 << shifts[None, :]).to(tl.int32), 1, _SUM).to(tl.uint8)
        boffs = pid.to(tl.int64) * (BLOCK // per_byte) + tl.arange(0, BLOCK // per_byte)
        tl.store(bits_ptr + boffs, packed, mask=boffs < (n + per_byte - 1) // per_byte)
    if LSQ_CODE:
        e = t - r
        if CEIL:
            e = e - 0.5
        k = _round_half_even(e * 252.0, LIBDEVICE)
        k = tl.minimum(tl.maximum(k, -126.0), 126.0) + 126.0
        inside = (r > -z) & (r < top)
        code = tl.where(inside, k, tl.where(r <= -z, 253.0, tl.where(r >= top, 254.0, 255.0)))
        tl.store(code_ptr + offs, code.to(tl.uint8), mask=inb)


@triton.jit
def _ste_factor(u, s, lo, hi, STE: tl.constexpr, MODE: tl.constexpr, FROM_U: tl.constexpr):
    """mu'(u) from the input (log_tailed_relu) or from the saved state ``s``."""
    if STE == 0:
        m = tl.full(s.shape, 1.0, tl.float32)
    elif FROM_U:  # log_tailed_relu: 1 on (lo, hi], 1/(u - tau) above, tau = hi - 1
        x = u - (hi - 1.0)
        x = tl.where(x < 1.0, 1.0, x)
        tail = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), x)
        m = tl.where(u > hi, tail, tl.where((u > lo) & (u <= hi), 1.0, 0.0))
    elif MODE == 2:  # pact codes: relu 1, 2, 3; clipped_relu 1, 2
        if STE == 1:
            m = tl.where(s >= 1, 1.0, 0.0)
        else:
            m = tl.where((s == 1) | (s == 2), 1.0, 0.0)
    elif MODE == 3:  # bcgd codes: relu 1, 3; clipped_relu 1
        if STE == 1:
            m = tl.where((s == 1) | (s == 3), 1.0, 0.0)
        else:
            m = tl.where(s == 1, 1.0, 0.0)
    else:  # a 1-bit mask
        m = s.to(tl.float32)
    return m


@triton.jit
def _alpha_derivative(u, s, code, a, z, levels, lo, hi, MODE: tl.constexpr, CEIL: tl.constexpr,
                      FROM_U: tl.constexpr, LIBDEVICE: tl.constexpr):
    """dy/dalpha per element (see functional.py), from the input or from the saved state."""
    top = levels - z
    if FROM_U:
        if MODE == 1:
            r = tl.math.div_rn(u, a)
            if CEIL:
                t = tl.math.ceil(r)
            else:
                t = _round_half_even(r, LIBDEVICE)
            d = tl.where(r <= -z, -z, tl.where(r >= top, top, t - r))
            d = tl.where(r != r, r, d)
        elif MODE == 2:
            d = tl.where(u >= hi, top, 0.0)
        else:
            d = tl.where(u <= lo, -z, tl.where(u <= hi, (levels + 1.0) * 0.5 - z, top))
    elif MODE == 1:
        resid = (code.to(tl.float32) - 126.0) * (1.0 / 252.0)
        if CEIL:
            resid = resid + 0.5
        d = tl.where(code <= 252, resid, tl.where(code == 253, -z, tl.where(code == 254, top, float("nan"))))
    elif MODE == 2:
        d = tl.where(s >= 2, top, 0.0)
    else:
        d = tl.where(s == 0, -z, tl.where(s == 1, (levels + 1.0) * 0.5 - z, top))
    return d


@triton.jit
def fq_backward_kernel(
    g_ptr, u_ptr, bits_ptr, code_ptr, alpha_ptr, zp_ptr, lo_ptr, hi_ptr, gu_ptr, part_ptr, per_chan, ch_stride,
    channels, levels,
    PER_CHANNEL: tl.constexpr, CEIL: tl.constexpr, STE: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
    FROM_U: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_u = grad_y * mu'(u) and per-channel partial sums of grad_y * dy/dalpha over a tile."""
    pid_j = tl.program_id(0)
    pid_c = tl.program_id(1)
    j = pid_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if PER_CHANNEL:
        offs = (j // ch_stride)[:, None] * (channels * ch_stride) + ch[None, :] * ch_stride + (j % ch_stride)[:, None]
    else:  # one channel: the positions are the storage offsets
        offs = j[:, None] + ch[None, :]
    inb = (j < per_chan)[:, None] & (ch < channels)[None, :]
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # lo = -z * alpha and hi = (L - z) * alpha come rounded from the host: computed here, the GPU
    # compiler could fuse hi's product into an FMA with log_tailed_relu's hi - 1 (not torch's rounding)
    if PER_CHANNEL:
        cmask = ch < channels
        a = tl.load(alpha_ptr + ch, mask=cmask, other=1.0).to(tl.float32)[None, :]
        z = tl.load(zp_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
        lo = tl.load(lo_ptr + ch, mask=cmask, other=0.0)[None, :]
        hi = tl.load(hi_ptr + ch, mask=cmask, other=1.0)[None, :]
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
        z = tl.load(zp_ptr).to(tl.float32)
        lo = tl.load(lo_ptr)
        hi = tl.load(hi_ptr)
    u = g
    if FROM_U:
        u = tl.load(u_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    s = tl.full(offs.shape, 0, tl.uint8)
    if BITS > 0:
        per_byte: tl.constexpr = 8 // BITS
        byte = tl.load(bits_ptr + offs // per_byte, mask=inb, other=0)
        s = (byte >> ((offs % per_byte) * BITS).to(tl.uint8)) & ((1 << BITS) - 1)
    m = _ste_factor(u, s, lo, hi, STE, MODE, FROM_U)
    tl.store(gu_ptr + offs, _cast_out(g * m, gu_ptr, LIBDEVICE), mask=inb)
    if MODE > 0:
        code = s
        if MODE == 1 and not FROM_U:
            code = tl.load(code_ptr + offs, mask=inb, other=0)
        d = _alpha_derivative(u, s, code, a, z, levels, lo, hi, MODE, CEIL, FROM_U, LIBDEVICE)
        contrib = tl.where(inb, g * d, 0.0)
        part = tl.reduce(contrib, 0, _SUM)
        tl.store(part_ptr + pid_j.to(tl.int64) * channels + ch, part, mask=ch < channels)

"""The fused quantizer as ``torch.library`` operators: ``qat_ste::fake_quant`` (forward) and
``qat_ste::fake_quant_backward``, Triton kernels registered with ``triton_op`` / ``wrap_triton`` so
that ``torch.compile(fullgraph=True)`` keeps them in the graph (inductor inlines the kernels).

Imported only when the Triton path first runs (registration imports triton and parts of inductor);
the kernels themselves (:mod:`.triton_kernels`) are imported inside the operators, so
``TRITON_INTERPRET=1`` set before that first call gives interpreted kernels on CPU tensors.
"""

from typing import Any, Optional

import torch
from torch.library import triton_op, wrap_triton

#: the built-in STEs and the step modes by kernel id
STE_IDS = {"identity": 0, "relu": 1, "clipped_relu": 2, "log_tailed_relu": 3}
MODE_IDS = {"fixed": 0, "lsq": 1, "pact": 2, "bcgd": 3}
LOG_TAILED, LSQ = 3, 1
FORWARD_BLOCK = 1024


def state_layout(ste: int, mode: int) -> tuple[int, bool, bool]:
    """(bits per element packed, one lsq byte per element, keeps the input) for an STE and a mode."""
    if ste == LOG_TAILED:
        return 0, False, True
    bits = 2 if mode in (MODE_IDS["pact"], MODE_IDS["bcgd"]) else (0 if ste == 0 else 1)
    return bits, mode == LSQ, False


def _channels(u: torch.Tensor, axis: int) -> tuple[int, int]:
    """(channel stride, channels) of ``u`` in storage offsets; one channel spanning all when axis < 0."""
    if axis < 0:
        return max(u.numel(), 1), 1
    return max(u.stride(axis), 1), u.shape[axis]


def _interpreted(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _state_buffers(u: torch.Tensor, ste: int, mode: int, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
    bits, lsq_code, _ = state_layout(ste, mode) if save else (0, False, False)
    n = u.numel()
    nbytes = (n * bits + 7) // 8 if bits else 0
    packed = torch.empty(nbytes, dtype=torch.uint8, device=u.device)
    code = torch.empty(n if lsq_code else 0, dtype=torch.uint8, device=u.device)
    return packed, code


@triton_op("qat_ste::fake_quant", mutates_args=())
def fake_quant(
    u: torch.Tensor, alpha: torch.Tensor, zero_point: torch.Tensor, levels: int, ste: int, mode: int,
    ceil: bool, axis: int, grad_scale: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, packed region bits, lsq byte codes) of a dense ``u``; ``alpha``/``zero_point`` are 1-D
    (one value, or one per channel along ``axis``). Without ``save`` (no gradient wanted) the
    state is not written."""
    from . import triton_kernels as tk

    y = torch.empty_like(u)
    packed, code = _state_buffers(u, ste, mode, save)
    n = u.numel()
    if n == 0:
        return y, packed, code
    bits, lsq_code, _ = state_layout(ste, mode) if save else (0, False, False)
    ch_stride, channels = _channels(u, axis)
    grid = ((n + FORWARD_BLOCK - 1) // FORWARD_BLOCK,)
    wrap_triton(tk.fq_forward_kernel)[grid](
        u, y, packed, code, alpha, zero_point, n, ch_stride, channels, levels,
        PER_CHANNEL=alpha.numel() > 1, CEIL=ceil, STE=ste, MODE=mode, BITS=bits, LSQ_CODE=lsq_code,
        LIBDEVICE=not _interpreted(tk.fq_forward_kernel), BLOCK=FORWARD_BLOCK)
    return y, packed, code


@fake_quant.register_fake
def _fake_quant_fake(u, alpha, zero_point, levels, ste, mode, ceil, axis, grad_scale, save):
    packed, code = _state_buffers(u, ste, mode, save)
    return torch.empty_like(u), packed, code


def _tile(ch_stride: int, channels: int) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_C) of the backward tile: channels along the columns when they are adjacent."""
    if ch_stride == 1 and channels > 1:
        block_c = min(1 << (channels - 1).bit_length(), 64)
        return max(1024 // block_c, 16), block_c
    return 1024, 1


@triton_op("qat_ste::fake_quant_backward", mutates_args=())
def fake_quant_backward(
    grad_y: torch.Tensor,
    u: Optional[torch.Tensor],  # noqa: UP045 - infer_schema reads this annotation at run time
    packed: torch.Tensor, code: torch.Tensor, alpha: torch.Tensor,
    zero_point: torch.Tensor, levels: int, ste: int, mode: int, ceil: bool, axis: int, grad_scale: float,
    size: list[int], stride: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_u, grad_alpha): the STE input gradient, laid out like the forward input (``size``,
    ``stride``), and the step gradient (1-D like ``alpha``; zeros for the fixed mode)."""
    from . import triton_kernels as tk

    g = grad_y
    if tuple(g.stride()) != tuple(stride) and g.numel() > 1:
        g = torch.empty_strided(size, stride, dtype=grad_y.dtype, device=grad_y.device).copy_(grad_y)
    grad_u = torch.empty_strided(size, stride, dtype=grad_y.dtype, device=grad_y.device)
    n = grad_u.numel()
    bits, _, from_u = state_layout(ste, mode)
    ch_stride, channels = _channels(grad_u, axis)
    block_j, block_c = _tile(ch_stride, channels)
    per_chan = n // max(channels, 1)
    rows = max((per_chan + block_j - 1) // block_j, 1)
    partial = torch.zeros((rows, channels), dtype=torch.float32, device=grad_y.device)
    a, z = alpha.float(), zero_point.float()
    lo, hi = -z * a, (levels - z) * a  # as the torch path rounds them
    if n > 0:
        grid = (rows, (channels + block_c - 1) // block_c)
        wrap_triton(tk.fq_backward_kernel)[grid](
            g, u if from_u else g, packed, code, alpha, zero_point, lo, hi, grad_u, partial, per_chan, ch_stride,
            channels, levels, PER_CHANNEL=alpha.numel() > 1, CEIL=ceil, STE=ste, MODE=mode, BITS=bits,
            FROM_U=from_u, LIBDEVICE=not _interpreted(tk.fq_backward_kernel), BLOCK_J=block_j, BLOCK_C=block_c)
    grad_alpha = partial.sum(0)
    if mode == LSQ:
        grad_alpha = grad_alpha * grad_scale
    elif mode == MODE_IDS["bcgd"]:
        grad_alpha = torch.clamp(grad_alpha * 0.01, -1.0, 1.0)
    return grad_u, grad_alpha.to(alpha.dtype).reshape(alpha.shape)


@fake_quant_backward.register_fake
def _fake_quant_backward_fake(grad_y, u, packed, code, alpha, zero_point, levels, ste, mode, ceil, axis,
                              grad_scale, size, stride):
    return (torch.empty_strided(size, stride, dtype=grad_y.dtype, device=grad_y.device),
            torch.empty_like(alpha))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    u, alpha, zero_point, levels, ste, mode, ceil, axis, grad_scale, save = inputs
    if not save:
        raise RuntimeError("qat_ste::fake_quant was called with save=False on inputs that need gradients")
    _, packed, code = output
    ctx.save_for_backward(u if ste == LOG_TAILED else None, packed, code, alpha, zero_point)
    ctx.args = (levels, ste, mode, ceil, axis, grad_scale)
    ctx.layout = (list(u.shape), list(u.stride()))


def _backward(ctx: Any, grad_y: torch.Tensor, _packed: Any, _code: Any) -> tuple:
    u, packed, code, alpha, zero_point = ctx.saved_tensors
    levels, ste, mode, ceil, axis, grad_scale = ctx.args
    grad_u, grad_alpha = fake_quant_backward(grad_y, u, packed, code, alpha, zero_point, levels, ste, mode,
                                             ceil, axis, grad_scale, *ctx.layout)
    return grad_u, (grad_alpha if mode != 0 else None), None, None, None, None, None, None, None, None


fake_quant.register_autograd(_backward, setup_context=_setup_context)

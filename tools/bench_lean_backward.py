"""What the lean backward of the quantizer saves, and what its one approximation costs.

    python -m tools.bench_lean_backward [--numel 524288] [--seeds 10] [--device cpu|cuda]

1. Bytes saved for backward per element, per STE and step mode, measured with
   ``torch.autograd.graph.saved_tensors_hooks`` (the input itself used to be saved: 2 bytes for
   bf16, 4 for fp32).
2. The lsq step gradient from the saved state (the rounding residual stored to a multiple of 1/252)
   against the exact one (an STE registered here with clipped_relu's derivative under another name:
   user STEs keep the input, so their step gradient is exact), on realistic inputs: BatchNorm-like
   N(0, 1) pre-activations of a ReLU site and GELU outputs (zero point > 0), steps from lsq's
   initialisation and from the 99.99th percentile, per tensor and per channel, upstream gradients
   Gaussian, sparse Laplace, or "recon": y - u, the gradient of the quantization error itself (a
   gradient correlated with the residual, as when the step is being fitted). Printed: the median
   and the largest relative error over the seeds, next to the seed-to-seed spread of the exact
   gradient itself (the noise SGD sees anyway), and the largest absolute error relative to that
   noise (a relative error is large only where the exact gradient is near zero).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

import qat_ste
from qat_ste.quantizer.functional import fake_quantize, lsq_grad_scale

STES = ("identity", "relu", "clipped_relu", "log_tailed_relu")
MODES = ("fixed", "lsq", "pact", "bcgd")
EXACT = "clipped_relu_exact_bench"


def saved_bytes_per_element(ste: str, mode: str, dtype: torch.dtype, numel: int, device: str, kernel: str) -> float:
    """Bytes saved for backward per element (the step and zero point, 8 bytes, left out)."""
    u = torch.randn(numel, device=device).to(dtype).requires_grad_(True)
    alpha = torch.tensor(0.25, device=device, requires_grad=mode != "fixed")
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fake_quantize(u, alpha, torch.tensor(0.0, device=device), 15, qat_ste.get_ste(ste), mode, kernel=kernel)
    y.sum().backward()
    return (total - 8) / numel


def _alpha_grad(u: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor, g: torch.Tensor, ste: str, bits: int,
                channels: int) -> torch.Tensor:
    a = alpha.clone().requires_grad_(True)
    shape = [1] * u.dim()
    if channels > 1:
        shape[1] = channels
    levels = 2 ** bits - 1
    scale = lsq_grad_scale(u, levels, channels)
    y = fake_quantize(u, a.view(shape), z.view(shape) if z.numel() > 1 else z, levels, qat_ste.get_ste(ste),
                      "lsq", "nearest", scale, kernel="torch")
    y.backward(g)
    assert a.grad is not None
    return a.grad.double()


def _quantized(u: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    shape = [1] * u.dim()
    if channels > 1:
        shape[1] = channels
    z = z.view(shape) if z.numel() > 1 else z
    with torch.no_grad():
        return fake_quantize(u, alpha.view(shape), z, 2 ** bits - 1, qat_ste.get_ste("identity"), kernel="torch")


def _case_inputs(case: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    return x if case == "relu" else F.gelu(x)


def _steps(u: torch.Tensor, case: str, init: str, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, zero points) for the site: lsq's initialisation or the 99.99th-percentile range."""
    levels = 2 ** bits - 1
    flat = u.transpose(0, 1).reshape(u.shape[1], -1) if per_channel else u.reshape(1, -1)
    lo = torch.zeros(flat.shape[0]) if case == "relu" else flat.min(dim=1).values.clamp(max=0)
    if init == "lsq":
        step = 2 * flat.abs().mean(dim=1) / math.sqrt(levels)
    else:
        hi = torch.quantile(flat[:, :: max(flat.shape[1] // 100_000, 1)], 0.9999, dim=1)
        step = (hi - lo) / levels
    zp = torch.round(-lo / step).clamp(0, levels)
    return step, zp


def lsq_error_table(numel: int, seeds: int) -> list[str]:
    """Rows: case, init, bits, per-channel, upstream gradient: median / max relative error, spread."""
    rows = []
    channels = 64
    shape = (numel // (channels * 64), channels, 8, 8)
    for case in ("relu", "gelu"):
        for init in ("lsq", "p99.99"):
            for bits in (2, 4, 8):
                for per_channel in (False, True):
                    for grad in ("gauss", "laplace", "recon"):
                        errors, abs_errors, exact_norms = [], [], []
                        for seed in range(seeds):
                            gen = torch.Generator().manual_seed(seed)
                            u = _case_inputs(case, shape, gen)
                            g = torch.randn(shape, generator=gen)
                            if grad == "laplace":
                                g = torch.distributions.Laplace(0.0, 1.0).sample(shape) * (g.abs() > 1)
                            alpha, zp = _steps(u, case, init, bits, per_channel)
                            c = channels if per_channel else 1
                            if grad == "recon":  # d/dy of 1/2 ||y - u||^2: a gradient that fits the step
                                g = _quantized(u, alpha, zp, bits, c) - u
                            exact = _alpha_grad(u, alpha, zp, g, EXACT, bits, c)
                            lean = _alpha_grad(u, alpha, zp, g, "clipped_relu", bits, c)
                            errors.append(((lean - exact).norm() / exact.norm()).item())
                            abs_errors.append((lean - exact).norm().item())
                            exact_norms.append(exact.flatten())
                        stack = torch.stack(exact_norms)
                        noise = stack.std(dim=0).norm().item()
                        spread = noise / stack.mean(dim=0).norm().item()
                        rows.append(f"{case:5} {init:7} {bits:4} {'per-ch' if per_channel else 'tensor':7} {grad:8} "
                                    f"{statistics.median(errors):10.2e} {max(errors):10.2e} {spread:10.2e} "
                                    f"{max(abs_errors) / noise:10.2e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=524288, help="elements per tensor")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="where the bytes are measured (cuda: the Triton path)")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    qat_ste.register_ste(EXACT, lambda u, lo, hi: ((u > lo) & (u <= hi)).to(u.dtype), overwrite=True)
    kernel = "triton" if args.device == "cuda" else "torch"
    print(f"bytes saved for backward per element ({kernel} path; before: the input, 2 B bf16 / 4 B fp32)")
    print(f"{'ste':16} {'mode':6} {'bf16':>6} {'fp32':>6}")
    for ste in STES:
        for mode in MODES:
            b16 = saved_bytes_per_element(ste, mode, torch.bfloat16, 4096, args.device, kernel)
            b32 = saved_bytes_per_element(ste, mode, torch.float32, 4096, args.device, kernel)
            print(f"{ste:16} {mode:6} {b16:6.3f} {b32:6.3f}")
    print()
    print("lsq step gradient from the lean state vs exact: relative error ||lean - exact|| / ||exact||,")
    print(f"over {args.seeds} seeds; 'spread': seed-to-seed std / mean of the exact gradient itself;")
    print("'err/noise': the largest ||lean - exact|| over the seeds / the seed-to-seed std of the exact gradient")
    print(f"{'case':5} {'init':7} {'bits':4} {'step':7} {'grad':8} {'median':>10} {'max':>10} {'spread':>10} "
          f"{'err/noise':>10}")
    for row in lsq_error_table(args.numel, args.seeds):
        print(row)
    qat_ste.unregister_ste(EXACT)


if __name__ == "__main__":
    main()

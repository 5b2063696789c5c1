"""Register your own straight-through estimator and train a quantized model with it.

    python examples/custom_ste.py
    python examples/custom_ste.py --bits 3 --sharpness 4

An STE is the derivative mu'(u) that replaces the zero derivative of the quantized activation's
staircase in the backward pass; ``lo`` and ``hi`` are the ends of the quantizer's range
(``lo = 0``, ``hi = L * alpha`` for the ReLU family, ``L = 2^bits - 1``). qat_ste checks at
registration that mu' is finite and >= 0 (a monotone proxy). Here: a smooth version of the
clipped-ReLU STE, ``sigmoid(s (u - lo)) * sigmoid(s (hi - u))``.

The script quantizes a small MLP with it, takes one training step on random data, and prints the
gradient that reaches a quantized activation's input next to the clipped-ReLU STE's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import qat_ste


def register_soft_clipped(sharpness: float) -> str:
    """Register the smooth clipped-ReLU STE (replacing an earlier registration); returns its name."""

    def soft_clipped(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """sigmoid(s (u - lo)) * sigmoid(s (hi - u)): about 1 inside [lo, hi], fading outside."""
        return torch.sigmoid(sharpness * (u - lo)) * torch.sigmoid(sharpness * (hi - u))

    qat_ste.register_ste("soft_clipped", soft_clipped, overwrite=True)
    return "soft_clipped"


def small_mlp() -> nn.Module:
    """8 inputs -> 16 ReLU units -> 3 classes."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def one_training_step(qmodel: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, float]:
    """One SGD step; returns the loss before and after it."""
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr)
    loss = F.cross_entropy(qmodel(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    qat_ste.project_alphas(qmodel)
    with torch.no_grad():
        after = F.cross_entropy(qmodel(x), y).item()
    return loss.item(), after


def input_gradient(site: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """d(sum of the site's outputs)/du: the STE's mu'(u), since the staircase itself has no slope."""
    u = u.clone().requires_grad_(True)
    site(u).sum().backward()
    assert u.grad is not None
    return u.grad


def main(argv: list[str] | None = None) -> int:
    """Register, quantize, train one step, show the gradient."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--sharpness", type=float, default=8.0, help="s in the STE's formula")
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    name = register_soft_clipped(args.sharpness)
    print(f"registered STEs: {', '.join(qat_ste.list_stes())}")

    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    qmodel = qat_ste.quantize(small_mlp(), bits=args.bits, ste=name)
    qat_ste.calibrate(qmodel, [x])
    before, after = one_training_step(qmodel, x, y, args.lr)
    print(f"one training step with the {name} STE: loss {before:.4f} -> {after:.4f}")

    (site_name, site), = qat_ste.quant_modules(qmodel)
    reference = qat_ste.quantize(nn.Sequential(nn.ReLU()), bits=args.bits, ste="clipped_relu")
    (_, clipped), = qat_ste.quant_modules(reference)
    clipped.load_state_dict(site.state_dict())  # the same step alpha, only the STE differs
    alpha = float(site.alpha.detach())
    hi = (2**args.bits - 1) * alpha
    print(f"site {site_name}: {args.bits} bits, step alpha {alpha:.4f}, range [0, {hi:.4f}]")
    u = torch.linspace(-0.5, hi + 0.5, 9)
    ours, theirs = input_gradient(site, u), input_gradient(clipped, u)
    print(f"{'u':>8}  {'quantized':>9}  {'grad ' + name:>18}  {'grad clipped_relu':>17}")
    with torch.no_grad():
        for ui, qi, gi, ci in zip(u.tolist(), site(u).tolist(), ours.tolist(), theirs.tolist(), strict=True):
            print(f"{ui:8.4f}  {qi + 0.0:9.4f}  {gi:18.4f}  {ci:17.4f}")  # + 0.0: no "-0.0"
    qat_ste.unregister_ste(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

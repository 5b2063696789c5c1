"""Figures for the two-linear-layer theory model of [P1] (tools.theory).

Writes three PNGs (each written to a temp file in the output folder, then renamed into place):

- ``theory_algorithm1_loss.png``: population loss f and angle theta along Algorithm 1 (expected
  gradients) for the identity, relu and clipped_relu STEs, all from the same start.
- ``theory_correlation.png``: <E g_mu, df/dw> and cos(E g_mu, df/dw) against theta in (0, pi)
  (w rotated in the plane of w* and a second axis, ||w|| fixed, v fixed).
- ``theory_one_step_loss.png``: the analogue of [P1] Fig. 1: the empirical loss on N samples after
  one coarse-gradient step ``w <- w - eta g_N`` (g_N = the mean coarse gradient over the same N
  samples, v held fixed) against the step size eta, for N = 10, 50 and 1000; dashed lines show
  the population loss f along the same step.

Usage: ``python -m tools.theory_figures --out docs/figures``
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qat_ste.atomic import save_figure  # noqa: E402
from tools import theory  # noqa: E402

STES = theory.CLOSED_FORM_STES
COLORS = {"identity": "tab:red", "relu": "tab:blue", "clipped_relu": "tab:green"}

# The model of the reference's check values; the Algorithm 1 start satisfies the convergence
# conditions of section 4: v0^T v* > 0, theta0 < pi/2, (1^T v*)(1^T v0) <= (1^T v*)^2.
V_STAR = np.array([0.8, -0.3, 0.5])
W_STAR = np.array([1.0, 0.0, 0.0])
V_CHECK = np.array([1.0, 0.5, -0.2])
W_CHECK = np.array([1.0, 1.0, 0.0])
V_START = np.array([1.0, 0.2, -0.4])
W_START = np.array([1.0, 1.5, 0.5])


def figure_algorithm1(out: Path, lr: float, iters: int) -> list[tuple[str, float, float, float]]:
    """(a) f and theta along Algorithm 1 for the three STEs; returns (ste, f0, f_end, theta_end)."""
    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    rows = []
    for ste in tqdm(STES, desc="(a) Algorithm 1"):
        hist = theory.run_algorithm1(ste, V_START, W_START, V_STAR, W_STAR, lr=lr, iters=iters)
        steps = np.arange(iters + 1)
        ax_f.semilogy(steps, np.maximum(hist.loss, 1e-16), color=COLORS[ste], label=ste)
        ax_t.plot(steps, hist.theta, color=COLORS[ste], label=ste)
        rows.append((ste, hist.loss[0], hist.loss[-1], hist.theta[-1]))
    ax_f.set(xlabel="iteration", ylabel="population loss f(v, w)  (log scale)",
             title=f"Algorithm 1, expected gradients, lr = {lr}")
    ax_t.set(xlabel="iteration", ylabel="angle theta(w, w*)  [rad]", title="angle to the teacher")
    for ax in (ax_f, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(title="STE")
    fig.suptitle("m = n = 3, v* = (0.8, -0.3, 0.5), w* = e1, start v0 = (1, 0.2, -0.4), w0 = (1, 1.5, 0.5)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "theory_algorithm1_loss.png")
    return rows


def figure_correlation(out: Path, w_norm: float) -> list[tuple[str, float, float]]:
    """(b) <E g, df/dw> and cos(E g, df/dw) against theta; returns (ste, min inner, min cos)."""
    thetas = np.linspace(0.01, math.pi - 0.01, 300)
    e2 = np.array([0.0, 1.0, 0.0])
    fig, (ax_i, ax_c) = plt.subplots(1, 2, figsize=(10, 4))
    rows = []
    for ste in tqdm(STES, desc="(b) correlation"):
        inner, cosine = [], []
        for t in thetas:
            w = w_norm * (math.cos(t) * W_STAR + math.sin(t) * e2)
            g = theory.expected_coarse_gradient(ste, V_CHECK, w, V_STAR, W_STAR)
            d = theory.loss_grad_w(V_CHECK, w, V_STAR, W_STAR)
            inner.append(float(g @ d))
            cosine.append(float(g @ d) / (np.linalg.norm(g) * np.linalg.norm(d)))
        ax_i.plot(thetas, inner, color=COLORS[ste], label=ste)
        ax_c.plot(thetas, cosine, color=COLORS[ste], label=ste)
        rows.append((ste, min(inner), min(cosine)))
    ax_i.set(xlabel="theta  [rad]", ylabel="<E g_mu, df/dw>", title="inner product with the true gradient")
    ax_c.set(xlabel="theta  [rad]", ylabel="cos(E g_mu, df/dw)", title="cosine with the true gradient")
    for ax in (ax_i, ax_c):
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlim(0, math.pi)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
        ax.grid(alpha=0.3)
        ax.legend(title="STE", loc="upper right", fontsize=8, title_fontsize=8)
    fig.suptitle(f"v = (1, 0.5, -0.2), v* = (0.8, -0.3, 0.5), w = {w_norm:g} (cos theta e1 + sin theta e2), "
                 "w* = e1", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "theory_correlation.png")
    return rows


def figure_one_step(out: Path, seed: int, max_lr: float) -> list[tuple[int, str, float, float, float]]:
    """(c) empirical loss after one coarse step vs step size for N = 10, 50, 1000 samples.

    Returns (N, ste, empirical loss at eta=0, min over eta, eta of the min).
    """
    sizes = (10, 50, 1000)
    etas = np.linspace(0.0, max_lr, 201)
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, len(sizes), figsize=(13, 4), sharey=True)
    rows = []
    for ax, size in zip(axes, tqdm(sizes, desc="(c) one step"), strict=True):
        z = rng.standard_normal((size, V_CHECK.size, W_CHECK.size))
        for ste in STES:
            _, g = theory.empirical_gradients(ste, V_CHECK, W_CHECK, V_STAR, W_STAR, z)
            emp, pop = [], []
            for eta in etas:
                w = W_CHECK - eta * g
                emp.append(theory.empirical_loss(V_CHECK, w, V_STAR, W_STAR, z))
                pop.append(theory.population_loss(V_CHECK, w, V_STAR, W_STAR))
            ax.plot(etas, emp, color=COLORS[ste], label=f"{ste} (empirical)")
            ax.plot(etas, pop, color=COLORS[ste], ls="--", lw=0.9, label=f"{ste} (population f)")
            best = int(np.argmin(emp))
            rows.append((size, ste, emp[0], emp[best], float(etas[best])))
        ax.set(xlabel="step size eta", title=f"N = {size} samples")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss at (v, w - eta g_N)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle("One coarse-gradient step on w from the check point v = (1, 0.5, -0.2), w = (1, 1, 0)"
                 " (g_N and the empirical loss use the same N samples)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "theory_one_step_loss.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"), help="output folder")
    parser.add_argument("--lr", type=float, default=0.5, help="Algorithm 1 step size for figure (a)")
    parser.add_argument("--iters", type=int, default=300, help="Algorithm 1 iterations for figure (a)")
    parser.add_argument("--w-norm", type=float, default=1.0, help="||w|| in figure (b)")
    parser.add_argument("--max-lr", type=float, default=8.0, help="largest step size in figure (c)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the samples of figure (c)")
    args = parser.parse_args(argv)

    rows_a = figure_algorithm1(args.out, args.lr, args.iters)
    rows_b = figure_correlation(args.out, args.w_norm)
    rows_c = figure_one_step(args.out, args.seed, args.max_lr)

    print(f"\n(a) Algorithm 1, expected gradients, lr={args.lr}, {args.iters} iterations")
    print(f"{'ste':<14}{'f start':>12}{'f end':>12}{'theta end':>12}")
    for ste, f0, f1, t1 in rows_a:
        print(f"{ste:<14}{f0:>12.6f}{f1:>12.3e}{t1:>12.3e}")
    print(f"\n(b) over theta in (0, pi), ||w|| = {args.w_norm}")
    print(f"{'ste':<14}{'min inner':>14}{'min cosine':>12}")
    for ste, inner, cos in rows_b:
        print(f"{ste:<14}{inner:>14.3e}{cos:>12.4f}")
    print("\n(c) empirical loss after one step w <- w - eta g_N")
    print(f"{'N':>6}  {'ste':<14}{'loss eta=0':>12}{'min loss':>12}{'at eta':>8}")
    for size, ste, l0, lmin, eta in rows_c:
        print(f"{size:>6}  {ste:<14}{l0:>12.5f}{lmin:>12.5f}{eta:>8.2f}")
    print(f"\nwrote 3 PNGs to {args.out}")


if __name__ == "__main__":
    main()

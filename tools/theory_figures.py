"""Figures for the two-linear-layer theory model of [P1] (tools.theory).

Writes five PNGs (each written to a temp file in the output folder, then renamed into place):

- ``theory_algorithm1_loss.png``: population loss f and angle theta along Algorithm 1 (expected
  gradients) for the identity, relu and clipped_relu STEs, all from the same start.
- ``theory_correlation.png``: <E g_mu, df/dw> and cos(E g_mu, df/dw) against theta in (0, pi)
  (w rotated in the plane of w* and a second axis, ||w|| fixed, v fixed).
- ``theory_near_critical_points.png``: Algorithm 1 started next to the spurious local minimizer and next
  to the saddle (both sides): relu and clipped_relu settle at the spurious minimizer (their expected
  coarse gradient vanishes there), identity leaves it and the saddle (its coarse gradient does not).
- ``theory_gradient_path.png``: the norm of each STE's expected coarse gradient, and of the true
  gradient, along a path through the global minimum, the saddle and the spurious minimizer.
- ``theory_one_step_loss.png``: the analogue of [P1] Fig. 1: the empirical loss on N samples after
  one coarse-gradient step ``w <- w - eta g_N`` (g_N = the mean coarse gradient over the same N
  samples, v held fixed) against the step size eta, for N = 10, 50 and 1000; dashed lines show
  the population loss f along the same step.

Usage: ``python -m tools.theory_figures --out docs/figures``
"""

from __future__ import annotations

import argparse
import math
import sys
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


E2 = np.array([0.0, 1.0, 0.0])
PERTURB_V = np.array([0.02, -0.02, 0.01])  # the fixed offset of v in the starts next to a critical point


def _near(point: theory.CriticalPoint, dtheta: float) -> tuple[np.ndarray, np.ndarray]:
    """A start next to ``point``: v offset by PERTURB_V, w (unit norm) at angle theta + ``dtheta`` in the
    plane of w* and e2."""
    theta = point.theta + dtheta
    return point.v + PERTURB_V, math.cos(theta) * W_STAR + math.sin(theta) * E2


def critical_points() -> tuple[theory.CriticalPoint, theory.CriticalPoint]:
    """The spurious local minimizer and the saddle of the figures' model (w in the plane of w* and e2)."""
    return (theory.spurious_local_minimizer(V_STAR, W_STAR), theory.saddle_point(V_STAR, W_STAR, E2))


def figure_near_critical_points(out: Path, lr: float, iters: int) -> list[tuple[str, str, float, float, float]]:
    """(d) Algorithm 1 (expected gradients) started next to the spurious minimizer (theta0 = pi - 0.1) and
    next to the saddle (theta0 = theta_s +- 0.05); returns (start, ste, f0, f_end, theta_end)."""
    spurious, saddle = critical_points()
    starts = [("spurious minimizer, theta0 = pi - 0.1", spurious, -0.1, "-"),
              ("saddle, theta0 = theta_s + 0.05", saddle, 0.05, "-"),
              ("saddle, theta0 = theta_s - 0.05", saddle, -0.05, "--")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    rows = []
    for index, (label, point, dtheta, style) in enumerate(starts):
        row = axes[0 if index == 0 else 1]
        v0, w0 = _near(point, dtheta)
        for ste in STES:
            hist = theory.run_algorithm1(ste, v0, w0, V_STAR, W_STAR, lr=lr, iters=iters)
            steps = np.arange(iters + 1)
            row[0].plot(steps, hist.loss, style, color=COLORS[ste], label=f"{ste}, {label.split(', ')[1]}")
            row[1].plot(steps, hist.theta, style, color=COLORS[ste], label=f"{ste}, {label.split(', ')[1]}")
            rows.append((label, ste, float(hist.loss[0]), float(hist.loss[-1]), float(hist.theta[-1])))
    for row, point, name in ((axes[0], spurious, "spurious minimizer"), (axes[1], saddle, "saddle")):
        row[0].axhline(point.loss, color="grey", lw=0.8, ls=":", label=f"f at the {name} = {point.loss:.4f}")
        row[1].axhline(point.theta, color="grey", lw=0.8, ls=":", label=f"theta of the {name} = {point.theta:.3f}")
        row[0].set(xlabel="iteration", ylabel="population loss f(v, w)", title=f"started next to the {name}")
        row[1].set(xlabel="iteration", ylabel="angle theta(w, w*)  [rad]", title=f"started next to the {name}")
        for ax in row:
            ax.set_ylim(bottom=-0.01 if ax is row[0] else -0.1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Algorithm 1 (expected coarse gradients, lr = {lr}, {iters} iterations) next to the critical "
                 "points of f: relu and clipped_relu stay at the spurious minimizer, identity leaves it\n"
                 "m = n = 3, v* = (0.8, -0.3, 0.5), w* = e1; start v = v_critical + (0.02, -0.02, 0.01), "
                 "||w0|| = 1 in the plane of w* and e2", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "theory_near_critical_points.png")
    return rows


def figure_gradient_path(out: Path) -> list[tuple[str, float, float, float]]:
    """(e) Norm of the expected coarse gradient E g_mu (and of the true df/dw) along the path
    theta in [0, pi], v = argmin_v f(v, theta), ||w|| = 1, through the global minimum (theta = 0), the
    saddle and the spurious minimizer (theta = pi); returns (ste, norm at the global min, at the saddle,
    at the spurious min)."""
    spurious, saddle = critical_points()
    thetas = np.linspace(1e-4, math.pi - 1e-4, 400)

    def point(theta: float) -> tuple[np.ndarray, np.ndarray]:
        return theory._stationary_v(V_STAR, theta), math.cos(theta) * W_STAR + math.sin(theta) * E2

    fig, (ax_g, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    for ste in STES:
        norms = [float(np.linalg.norm(theory.expected_coarse_gradient(ste, *point(t), V_STAR, W_STAR)))
                 for t in thetas]
        ax_g.plot(thetas, norms, color=COLORS[ste], label=f"||E g_mu||, {ste}")
        at = [float(np.linalg.norm(theory.expected_coarse_gradient(ste, *point(t), V_STAR, W_STAR)))
              for t in (1e-9, saddle.theta, math.pi - 1e-9)]
        rows.append((ste, *at))
    true = [float(np.linalg.norm(theory.loss_grad_w(*point(t), V_STAR, W_STAR))) for t in thetas]
    ax_g.plot(thetas, true, "k--", lw=1, label="||df/dw|| (true gradient)")
    ax_f.plot(thetas, [theory.population_loss(*point(t), V_STAR, W_STAR) for t in thetas], "k")
    for ax in (ax_g, ax_f):
        for x, name in ((0.0, "global min"), (saddle.theta, "saddle"), (math.pi, "spurious min")):
            ax.axvline(x, color="grey", lw=0.8, ls=":")
            ax.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, ha="center", va="bottom")
        ax.set_xlim(-0.05, math.pi + 0.05)
        ax.grid(alpha=0.3)
    ax_g.set(xlabel="theta(w, w*)  [rad]", ylabel="gradient norm")
    ax_g.legend(fontsize=7)
    ax_f.set(xlabel="theta(w, w*)  [rad]", ylabel="population loss f(v(theta), w)")
    fig.suptitle("Along theta in [0, pi] with v = argmin_v f (df/dv = 0), ||w|| = 1: the expected coarse gradient "
                 "of relu and clipped_relu\nvanishes at every critical point, identity's only at the global minimum. "
                 "(||df/dw|| does not vanish at theta = 0, pi: f is not differentiable in w there.)\n"
                 "m = n = 3, v* = (0.8, -0.3, 0.5), w* = e1, w = cos(theta) e1 + sin(theta) e2", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    save_figure(fig, out / "theory_gradient_path.png")
    return rows


def report_block(rows_d: list[tuple[str, str, float, float, float]], rows_e: list[tuple[str, float, float, float]],
                 lr: float, iters: int, command: str) -> str:
    """The RESULTS.md block of figures (d) and (e): the measured numbers and a verdict per claim."""
    spurious, saddle = critical_points()
    lines = ["## Theory figures: STEs next to the spurious minimizer and the saddle ([P1] two-linear-layer model)", "",
             "The model of [P1] section 3 with closed-form expected gradients (no sampling): m = n = 3, "
             f"v* = (0.8, -0.3, 0.5), w* = e1. Spurious local minimizer: theta = pi, f = {spurious.loss:.4f}; "
             f"saddle: theta_s = {saddle.theta:.4f}, f = {saddle.loss:.4f}; global minimum f = 0. "
             f"Algorithm 1 with lr {lr:g}, {iters} iterations, from v = v_critical + (0.02, -0.02, 0.01) and a unit "
             "w at the stated angle. Command: `" + command + "`.", "",
             "![Algorithm 1 next to the critical points](../docs/figures/theory_near_critical_points.png)", "",
             "| start | STE | f start | f end | theta end |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {ste} | {f0:.4f} | {f1:.3g} | {t1:.4f} |" for label, ste, f0, f1, t1 in rows_d]
    end = {(label.split(",")[0], ste, label.split("= ")[1]): (f1, t1) for label, ste, _, f1, t1 in rows_d}
    near = {s: end[("spurious minimizer", s, "pi - 0.1")] for s in STES}
    settled = all(abs(near[s][0] - spurious.loss) < 1e-3 and abs(near[s][1] - math.pi) < 1e-2
                  for s in ("relu", "clipped_relu"))
    left = abs(end[("spurious minimizer", "identity", "pi - 0.1")][1] - math.pi) > 0.5
    saddle_left = all(abs(t1 - saddle.theta) > 0.5 for label, _, _, _, t1 in rows_d if label.startswith("saddle"))
    norms = {ste: (g0, gs, gp) for ste, g0, gs, gp in rows_e}
    vanish = all(max(norms[s]) < 1e-6 for s in ("relu", "clipped_relu"))
    id_nonzero = min(norms["identity"][1:]) > 1e-2
    lines += ["", "Verdicts (from the numbers above):", "",
              "- relu and clipped_relu settle at the spurious minimizer: "
              f"**{'reproduced' if settled else 'not reproduced'}** (f ends at the minimizer's value, theta at pi).",
              f"- identity leaves the spurious minimizer: **{'reproduced' if left else 'not reproduced'}** (here it "
              f"ends at theta = {end[('spurious minimizer', 'identity', 'pi - 0.1')][1]:.3f}, f = "
              f"{end[('spurious minimizer', 'identity', 'pi - 0.1')][0]:.3g}, after oscillating between theta near 0 "
              "and near pi).",
              f"- next to the saddle every STE moves away: **{'yes' if saddle_left else 'no'}**. relu and clipped_relu "
              "descend to the minimum on their side (the spurious one from theta_s + 0.05, the global one from "
              "theta_s - 0.05), as any descent method leaves a saddle; identity goes to the global minimum from both "
              "sides. So 'settle' holds at the spurious minimizer, not at the saddle.",
              "", "![coarse-gradient norm along a path](../docs/figures/theory_gradient_path.png)", "",
              "| STE | norm of E g at the global min | at the saddle | at the spurious min |", "|---|---|---|---|"]
    lines += [f"| {ste} | {g0:.2e} | {gs:.2e} | {gp:.2e} |" for ste, g0, gs, gp in rows_e]
    lines += ["", f"- The expected coarse gradient of relu and clipped_relu vanishes at all three critical points: "
              f"**{'reproduced' if vanish else 'not reproduced'}**; identity's does not at the saddle and the spurious "
              f"minimizer ({norms['identity'][1]:.4f} and {norms['identity'][2]:.4f}; the reference's closed form "
              f"2(m-1)(1'v*)^2/(sqrt(2 pi)(m+1)^2) = {2 * 2 * 1.0 / (math.sqrt(2 * math.pi) * 16):.4f} at the latter): "
              f"**{'reproduced' if id_nonzero else 'not reproduced'}**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"), help="output folder")
    parser.add_argument("--lr", type=float, default=0.5, help="Algorithm 1 step size for figure (a)")
    parser.add_argument("--iters", type=int, default=300, help="Algorithm 1 iterations for figure (a)")
    parser.add_argument("--w-norm", type=float, default=1.0, help="||w|| in figure (b)")
    parser.add_argument("--max-lr", type=float, default=8.0, help="largest step size in figure (c)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the samples of figure (c)")
    parser.add_argument("--near-lr", type=float, default=0.1, help="Algorithm 1 step size for figure (d)")
    parser.add_argument("--near-iters", type=int, default=2000, help="Algorithm 1 iterations for figure (d)")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the verdicts of figures (d) and (e) into this RESULTS.md")
    args = parser.parse_args(argv)

    rows_a = figure_algorithm1(args.out, args.lr, args.iters)
    rows_b = figure_correlation(args.out, args.w_norm)
    rows_c = figure_one_step(args.out, args.seed, args.max_lr)
    rows_d = figure_near_critical_points(args.out, args.near_lr, args.near_iters)
    rows_e = figure_gradient_path(args.out)

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
    print(f"\n(d) Algorithm 1 next to the critical points, lr={args.near_lr}, {args.near_iters} iterations")
    print(f"{'start':<40}{'ste':<14}{'f start':>10}{'f end':>12}{'theta end':>11}")
    for label, ste, f0, f1, t1 in rows_d:
        print(f"{label:<40}{ste:<14}{f0:>10.4f}{f1:>12.3e}{t1:>11.4f}")
    print("\n(e) ||E g_mu|| at the critical points (theta = 0, theta_s, pi; v = argmin_v f)")
    print(f"{'ste':<14}{'global min':>12}{'saddle':>12}{'spurious':>12}")
    for ste, g0, gs, gp in rows_e:
        print(f"{ste:<14}{g0:>12.3e}{gs:>12.3e}{gp:>12.3e}")
    print(f"\nwrote 5 PNGs to {args.out}")
    if args.report is not None:
        from tools.reproduce_paper import put_block

        command = "python -m tools.theory_figures " + " ".join(sys.argv[1:] if argv is None else argv)
        put_block(args.report, "theory figures", report_block(rows_d, rows_e, args.near_lr, args.near_iters, command))
        print(f"wrote the theory block of {args.report}")


if __name__ == "__main__":
    main()

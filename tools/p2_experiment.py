"""[P2] experiment: coarse gradient descent on a two-linear-layer net with a multi-level quantized ReLU.

Question ([P2], Long, Yin & Xin 2021): does coarse gradient descent, with the quantizer's zero
derivative replaced by an STE, train a quantized-activation network to 100 % training accuracy on
data that such a network can classify perfectly? We run it for every registered STE.

Design (every choice below is a parameter of :func:`run_p2`):

- Network: ``x in R^d -> W (hidden, no bias) -> sigma_alpha -> V (classes, no bias) -> logits``.
  ``sigma_alpha(x) = alpha * clamp(round(x / alpha), 0, L)``, ``L = 2^bits - 1`` (nearest rounding,
  half to even, reference section 1), with the step ``alpha`` fixed (never trained). Default alpha
  is the MSE-optimal step for half-Gaussian inputs with nearest rounding (reference section 3:
  1-bit 1.2236, 2-bit 0.6509, 3-bit 0.3532, 4-bit 0.1932).
- Data: ``x ~ N(0, I_d)``; labels from a teacher network of the same architecture: teacher rows
  ``W*_j`` have unit norm (so teacher pre-activations are N(0, 1), the inputs alpha is fitted to),
  ``V*`` is Gaussian with each class row centred (so no class wins on the mean activation alone and
  the classes are roughly balanced); label = argmax of the teacher's logits. Samples whose teacher
  top-1 minus top-2 logit gap is below ``margin`` are dropped (``margin=0`` keeps all), so the
  classes are separated by a margin; the data are realizable: the teacher classifies them perfectly.
- Student: same architecture, hidden width ``student_hidden`` (default wider than the teacher's, an
  over-parameterized student); ``W`` rows random unit vectors, ``V ~ 0.1 N(0, 1)``.
- Training: full-batch coarse gradient descent on the softmax cross-entropy, ``lr`` fixed,
  ``momentum`` 0 by default (plain gradient descent, as in the coarse gradient method). The
  backward pass of ``sigma_alpha`` is ``grad_out * mu'(x)``, mu' = the registry's derivative with
  ``lo = 0``, ``hi = L * alpha``; everything else is exact backprop.
- Measured: training accuracy (of the quantized network, i.e. the forward pass the STE does not
  touch) at every iteration, the first iteration at 100 %, the iteration from which it stays at
  100 %, the best and the final accuracy, and the majority-class rate (the accuracy of always
  guessing the most frequent class).

Measured with the defaults (2 bits, 2000 iterations, seeds 0-2; majority-class rate 0.30-0.42):
clipped_relu and log_tailed_relu reach 100 % on all three seeds (first at iterations 759-1249),
but flicker between 100 % and one misclassified sample until iterations 1780-1983; relu climbs to
96-99.95 % and then degrades (final 63-94 %, loss rising); identity plateaus at 68-85 %. With
lr 0.5 and 4000 iterations, clipped_relu reaches 100 % on 2 of 3 seeds (99.75 % on the third),
relu peaks at 97.4-99.65 % and identity at 85-89 %.

Usage: ``python -m tools.p2_experiment --out docs/figures`` (add ``--seeds 0 1 2`` etc.).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qat_ste import QatSteError, get_ste, list_stes
from qat_ste.atomic import save_figure
from qat_ste.ste import STE

#: MSE-optimal fixed steps for N(0,1) inputs with nearest rounding (reference section 3).
DEFAULT_ALPHA: dict[int, float] = {1: 1.2236, 2: 0.6509, 3: 0.3532, 4: 0.1932}


class QuantizedReLUWithSTE(torch.autograd.Function):
    """Forward: the b-bit quantized ReLU staircase; backward: grad_out * mu'(x) from an STE."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float, levels: int, ste: STE) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha, ctx.levels, ctx.ste = alpha, levels, ste
        return alpha * torch.clamp(torch.round(x / alpha), 0, levels)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        lo = torch.zeros((), dtype=x.dtype)
        hi = torch.tensor(ctx.levels * ctx.alpha, dtype=x.dtype)
        return grad_out * ctx.ste(x, lo, hi).to(x.dtype), None, None, None


def quantized_relu(x: torch.Tensor, alpha: float, levels: int, ste: STE) -> torch.Tensor:
    """sigma_alpha(x) with the coarse (STE) backward pass."""
    return QuantizedReLUWithSTE.apply(x, alpha, levels, ste)


def make_teacher_data(
    *,
    input_dim: int,
    teacher_hidden: int,
    classes: int,
    samples: int,
    alpha: float,
    levels: int,
    margin: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, labels) labelled by a random teacher of the same architecture, keeping margin >= ``margin``."""
    w_teacher = torch.randn(teacher_hidden, input_dim, generator=generator, dtype=torch.float64)
    w_teacher /= w_teacher.norm(dim=1, keepdim=True)
    v_teacher = torch.randn(classes, teacher_hidden, generator=generator, dtype=torch.float64)
    v_teacher -= v_teacher.mean(dim=1, keepdim=True)
    kept_x, kept_y, have, draws = [], [], 0, 0
    while have < samples:
        draws += 1
        if draws > 50:
            raise QatSteError(
                f"could not draw {samples} samples with teacher margin >= {margin} (too few pass)",
                "lower margin or the number of classes",
            )
        x = torch.randn(2 * samples, input_dim, generator=generator, dtype=torch.float64)
        hidden = alpha * torch.clamp(torch.round(x @ w_teacher.T / alpha), 0, levels)
        logits = hidden @ v_teacher.T
        top2 = logits.topk(2, dim=1).values
        keep = (top2[:, 0] - top2[:, 1]) >= margin
        kept_x.append(x[keep])
        kept_y.append(logits[keep].argmax(dim=1))
        have += int(keep.sum())
    return torch.cat(kept_x)[:samples], torch.cat(kept_y)[:samples]


def _positive(value: float, name: str) -> None:
    if not (value > 0):
        raise QatSteError(f"{name} must be positive, got {value!r}", f"pass a positive {name}")


def run_p2(
    ste: str | STE,
    bits: int = 2,
    iters: int = 2000,
    seed: int = 0,
    *,
    alpha: float | None = None,
    input_dim: int = 10,
    teacher_hidden: int = 20,
    student_hidden: int = 100,
    classes: int = 4,
    samples: int = 2000,
    margin: float = 0.5,
    lr: float = 2.0,
    momentum: float = 0.0,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Train the student with coarse gradient descent using ``ste``; return per-iteration accuracies.

    The data and the student's initialization depend only on ``seed`` (not on the STE), so runs
    with different STEs and the same seed start from the same point on the same data.
    Returned keys: ste, bits, alpha, seed, accuracy (iters + 1 values, entry k after k steps),
    loss (cross-entropy before each step, iters values), final_accuracy, max_accuracy,
    first_iter_100 (None if never), reached_100, stable_100_from (first k with 100 % at every
    iteration from k on; None if the final accuracy is below 100 %), majority_rate, config.
    ``num_threads`` sets torch's intra-op threads for the run (restored afterwards); the matrices
    are tiny, so 1 thread is fastest and avoids severe slowdowns on a busy machine; None = leave.
    """
    ste_obj = get_ste(ste)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise QatSteError(f"bits must be an integer >= 1, got {bits!r}", "pass e.g. bits=2")
    if alpha is None:
        if bits not in DEFAULT_ALPHA:
            raise QatSteError(
                f"no default step alpha for {bits}-bit activations",
                f"pass alpha explicitly, or use bits in {sorted(DEFAULT_ALPHA)}",
            )
        alpha = DEFAULT_ALPHA[bits]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise QatSteError(f"iters must be an integer >= 0, got {iters!r}", "pass e.g. iters=2000")
    for value, name in ((alpha, "alpha"), (lr, "lr"), (samples, "samples"), (input_dim, "input_dim"),
                        (teacher_hidden, "teacher_hidden"), (student_hidden, "student_hidden")):
        _positive(value, name)
    if classes < 2:
        raise QatSteError(f"classes must be >= 2, got {classes}", "pass classes=2 or more")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(ste_obj, bits, iters, seed, alpha, input_dim, teacher_hidden, student_hidden,
                      classes, samples, margin, lr, momentum)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    ste_obj: STE, bits: int, iters: int, seed: int, alpha: float, input_dim: int, teacher_hidden: int,
    student_hidden: int, classes: int, samples: int, margin: float, lr: float, momentum: float,
) -> dict[str, Any]:
    """The body of :func:`run_p2` (arguments already checked)."""
    levels = 2**bits - 1
    generator = torch.Generator().manual_seed(seed)
    x, labels = make_teacher_data(
        input_dim=input_dim, teacher_hidden=teacher_hidden, classes=classes, samples=samples,
        alpha=alpha, levels=levels, margin=margin, generator=generator,
    )
    w = torch.randn(student_hidden, input_dim, generator=generator, dtype=torch.float64)
    w /= w.norm(dim=1, keepdim=True)
    v = 0.1 * torch.randn(classes, student_hidden, generator=generator, dtype=torch.float64)
    w.requires_grad_(True)
    v.requires_grad_(True)
    optimizer = torch.optim.SGD([w, v], lr=lr, momentum=momentum)

    accuracy: list[float] = []
    losses: list[float] = []
    for _ in range(iters):
        logits = quantized_relu(x @ w.T, alpha, levels, ste_obj) @ v.T
        loss = torch.nn.functional.cross_entropy(logits, labels)
        accuracy.append(float((logits.argmax(dim=1) == labels).double().mean()))
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = quantized_relu(x @ w.T, alpha, levels, ste_obj) @ v.T
        accuracy.append(float((logits.argmax(dim=1) == labels).double().mean()))
    first_100 = next((k for k, a in enumerate(accuracy) if a == 1.0), None)
    stable_from = None  # the first k with accuracy 1.0 at every iteration from k on
    for k in range(len(accuracy) - 1, -1, -1):
        if accuracy[k] != 1.0:
            break
        stable_from = k
    counts = torch.bincount(labels, minlength=classes)
    return {
        "ste": ste_obj.name,
        "bits": bits,
        "alpha": alpha,
        "seed": seed,
        "accuracy": accuracy,
        "loss": losses,
        "final_accuracy": accuracy[-1],
        "max_accuracy": max(accuracy),
        "first_iter_100": first_100,
        "reached_100": first_100 is not None,
        "stable_100_from": stable_from,
        "majority_rate": float(counts.max()) / len(labels),
        "config": {
            "input_dim": input_dim, "teacher_hidden": teacher_hidden, "student_hidden": student_hidden,
            "classes": classes, "samples": samples, "margin": margin, "lr": lr, "momentum": momentum,
        },
    }


def plot_accuracy(results: list[dict[str, Any]], path: Path) -> None:
    """Training accuracy and training error (symlog) against iteration, one color per STE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["ste"] for r in results))
    colors = {n: plt.cm.tab10(k % 10) for k, n in enumerate(names)}
    seeds = sorted({r["seed"] for r in results})
    fig, (ax_acc, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        first = r["seed"] == seeds[0]
        style = {"color": colors[r["ste"]], "lw": 1.4 if first else 0.8, "alpha": 1.0 if first else 0.45}
        label = r["ste"] if first else None
        steps = range(len(r["accuracy"]))
        ax_acc.plot(steps, r["accuracy"], label=label, **style)
        ax_err.plot(steps, [1.0 - a for a in r["accuracy"]], label=label, **style)
    n_samples = results[0]["config"]["samples"]
    ax_acc.axhline(results[0]["majority_rate"], color="gray", ls=":", lw=1,
                   label=f"majority class (seed {seeds[0]})")
    ax_acc.set(xlabel="iteration", ylabel="training accuracy", ylim=(0, 1.02), title="training accuracy")
    ax_err.set_yscale("symlog", linthresh=1.0 / n_samples)
    ax_err.set(xlabel="iteration", ylabel="training error 1 - accuracy (symlog)",
               title=f"training error (0 = 100 %; one sample = {1.0 / n_samples:.0e})")
    ax_err.set_ylim(bottom=0)
    for ax in (ax_acc, ax_err):
        ax.grid(alpha=0.3)
        ax.legend(title="STE", fontsize=8, title_fontsize=8, loc="best")
    cfg, r0 = results[0]["config"], results[0]
    fig.suptitle(
        f"[P2] {r0['bits']}-bit quantized ReLU (alpha={r0['alpha']}), d={cfg['input_dim']}, teacher "
        f"hidden {cfg['teacher_hidden']}, student hidden {cfg['student_hidden']}, {cfg['classes']} classes, "
        f"N={cfg['samples']}, margin {cfg['margin']}, full-batch GD lr {cfg['lr']}, momentum {cfg['momentum']}; "
        f"seeds {seeds} "
        f"(seed {seeds[0]} bold)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"), help="folder for the PNG")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=None, help="fixed step (default: table by bits)")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stes", nargs="+", default=None, help="default: every registered STE")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--student-hidden", type=int, default=100)
    parser.add_argument("--teacher-hidden", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--print-every", type=int, default=200)
    args = parser.parse_args(argv)

    names = args.stes or list_stes()
    results = []
    for name, seed in tqdm([(n, s) for n in names for s in args.seeds], desc="P2 runs"):
        results.append(run_p2(
            name, args.bits, args.iters, seed, alpha=args.alpha, lr=args.lr, momentum=args.momentum,
            student_hidden=args.student_hidden, teacher_hidden=args.teacher_hidden,
            samples=args.samples, margin=args.margin,
        ))

    first_seed = args.seeds[0]
    by_name = {r["ste"]: r for r in results if r["seed"] == first_seed}
    print(f"\ntraining accuracy, seed {first_seed} (majority-class rate "
          f"{by_name[names[0]]['majority_rate']:.4f})")
    print(",".join(["iteration"] + names))
    for k in sorted(set(range(0, args.iters + 1, args.print_every)) | {args.iters}):
        print(",".join([str(k)] + [f"{by_name[n]['accuracy'][k]:.4f}" for n in names]))

    print("\nsummary (per STE and seed)")
    print("ste,seed,final_accuracy,max_accuracy,reached_100,first_iter_at_100,at_100_from,final_loss")
    for r in results:
        first = "" if r["first_iter_100"] is None else r["first_iter_100"]
        stable = "" if r["stable_100_from"] is None else r["stable_100_from"]
        final_loss = r["loss"][-1] if r["loss"] else float("nan")
        print(f"{r['ste']},{r['seed']},{r['final_accuracy']:.4f},{r['max_accuracy']:.4f},"
              f"{r['reached_100']},{first},{stable},{final_loss:.4g}")
    path = args.out / "p2_training_accuracy.png"
    plot_accuracy(results, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

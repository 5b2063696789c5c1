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
import sys
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


# =============================================================================================
# [P2] on MNIST: the two-linear-layer network with quantized activations, 10 classes
# =============================================================================================

MNIST_STES = ("identity", "relu", "clipped_relu", "log_tailed_relu")
P2_MNIST_FORMAT = "qat_ste.p2_mnist/1"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist_vectors(folder: Path, train_subset: int | None, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): MNIST images as 784-vectors, standardized with MNIST's pixel mean
    and std (so a unit-norm row of W gives pre-activations of about unit variance); the training set cut
    to a fixed subset of ``train_subset`` images chosen with ``seed`` (None: all 60000)."""
    from qat_ste.data import load_dataset

    train = load_dataset(f"mnist:{folder}", "train")
    test = load_dataset(f"mnist:{folder}", "val")

    def vectors(images: torch.Tensor) -> torch.Tensor:
        return ((images.reshape(len(images), -1).float() / 255.0) - MNIST_MEAN) / MNIST_STD

    x, y = vectors(train.images), train.labels.long()
    if train_subset is not None and train_subset < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:train_subset].sort().values
        x, y = x[keep], y[keep]
    return x, y, vectors(test.images), test.labels.long()


def run_p2_mnist(
    ste: str | STE,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    bits: int = 2,
    seed: int = 0,
    *,
    hidden: int = 256,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
) -> dict[str, Any]:
    """Coarse gradient (SGD) training of ``x -> W -> sigma_alpha -> V -> logits`` on MNIST vectors with
    the STE ``ste`` (alpha fixed: the half-Gaussian step). The initialization (W rows random unit
    vectors, V ~ 0.1 N(0, 1)) and the batch order depend only on ``seed``, so every STE of a seed starts
    from the same point and sees the same batches. Per epoch: the mean training loss over its batches,
    then the loss and accuracy of the quantized network on the whole training set and on the test set."""
    ste_obj = get_ste(ste)
    if bits not in DEFAULT_ALPHA:
        raise QatSteError(f"no default step for {bits}-bit activations", f"use bits in {sorted(DEFAULT_ALPHA)}")
    for value, name in ((hidden, "hidden"), (epochs, "epochs"), (batch_size, "batch_size"), (lr, "lr")):
        _positive(value, name)
    alpha, levels = DEFAULT_ALPHA[bits], 2 ** bits - 1
    x, y, x_test, y_test = data
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, x.shape[1], generator=generator)
    w /= w.norm(dim=1, keepdim=True)
    v = 0.1 * torch.randn(10, hidden, generator=generator)
    w.requires_grad_(True)
    v.requires_grad_(True)
    optimizer = torch.optim.SGD([w, v], lr=lr, momentum=momentum)

    def evaluate(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            logits = quantized_relu(inputs @ w.T, alpha, levels, ste_obj) @ v.T
            return (float(torch.nn.functional.cross_entropy(logits, labels)),
                    float((logits.argmax(1) == labels).float().mean()))

    history = []
    loss0, acc0 = evaluate(x, y)
    history.append({"epoch": 0, "batch_loss": None, "train_loss": loss0, "train_accuracy": acc0,
                    "test_accuracy": evaluate(x_test, y_test)[1]})
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(quantized_relu(x[batch] @ w.T, alpha, levels, ste_obj) @ v.T,
                                                     y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        train_loss, train_acc = evaluate(x, y)
        history.append({"epoch": epoch, "batch_loss": total / len(x), "train_loss": train_loss,
                        "train_accuracy": train_acc, "test_accuracy": evaluate(x_test, y_test)[1]})
    return {"format": P2_MNIST_FORMAT, "ste": ste_obj.name, "bits": bits, "alpha": alpha, "seed": seed,
            "history": history, "final_train_accuracy": history[-1]["train_accuracy"],
            "final_test_accuracy": history[-1]["test_accuracy"], "final_train_loss": history[-1]["train_loss"],
            "config": {"hidden": hidden, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                       "momentum": momentum, "train_images": len(x), "test_images": len(x_test)}}


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((a - mean) ** 2 for a in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def mnist_title(results: list[dict[str, Any]]) -> str:
    """The data and scale of the MNIST runs, for titles and captions."""
    c = results[0]["config"]
    seeds = sorted({r["seed"] for r in results})
    return (f"MNIST ({c['train_images']} training / {c['test_images']} test images), 784-{c['hidden']}-10 net, "
            f"{results[0]['bits']}-bit activations (step {results[0]['alpha']}), {c['epochs']} epochs of SGD "
            f"(batch {c['batch_size']}, lr {c['lr']:g}, momentum {c['momentum']:g}), {len(seeds)} seed(s)")


def plot_mnist(results: list[dict[str, Any]], path: Path) -> None:
    """Training loss (whole training set, quantized net) and test accuracy per epoch: the mean over seeds
    with the min-max band, per STE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for index, ste in enumerate(dict.fromkeys(r["ste"] for r in results)):
        runs = [r for r in results if r["ste"] == ste]
        epochs = [h["epoch"] for h in runs[0]["history"]]
        for ax, key, scale in ((ax_l, "train_loss", 1.0), (ax_a, "test_accuracy", 100.0)):
            values = torch.tensor([[scale * h[key] for h in r["history"]] for r in runs])
            color = f"C{index}"
            ax.plot(epochs, values.mean(0).tolist(), color=color, label=f"{ste} ({len(runs)} seeds)")
            ax.fill_between(epochs, values.min(0).values.tolist(), values.max(0).values.tolist(), color=color,
                            alpha=0.2)
    ax_l.set(xlabel="epoch", ylabel="training cross-entropy (whole training set)", yscale="log",
             title="training loss of the quantized network")
    ax_a.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy", ylim=(85, 100))
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    import textwrap

    fig.suptitle(textwrap.fill("[P2] coarse gradient with monotone STEs on " + mnist_title(results)
                               + " (line: mean over seeds; band: min-max)", 130), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def mnist_block(results: list[dict[str, Any]], figure: str, command: str, results_dir: str) -> str:
    """The RESULTS.md block of the MNIST experiment: table (mean ± std over seeds) and what it shows."""
    lines = ["## [P2] on MNIST: coarse gradient with monotone STEs, two-linear-layer network", "",
             "[P2] = Long, Yin, Xin, *Learning quantized neural nets by coarse gradient method for nonlinear "
             "classification*, 2021: convergence of the coarse gradient method for STEs with a monotone proxy "
             "(identity, relu, clipped_relu and log_tailed_relu are all monotone). Here: " + mnist_title(results)
             + "; x -> W (no bias) -> 2-bit quantized ReLU (nearest rounding, fixed step) -> V (no bias) -> 10 "
             "logits; W rows random unit vectors, V ~ 0.1 N(0, 1); each seed's runs share the initialization and "
             f"the batch order. Per-run results: `{results_dir}/*.json`. Command: `{command}`.", "",
             f"![P2 on MNIST]({figure})", "",
             "| STE | seeds | train loss, epoch 0 -> last (mean) | epochs where the loss rose (all seeds) | "
             "train acc % (mean ± std) | test acc % (mean ± std) |", "|---|---|---|---|---|---|"]
    summary = {}
    for ste in dict.fromkeys(r["ste"] for r in results):
        runs = [r for r in results if r["ste"] == ste]
        rises = sum(1 for r in runs for a, b in zip(r["history"][1:], r["history"][2:], strict=False)
                    if b["train_loss"] > a["train_loss"])
        train = _mean_std([100 * r["final_train_accuracy"] for r in runs])
        test = _mean_std([100 * r["final_test_accuracy"] for r in runs])
        loss0 = sum(r["history"][0]["train_loss"] for r in runs) / len(runs)
        loss1 = sum(r["final_train_loss"] for r in runs) / len(runs)
        summary[ste] = (train, test, loss0, loss1)
        lines.append(f"| {ste} | {len(runs)} | {loss0:.3f} -> {loss1:.4f} | {rises} of "
                     f"{len(runs) * (len(runs[0]['history']) - 2)} | {train[0]:.2f} ± {train[1]:.2f} | "
                     f"{test[0]:.2f} ± {test[1]:.2f} |")
    trained = [s for s, (_, _, l0, l1) in summary.items() if l1 < 0.5 * l0]
    best = max(summary, key=lambda s: summary[s][1][0])
    gaps = []
    for s, (_, (mean, std), _, _) in summary.items():
        if s != best:
            gap, noise = summary[best][1][0] - mean, 2 * max(std, summary[best][1][1])
            gaps.append(f"{s} {gap:.2f} points behind ({'beyond' if gap > noise else 'within'} 2 std = {noise:.2f})")
    low = min(v[3] for v in summary.values())
    stalls = [f"{s} stalls at a loss {v[3] / low:.0f}x the lowest ({v[3]:.4f} vs {low:.4f})"
              for s, v in summary.items() if v[3] > 10 * low]
    lines += ["", f"Measured: the coarse gradient trains the quantized network with every monotone STE "
              f"({', '.join(trained) or 'none'}: the whole-training-set loss falls to under half its start), as "
              f"[P2] proves for this class{'; but ' + ', '.join(stalls) if stalls else ''}. Test accuracy "
              f"against the best ({best}): " + "; ".join(gaps) + ". "
              "The epoch-to-epoch rises of the loss (SGD with momentum at a constant lr, not [P2]'s small-step "
              "method) are counted in the table; [P2]'s theorem is about the limit, which a run of this length "
              "approaches, not proves."]
    return "\n".join(lines)


def main_mnist(args: argparse.Namespace, argv: list[str]) -> None:
    """``--mnist FOLDER``: the [P2] MNIST runs (every STE x seed), per-run JSON, plot and RESULTS.md block."""
    import json

    from qat_ste.atomic import atomic_write_text
    from tools.reproduce_paper import provenance

    results_dir = Path(args.results)
    results = []
    if args.report_only:  # the figure and the block from the stored runs
        results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(results_dir.glob("*.json"))]
        results = [r for r in results if r.get("format") == P2_MNIST_FORMAT]
        order = {s: i for i, s in enumerate(MNIST_STES)}
        results.sort(key=lambda r: (order.get(r["ste"], len(order)), r["seed"]))
        if not results:
            raise QatSteError(f"no [P2] MNIST results in {results_dir}", "run without --report-only first")
    data = load_mnist_vectors(args.mnist, args.train_subset) if not args.report_only else None
    for name, seed in tqdm([] if data is None else [(n, s) for n in (args.stes or MNIST_STES) for s in args.seeds],
                           desc="P2 MNIST runs"):
        torch.set_num_threads(1)
        assert data is not None
        record = run_p2_mnist(name, data, args.bits, seed, hidden=args.hidden, epochs=args.epochs, lr=args.mnist_lr,
                              momentum=args.mnist_momentum)
        record["command"] = "python -m tools.p2_experiment " + " ".join(argv)
        record["provenance"] = provenance(record["command"], seed)
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_dir / f"{record['ste']}__seed{seed}.json", json.dumps(record, indent=1) + "\n")
        results.append(record)
    figure = args.out / "p2_mnist.png"
    plot_mnist(results, figure)
    print(f"wrote {figure}")
    if args.report is not None:
        import os

        from tools.reproduce_paper import put_block

        rel = os.path.relpath(figure.resolve(), Path(args.report).resolve().parent)
        put_block(args.report, "[P2] MNIST", mnist_block(results, rel, results[0]["command"], str(results_dir)))
        print(f"wrote the [P2] MNIST block of {args.report}")


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
    mnist = parser.add_argument_group("[P2] on MNIST (the two-linear-layer net, 10 classes)")
    mnist.add_argument("--mnist", type=Path, default=None, help="MNIST folder: run the MNIST experiment instead")
    mnist.add_argument("--train-subset", type=int, default=None, help="training images (default all 60000)")
    mnist.add_argument("--hidden", type=int, default=256)
    mnist.add_argument("--epochs", type=int, default=10)
    mnist.add_argument("--mnist-lr", type=float, default=0.05)
    mnist.add_argument("--mnist-momentum", type=float, default=0.9)
    mnist.add_argument("--results", type=Path, default=Path("model_zoo/results/p2_mnist"),
                       help="folder of the per-run JSON")
    mnist.add_argument("--report", type=Path, default=None, help="RESULTS.md to write the block into")
    mnist.add_argument("--report-only", action="store_true", help="only the figure and the block, from --results")
    args = parser.parse_args(argv)
    if args.mnist is not None:
        main_mnist(args, list(sys.argv[1:] if argv is None else argv))
        return

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

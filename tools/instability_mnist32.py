#!/usr/bin/env python
"""[P1]'s instability experiment, phase 1, on the MNIST-32 substitute at a CPU-sized scale, several seeds.

[P1]: start from ResNet-20 4-bit weights trained with the relu or clipped_relu STE, train with the
identity STE at lr 1e-5 for 20 epochs: the training loss and the validation error rise. Here, per
seed: the float ResNet-20 (affine-free BatchNorm) trained first, then the 4-bit quantized net
trained from it with relu and with clipped_relu (fixed steps), each until its accuracy is flat;
then from each of those starts the lr 1e-5 phase with the identity STE, and as controls the same
phase with the STE the weights were trained with (BatchNorm running statistics move in train mode
even at lr 1e-5; the control shows how much). Data: MNIST zero-padded to 32x32, one channel
(a substitute for CIFAR-10), a fixed subset of the training images. [P1]'s second phase (200
epochs of the normal schedule) is not run.

    python -m tools.instability_mnist32 --seeds 0,1,2 --report model_zoo/RESULTS.md

Each seed's runs are written to ``model_zoo/results/instability_mnist32/seed<k>.json`` (skipped when
present with the same settings).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import qat_ste
from qat_ste.atomic import atomic_write_text, json_safe, save_figure
from qat_ste.train import TrainConfig, TrainingDiverged, evaluate, train
from qat_ste.train.setup import seed_everything
from qat_ste.zoo.recipes import load_recipes
from tools.reproduce_paper import (
    DEFAULT_MNIST,
    REPO_ROOT,
    build_model,
    fingerprint,
    load_net_data,
    machine_info,
    provenance,
    put_block,
)

FORMAT = "qat_ste.instability_mnist32/1"
DEFAULT_RESULTS = REPO_ROOT / "model_zoo" / "results" / "instability_mnist32"
PHASE1 = (("identity_from_relu", "relu", "identity"), ("identity_from_clipped_relu", "clipped_relu", "identity"),
          ("relu_continued", "relu", "relu"), ("clipped_relu_continued", "clipped_relu", "clipped_relu"))
NOISE_PTS = 0.5  # validation-accuracy points a mean change must exceed beyond the control's
LOSS_NOISE = 0.01  # the same for the training loss


def _schedule(epochs: int, lr: float, milestones: Sequence[int] = ()) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": 128, "lr": lr, "schedule": "multistep" if milestones else "constant",
            "milestones": tuple(milestones) or None, "gamma": 0.1, "optimizer": "sgd", "momentum": 0.9,
            "weight_decay": 1e-4}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What decides the numbers (a seed's file is reused when its fingerprint matches)."""
    return {"bits": args.bits, "train_subset": args.train_subset, "val_subset": args.val_subset,
            "float": _schedule(args.float_epochs, 0.1, [m for m in (args.float_epochs * 2 // 3,) if m >= 1]),
            "quant": _schedule(args.quant_epochs, 0.01, [m for m in (args.quant_epochs * 2 // 3,) if m >= 1]),
            "phase1": _schedule(args.phase1_epochs, 1e-5)}


def _fit(model: torch.nn.Module, data: Any, schedule: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    config = TrainConfig(**schedule, device="cpu", seed=seed, progress=False, print_summary=False, plot=False,
                         verbose=False)
    result = train(model, data.train, data.val, config)
    if result.stopped_early:  # SIGTERM/SIGINT: stop the whole tool, write nothing for this seed
        raise KeyboardInterrupt(f"stopped ({result.stop_reason}); run the same command again to redo this seed")
    return result.history


def run_seed(seed: int, args: argparse.Namespace, data: Any, recipes: Any) -> dict[str, Any]:
    """Float, the two quantized starts, then the four lr 1e-5 phase-1 runs of one seed."""
    started = time.perf_counter()
    plan = settings(args)
    seed_everything(seed)
    model = build_model("resnet20", data, recipes)
    runs: dict[str, Any] = {"float": {"history": _fit(model, data, plan["float"], seed)}}
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    starts = {}
    for ste in ("relu", "clipped_relu"):
        seed_everything(seed)
        net = build_model("resnet20", data, recipes)
        net.load_state_dict(float_state)
        net = qat_ste.quantize(net, args.bits, ste, **recipes.quant_options(args.bits))
        runs[f"quant_{ste}"] = {"history": _fit(net, data, plan["quant"], seed)}
        starts[ste] = {k: v.clone() for k, v in net.state_dict().items()}
    for name, start, ste in PHASE1:
        seed_everything(seed)
        net = qat_ste.quantize(build_model("resnet20", data, recipes), args.bits, ste,
                               **recipes.quant_options(args.bits))
        net.load_state_dict(starts[start])
        first = evaluate(net, data.val, batch_size=256, device="cpu")
        record: dict[str, Any] = {"start": start, "ste": ste, "start_val_accuracy": first["accuracy"],
                                  "start_val_loss": first["loss"], "status": "done"}
        try:
            record["history"] = _fit(net, data, plan["phase1"], seed)
        except TrainingDiverged as error:
            record.update(status="diverged", message=error.problem, history=[])
        runs[name] = record
    return {"format": FORMAT, "seed": seed, "settings": plan, "fingerprint": fingerprint(plan), "data": data.label,
            "train_images": len(data.train), "val_images": len(data.val), "runs": runs,
            "wall_time_s": time.perf_counter() - started, "machine": machine_info("cpu"),
            "provenance": provenance(args.command, seed)}


# ---- report -----------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def changes(record: dict[str, Any], name: str) -> tuple[float, float]:
    """(train loss: last phase-1 epoch minus the first, val accuracy points: end minus start) of one run."""
    run = record["runs"][name]
    history = run["history"]
    return (history[-1]["train_loss"] - history[0]["train_loss"],
            100.0 * (history[-1]["val_accuracy"] - run["start_val_accuracy"]))


def verdict(records: Sequence[dict[str, Any]], restart: str, control: str) -> str:
    """[P1]'s claim 'loss and validation error rise during the lr 1e-5 phase' for one start, against
    its control, over seeds: reproduced when, in every seed, the identity run's loss rises more and its
    accuracy falls more than the control's, by more than NOISE_PTS on average; not reproduced when on
    average neither moves beyond the control's by more than NOISE_PTS / LOSS_NOISE; else inconclusive."""
    pairs = [(changes(r, restart), changes(r, control)) for r in records]
    d_loss = [a[0] - b[0] for a, b in pairs]
    d_acc = [a[1] - b[1] for a, b in pairs]
    loss_m, _ = _mean_std(d_loss)
    acc_m, acc_s = _mean_std(d_acc)
    text = (f"identity minus control over {len(pairs)} seed(s): train-loss change {loss_m:+.4f} "
            f"(per seed {', '.join(f'{v:+.4f}' for v in d_loss)}), val-accuracy change {acc_m:+.2f} ± {acc_s:.2f} "
            f"points (per seed {', '.join(f'{v:+.2f}' for v in d_acc)})")
    if len(pairs) < 2:
        return f"{text}: only one seed, no verdict"
    if all(v > 0 for v in d_loss) and all(v < 0 for v in d_acc) and acc_m < -NOISE_PTS:
        return f"{text}: **reproduced**"
    if acc_m >= -NOISE_PTS and loss_m <= LOSS_NOISE:
        return f"{text}: **not reproduced** (no rise beyond the control's: {NOISE_PTS} points, loss {LOSS_NOISE})"
    return f"{text}: **inconclusive** (no consistent sign across seeds)"


def plot(records: Sequence[dict[str, Any]], path: Path, caption: str) -> None:
    """Validation error and training loss over the phase-1 epochs, every seed (epoch 0: the start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, _, ste) in enumerate(PHASE1):
        style = "-" if ste == "identity" else "--"
        for k, record in enumerate(records):
            run = record["runs"][name]
            epochs = [0] + [h["epoch"] for h in run["history"]]
            err = [100 * (1 - run["start_val_accuracy"])] + [100 * (1 - h["val_accuracy"]) for h in run["history"]]
            label = name if k == 0 else None
            ax_e.plot(epochs, err, style, color=f"C{index}", lw=1, label=label)
            ax_l.plot(epochs[1:], [h["train_loss"] for h in run["history"]], style, color=f"C{index}", lw=1,
                      label=label)
    ax_e.set(xlabel="epoch at lr 1e-5 (0 = the start)", ylabel="validation error (%)", title="validation error")
    ax_l.set(xlabel="epoch at lr 1e-5", ylabel="training loss (mean over the epoch)", title="training loss")
    for ax in (ax_e, ax_l):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    import textwrap

    fig.suptitle(textwrap.fill(caption + " (solid: identity STE from the relu / clipped_relu weights; dashed: the "
                               "controls; one line per seed)", 140), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def caption(records: Sequence[dict[str, Any]]) -> str:
    """Data and scale, for the title and the report."""
    r, s = records[0], records[0]["settings"]
    return (f"ResNet-20 {s['bits']}-bit on MNIST-32 (MNIST padded to 32x32, 1 channel, a substitute for CIFAR-10): "
            f"{r['train_images']} of 60000 training / {r['val_images']} validation images; float "
            f"{s['float']['epochs']} epochs, quantized {s['quant']['epochs']} epochs, then {s['phase1']['epochs']} "
            f"epochs at lr 1e-5 (paper 20); {len(records)} seed(s)")


def block(records: Sequence[dict[str, Any]], figure: str, command: str) -> str:
    """The RESULTS.md block: the starts, the phase-1 changes per run (mean ± std), the verdicts."""
    lines = ["## Instability, phase 1, with converged starts and several seeds (MNIST-32, CPU scale)", "",
             caption(records) + ". [P1]'s claim: from relu- or clipped_relu-trained weights, training with the "
             "identity STE at lr 1e-5 raises the training loss and the validation error. Controls: the same phase "
             f"with the STE the weights were trained with. Command: `{command}`.", "",
             f"![instability phase 1]({figure})", "",
             "| run | start val acc % | val acc change (points) | train-loss change (last - first epoch) |",
             "|---|---|---|---|"]
    quant = {ste: _mean_std([100 * r["runs"][f"quant_{ste}"]["history"][-1]["val_accuracy"] for r in records])
             for ste in ("relu", "clipped_relu")}
    for name, _, _ in PHASE1:
        start = _mean_std([100 * r["runs"][name]["start_val_accuracy"] for r in records])
        acc = _mean_std([changes(r, name)[1] for r in records])
        loss = _mean_std([changes(r, name)[0] for r in records])
        lines.append(f"| {name} | {start[0]:.2f} ± {start[1]:.2f} | {acc[0]:+.2f} ± {acc[1]:.2f} | "
                     f"{loss[0]:+.4f} ± {loss[1]:.4f} |")
    lines += ["", "Quantized starts (validation accuracy after their training, mean ± std): "
              + "; ".join(f"{s} {m:.2f} ± {d:.2f} %" for s, (m, d) in quant.items()) + ".", ""]
    unconverged = {ste: [r for r in records if not converged(r, ste)] for ste in ("relu", "clipped_relu")}
    for ste, bad in unconverged.items():
        for r in bad:
            accs = [100 * h["val_accuracy"] for h in r["runs"][f"quant_{ste}"]["history"]]
            lines.append(f"Not converged: seed {r['seed']}'s {ste} start ({accs[-2]:.1f} -> {accs[-1]:.1f} % over its "
                         f"last epoch; float {100 * r['runs']['float']['history'][-1]['val_accuracy']:.1f} %).")
    lines += ["", "Verdicts:", ""]
    for ste in ("relu", "clipped_relu"):
        restart, control = f"identity_from_{ste}", f"{ste}_continued"
        lines.append(f"- from the {ste} weights: " + verdict(records, restart, control))
        good = [r for r in records if converged(r, ste)]
        if unconverged[ste] and good:
            lines.append(f"- from the {ste} weights, converged starts only (seeds "
                         f"{', '.join(str(r['seed']) for r in good)}): " + verdict(good, restart, control))
        elif unconverged[ste]:
            lines.append(f"- caveat: none of the {ste} starts had converged (see above), so this verdict is weak "
                         "evidence for [P1]'s claim, which is about trained weights; a longer `--quant-epochs` "
                         "run is needed")
    lines += ["", "[P1]'s second phase (the normal schedule after the lr 1e-5 phase) is not run here."]
    return "\n".join(lines)


def converged(record: dict[str, Any], ste: str) -> bool:
    """A quantized start counts as converged when its last epoch moved its validation accuracy by at most
    2 points and it is within 3 points of the seed's float net."""
    accs = [100 * h["val_accuracy"] for h in record["runs"][f"quant_{ste}"]["history"]]
    float_acc = 100 * record["runs"]["float"]["history"][-1]["val_accuracy"]
    return abs(accs[-1] - accs[-2]) <= 2.0 and accs[-1] >= float_acc - 3.0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mnist", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--val-subset", type=int, default=1000)
    p.add_argument("--float-epochs", type=int, default=8)
    p.add_argument("--quant-epochs", type=int, default=6)
    p.add_argument("--phase1-epochs", type=int, default=10)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--figure", type=Path, default=REPO_ROOT / "model_zoo" / "figures" / "instability_mnist32.png")
    p.add_argument("--report", type=Path, default=None)
    args = p.parse_args(argv)
    args.command = "python -m tools.instability_mnist32 " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    recipes = load_recipes()
    data = load_net_data("resnet20", recipes, args.mnist, None, args.train_subset, args.val_subset, 0)
    records = []
    for seed in args.seeds:
        path = args.results / f"seed{seed}.json"
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("fingerprint") == fingerprint(settings(args)):
                print(f"skip seed {seed}: done", flush=True)
                records.append(old)
                continue
        print(f"seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
        record = run_seed(seed, args, data, recipes)
        args.results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(json_safe(record), indent=1) + "\n")
        records.append(record)
        print(f"seed {seed} done in {record['wall_time_s'] / 60:.1f} min", flush=True)
    done = [r for r in records if all(run.get("status", "done") == "done" for run in r["runs"].values())]
    if done:
        plot(done, args.figure, caption(done))
        if args.report is not None:
            import os

            rel = os.path.relpath(args.figure.resolve(), args.report.resolve().parent)
            put_block(args.report, "instability MNIST-32 phase 1", block(done, rel, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""[P1] Table 1's MNIST row at the paper's scale: LeNet-5 on full MNIST (60k / 10k), several seeds.

Per seed: the float LeNet-5 (affine-free BatchNorm before each ReLU) trained with the paper's
schedule, then from those weights every (bits, STE) cell: 2 and 4 bits x identity / relu /
clipped_relu, fixed steps, 50 epochs, batch 64, lr 0.1 x0.1 at 20 and 40, SGD momentum 0.9,
weight decay 1e-4 (the recipe in ``qat_ste/zoo/recipes.json``). Everything random (the model's
initialization, the data order) comes from the run's seed, set before the model is built.

    python -m tools.paper_table1                          # all runs not done yet, seeds 0,1,2
    python -m tools.paper_table1 --report-only            # only rewrite RESULTS.md's Table 1 block

Resumable: each finished run is written at once to ``model_zoo/results/table1/<run>.json`` (commit,
command, seed, library versions, machine, per-epoch history); a run whose file holds the same
settings is skipped; a killed run continues from its last epoch (``runs/table1/work``). The float
weights the quantized runs start from are kept under ``runs/table1/weights``. One run at a time:
on CPU, start it with ``nice -n 19`` and ``OMP_NUM_THREADS=1`` in the background.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import qat_ste
from qat_ste.atomic import atomic_save, atomic_write_text, json_safe
from qat_ste.errors import QatSteError
from qat_ste.train import TrainConfig, TrainingDiverged, train
from qat_ste.train.setup import seed_everything
from qat_ste.zoo.recipes import Recipes, Schedule, load_recipes
from tools.reproduce_paper import (
    DEFAULT_MNIST,
    DEFAULT_REPORT,
    REPO_ROOT,
    T1_BEGIN,
    T1_END,
    NetData,
    build_model,
    fingerprint,
    load_net_data,
    load_records,
    machine_info,
    provenance,
)

FORMAT = "qat_ste.paper_table1/1"
NET = "lenet5"
DEFAULT_RESULTS = REPO_ROOT / "model_zoo" / "results" / "table1"
DEFAULT_RUNS = REPO_ROOT / "runs" / "table1"
BEGIN, END = T1_BEGIN, T1_END
STES = ("identity", "relu", "clipped_relu")

__all__ = ["T1Run", "T1Options", "plan", "run_all", "load_results", "cell_stats", "verdict", "section",
           "write_section", "main"]


@dataclass(frozen=True)
class T1Run:
    """One run: the float network (``bits`` None) or one quantized cell, for one seed."""

    seed: int
    schedule: Schedule
    bits: int | None = None
    ste: str | None = None

    @property
    def run_id(self) -> str:
        """``table1/lenet5/float/seed0`` or ``table1/lenet5/2bit-relu/seed0``."""
        cell = "float" if self.bits is None else f"{self.bits}bit-{self.ste}"
        return f"table1/{NET}/{cell}/seed{self.seed}"

    @property
    def depends_on(self) -> str | None:
        """The float run whose weights a quantized run starts from."""
        return None if self.bits is None else T1Run(self.seed, self.schedule).run_id


@dataclass(frozen=True)
class T1Options:
    """What runs and where its files go."""

    results_dir: Path = DEFAULT_RESULTS
    runs_dir: Path = DEFAULT_RUNS
    seeds: tuple[int, ...] = (0, 1, 2)
    bits: tuple[int, ...] = (2, 4)
    stes: tuple[str, ...] = STES
    epochs_scale: float = 1.0          # < 1 only for tests; the report marks such runs as reduced
    eval_every: int = 5
    device: str = "cpu"
    command: str = ""
    log: Callable[[str], None] = field(default=print)


def plan(recipes: Recipes, options: T1Options) -> list[T1Run]:
    """Seed by seed: the float run, then every bits x STE cell (so each seed's row completes in turn)."""
    recipe = recipes.nets[NET]
    out: list[T1Run] = []
    for seed in options.seeds:
        out.append(T1Run(seed, recipe.pretrain.scaled(options.epochs_scale)))
        out += [T1Run(seed, recipe.quant.scaled(options.epochs_scale), b, s) for b in options.bits
                for s in options.stes]
    return out


def _settings(run: T1Run, data: NetData, recipes: Recipes, parent: str | None) -> dict[str, Any]:
    """Everything that decides a run's numbers (its hash decides whether a stored result is reused)."""
    return {"run_id": run.run_id, "net": NET, "bits": run.bits, "ste": run.ste, "seed": run.seed,
            "data": data.label, "train_images": len(data.train), "val_images": len(data.val),
            "schedule": run.schedule.to_dict(), "alpha_mode": recipes.alpha_mode if run.bits else None,
            "rounding": recipes.rounding if run.bits else None, "bn_affine": recipes.bn_affine,
            "starts_from": parent}


def _file(results_dir: Path, run_id: str) -> Path:
    return Path(results_dir) / (run_id.removeprefix("table1/").replace("/", "__") + ".json")


def _weights(runs_dir: Path, run_id: str, digest: str) -> Path:
    return Path(runs_dir) / "weights" / f"{run_id.replace('/', '__')}-{digest}.pt"


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """run_id -> record of every result file of this tool in ``results_dir``."""
    return load_records(results_dir, FORMAT)


def _model(run: T1Run, data: NetData, recipes: Recipes, float_state: Mapping[str, Any] | None) -> torch.nn.Module:
    """The float LeNet-5, or the quantized one from the float weights (fixed steps, as [P1])."""
    seed_everything(run.seed)  # before anything random: the initialization comes from the seed
    model = build_model(NET, data, recipes)
    if run.bits is None:
        return model
    assert float_state is not None and run.ste is not None
    model.load_state_dict(float_state)
    return qat_ste.quantize(model, run.bits, run.ste, **recipes.quant_options(run.bits))


def execute(run: T1Run, data: NetData, recipes: Recipes, options: T1Options, settings: dict[str, Any],
            digest: str, float_weights: Path | None) -> dict[str, Any]:
    """Train one run (continuing from its last epoch when an earlier attempt was killed); its record."""
    started = time.perf_counter()
    state = torch.load(float_weights, map_location="cpu", weights_only=True) if float_weights else None
    model = _model(run, data, recipes, state)
    work = Path(options.runs_dir) / "work" / f"{run.run_id.replace('/', '__')}-{digest}"
    last = work / "last.pt"
    resumed = last.exists()
    config = TrainConfig(**run.schedule.to_train_kwargs(), device=options.device, seed=run.seed, out_dir=str(work),
                         resume=str(last) if resumed else None, progress=False, log_format="none",
                         tensorboard=False, plot=False, print_summary=False, verbose=False,
                         eval_every=options.eval_every)
    status, message, result = "done", "", None
    try:
        result = train(model, data.train, data.val, config, metadata={"title": run.run_id, "run_id": run.run_id})
    except TrainingDiverged as error:
        status, message = "diverged", error.problem
    if result is not None and result.stopped_early:
        raise KeyboardInterrupt(f"{run.run_id} stopped ({result.stop_reason}); run again to resume")
    if run.bits is None and status == "done":
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                    _weights(options.runs_dir, run.run_id, digest))
    history = list(result.history) if result is not None else []
    evaluated = [r for r in history if r.get("val_accuracy") is not None]
    record = {
        "format": FORMAT, "run_id": run.run_id, "net": NET, "bits": run.bits, "ste": run.ste, "seed": run.seed,
        "status": status, "message": message, "fingerprint": digest, "settings": settings,
        "epochs": run.schedule.epochs, "paper_epochs": recipes.nets[NET].quant.epochs, "data": data.label,
        "train_images": len(data.train), "train_images_full": data.train_full,
        "val_images": len(data.val), "val_images_full": data.val_full,
        "final_train_loss": history[-1].get("train_loss") if history and status == "done" else None,
        "final_val_accuracy_pct": 100.0 * evaluated[-1]["val_accuracy"] if evaluated and status == "done" else None,
        "history": history, "wall_time_s": time.perf_counter() - started, "resumed_from_checkpoint": resumed,
        "machine": machine_info(options.device), "provenance": provenance(options.command, run.seed),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shutil.rmtree(work, ignore_errors=True)
    return record


def run_all(runs: Sequence[T1Run], recipes: Recipes, data: NetData, options: T1Options) -> list[dict[str, Any]]:
    """Run ``runs`` in order, skipping those whose result file holds the same settings; returns the records."""
    records = load_results(options.results_dir)
    digests: dict[str, str] = {}
    for run in runs:
        parent = digests.get(run.depends_on) if run.depends_on else None
        digests[run.run_id] = fingerprint(_settings(run, data, recipes, parent))
    out: list[dict[str, Any]] = []
    for run in runs:
        digest = digests[run.run_id]
        record = records.get(run.run_id)
        float_weights = _weights(options.runs_dir, run.run_id, digest) if run.bits is None else None
        needed_later = run.bits is None and any(
            r.depends_on == run.run_id and (records.get(r.run_id) or {}).get("fingerprint") != digests[r.run_id]
            for r in runs)
        if record is not None and record.get("fingerprint") == digest and record.get("status") in ("done", "diverged") \
                and not (needed_later and float_weights is not None and not float_weights.exists()):
            options.log(f"skip {run.run_id}: done earlier with the same settings")
            out.append(record)
            continue
        parent_weights = None
        if run.depends_on:
            parent_weights = _weights(options.runs_dir, run.depends_on, digests[run.depends_on])
            if not parent_weights.exists():
                options.log(f"blocked {run.run_id}: {run.depends_on} did not finish")
                continue
        options.log(f"run {run.run_id}: {run.schedule.epochs} epochs, {len(data.train)} training images "
                    f"({time.strftime('%H:%M:%S')})")
        settings = _settings(run, data, recipes, digests.get(run.depends_on) if run.depends_on else None)
        record = execute(run, data, recipes, options, settings, digest, parent_weights)
        Path(options.results_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(_file(options.results_dir, run.run_id),
                          json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
        records[run.run_id] = record
        out.append(record)
        acc = record["final_val_accuracy_pct"]
        options.log(f"  {run.run_id}: {record['status']}, val acc {'-' if acc is None else f'{acc:.2f}'} %, "
                    f"{record['wall_time_s'] / 60:.1f} min")
    return out


# =============================================================================================
# Report
# =============================================================================================


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


@dataclass(frozen=True)
class CellStats:
    """A cell's finished runs at the paper's scale: seeds, accuracy and loss mean ± std."""

    seeds: tuple[int, ...]
    acc: tuple[float, float]
    loss: tuple[float, float]
    accs: tuple[float, ...]


def _full_scale(record: Mapping[str, Any]) -> bool:
    return (record["epochs"] >= record["paper_epochs"] and record["train_images"] >= record["train_images_full"]
            and record["val_images"] >= record["val_images_full"])


def cell_stats(records: Mapping[str, Mapping[str, Any]], bits: int | None, ste: str | None,
               full_scale_only: bool = True) -> CellStats | None:
    """The cell's finished runs (at the paper's scale unless told otherwise), or None when there is none."""
    rows = sorted((r for r in records.values() if r.get("status") == "done" and r.get("bits") == bits
                   and r.get("ste") == ste and (_full_scale(r) or not full_scale_only)), key=lambda r: r["seed"])
    if not rows:
        return None
    accs = tuple(float(r["final_val_accuracy_pct"]) for r in rows)
    return CellStats(tuple(r["seed"] for r in rows), _mean_std(accs),
                     _mean_std([float(r["final_train_loss"]) for r in rows]), accs)


def verdict(stats: CellStats | None, paper: float | None) -> str:
    """Measured accuracy against the paper's: within noise when the paper's value lies within mean ± 2 std
    (std over seeds); fewer than 3 seeds give no verdict."""
    if stats is None:
        return "not run yet"
    n = len(stats.seeds)
    if paper is None:
        return f"{n} seed(s)"
    mean, std = stats.acc
    gap = mean - paper
    if n < 3:
        return f"only {n} seed(s): no verdict yet ({gap:+.2f} vs the paper)"
    if abs(gap) <= 2 * std:
        return f"within noise ({gap:+.2f}, 2 std = {2 * std:.2f})"
    return f"{'above' if gap > 0 else 'below'} the paper by {abs(gap):.2f} points (beyond 2 std = {2 * std:.2f})"


def _paired(records: Mapping[str, Mapping[str, Any]], bits: int, better: str, worse: str) -> str | None:
    """``better`` minus ``worse`` per seed (both start from that seed's float weights)."""
    done = {(r["seed"], r["ste"]): r for r in records.values()
            if r.get("status") == "done" and r.get("bits") == bits and _full_scale(r)}
    diffs = [done[(s, better)]["final_val_accuracy_pct"] - done[(s, worse)]["final_val_accuracy_pct"]
             for s, ste in done if ste == better and (s, worse) in done]
    if not diffs:
        return None
    mean, std = _mean_std(diffs)
    sign = ("ahead in every seed" if min(diffs) > 0 else "behind in every seed" if max(diffs) < 0
            else "no consistent sign: within noise")
    few = "" if len(diffs) >= 3 else f"; only {len(diffs)} seed(s), no verdict yet"
    return f"{bits}-bit {better} − {worse}: {mean:+.2f} ± {std:.2f} points over {len(diffs)} seed(s) ({sign}{few})"


def section(records: Mapping[str, Mapping[str, Any]], recipes: Recipes, results_dir: Path) -> str:
    """The Markdown block of RESULTS.md for Table 1's MNIST row at the paper's scale."""
    done = [r for r in records.values() if r.get("status") == "done"]
    rel = results_dir.resolve().relative_to(REPO_ROOT) if results_dir.resolve().is_relative_to(REPO_ROOT) \
        else results_dir
    lines = [BEGIN, "## Table 1, MNIST row, at the paper's scale (LeNet-5, full MNIST, several seeds)", "",
             "LeNet-5 (affine-free BatchNorm before each ReLU) on the full MNIST (60000 training / 10000 validation "
             "images, 28x28), the paper's recipe: float pre-training, then from the float weights of the same seed "
             "50 epochs, batch 64, lr 0.1 ×0.1 at epochs 20 and 40, SGD momentum 0.9, weight decay 1e-4, fixed "
             f"steps ({recipes.rounding} rounding). Measured: validation accuracy after the last epoch and the mean "
             "training loss of the last epoch, mean ± sample std over seeds. Verdict: *within noise* when the "
             "paper's value lies within mean ± 2 std; cells with fewer than 3 seeds get no verdict. "
             f"Per-run results (commit, command, seed, library versions, history): `{rel}/*.json` "
             f"({len(done)} finished).", "",
             "| bits | STE | seeds | val acc % (mean ± std) | val acc % ([P1]) | train loss (mean ± std) | "
             "train loss ([P1]) | verdict (accuracy) |", "|---|---|---|---|---|---|---|---|"]
    float_stats = cell_stats(records, None, None)
    lines.append(_row("float", "-", float_stats, None, None, _diverged(records, None, None)))
    for bits in (2, 4):
        for ste in STES:
            paper = recipes.paper_result(NET, bits, ste)
            lines.append(_row(str(bits), ste, cell_stats(records, bits, ste),
                              paper.val_accuracy_pct if paper else None, paper.train_loss if paper else None,
                              _diverged(records, bits, ste)))
    pairs = [p for bits in (2, 4) for p in (_paired(records, bits, "relu", "identity"),
                                           _paired(records, bits, "clipped_relu", "identity"),
                                           _paired(records, bits, "clipped_relu", "relu")) if p]
    if pairs:
        lines += ["", "[P1]'s ordering, paired by seed (each seed's cells start from the same float weights and see "
                  "the same batches):", ""] + [f"- {p}" for p in pairs]
    reduced = [r["run_id"] for r in done if not _full_scale(r)]
    if reduced:
        lines += ["", f"Left out (reduced scale, {len(reduced)}): " + ", ".join(f"`{r}`" for r in sorted(reduced))]
    if done:
        walls = [r["wall_time_s"] for r in done if _full_scale(r)]
        sample = next((r for r in done if _full_scale(r)), done[0])
        m = sample["machine"]
        lines += ["", f"Wall time per run: {min(walls) / 60:.1f}-{max(walls) / 60:.1f} min on {m.get('cpu', '?')} "
                  f"(torch threads {m.get('torch_threads', '?')}, niced, sharing the machine)." if walls else ""]
    commits: dict[str, int] = {}
    for r in done:
        commit = (r.get("provenance") or {}).get("commit") or "unknown"
        commits[commit[:10]] = commits.get(commit[:10], 0) + 1
    if commits:
        lines += ["", "Code: " + ", ".join(f"commit `{c}` ({n} run(s))" for c, n in sorted(commits.items()))
                  + "; torch " + ", ".join(sorted({str((r.get("provenance") or {}).get("versions", {}).get("torch"))
                                                   for r in done})) + "."]
    lines += ["", "Command: `nice -n 19 env OMP_NUM_THREADS=1 python -m tools.paper_table1` (resumable; "
              "`--report-only` rewrites this block).", END]
    return "\n".join(lines)


def _diverged(records: Mapping[str, Mapping[str, Any]], bits: int | None, ste: str | None) -> list[int]:
    """The seeds of a cell whose run diverged (a non-finite loss)."""
    return sorted(r["seed"] for r in records.values()
                  if r.get("status") == "diverged" and r.get("bits") == bits and r.get("ste") == ste)


def _row(bits: str, ste: str, stats: CellStats | None, paper_acc: float | None, paper_loss: float | None,
         diverged: Sequence[int] = ()) -> str:
    p_acc = "-" if paper_acc is None else f"{paper_acc:.2f}"
    p_loss = "-" if paper_loss is None else f"{paper_loss:.1e}"
    note = f"; diverged with seed(s) {', '.join(map(str, diverged))}" if diverged else ""
    if stats is None:
        state = "diverged" if diverged else "not run yet"
        return f"| {bits} | {ste} | - | {state} | {p_acc} | - | {p_loss} | {state}{note} |"
    (acc, acc_sd), (loss, loss_sd) = stats.acc, stats.loss
    return (f"| {bits} | {ste} | {', '.join(map(str, stats.seeds))} | {acc:.2f} ± {acc_sd:.2f} | {p_acc} | "
            f"{loss:.1e} ± {loss_sd:.1e} | {p_loss} | {verdict(stats, paper_acc)}{note} |")


def write_section(report: Path, records: Mapping[str, Mapping[str, Any]], recipes: Recipes,
                  results_dir: Path) -> str:
    """Put the block into ``report`` (replacing the previous one, else after the title); returns it."""
    block = section(records, recipes, results_dir)
    text = Path(report).read_text(encoding="utf-8") if Path(report).exists() else ""
    atomic_write_text(report, with_block(text, block))
    return block


def with_block(text: str, block: str) -> str:
    """``text`` with its Table 1 block replaced by ``block`` (inserted after the first heading's paragraph
    when it has none)."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin >= 0 and end > begin:
        return text[:begin] + block + text[end + len(END):]
    marker = text.find("\n## ")
    if marker < 0:
        return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    return text[:marker + 1] + block + "\n\n" + text[marker + 1:]


def kept_block(text: str) -> str | None:
    """The Table 1 block of a RESULTS.md text, if any (for writers of the rest of the file)."""
    begin, end = text.find(BEGIN), text.find(END)
    return text[begin:end + len(END)] if begin >= 0 and end > begin else None


# =============================================================================================
# Command line
# =============================================================================================


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="folder of the four MNIST IDX files")
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="comma-separated, default 0,1,2")
    p.add_argument("--bits", type=_ints, default=(2, 4), help="comma-separated, default 2,4")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of the per-run JSON results")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS, help="float weights and resumable checkpoints")
    p.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="the RESULTS.md whose block is rewritten")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="< 1 for tests only (reported as reduced)")
    p.add_argument("--train-subset", type=int, default=None, help="for tests only (reported as reduced)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report block")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    recipes = load_recipes()
    try:
        if not args.report_only:
            torch.set_num_threads(max(1, args.threads))
            data = load_net_data(NET, recipes, args.mnist.expanduser(), None, args.train_subset, None, 0)
            options = T1Options(results_dir=args.results, runs_dir=args.runs_dir, seeds=args.seeds,
                                bits=args.bits, epochs_scale=args.epochs_scale, device=args.device,
                                command="python -m tools.paper_table1 " + " ".join(argv),
                                log=lambda message: print(message, flush=True))
            run_all(plan(recipes, options), recipes, data, options)
        write_section(args.report, load_results(args.results), recipes, args.results)
    except QatSteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote the Table 1 block of {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

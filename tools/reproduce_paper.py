#!/usr/bin/env python
"""Reproduce [P1]'s Table 1 grid and its instability runs, and write model_zoo/RESULTS.md.

[P1] = Yin et al., "Understanding Straight-Through Estimator in Training Activation Quantized Neural
Nets", ICLR 2019. Recipes: qat_ste/zoo/recipes.json (loaded by qat_ste.zoo.recipes).

What runs, per network: float pre-training (affine-free BatchNorm before each ReLU), then for each
bit width and STE the quantized network trained from the float weights (alpha fixed), then the
instability runs (ResNet-20: retrain quantized weights with another STE). Data: MNIST for LeNet-5;
VGG-11 and ResNet-20 run on CIFAR-10 with ``--cifar10 FOLDER`` (the paper's setting), otherwise on
MNIST zero-padded to 32x32 with one input channel (a substitute, clearly labelled in the report).

    python -m tools.reproduce_paper                                  # the full paper scale
    python -m tools.reproduce_paper --nets lenet5 --epochs-scale 0.1 --train-subset 10000
    python -m tools.reproduce_paper --cifar10 ~/data/cifar-10-batches-py --device cuda
    python -m tools.reproduce_paper --report-only                    # rewrite RESULTS.md

Every finished run is appended to a JSON file (written atomically); running the same command again
skips finished runs with the same settings and resumes an interrupted one from its last epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
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
from qat_ste.train import TrainConfig, TrainingDiverged, evaluate, train
from qat_ste.train.data import TensorImageDataset, load_dataset
from qat_ste.train.setup import seed_everything
from qat_ste.zoo import create_zoo_model
from qat_ste.zoo.recipes import InstabilityRun, PaperResult, Recipes, Schedule, load_recipes

REPO_ROOT = Path(__file__).resolve().parents[1]

RESULTS_FORMAT = "qat_ste.reproduce_paper/1"
DEFAULT_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"
DEFAULT_RUNS_DIR = REPO_ROOT / "runs" / "reproduce_paper"
DEFAULT_REPORT = REPO_ROOT / "model_zoo" / "RESULTS.md"
DEFAULT_FIGURES = REPO_ROOT / "model_zoo" / "figures"
INSTABILITY_FIGURE = "instability_resnet20.png"
NET_TITLES = {"lenet5": "LeNet-5", "vgg11": "VGG-11", "resnet20": "ResNet-20"}
PAPER_DATA = {"mnist": "MNIST", "cifar10": "CIFAR-10"}

__all__ = [
    "NetData", "RunSpec", "GridOptions", "ResultsStore", "load_net_data", "plan_runs", "run_grid",
    "write_report", "summary_table", "machine_info", "provenance", "put_block", "main", "P3Run", "P3Options",
    "plan_p3", "run_p3", "p3_table", "write_p3_report", "load_p3_results", "load_records",
]


# =============================================================================================
# Data
# =============================================================================================


@dataclass(frozen=True)
class NetData:
    """The training and validation images one network trains on here."""

    label: str  # e.g. "MNIST padded to 32x32 (substitute for CIFAR-10)"
    train: TensorImageDataset
    val: TensorImageDataset
    train_full: int  # images in the whole training split (before --train-subset)
    val_full: int
    substitute: bool  # True when this is not the paper's data set

    @property
    def in_channels(self) -> int:
        """Channels of one image."""
        return self.train.info.channels

    @property
    def image_size(self) -> int:
        """Side of the (square) images."""
        return int(self.train.info.image_size[0])


def subset(data: TensorImageDataset, n: int | None, seed: int) -> TensorImageDataset:
    """A fixed, seeded random subset of ``n`` images (all of them when ``n`` is None or too big)."""
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise QatSteError(f"subset size {n} must be >= 1", "pass a positive --train-subset / --val-subset")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return TensorImageDataset(data.images[keep].contiguous(), data.labels[keep], data.info, data.augment,
                              data.crop_padding)


def check_mnist_folder(folder: Path) -> None:
    """Raise a clear error when the MNIST folder is absent."""
    if not folder.is_dir():
        raise QatSteError(
            f"the MNIST folder {folder} does not exist (LeNet-5 trains on MNIST, and VGG-11/ResNet-20 on "
            f"MNIST padded to 32x32 unless --cifar10 is given)",
            "pass --mnist FOLDER with the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...), or run only "
            "--nets vgg11,resnet20 with --cifar10 FOLDER",
        )


def load_net_data(
    net: str,
    recipes: Recipes,
    mnist: Path | None,
    cifar10: Path | None,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    cache: dict[tuple[str, str], TensorImageDataset] | None = None,
) -> NetData:
    """Load the data for ``net``: the paper's data set where available, else the MNIST substitute."""
    recipe = recipes.nets[net]
    cache = {} if cache is None else cache

    def get(spec: str, split: str, **options: Any) -> TensorImageDataset:
        key = (spec + repr(sorted(options.items())), split)
        if key not in cache:
            cache[key] = load_dataset(spec, split, **options)
        return cache[key]

    if recipe.dataset == "cifar10" and cifar10 is not None:
        train_set = get(f"cifar10:{cifar10}", "train", augment=recipe.augment)
        val_set = get(f"cifar10:{cifar10}", "val")
        label, substitute = "CIFAR-10" + (" (crop + flip)" if recipe.augment else ""), False
    else:
        if mnist is None:
            raise QatSteError(f"{net} needs MNIST here, but no MNIST folder was given", "pass --mnist FOLDER")
        check_mnist_folder(mnist)
        if recipe.dataset == "mnist":
            pad = recipe.image_size if recipe.image_size != 28 else None
            train_set = get(f"mnist:{mnist}", "train", pad_to=pad)
            val_set = get(f"mnist:{mnist}", "val", pad_to=pad)
            label, substitute = f"MNIST {train_set.info.image_size[0]}x{train_set.info.image_size[1]}", False
        else:
            train_set = get(f"mnist:{mnist}", "train", pad_to=32)
            val_set = get(f"mnist:{mnist}", "val", pad_to=32)
            label, substitute = "MNIST padded to 32x32, 1 channel (substitute for CIFAR-10)", True
    return NetData(label, subset(train_set, train_subset, seed), subset(val_set, val_subset, seed + 1),
                   len(train_set), len(val_set), substitute)


# =============================================================================================
# The plan: which runs, with which (scaled) schedules
# =============================================================================================


@dataclass(frozen=True)
class RunSpec:
    """One training run of the reproduction."""

    run_id: str  # "float/lenet5", "grid/lenet5/2bit/relu", "instability/resnet20_4bit_identity_from_relu"
    kind: str  # "float" | "grid" | "instability"
    net: str
    bits: int | None
    ste: str | None
    phases: tuple[tuple[str, Schedule], ...]  # (label, scaled schedule)
    paper_epochs: int  # total epochs at the paper's scale
    depends_on: str | None = None  # run_id whose final weights this run starts from
    from_ste: str | None = None
    role: str = ""
    paper: PaperResult | None = None
    claim: str = ""

    @property
    def epochs(self) -> int:
        """Total epochs of this run (all phases)."""
        return sum(s.epochs for _, s in self.phases)


def float_id(net: str) -> str:
    """Run id of a network's float pre-training."""
    return f"float/{net}"


def grid_id(net: str, bits: int, ste: str) -> str:
    """Run id of one Table 1 cell."""
    return f"grid/{net}/{bits}bit/{ste}"


def plan_runs(
    recipes: Recipes,
    nets: Sequence[str],
    bits: Sequence[int],
    stes: Sequence[str],
    epochs_scale: float = 1.0,
    instability_scale: float | None = None,
    instability: bool = True,
    float_scale: float | None = None,
) -> list[RunSpec]:
    """The runs for the chosen nets/bits/STEs in dependency order: float pre-training, the grid
    cells, then the instability runs of the chosen nets (adding the grid cells they start from).
    ``float_scale`` and ``instability_scale`` default to ``epochs_scale``."""
    unknown = [n for n in nets if n not in recipes.nets]
    if unknown:
        raise QatSteError(f"unknown net(s) {', '.join(unknown)}", f"use some of {', '.join(recipes.nets)}")
    known_stes = set(qat_ste.list_stes())
    bad = [s for s in stes if s not in known_stes]
    if bad:
        raise QatSteError(f"unknown STE(s) {', '.join(bad)}", f"use some of {', '.join(sorted(known_stes))}")
    bad_bits = [b for b in bits if not 1 <= int(b) <= 8]
    if bad_bits:
        raise QatSteError(f"bit widths {bad_bits} are outside 1..8", "use e.g. --bits 2,4")
    inst_scale = epochs_scale if instability_scale is None else instability_scale
    pre_scale = epochs_scale if float_scale is None else float_scale
    chosen = [r for r in recipes.instability if instability and r.net in nets]
    cells: list[tuple[str, int, str]] = [(n, int(b), s) for n in nets for b in bits for s in stes]
    for run in chosen:  # the weights an instability run starts from
        if (run.net, run.bits, run.from_ste) not in cells:
            cells.append((run.net, run.bits, run.from_ste))
    plan: list[RunSpec] = []
    for net in dict.fromkeys(n for n, _, _ in cells):
        recipe = recipes.nets[net]
        plan.append(RunSpec(float_id(net), "float", net, None, None,
                            (("float pre-training", recipe.pretrain.scaled(pre_scale)),), recipe.pretrain.epochs))
        for n, b, s in cells:
            if n == net:
                plan.append(RunSpec(grid_id(net, b, s), "grid", net, b, s,
                                    (("quantized training", recipe.quant.scaled(epochs_scale)),), recipe.quant.epochs,
                                    depends_on=float_id(net), paper=recipes.paper_result(net, b, s)))
    for run in chosen:
        plan.append(instability_spec(run, inst_scale))
    return plan


def instability_spec(run: InstabilityRun, scale: float) -> RunSpec:
    """The RunSpec of one instability run at an epoch scale."""
    return RunSpec(
        f"instability/{run.name}", "instability", run.net, run.bits, run.ste,
        tuple((p.label, p.schedule.scaled(scale)) for p in run.phases), sum(p.schedule.epochs for p in run.phases),
        depends_on=grid_id(run.net, run.bits, run.from_ste), from_ste=run.from_ste, role=run.role, claim=run.claim,
    )


# =============================================================================================
# Results file (atomic JSON) and machine description
# =============================================================================================


class ResultsStore:
    """The JSON file of finished runs: ``{"format", "invocations": [...], "runs": {run_id: record}}``.
    Every change is written at once, atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"format": RESULTS_FORMAT, "invocations": [], "runs": {}}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise QatSteError(f"cannot read the results file {self.path}: {error}",
                                  "move it away (finished runs are then redone) or pass another --results") from None
            if not isinstance(loaded, dict) or loaded.get("format") != RESULTS_FORMAT:
                raise QatSteError(f"{self.path} is not a results file of this tool (format {RESULTS_FORMAT})",
                                  "pass another --results path")
            self.data = loaded

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        """run_id -> record."""
        return self.data["runs"]

    def save(self) -> None:
        """Write the file atomically."""
        atomic_write_text(self.path, json.dumps(json_safe(self.data), indent=1, allow_nan=False) + "\n")

    def put(self, record: dict[str, Any]) -> None:
        """Add or replace one run's record and save."""
        self.runs[record["run_id"]] = json_safe(record)
        self.save()

    def add_invocation(self, entry: dict[str, Any]) -> int:
        """Log one invocation of the tool; returns its index."""
        self.data.setdefault("invocations", []).append(json_safe(entry))
        self.save()
        return len(self.data["invocations"]) - 1


def provenance(command: str, seed: int) -> dict[str, Any]:
    """Where a result comes from: the git commit (and whether the code under qat_ste/ and tools/ had
    uncommitted changes), the command, the seed and the library versions."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--untracked-files=no", "--", "qat_ste", "tools")
    commit = git("rev-parse", "HEAD")
    versions = {"qat_ste": getattr(qat_ste, "__version__", None), "torch": torch.__version__,
                "python": platform.python_version()}
    for name in ("numpy", "torchvision"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"commit": commit.strip() if commit else None,
            "uncommitted_code_changes": None if changed is None else [line[3:] for line in changed.splitlines()],
            "command": command, "seed": seed, "versions": versions}


def machine_info(device: str | None = None) -> dict[str, Any]:
    """CPU (and GPU) name, torch version, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
    return info


# =============================================================================================
# Running
# =============================================================================================


@dataclass(frozen=True)
class GridOptions:
    """How the runs are executed."""

    runs_dir: Path = DEFAULT_RUNS_DIR
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    epochs_scale: float = 1.0
    instability_scale: float | None = None
    float_scale: float | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    command: str = ""  # the command line, stored in each record
    log: Callable[[str], None] = field(default=lambda message: _write_line(message))


def _write_line(message: str) -> None:
    """Print a line without breaking the progress bars."""
    from tqdm.auto import tqdm

    tqdm.write(message)


def build_model(net: str, data: NetData, recipes: Recipes) -> torch.nn.Module:
    """The float zoo network for ``net`` with the recipes' BatchNorm setting and this data's shape."""
    kwargs: dict[str, Any] = {"num_classes": data.train.info.num_classes, "in_channels": data.in_channels,
                              "bn_affine": recipes.bn_affine}
    if net == "lenet5":
        kwargs["image_size"] = data.image_size
    return create_zoo_model(net, **kwargs)


def quantized_model(net: str, bits: int, ste: str, data: NetData, recipes: Recipes) -> torch.nn.Module:
    """The zoo network with every ReLU quantized (fixed alpha by default, as [P1])."""
    return qat_ste.quantize(build_model(net, data, recipes), bits, ste, **recipes.quant_options(bits))


def run_settings(spec: RunSpec, data: NetData, recipes: Recipes, options: GridOptions,
                 parent_fingerprint: str | None) -> dict[str, Any]:
    """Everything that determines a run's result; its hash decides whether a stored run is reused."""
    return {
        "run_id": spec.run_id, "net": spec.net, "bits": spec.bits, "ste": spec.ste, "from_ste": spec.from_ste,
        "data": data.label, "train_images": len(data.train), "val_images": len(data.val),
        "augment": data.train.augment, "subset_seed": options.seed, "seed": options.seed,
        "phases": [{"label": label, **s.to_dict()} for label, s in spec.phases],
        "alpha": recipes.alpha_mode if spec.kind != "float" else None,  # key kept: stored runs resume
        "rounding": recipes.rounding if spec.kind != "float" else None,
        "bn_affine": recipes.bn_affine, "starts_from": parent_fingerprint,
    }


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short stable hash of a settings dict."""
    return hashlib.sha1(json.dumps(json_safe(settings), sort_keys=True).encode()).hexdigest()[:12]


def _safe(run_id: str) -> str:
    return run_id.replace("/", "__")


def weights_path(runs_dir: Path, run_id: str, digest: str) -> Path:
    """Where a finished run's final state_dict is kept."""
    return runs_dir / "weights" / f"{_safe(run_id)}-{digest}.pt"


def is_finished(record: Mapping[str, Any] | None, digest: str, runs_dir: Path) -> bool:
    """True when ``record`` is a completed run with these settings whose weights are still there."""
    return (record is not None and record.get("status") == "done" and record.get("fingerprint") == digest
            and weights_path(runs_dir, record["run_id"], digest).exists())


def _starting_model(spec: RunSpec, data: NetData, recipes: Recipes, parent_weights: Path | None) -> torch.nn.Module:
    if spec.kind == "float":
        return build_model(spec.net, data, recipes)
    assert parent_weights is not None and spec.bits is not None and spec.ste is not None
    state = torch.load(parent_weights, map_location="cpu", weights_only=True)
    if spec.kind == "grid":  # from the float weights, then quantize
        model = build_model(spec.net, data, recipes)
        model.load_state_dict(state)
        return qat_ste.quantize(model, spec.bits, spec.ste, **recipes.quant_options(spec.bits))
    # instability: the same quantized network with another STE (the STE only changes the backward pass)
    model = quantized_model(spec.net, spec.bits, spec.ste, data, recipes)
    model.load_state_dict(state)
    return model


def execute_run(
    spec: RunSpec,
    data: NetData,
    recipes: Recipes,
    options: GridOptions,
    settings: dict[str, Any],
    digest: str,
    parent: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Train one run (all its phases) with the qat_ste.train engine; returns its record.

    Each phase checkpoints every epoch under ``runs_dir/work``; an interrupted run continues from
    its last finished epoch when started again with the same settings."""
    started = time.perf_counter()
    parent_weights = weights_path(options.runs_dir, spec.depends_on, parent["fingerprint"]) if parent else None
    seed_everything(options.seed)  # before anything random: the model's initialization included
    model = _starting_model(spec, data, recipes, parent_weights)
    work = options.runs_dir / "work" / f"{_safe(spec.run_id)}-{digest}"
    history: list[dict[str, Any]] = []
    start_point: dict[str, Any] | None = None
    if spec.kind == "instability":  # epoch 0: the starting weights (the forward pass ignores the STE)
        start = evaluate(model, data.val, batch_size=256, device=_device_of(options.device))
        start_point = {"epoch": 0, "train_loss": parent.get("final_train_loss") if parent else None,
                       "val_loss": start["loss"], "val_accuracy": start["accuracy"]}
    status, message, offset, result = "done", "", 0, None
    for index, (label, schedule) in enumerate(spec.phases):
        phase_dir = work / f"phase{index}"
        last = phase_dir / "last.pt"
        config = TrainConfig(
            **schedule.to_train_kwargs(), device=options.device, seed=options.seed, out_dir=str(phase_dir),
            resume=str(last) if last.exists() else None, progress=options.progress, log_format="none",
            tensorboard=False, plot=False, print_summary=False,
        )
        try:
            result = train(model, data.train, data.val, config,
                           metadata={"title": f"{spec.run_id} - {label}", "run_id": spec.run_id})
        except TrainingDiverged as error:
            status, message = "diverged", error.problem
            break
        for row in result.history:
            history.append({**row, "phase": index, "phase_label": label, "epoch": offset + int(row["epoch"])})
        offset += schedule.epochs
        if result.stopped_early:
            raise KeyboardInterrupt(f"{spec.run_id} stopped ({result.stop_reason}); run again to resume")
    if status == "done":
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                           weights_path(options.runs_dir, spec.run_id, digest))
    wall = time.perf_counter() - started
    final = history[-1] if history else {}
    evaluated = [r for r in history if r.get("val_accuracy") is not None]
    record = {
        "run_id": spec.run_id, "kind": spec.kind, "net": spec.net, "bits": spec.bits, "ste": spec.ste,
        "from_ste": spec.from_ste, "role": spec.role, "depends_on": spec.depends_on, "status": status,
        "message": message, "fingerprint": digest, "settings": settings,
        "epochs": spec.epochs, "paper_epochs": spec.paper_epochs,
        "epochs_scale": _scale_of(spec, options),
        "data": data.label, "substitute_data": data.substitute,
        "train_images": len(data.train), "train_images_full": data.train_full,
        "val_images": len(data.val), "val_images_full": data.val_full,
        "final_train_loss": final.get("train_loss") if status == "done" else None,
        "final_val_accuracy_pct": 100.0 * evaluated[-1]["val_accuracy"] if evaluated and status == "done" else None,
        "best_val_accuracy_pct": 100.0 * max(r["val_accuracy"] for r in evaluated) if evaluated else None,
        "paper_train_loss": spec.paper.train_loss if spec.paper else None,
        "paper_val_accuracy_pct": spec.paper.val_accuracy_pct if spec.paper else None,
        "start": start_point, "history": history, "wall_time_s": wall,
        "device": result.device if result is not None else options.device,
        "machine": machine_info(result.device if result is not None else options.device),
        "engine": "qat_ste.train.engine.train", "finished_at": _now(),
        "provenance": provenance(options.command, options.seed),
    }
    shutil.rmtree(work, ignore_errors=True)  # the phase checkpoints are only needed to resume
    return record


def _scale_of(spec: RunSpec, options: GridOptions) -> float:
    if spec.kind == "instability" and options.instability_scale is not None:
        return options.instability_scale
    if spec.kind == "float" and options.float_scale is not None:
        return options.float_scale
    return options.epochs_scale


def _device_of(device: str) -> str | None:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def run_grid(
    plan: Sequence[RunSpec],
    recipes: Recipes,
    store: ResultsStore,
    data_for: Callable[[str], NetData],
    options: GridOptions,
) -> list[dict[str, Any]]:
    """Run every spec of ``plan`` in order, skipping those finished with the same settings.
    Returns the records of the plan's runs (stored, new, or skipped as blocked)."""
    from tqdm.auto import tqdm

    digests: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    bar = tqdm(plan, desc="reproduce [P1]", unit="run", disable=not options.progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.run_id)
        data = data_for(spec.net)
        parent = store.runs.get(spec.depends_on) if spec.depends_on else None
        parent_digest = digests.get(spec.depends_on) if spec.depends_on else None
        settings = run_settings(spec, data, recipes, options, parent_digest)
        digest = fingerprint(settings)
        digests[spec.run_id] = digest
        existing = store.runs.get(spec.run_id)
        if is_finished(existing, digest, options.runs_dir):
            options.log(f"skip {spec.run_id}: finished earlier with the same settings")
            records.append(existing)
            continue
        if spec.depends_on and not is_finished(parent, parent_digest or "", options.runs_dir):
            options.log(f"blocked {spec.run_id}: {spec.depends_on} did not finish")
            records.append({"run_id": spec.run_id, "status": "blocked"})
            continue
        options.log(f"run {spec.run_id}: {spec.epochs} epoch(s) (paper: {spec.paper_epochs}), "
                    f"{len(data.train)} training images, {data.label}")
        record = execute_run(spec, data, recipes, options, settings, digest, parent)
        store.put(record)
        records.append(record)
        options.log(_one_line(record))
    return records


def _one_line(record: Mapping[str, Any]) -> str:
    if record.get("status") != "done":
        return f"  {record['run_id']}: {record.get('status')} {record.get('message', '')}"
    return (f"  {record['run_id']}: train loss {_fmt_loss(record['final_train_loss'])}, "
            f"val acc {_fmt_acc(record['final_val_accuracy_pct'])} %, {_fmt_wall(record['wall_time_s'])} s")


# =============================================================================================
# Report
# =============================================================================================


def _fmt_loss(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.2e}" if abs(value) < 0.01 else f"{value:.3f}"


def _fmt_wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _done(store_runs: Mapping[str, Mapping[str, Any]], run_id: str) -> Mapping[str, Any] | None:
    record = store_runs.get(run_id)
    return record if record is not None and record.get("status") == "done" else None


def _scale_text(record: Mapping[str, Any]) -> str:
    parts = [f"{record['epochs']}/{record['paper_epochs']} ep"]
    if record["train_images"] < record["train_images_full"]:
        parts.append(f"{record['train_images']}/{record['train_images_full']} train img")
    if record["val_images"] < record["val_images_full"]:
        parts.append(f"{record['val_images']}/{record['val_images_full']} val img")
    return ", ".join(parts)


def is_reduced(record: Mapping[str, Any]) -> bool:
    """True when a run used fewer epochs or images than the paper."""
    return (record["epochs"] < record["paper_epochs"] or record["train_images"] < record["train_images_full"]
            or record["val_images"] < record["val_images_full"])


def ranking_verdict(cells: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """Test [P1]'s claim clipped_relu >= relu > identity on one (net, bits) row, by validation
    accuracy and by training loss. Returns (measured order, verdict)."""
    acc = {s: r["final_val_accuracy_pct"] for s, r in cells.items()}
    loss = {s: r["final_train_loss"] for s, r in cells.items()}
    order = " > ".join(f"{s} {acc[s]:.2f}" for s in sorted(acc, key=lambda s: -acc[s]))
    holds_acc = acc["clipped_relu"] >= acc["relu"] > acc["identity"]
    holds_loss = loss["clipped_relu"] <= loss["relu"] < loss["identity"]
    verdict = ("holds" if holds_acc else "does not hold") + " by val accuracy; " + \
              ("holds" if holds_loss else "does not hold") + " by training loss"
    return order, verdict


def summary_table(runs: Mapping[str, Mapping[str, Any]], recipes: Recipes) -> list[str]:
    """Markdown rows: every Table 1 cell, measured beside the paper's numbers."""
    lines = ["| net | bits | STE | train loss (measured) | train loss ([P1]) | val acc % (measured) | "
             "val acc % ([P1]) | scale | data | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for net, bits, ste in recipes.grid_cells():
        record = _done(runs, grid_id(net, bits, ste))
        paper = recipes.paper_result(net, bits, ste)
        p_loss = _fmt_loss(paper.train_loss) if paper else "-"
        p_acc = _fmt_acc(paper.val_accuracy_pct) if paper else "-"
        if record is None:
            status = (runs.get(grid_id(net, bits, ste)) or {}).get("status", "not run")
            lines.append(f"| {NET_TITLES.get(net, net)} | {bits} | {ste} | {status} | {p_loss} | {status} | "
                         f"{p_acc} | - | - | - |")
            continue
        lines.append(
            f"| {NET_TITLES.get(net, net)} | {bits} | {ste} | {_fmt_loss(record['final_train_loss'])} | {p_loss} | "
            f"{_fmt_acc(record['final_val_accuracy_pct'])} | {p_acc} | {_scale_text(record)} | "
            f"{_short_data(record)} | {_fmt_wall(record['wall_time_s'])} |")
    return lines


def _short_data(record: Mapping[str, Any]) -> str:
    return "MNIST-32 (substitute)" if record.get("substitute_data") else record["data"]


def missing_runs(runs: Mapping[str, Mapping[str, Any]], recipes: Recipes) -> tuple[list[str], list[str]]:
    """(runs of the full reproduction with no finished record, finished runs done at reduced scale)."""
    full = plan_runs(recipes, list(recipes.grid_nets), list(recipes.grid_bits), list(recipes.grid_stes))
    absent, reduced = [], []
    for spec in full:
        record = _done(runs, spec.run_id)
        if record is None:
            absent.append(spec.run_id)
        elif is_reduced(record) or record.get("substitute_data"):
            reduced.append(spec.run_id)
    return absent, reduced


def plot_instability(runs: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Training loss and validation error over epochs of the instability runs (PNG), or None when
    none has finished."""
    chosen = [r for r in runs.values() if r.get("kind") == "instability" and r.get("status") == "done"]
    if not chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    chosen.sort(key=lambda r: (r["bits"] != 4, r["role"] == "control", r["run_id"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    boundaries: set[int] = set()
    for record in chosen:
        points = ([record["start"]] if record.get("start") else []) + list(record["history"])
        epochs = [p["epoch"] for p in points]
        label = record["run_id"].split("/", 1)[1].replace("resnet20_", "")
        style = "--" if record["role"] == "control" else "-"
        loss = [p.get("train_loss") for p in points]
        err = [None if p.get("val_accuracy") is None else 100.0 * (1.0 - p["val_accuracy"]) for p in points]
        axes[0].plot(epochs, [math.nan if v is None else v for v in loss], style, marker="o", ms=3, label=label)
        axes[1].plot(epochs, [math.nan if v is None else v for v in err], style, marker="o", ms=3, label=label)
        offset = 0
        for phase in record["settings"]["phases"][:-1]:
            offset += phase["epochs"]
            boundaries.add(offset)
    for ax, title in zip(axes, ("training loss (mean over the epoch)", "validation error (%)"), strict=True):
        for b in sorted(boundaries):
            ax.axvline(b + 0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epoch (0 = starting weights)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"ResNet-20 on {_scale_caption(chosen)}: retraining STE-trained quantized weights with another "
                 "STE\n(dotted line: end of the lr 1e-5 phase)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _scale_caption(records: Sequence[Mapping[str, Any]]) -> str:
    """The data and scale of some runs, for a title: data set, images, epochs against the paper's."""
    first = records[0]
    data = "MNIST-32 (substitute for CIFAR-10)" if first.get("substitute_data") else first.get("data", "?")
    epochs = sorted({(r["epochs"], r["paper_epochs"]) for r in records})
    return (f"{data}, {first['train_images']} of {first['train_images_full']} training images, "
            + ", ".join(f"{e} of {p} epochs" for e, p in epochs) + ", one seed")


#: accuracy points within which a change counts as noise for one seed at reduced scale
INSTABILITY_NOISE_PTS = 1.0


def instability_verdict(record: Mapping[str, Any], chance_pct: float = 10.0) -> str:
    """A verdict on [P1]'s claim for one instability run, computed from its numbers: reproduced,
    not reproduced or inconclusive, with the numbers it rests on."""
    first = [h for h in record["history"] if h["phase"] == 0]
    start = record.get("start") or {}
    if not first or start.get("val_accuracy") is None or start.get("train_loss") is None:
        return "inconclusive: the run has no start or phase-1 numbers"
    acc0, acc1 = 100.0 * start["val_accuracy"], 100.0 * (first[-1].get("val_accuracy") or 0.0)
    loss0, loss1 = start["train_loss"], first[-1]["train_loss"]
    final = record["final_val_accuracy_pct"]
    phase1 = (f"phase 1 ({first[-1]['epoch']} ep at lr 1e-5): loss {loss0:.3f} -> {loss1:.3f}, val acc "
              f"{acc0:.2f} -> {acc1:.2f} %")
    if record["role"] == "control":
        moved = abs(final - acc0)
        return (f"control: {'stays near its start' if moved <= INSTABILITY_NOISE_PTS else 'moves'} "
                f"({acc0:.2f} -> {final:.2f} %); {phase1}")
    rose = loss1 > loss0 and acc1 < acc0 - INSTABILITY_NOISE_PTS
    fell = loss1 < loss0 and acc1 >= acc0 - INSTABILITY_NOISE_PTS
    p1 = ("reproduced" if rose else "not reproduced (loss fell, accuracy held or rose)" if fell
          else "inconclusive (within one-seed noise)")
    if len(record["settings"]["phases"]) == 1:  # the slow-degradation claim: the end against the start
        change = final - acc0
        verdict = ("reproduced" if change < -INSTABILITY_NOISE_PTS else "not reproduced" if change > 0
                   else "inconclusive (within one-seed noise)")
        return f"slow degradation: {verdict} ({acc0:.2f} -> {final:.2f} %); {phase1}"
    if final <= 2 * chance_pct:
        end = (f"ends much worse in direction ({acc0:.2f} -> {final:.2f} %, train loss "
               f"{record['final_train_loss']:.3f}), but as a collapse to near chance within the normal-schedule "
               "phase, which plain divergence at that lr would also give: inconclusive")
    elif final < acc0 - 5.0:
        end = f"ends much worse ({acc0:.2f} -> {final:.2f} %): reproduced"
    else:
        end = f"does not end much worse ({acc0:.2f} -> {final:.2f} %): not reproduced"
    return f"rise during the lr 1e-5 phase: {p1} [{phase1}]; end: {end}"


def write_report(store: ResultsStore, recipes: Recipes, report_path: Path, figures_dir: Path) -> str:
    """Write RESULTS.md (and the instability PNG) from every run in ``store``; returns the text."""
    runs = store.runs
    if not runs and Path(report_path).exists() and _has_measured_rows(Path(report_path).read_text(encoding="utf-8")):
        raise QatSteError(f"the results file {store.path} holds no run, and rewriting {report_path} from it would "
                          "erase the measured tables it has",
                          "pass --results with the file those runs were written to (or move the report away)")
    done = [r for r in runs.values() if r.get("status") == "done"]
    lines = _report_header(store, done)
    lines += _float_section(runs, recipes)
    lines += _table1_section(runs, done, recipes)
    lines += _ranking_section(runs, recipes)
    lines += _instability_section(runs, recipes, figures_dir)
    lines += _missing_section(runs, recipes)
    text = "\n".join(lines).rstrip() + "\n"
    old = Path(report_path).read_text(encoding="utf-8") if Path(report_path).exists() else ""
    kept = _p3_block(old)
    if kept is not None:  # the [P3] section is written by --p3 from its own results: keep it
        text = _with_p3_section(text, kept)
    for name, block in kept_blocks(old):  # so are the blocks other tools write (put_block)
        if block not in text:
            text = with_block(text, name, block)
    atomic_write_text(report_path, text)
    return text


def _has_measured_rows(text: str) -> bool:
    """Whether the [P1] part of a report (outside the named blocks) has a measured table row."""
    for block in [_p3_block(text) or ""] + [b for _, b in kept_blocks(text)]:
        text = text.replace(block, "") if block else text
    return any(line.startswith(tuple(f"| {t} |" for t in NET_TITLES.values())) and "not run" not in line
               for line in text.splitlines())


def block_markers(name: str) -> tuple[str, str]:
    """The begin and end comments of a named block of RESULTS.md."""
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def kept_blocks(text: str) -> list[tuple[str, str]]:
    """(name, block) of every named block in ``text`` except [P3]'s (kept by its own writer)."""
    import re

    out = []
    for match in re.finditer(r"<!-- (.+?): begin -->", text):
        name = match.group(1)
        if name == "[P3] section":
            continue
        end = text.find(block_markers(name)[1], match.start())
        if end > 0:
            out.append((name, text[match.start():end + len(block_markers(name)[1])]))
    return out


def with_block(text: str, name: str, block: str) -> str:
    """``text`` with block ``name`` replaced by ``block``; a new block goes right after the title's
    paragraphs when it is Table 1's, else before the [P3] section (or at the end)."""
    begin_marker, end_marker = block_markers(name)
    begin, end = text.find(begin_marker), text.find(end_marker)
    if begin >= 0 and end > begin:
        return text[:begin] + block + text[end + len(end_marker):]
    at = text.find("\n## ") + 1 if (begin_marker, end_marker) == (T1_BEGIN, T1_END) else text.find(P3_BEGIN)
    if at <= 0:
        return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    return text[:at] + block + "\n\n" + text[at:]


def put_block(report_path: Path, name: str, block_body: str) -> str:
    """Write ``block_body`` as the named block of ``report_path`` (replacing the previous one); returns
    the block. :func:`write_report` keeps such blocks."""
    begin, end = block_markers(name)
    block = f"{begin}\n{block_body.strip()}\n{end}"
    old = Path(report_path).read_text(encoding="utf-8") if Path(report_path).exists() else ""
    atomic_write_text(report_path, with_block(old, name, block))
    return block


def _report_header(store: ResultsStore, done: list[dict[str, Any]]) -> list[str]:
    """Title, provenance, the reduced-scale warning, machines, commands and total wall time."""
    lines = ["# Reproducing [P1] Table 1 and the instability runs", ""]
    lines += [f"Written by `python -m tools.reproduce_paper` on {_now()} from `{_rel(store.path)}` "
              f"({len(done)} finished run(s)). [P1] = Yin et al., *Understanding Straight-Through Estimator in "
              "Training Activation Quantized Neural Nets*, ICLR 2019. Recipes: `qat_ste/zoo/recipes.json` "
              "(see `model_zoo/README.md` for the choices the paper leaves open).", ""]
    reduced_any = any(is_reduced(r) for r in done)
    substitute_any = any(r.get("substitute_data") for r in done)
    if reduced_any or substitute_any:
        lines += ["> **REDUCED-SCALE RUNS.** " +
                  ("Fewer epochs and/or training images than the paper (the `scale` column gives the exact "
                   "numbers). " if reduced_any else "") +
                  ("VGG-11 and ResNet-20 ran on MNIST padded to 32x32 (1 channel) instead of CIFAR-10, so their "
                   "numbers are **not comparable** with the paper's CIFAR-10 numbers. " if substitute_any else "") +
                  "The measured columns test the *direction* of the paper's claims at this scale; they do not "
                  "reproduce its values.", ""]
    machines = sorted({_machine_text(r) for r in done})
    lines += ["## Machine", ""] + [f"- {m}" for m in machines] + [""]
    invocations = store.data.get("invocations", [])
    if invocations:
        lines += ["## Commands", ""]
        for inv in invocations:
            wall = inv.get("wall_time_s")
            lines.append(f"- `{inv.get('command', '')}` ({inv.get('started', '')}"
                         + (f", {wall / 60:.1f} min" if wall is not None else ", interrupted or running") + ")")
        lines.append("")
    total = sum(r.get("wall_time_s", 0.0) for r in done)
    lines += [f"Total training wall time of the finished runs: {total / 60:.1f} min.", ""]
    return lines


def _float_section(runs: Mapping[str, Mapping[str, Any]], recipes: Recipes) -> list[str]:
    """The float pre-training baselines."""
    lines = ["## Float baselines (pre-training)", "",
              "| net | data | epochs used / paper-scale | train images | val images | train loss | val acc % "
              "| wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for net in recipes.grid_nets:
        record = _done(runs, float_id(net))
        if record is None:
            lines.append(f"| {NET_TITLES.get(net, net)} | - | not run | - | - | - | - | - |")
            continue
        lines.append(f"| {NET_TITLES.get(net, net)} | {record['data']} | "
                     f"{record['epochs']} / {record['paper_epochs']} | "
                     f"{record['train_images']} / {record['train_images_full']} | "
                     f"{record['val_images']} / {record['val_images_full']} | "
                     f"{_fmt_loss(record['final_train_loss'])} | {_fmt_acc(record['final_val_accuracy_pct'])} | "
                     f"{_fmt_wall(record['wall_time_s'])} |")
    return lines


def _table1_section(runs: Mapping[str, Mapping[str, Any]], done: list[dict[str, Any]],
                    recipes: Recipes) -> list[str]:
    """[P1] Table 1 beside the measured cells, and the schedules actually used."""
    lines = ["", "## Table 1: training loss / validation accuracy, measured beside [P1]", "",
              "Measured: mean training cross-entropy over the last epoch (train mode) and validation accuracy "
              "after the last epoch. [P1]'s numbers are for the full schedules on MNIST (LeNet-5) and CIFAR-10 "
              "(VGG-11, ResNet-20).", ""]
    lines += summary_table(runs, recipes)
    lines += ["", "Schedules actually used (after `--epochs-scale`):", ""]
    for net in recipes.grid_nets:
        record = next((r for r in done if r["net"] == net and r["kind"] == "grid"), None)
        if record is not None:
            phase = record["settings"]["phases"][0]
            lines.append(f"- {NET_TITLES.get(net, net)}: {phase['epochs']} epochs (paper {record['paper_epochs']}), "
                         f"batch {phase['batch_size']}, lr {phase['lr']:g}, x{phase['gamma']:g} at "
                         f"{phase['milestones'] or 'no milestone'}, SGD momentum {phase['momentum']:g}, "
                         f"wd {phase['weight_decay']:g}; {record['train_images']} training images")
    return lines


def _ranking_section(runs: Mapping[str, Mapping[str, Any]], recipes: Recipes) -> list[str]:
    """Whether clipped_relu >= relu > identity holds, per (net, bits) row."""
    lines = ["", "## Does clipped_relu >= relu > identity hold?", "",
              "Tested per row on the measured numbers (not forced): validation accuracy "
              "clipped_relu >= relu > identity, and training loss clipped_relu <= relu < identity.", "",
              "| net | bits | measured order (val acc %) | verdict | float start (val acc %) |",
              "|---|---|---|---|---|"]
    any_row = False
    for net in recipes.grid_nets:
        for bits in recipes.grid_bits:
            cells = {s: _done(runs, grid_id(net, bits, s)) for s in ("identity", "relu", "clipped_relu")}
            if any(c is None for c in cells.values()):
                continue
            if len({_scale_key(c) for c in cells.values()}) > 1:
                lines.append(f"| {NET_TITLES.get(net, net)} | {bits} | - "
                             "| cells ran at different scales: not compared | - |")
                continue
            order, verdict = ranking_verdict(cells)  # type: ignore[arg-type]
            lines.append(f"| {NET_TITLES.get(net, net)} | {bits} | {order} | {verdict} | {_float_note(runs, net)} |")
            any_row = True
    if not any_row:
        lines.append("| - | - | no row has all three STEs finished | - | - |")
    lines += ["", "At reduced scale the differences between STEs can be within run-to-run noise (one seed per "
              "cell); a verdict here is about this run, not a refutation or confirmation of the paper.", ""]
    return lines


def _instability_section(runs: Mapping[str, Mapping[str, Any]], recipes: Recipes,
                         figures_dir: Path) -> list[str]:
    """The instability runs (table, [P1]'s claims, the figure)."""
    inst_done = [r for r in runs.values() if r.get("kind") == "instability" and r.get("status") == "done"]
    lines = ["## Instability runs (ResNet-20" + (f", {_scale_caption(inst_done)})" if inst_done else ")"), ""]
    figure = plot_instability(runs, figures_dir / INSTABILITY_FIGURE)
    inst = [r for r in runs.values() if r.get("kind") == "instability"]
    if inst:
        lines += ["Epoch 0 is the starting weights: their validation accuracy, and as training loss the last-epoch "
                  "loss of the run they come from (the forward pass does not depend on the STE). BatchNorm running "
                  "statistics keep updating in train mode, so validation numbers move a little even at lr 1e-5; "
                  "compare with the control.", "",
                  "| run | role | phases, epochs used | train loss: start / after phase 1 / final | "
                  "val acc %: start / after phase 1 / final | wall s |", "|---|---|---|---|---|---|"]
        for record in sorted(inst, key=lambda r: r["run_id"]):
            if record.get("status") != "done":
                lines.append(f"| {record['run_id']} | - | {record.get('status')} | - | - | - |")
                continue
            phases = record["settings"]["phases"]
            first = [h for h in record["history"] if h["phase"] == 0]
            start = record.get("start") or {}
            after = first[-1] if first else {}
            losses = (start.get("train_loss"), after.get("train_loss"), record["final_train_loss"])
            accs = [None if v is None else 100.0 * v for v in (start.get("val_accuracy"), after.get("val_accuracy"))]
            accs.append(record["final_val_accuracy_pct"])
            lines.append(
                f"| {record['run_id'].split('/', 1)[1]} | {record['role']} | "
                + " + ".join(f"{p['label']}: {p['epochs']} ep" for p in phases)
                + f" (paper {record['paper_epochs']}) | "
                + " / ".join(_fmt_loss(v) for v in losses) + " | " + " / ".join(_fmt_acc(v) for v in accs) + " | "
                f"{_fmt_wall(record['wall_time_s'])} |")
        ordered = sorted(inst, key=lambda r: r["run_id"])
        claims = [c for c in (_claim(recipes, r) for r in ordered) if c]
        lines += ["", "What [P1] reports for these runs (the control is ours):", ""] + [f"- {c}" for c in claims] + [""]
        done = [r for r in ordered if r.get("status") == "done"]
        if done:
            lines += [f"Verdicts, from the numbers above ({_scale_caption(done)}; a change under "
                      f"{INSTABILITY_NOISE_PTS:g} accuracy point counts as noise):", ""]
            lines += [f"- {r['run_id'].split('/', 1)[1]}: {instability_verdict(r)}" for r in done] + [""]
    else:
        lines += ["No instability run has been made yet.", ""]
    if figure is not None:
        lines += [f"![instability runs](figures/{figure.name})", ""]
    return lines


def _missing_section(runs: Mapping[str, Mapping[str, Any]], recipes: Recipes) -> list[str]:
    """The runs not finished, or finished only at reduced scale."""
    absent, reduced = missing_runs(runs, recipes)
    lines = ["## Missing", ""]
    if absent:
        lines += [f"Not run (or not finished) at any scale ({len(absent)}):", ""] + [f"- `{r}`" for r in absent] + [""]
    if reduced:
        lines += [f"Finished only at reduced scale or on substitute data, so still missing at the paper's scale "
                  f"({len(reduced)}):", ""] + [f"- `{r}`" for r in reduced] + [""]
    if not absent and not reduced:
        lines += ["Nothing: every run of the reproduction finished at the paper's scale.", ""]
    return lines


def _float_note(runs: Mapping[str, Mapping[str, Any]], net: str) -> str:
    """The float baseline's accuracy, flagged when it is too low for the row to say much."""
    record = _done(runs, float_id(net))
    if record is None or record.get("final_val_accuracy_pct") is None:
        return "-"
    accuracy = record["final_val_accuracy_pct"]
    return _fmt_acc(accuracy) + (" (**uninformative**: the float model barely trained)" if accuracy < 50 else "")


def _claim(recipes: Recipes, record: Mapping[str, Any]) -> str:
    name = record["run_id"].split("/", 1)[1]
    run = next((r for r in recipes.instability if r.name == name), None)
    return f"{name}: {run.claim}" if run and run.claim else ""


def _scale_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (record["epochs"], record["train_images"], record["val_images"], record["data"])


def _machine_text(record: Mapping[str, Any]) -> str:
    m = record.get("machine", {})
    text = f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, torch threads {m.get('torch_threads', '?')})"
    if m.get("gpu"):
        text += f", GPU {m['gpu']}"
    device = f", device {record['device']}" if record.get("device") else ""
    return text + f"{device}, torch {m.get('torch', '?')}, Python {m.get('python', '?')}"


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# =============================================================================================
# [P3]: full quantization (quantized weights + 4-bit activations), BCGD against BinaryConnect
# =============================================================================================

P3_FORMAT = "qat_ste.reproduce_paper.p3/1"
DEFAULT_P3_RESULTS = REPO_ROOT / "model_zoo" / "results" / "p3"
P3_BEGIN, P3_END = "<!-- [P3] section: begin -->", "<!-- [P3] section: end -->"
#: the block of RESULTS.md written by tools/paper_table1.py (kept by write_report)
T1_NAME = "Table 1 MNIST paper scale"
T1_BEGIN, T1_END = f"<!-- {T1_NAME}: begin -->", f"<!-- {T1_NAME}: end -->"
P3_ACT_BITS = 4
P3_WEIGHT_BITS: dict[str, int | str] = {"binary": 1, "ternary": "ternary"}
P3_METHODS = ("bcgd", "binaryconnect")
#: [P3]'s published figures that our reference notes hold (ImageNet top-1 %, ResNet-18, 4-bit activations)
P3_PAPER = (
    ("ResNet-18, ImageNet, binary weights + 4-bit activations, BCGD", 64.36),
    ("ResNet-18, ImageNet, binary weights + 4-bit activations, BinaryConnect", 62.98),
    ("ResNet-18, ImageNet, binary weights + 4-bit activations, BCGD, first and last layers float", 65.46),
)


@dataclass(frozen=True)
class P3Run:
    """One run of the [P3] grid: ``float`` pre-training, ``act`` (4-bit activations, float weights),
    or ``full`` (quantized weights + 4-bit activations) trained with ``method``."""

    run_id: str                       # "p3/lenet5/float/seed0", "p3/lenet5/binary-bcgd/seed1"
    kind: str
    net: str
    seed: int
    schedule: Schedule
    weights: str | None = None        # "binary" | "ternary"
    method: str | None = None         # "bcgd" | "binaryconnect"
    depends_on: str | None = None

    @property
    def cell(self) -> str:
        """The table row this run belongs to."""
        return {"float": "float", "act": f"{P3_ACT_BITS}-bit activations only"}.get(
            self.kind, f"{self.weights} + {P3_ACT_BITS}-bit act, {self.method}")


@dataclass(frozen=True)
class P3Options:
    """What the [P3] grid runs and where its results go."""

    results_dir: Path = DEFAULT_P3_RESULTS
    runs_dir: Path = DEFAULT_RUNS_DIR
    nets: tuple[str, ...] = ("lenet5",)
    weights: tuple[str, ...] = ("binary", "ternary")
    methods: tuple[str, ...] = P3_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs_scale: float = 0.04
    float_scale: float | None = None
    lr: float | None = None            # None: the recipe's quantized-training lr
    bcgd_rho: float = 1e-5
    device: str = "cpu"
    progress: bool = False
    command: str = ""                  # the command line, stored in each result
    log: Callable[[str], None] = field(default=lambda message: _write_line(message))


def plan_p3(recipes: Recipes, options: P3Options) -> list[P3Run]:
    """Per net and seed: float pre-training, the activation-only run, then every weights x method cell."""
    bad = [w for w in options.weights if w not in P3_WEIGHT_BITS]
    if bad:
        raise QatSteError(f"[P3] weights {bad} are not binary/ternary", "use --p3-weights binary,ternary")
    bad = [m for m in options.methods if m not in P3_METHODS]
    if bad:
        raise QatSteError(f"[P3] methods {bad} are unknown", f"use --p3-methods {','.join(P3_METHODS)}")
    plan: list[P3Run] = []
    for net in options.nets:
        recipe = recipes.nets[net]
        pre = recipe.pretrain.scaled(options.epochs_scale if options.float_scale is None else options.float_scale)
        quant = recipe.quant.scaled(options.epochs_scale)
        if options.lr is not None:
            quant = dataclasses.replace(quant, lr=options.lr)
        for seed in options.seeds:
            base = f"p3/{net}/float/seed{seed}"
            plan.append(P3Run(base, "float", net, seed, pre))
            plan.append(P3Run(f"p3/{net}/act{P3_ACT_BITS}/seed{seed}", "act", net, seed, quant, depends_on=base))
            plan += [P3Run(f"p3/{net}/{w}-{m}/seed{seed}", "full", net, seed, quant, w, m, base)
                     for w in options.weights for m in options.methods]
    return plan


def p3_model(run: P3Run, data: NetData, recipes: Recipes, float_state: Mapping[str, Any] | None,
             bcgd_rho: float) -> torch.nn.Module:
    """The network of ``run``: float, or quantized from the float weights ([P3]: clipped_relu STE,
    bcgd-learned steps; the weights of every Conv/Linear quantized, first and last included)."""
    model = build_model(run.net, data, recipes)
    if run.kind == "float":
        return model
    assert float_state is not None
    model.load_state_dict(float_state)
    options: dict[str, Any] = {"alpha_mode": "bcgd"}
    if run.kind == "full":
        assert run.weights is not None and run.method is not None
        options.update(weight_bits=P3_WEIGHT_BITS[run.weights], weight_method=run.method, bcgd_rho=bcgd_rho,
                       keep_first_weights=False, keep_last_weights=False)
    return qat_ste.quantize(model, P3_ACT_BITS, "clipped_relu", **options)


def _p3_settings(run: P3Run, data: NetData, options: P3Options, parent: str | None) -> dict[str, Any]:
    return {"run_id": run.run_id, "kind": run.kind, "net": run.net, "seed": run.seed, "weights": run.weights,
            "method": run.method, "bcgd_rho": options.bcgd_rho if run.method == "bcgd" else None,
            "act_bits": P3_ACT_BITS if run.kind != "float" else None, "data": data.label,
            "train_images": len(data.train), "val_images": len(data.val), "schedule": run.schedule.to_dict(),
            "starts_from": parent}


def p3_result_path(results_dir: Path, run_id: str) -> Path:
    """The JSON file of one [P3] run (committed with the repository)."""
    return Path(results_dir) / f"{_safe(run_id.removeprefix('p3/'))}.json"


def load_records(results_dir: Path, fmt: str) -> dict[str, dict[str, Any]]:
    """run_id -> record of every JSON result file of format ``fmt`` in ``results_dir`` (unreadable
    files and files of another format are skipped)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("format") == fmt:
            found[record["run_id"]] = record
    return found


def load_p3_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """run_id -> record of every [P3] result file in ``results_dir`` (files of another format are skipped)."""
    return load_records(results_dir, P3_FORMAT)


def _p3_train(run: P3Run, model: torch.nn.Module, data: NetData, options: P3Options, digest: str) -> Any:
    work = options.runs_dir / "p3-work" / f"{_safe(run.run_id)}-{digest}"
    last = work / "last.pt"
    config = TrainConfig(**run.schedule.to_train_kwargs(), device=options.device, seed=run.seed,
                         out_dir=str(work), resume=str(last) if last.exists() else None, progress=options.progress,
                         log_format="none", tensorboard=False, plot=False, print_summary=False, verbose=False)
    result = train(model, data.train, data.val, config, metadata={"title": run.run_id, "run_id": run.run_id})
    if result.stopped_early:
        raise KeyboardInterrupt(f"{run.run_id} stopped ({result.stop_reason}); run again to resume")
    shutil.rmtree(work, ignore_errors=True)
    return result


def execute_p3_run(run: P3Run, data: NetData, recipes: Recipes, options: P3Options, settings: dict[str, Any],
                   digest: str, float_weights: Path | None) -> dict[str, Any]:
    """Train one [P3] run; returns its record (its float weights are kept under ``runs_dir``)."""
    started = time.perf_counter()
    state = torch.load(float_weights, map_location="cpu", weights_only=True) if float_weights else None
    seed_everything(run.seed)  # before anything random: the model's initialization included
    model = p3_model(run, data, recipes, state, options.bcgd_rho)
    status, message, result = "done", "", None
    try:
        result = _p3_train(run, model, data, options, digest)
    except TrainingDiverged as error:
        status, message = "diverged", error.problem
    if run.kind == "float" and status == "done":
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                    weights_path(options.runs_dir / "p3", run.run_id, digest))
    history = list(result.history) if result is not None else []
    evaluated = [r for r in history if r.get("val_accuracy") is not None]
    return {
        "format": P3_FORMAT, "run_id": run.run_id, "kind": run.kind, "cell": run.cell, "net": run.net,
        "seed": run.seed, "weights": run.weights, "method": run.method, "status": status, "message": message,
        "fingerprint": digest, "settings": settings, "epochs": run.schedule.epochs,
        "paper_epochs": recipes.nets[run.net].quant.epochs, "data": data.label,
        "train_images": len(data.train), "train_images_full": data.train_full,
        "val_images": len(data.val), "val_images_full": data.val_full,
        "final_train_loss": history[-1].get("train_loss") if history and status == "done" else None,
        "final_val_accuracy_pct": 100.0 * evaluated[-1]["val_accuracy"] if evaluated and status == "done" else None,
        "weight_codes": _distinct_codes(model) if run.kind == "full" else None,
        "history": history, "wall_time_s": time.perf_counter() - started,
        "device": result.device if result is not None else options.device,
        "machine": machine_info(options.device), "finished_at": _now(), "command": options.command,
        "provenance": provenance(options.command, run.seed),
    }


def _distinct_codes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Per quantized-weight layer, the distinct codes its trained weights take."""
    from qat_ste.quantizer.weight import quant_weight_layers

    out = {}
    for name, layer in quant_weight_layers(model):
        codes, _ = layer.weight_quantizer.codes_and_scale(layer.weight)
        out[name] = [int(v) for v in torch.unique(codes)]
    return out


def _p3_needs_run(run: P3Run, plan: Sequence[P3Run], records: Mapping[str, Mapping[str, Any]],
                  digests: Mapping[str, str], options: P3Options) -> bool:
    """A run is redone when its record is missing or stale; a float run also when a dependant must
    run and its weights are gone."""
    record = records.get(run.run_id)
    if record is None or record.get("status") != "done" or record.get("fingerprint") != digests[run.run_id]:
        return True
    if run.kind != "float":
        return False
    kept = weights_path(options.runs_dir / "p3", run.run_id, digests[run.run_id]).exists()
    dependants = [r for r in plan if r.depends_on == run.run_id]
    return not kept and any(_p3_needs_run(r, plan, records, digests, options) for r in dependants)


def run_p3(plan: Sequence[P3Run], recipes: Recipes, data_for: Callable[[str], NetData],
           options: P3Options) -> list[dict[str, Any]]:
    """Run the [P3] plan, skipping runs whose result file holds the same settings; each finished run
    is written at once to ``results_dir/<net>__<cell>__seed<k>.json``. Returns the plan's records."""
    records = load_p3_results(options.results_dir)
    digests: dict[str, str] = {}
    for run in plan:
        parent = digests.get(run.depends_on) if run.depends_on else None
        digests[run.run_id] = fingerprint(_p3_settings(run, data_for(run.net), options, parent))
    out = []
    for run in plan:
        data, digest = data_for(run.net), digests[run.run_id]
        if not _p3_needs_run(run, plan, records, digests, options):
            options.log(f"skip {run.run_id}: finished earlier with the same settings")
            out.append(records[run.run_id])
            continue
        parent_weights = None
        if run.depends_on:
            parent_weights = weights_path(options.runs_dir / "p3", run.depends_on, digests[run.depends_on])
            if not parent_weights.exists():
                options.log(f"blocked {run.run_id}: {run.depends_on} did not finish")
                out.append({"run_id": run.run_id, "status": "blocked"})
                continue
        options.log(f"run {run.run_id}: {run.schedule.epochs} epoch(s), {len(data.train)} training images")
        settings = _p3_settings(run, data, options, digests.get(run.depends_on) if run.depends_on else None)
        record = execute_p3_run(run, data, recipes, options, settings, digest, parent_weights)
        options.results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p3_result_path(options.results_dir, run.run_id),
                          json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
        records[run.run_id] = record
        out.append(record)
        options.log(_one_line(record))
    return out


def _mean_spread(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sample standard deviation (0 for one value), min, max)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, min(values), max(values)


def p3_table(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows: per net and cell, validation accuracy mean ± std over seeds, min-max, training loss."""
    lines = ["| net | row | seeds | val acc % (mean ± std) | min - max | train loss (mean) | epochs | "
             "train / val images | wall s (mean) |", "|---|---|---|---|---|---|---|---|---|"]
    order = ["float", f"{P3_ACT_BITS}-bit activations only"] + [
        f"{w} + {P3_ACT_BITS}-bit act, {m}" for w in P3_WEIGHT_BITS for m in P3_METHODS]
    done = [r for r in records.values() if r.get("status") == "done" and r.get("final_val_accuracy_pct") is not None]
    for net in dict.fromkeys(r["net"] for r in done):
        for cell in order:
            rows = sorted((r for r in done if r["net"] == net and r["cell"] == cell), key=lambda r: r["seed"])
            if not rows:
                continue
            mean, std, lo, hi = _mean_spread([r["final_val_accuracy_pct"] for r in rows])
            loss = sum(r["final_train_loss"] for r in rows) / len(rows)
            wall = sum(r["wall_time_s"] for r in rows) / len(rows)
            lines.append(f"| {NET_TITLES.get(net, net)} | {cell} | {', '.join(str(r['seed']) for r in rows)} | "
                         f"{mean:.2f} ± {std:.2f} | {lo:.2f} - {hi:.2f} | {_fmt_loss(loss)} | "
                         f"{rows[0]['epochs']} | {rows[0]['train_images']} / {rows[0]['val_images']} | "
                         f"{_fmt_wall(wall)} |")
    return lines


def _p3_paired(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """BCGD minus BinaryConnect per seed (same float start, same data order)."""
    done = {r["run_id"]: r for r in records.values() if r.get("status") == "done"}
    lines = []
    for net in dict.fromkeys(r["net"] for r in done.values()):
        for weights in P3_WEIGHT_BITS:
            diffs = []
            for r in done.values():
                if r["net"] == net and r.get("weights") == weights and r.get("method") == "bcgd":
                    other = done.get(r["run_id"].replace(f"{weights}-bcgd", f"{weights}-binaryconnect"))
                    if other is not None:
                        diffs.append(r["final_val_accuracy_pct"] - other["final_val_accuracy_pct"])
            if diffs:
                mean, std, lo, hi = _mean_spread(diffs)
                verdict = ("BCGD ahead in every seed" if lo > 0 else "BinaryConnect ahead in every seed" if hi < 0
                           else "no consistent sign: within seed noise")
                lines.append(f"- {NET_TITLES.get(net, net)}, {weights}: BCGD − BinaryConnect = {mean:+.2f} ± {std:.2f} "
                             f"points over {len(diffs)} seed(s) (min {lo:+.2f}, max {hi:+.2f}; {verdict})")
    return lines


def p3_section(records: Mapping[str, Mapping[str, Any]], results_dir: Path, commands: Sequence[str]) -> str:
    """The [P3] section of RESULTS.md (between its begin/end markers)."""
    done = [r for r in records.values() if r.get("status") == "done"]
    lines = [P3_BEGIN, "## [P3] Full quantization: BCGD against BinaryConnect", "",
             "[P3] = Yin, Zhang, Lyu, Osher, Qi, Xin, *Blended coarse gradient descent for full quantization of deep "
             "neural networks*, Res. Math. Sci. 2019. Quantized weights (binary: mean|W|·sign(W); ternary: threshold "
             "0.7·mean|W|, least-squares scale; every Conv/Linear, first and last included) with 4-bit activations "
             "(clipped_relu STE, bcgd-learned steps), trained from the float network of the same seed with BCGD "
             "(w ← (1 − ρ)w + ρQ(w) − η·g at Q(w), ρ = 1e-5 as the authors' code) or BinaryConnect (ρ = 0). "
             f"Per-run results: `{_rel(results_dir)}/*.json` ({len(done)} finished).", ""]
    if done:
        lines += p3_table(records) + [""]
        paired = _p3_paired(records)
        if paired:
            lines += ["Paired difference (each seed's BCGD and BinaryConnect runs start from the same float weights "
                      "and see the same batches):", ""] + paired + [""]
        sample = next((r for r in done if r["kind"] != "float"), done[0])
        schedule = sample["settings"]["schedule"]
        floats = [r for r in done if r["kind"] == "float"]
        float_text = f"float pre-training {floats[0]['epochs']} epoch(s); " if floats else ""
        steps = math.ceil(sample["train_images"] / schedule["batch_size"]) * sample["epochs"]
        total = sum(r.get("wall_time_s", 0.0) for r in done)
        lines += [f"Scale: {float_text}{sample['epochs']} epoch(s) of quantized training from those weights "
                  f"(the LeNet-5 recipe: {sample['paper_epochs']}; the `epochs` column counts the run's own), "
                  f"batch {schedule['batch_size']}, lr {schedule['lr']:g}, SGD momentum {schedule['momentum']:g}, "
                  f"wd {schedule['weight_decay']:g}; {sample['train_images']} of {sample['train_images_full']} "
                  f"training images, {sample['val_images']} of {sample['val_images_full']} validation images "
                  f"({sample['data']}); {steps} optimizer steps per quantized run. Total wall time of the runs: "
                  f"{total / 60:.1f} min on {_machine_text(sample)} (shared with other jobs, so wall times vary).",
                  ""]
    else:
        lines += ["No [P3] run has finished yet.", ""]
    lines += ["[P3]'s published figures (the ones our reference notes hold):", "",
              "| setting | top-1 % ([P3]) |", "|---|---|"] + [f"| {s} | {v:.2f} |" for s, v in P3_PAPER] + [""]
    lines += ["What is and is not comparable: [P3]'s figures are ImageNet ResNet-18 after full training; the rows "
              "above are LeNet-5 on an MNIST subset for a few epochs on a CPU. Only the *direction* (BCGD ≥ "
              "BinaryConnect, the cost of binary vs ternary weights against the activation-only and float rows) can be "
              "compared, not the values. With ρ = 1e-5 and a few hundred steps the blend moves the float weights by "
              "at most ρ·steps (under 1 %) of their distance to Q(w), so at this scale BCGD and BinaryConnect are "
              "expected to stay within seed noise; [P3]'s gain (+1.38 points on ImageNet) comes over hundreds of "
              "thousands of steps. The CIFAR-10 "
              "ResNet-20 rows run only with `--cifar10 FOLDER` (skipped here: no CIFAR-10; no MNIST-32 substitute is "
              "run for them).", ""]
    if commands:
        lines += ["Command(s):", ""] + [f"- `{c}`" for c in commands] + [""]
    lines.append(P3_END)
    return "\n".join(lines)


def write_p3_report(report_path: Path, results_dir: Path, commands: Sequence[str] = ()) -> str:
    """Put the [P3] section into ``report_path`` (replacing the previous one, or appended); returns it.
    The [P1] part of the file is left as it is."""
    records = load_p3_results(results_dir)
    if not commands:
        commands = sorted({c for r in records.values() for c in [r.get("command")] if c})
    section = p3_section(records, results_dir, commands)
    old = Path(report_path).read_text(encoding="utf-8") if Path(report_path).exists() else ""
    atomic_write_text(report_path, _with_p3_section(old, section))
    return section


def _with_p3_section(text: str, section: str) -> str:
    """``text`` with its [P3] block replaced by ``section`` (appended when it has none)."""
    begin, end = text.find(P3_BEGIN), text.find(P3_END)
    if begin >= 0 and end > begin:
        return text[:begin] + section + text[end + len(P3_END):]
    return (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"


def _p3_block(text: str) -> str | None:
    begin, end = text.find(P3_BEGIN), text.find(P3_END)
    return text[begin:end + len(P3_END)] if begin >= 0 and end > begin else None


def _net_data_source(args: argparse.Namespace, recipes: Recipes, subset_seed: int) -> Callable[[str], NetData]:
    """``data_for(net)``: each net's data, loaded once (the data sets shared through one cache)."""
    cache: dict[tuple[str, str], TensorImageDataset] = {}
    loaded: dict[str, NetData] = {}

    def data_for(net: str) -> NetData:
        if net not in loaded:
            loaded[net] = load_net_data(net, recipes, args.mnist.expanduser(),
                                        args.cifar10.expanduser() if args.cifar10 else None,
                                        args.train_subset, args.val_subset, subset_seed, cache)
        return loaded[net]

    return data_for


def _p3_main(args: argparse.Namespace, argv: list[str], recipes: Recipes) -> int:
    """``--p3``: run the [P3] grid and write its section of the report."""
    results_dir = args.p3_results
    command = "python -m tools.reproduce_paper " + " ".join(argv)
    if args.report_only:
        write_p3_report(args.report, results_dir)
        print(f"wrote the [P3] section of {args.report}")
        return 0
    nets = args.nets or ["lenet5"]
    if "resnet20" in nets and args.cifar10 is None:
        print("[P3] ResNet-20 rows need --cifar10 FOLDER: skipped (no MNIST substitute for them)", file=sys.stderr)
        nets = [n for n in nets if n != "resnet20"]
    if not nets:
        raise QatSteError("no [P3] net left to run", "pass --nets lenet5, or --cifar10 FOLDER for resnet20")
    check_mnist_folder(args.mnist.expanduser())
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    options = P3Options(results_dir=results_dir, runs_dir=args.runs_dir, nets=tuple(nets),
                        weights=tuple(args.p3_weights), methods=tuple(args.p3_methods), seeds=tuple(args.seeds),
                        epochs_scale=args.epochs_scale, float_scale=args.float_epochs_scale, lr=args.p3_lr,
                        bcgd_rho=args.bcgd_rho, device=args.device, progress=not args.no_progress,
                        command=command)
    plan = plan_p3(recipes, options)
    data_for = _net_data_source(args, recipes, subset_seed=0)

    def log_with_command(message: str) -> None:
        _write_line(message)

    records = run_p3(plan, recipes, data_for, dataclasses.replace(options, log=log_with_command))
    for record in records:  # remember the command in every result it produced
        path = p3_result_path(results_dir, record["run_id"])
        if record.get("status") == "done" and path.exists() and not record.get("command"):
            record["command"] = command
            atomic_write_text(path, json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
    write_p3_report(args.report, results_dir)
    print("\n".join(p3_table(load_p3_results(results_dir))))
    print(f"\nwrote the [P3] section of {args.report} and {_rel(results_dir)}/")
    return 0


# =============================================================================================
# Command line
# =============================================================================================


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give a comma-separated list")
        return [kind(t) for t in items]
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="folder of the four MNIST IDX files "
                   "(default: ../shared/data/mnist next to the repository)")
    p.add_argument("--cifar10", type=Path, default=None, help="cifar-10-batches-py folder: run VGG-11/ResNet-20 on "
                   "CIFAR-10 as the paper (default: MNIST padded to 32x32 as a substitute)")
    p.add_argument("--nets", type=_csv(str), default=None, help="comma-separated, default lenet5,vgg11,resnet20")
    p.add_argument("--bits", type=_csv(int), default=None, help="comma-separated, default 2,4")
    p.add_argument("--stes", type=_csv(str), default=None, help="comma-separated, default identity,relu,clipped_relu")
    p.add_argument("--epochs-scale", type=_positive_float, default=1.0,
                   help="multiply every epoch count and milestone (e.g. 0.1); 1 = the paper's schedules")
    p.add_argument("--float-epochs-scale", type=_positive_float, default=None,
                   help="epoch scale of the float pre-training (default: --epochs-scale)")
    p.add_argument("--instability-scale", type=_positive_float, default=None,
                   help="epoch scale of the instability runs (default: --epochs-scale)")
    p.add_argument("--train-subset", type=int, default=None, help="train on a fixed random subset of N images")
    p.add_argument("--val-subset", type=int, default=None, help="validate on a fixed random subset of N images")
    p.add_argument("--no-instability", action="store_true", help="skip the instability runs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="weights and resumable checkpoints")
    p.add_argument("--results", type=Path, default=None, help="results JSON (default RUNS_DIR/results.json)")
    p.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="the RESULTS.md to write")
    p.add_argument("--figures", type=Path, default=DEFAULT_FIGURES, help="folder of the report's PNGs")
    p.add_argument("--recipes", type=Path, default=None,
                   help="recipes JSON (default: the package's qat_ste/zoo/recipes.json)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the results file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("[P3] full quantization (BCGD vs BinaryConnect)")
    g.add_argument("--p3", action="store_true", help="run the [P3] grid (LeNet-5 on MNIST; ResNet-20 only with "
                   "--cifar10) instead of [P1]'s, and write its section of the report")
    g.add_argument("--p3-weights", type=_csv(str), default=["binary", "ternary"], help="default binary,ternary")
    g.add_argument("--p3-methods", type=_csv(str), default=list(P3_METHODS), help="default bcgd,binaryconnect")
    g.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="[P3] seeds, default 0,1,2")
    g.add_argument("--p3-lr", type=_positive_float, default=None,
                   help="learning rate of the quantized runs (default: the recipe's)")
    g.add_argument("--bcgd-rho", type=float, default=1e-5, help="BCGD's blend factor rho (default 1e-5)")
    g.add_argument("--p3-results", type=Path, default=DEFAULT_P3_RESULTS,
                   help="folder of the per-run [P3] JSON results (default model_zoo/results/p3)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args, list(sys.argv[1:] if argv is None else argv))
    except QatSteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    recipes = load_recipes(args.recipes)
    if args.p3:
        return _p3_main(args, argv, recipes)
    store = ResultsStore(args.results or args.runs_dir / "results.json")
    if args.report_only:
        write_report(store, recipes, args.report, args.figures)
        print(f"wrote {args.report}")
        return 0
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    nets = args.nets or list(recipes.grid_nets)
    plan = plan_runs(recipes, nets, args.bits or list(recipes.grid_bits), args.stes or list(recipes.grid_stes),
                     args.epochs_scale, args.instability_scale, not args.no_instability, args.float_epochs_scale)
    needs_mnist = any(recipes.nets[s.net].dataset == "mnist" or args.cifar10 is None for s in plan)
    if needs_mnist:
        check_mnist_folder(args.mnist.expanduser())
    options = GridOptions(runs_dir=args.runs_dir, device=args.device, seed=args.seed, progress=not args.no_progress,
                          epochs_scale=args.epochs_scale, instability_scale=args.instability_scale,
                          float_scale=args.float_epochs_scale,
                          train_subset=args.train_subset, val_subset=args.val_subset,
                          command="python -m tools.reproduce_paper " + " ".join(argv))
    data_for = _net_data_source(args, recipes, subset_seed=args.seed)

    started, clock = _now(), time.perf_counter()
    index = store.add_invocation({"command": "python -m tools.reproduce_paper " + " ".join(argv), "started": started,
                                  "wall_time_s": None, "machine": machine_info(_device_of(args.device))})
    try:
        run_grid(plan, recipes, store, data_for, options)
    finally:
        store.data["invocations"][index]["wall_time_s"] = time.perf_counter() - clock
        store.save()
        write_report(store, recipes, args.report, args.figures)
    print()
    print("\n".join(summary_table(store.runs, recipes)))
    print(f"\nwrote {args.report} and {store.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

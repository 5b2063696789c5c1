"""The state of a running training loop (:class:`Run`) and its checkpoint: what ``last.pt`` holds,
writing it, checking on resume that it belongs to this run, and putting it back."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler

from ..data.loaders import TrainLoader
from ..errors import QatSteError
from .checkpoint import CHECKPOINT_FORMAT, atomic_save, atomic_write_bytes, capture_rng_state, restore_rng_state
from .config import TrainConfig, TrainingDiverged
from .distributed import DistInfo, gather_to_main

__all__ = ["RESUME_METADATA_KEYS", "EpochMeter", "Run", "check_resume_config", "check_resume_metadata",
           "diverged", "plain", "restore", "resume_path", "save_checkpoint"]

#: metadata entries that must match on resume: what the model, its data (and a streamed folder's
#: preprocessing), its quantization and the calibration of its steps are
RESUME_METADATA_KEYS = ("model", "data", "quant", "calibration", "num_classes", "in_channels", "image_size",
                        "stage", "preprocess")

#: settings whose change on resume is warned about (the run will not match an uninterrupted one)
RESUME_CONFIG_KEYS = ("epochs", "batch_size", "optimizer", "lr", "schedule", "milestones", "warmup_epochs", "seed",
                      "weight_decay", "momentum", "amp", "grad_clip", "label_smoothing", "distill_weight",
                      "distill_temperature", "ema_decay", "freeze_bn_after_steps")


@dataclass
class EpochMeter:
    """Sums over the current epoch's steps (global over ranks)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    time_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """Plain-Python form (what checkpoints store)."""
        return asdict(self)


@dataclass
class Run:
    """Everything a running training loop holds."""

    config: TrainConfig
    model: nn.Module  # the module as given (what checkpoints store)
    step_model: nn.Module  # DDP and/or compiled wrapper used for training steps
    eager_model: nn.Module  # the model or its DDP wrapper, never compiled
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: Any
    loader: TrainLoader  # TensorLoader or StreamLoader
    val_data: Any
    dist: DistInfo
    device: torch.device
    amp: str
    channels_last: bool
    compiled: bool
    out_dir: Path | None
    metadata: dict[str, Any]
    criterion: nn.Module
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    meter: EpochMeter = field(default_factory=EpochMeter)
    best_metric: float | None = None
    best_epoch: int | None = None
    last_checkpoint: Path | None = None
    train_images: float = 0.0
    train_time_s: float = 0.0
    compile_verified: bool = False
    input_dtype: torch.dtype | None = None
    project_alphas: Callable[[], None] = lambda: None  # AlphaProjector of the model, after each step

    @property
    def files(self) -> bool:
        """Whether this process writes files (rank 0 with an out_dir)."""
        return self.out_dir is not None and self.dist.is_main


# ---- writing last.pt ------------------------------------------------------------------------------


def save_checkpoint(run: Run, epoch_done: bool, best: bool = False) -> None:
    """Write last.pt (and best.pt) on rank 0; every rank must call it (RNG states are gathered)."""
    if run.out_dir is None:
        return
    if not _params_finite(run.model):
        raise diverged(run, "a weight became NaN or infinite")
    rng_states = gather_to_main(capture_rng_state(), run.dist)
    if not run.files:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rng_states,
        "epoch": run.epoch,
        "epoch_done": epoch_done,
        "step": run.step,
        "loader": run.loader.state_dict(),
        "epoch_meter": run.meter.to_dict(),
        "history": run.history,
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "train_images": run.train_images,
        "train_time_s": run.train_time_s,
        "config": run.config.to_dict(),
        "metadata": run.metadata,
        "world_size": run.dist.world_size,
        "torch_version": str(torch.__version__),
    }
    last = run.out_dir / "last.pt"
    atomic_save(state, last)
    run.last_checkpoint = last
    if best:
        atomic_write_bytes(run.out_dir / "best.pt", last.read_bytes())


def _params_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter is finite (one device synchronisation in all)."""
    flags = [torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point()]
    return not flags or bool(torch.stack(flags).all())


def diverged(run: Run, what: str) -> TrainingDiverged:
    """The error for a run that went non-finite at its current step, naming the checkpoint it keeps."""
    kept = str(run.last_checkpoint) if run.last_checkpoint is not None else None
    where = f"at epoch {run.epoch + 1}, step {run.step + 1}"
    kept_text = (f"the last good checkpoint {kept} is kept" if kept else
                 "no checkpoint was written before it" if run.out_dir is not None else "no out_dir was set")
    return TrainingDiverged(
        f"training stopped: {what} {where}; {kept_text}",
        "lower the learning rate (lr), add warmup (warmup_epochs) or gradient clipping (grad_clip), or check "
        "the data for NaNs; then resume from the checkpoint with the new settings or start afresh",
        step=run.step, last_checkpoint=kept)


def plain(value: Any, where: str) -> Any:
    """``value`` as plain Python (what a weights-only checkpoint can hold); Paths become strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise QatSteError(f"{where} holds a {type(value).__name__}; checkpoints store only plain values",
                      "pass strings, numbers, booleans, lists and dicts of them")


# ---- resuming -------------------------------------------------------------------------------------


def resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint a run resumes from (``resume=True``: out_dir/last.pt), or None."""
    if config.resume is None or config.resume is False:
        return None
    if config.resume is True:
        if config.out_dir is None:
            raise QatSteError("resume=True needs out_dir (it resumes from out_dir/last.pt)",
                              "set out_dir, or pass resume= the checkpoint path")
        return Path(config.out_dir) / "last.pt"
    return Path(str(config.resume)).expanduser()


def check_resume_config(saved: dict[str, Any], config: TrainConfig) -> None:
    """Warn when settings that shape the run differ from the checkpoint's."""
    current = config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in RESUME_CONFIG_KEYS
               if k in saved and saved[k] != current[k]]
    if changed:
        warnings.warn("resuming with settings that differ from the checkpoint's, so the run will not match an "
                      "uninterrupted one: " + "; ".join(changed), stacklevel=4)


def check_resume_metadata(saved: dict[str, Any], current: dict[str, Any], config: TrainConfig,
                          path: Path | None) -> None:
    """Refuse (or, with force_resume, warn) when the checkpoint was written for another model, data,
    quantization or calibration than this run's: the weights would be trained and saved under the
    wrong labels."""
    differences: list[str] = []
    saved = saved if isinstance(saved, dict) else {}
    for key in RESUME_METADATA_KEYS:
        if key in saved and key in current:
            differences += _differences(key, saved[key], current[key])
    if not differences:
        return
    text = f"checkpoint {path} was written for a different run: " + "; ".join(differences)
    if config.force_resume:
        warnings.warn(f"{text}; resuming anyway (force_resume)", stacklevel=4)
        return
    raise QatSteError(text, "pass --force-resume (TrainConfig.force_resume=True) to resume anyway, or use "
                            "another --out (out_dir) to start afresh")


#: settings that change how a run executes, not what it trains: a resume may change them
EXECUTION_ONLY = frozenset({"quant.kernel"})


def _differences(key: str, saved: Any, now: Any) -> list[str]:
    """``key: saved -> now`` for each difference; dicts compare their common entries one by one
    (entries in :data:`EXECUTION_ONLY`, e.g. the quantizer's kernel, are not compared)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for sub in [k for k in saved if k in now and f"{key}.{k}" not in EXECUTION_ONLY]:
            out += _differences(f"{key}.{sub}", saved[sub], now[sub])
        return out
    return [] if saved == now else [f"{key}: {saved!r} -> {now!r}"]


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put a checkpoint's optimizer, schedule, scaler, loader position, counters, history and RNG
    states into ``run`` (the model's weights are loaded before the optimizer is built)."""
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        _restore_scheduler(run.scheduler, run.optimizer, state["scheduler"], int(state["step"]))
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        raise QatSteError(f"the checkpoint's optimizer/scheduler state does not fit this run ({error})",
                          "resume with the same model and optimizer settings as the interrupted run") from None
    run.loader.load_state_dict(state["loader"])
    run.epoch = int(state["epoch"])
    run.step = int(state["step"])
    run.history = list(state.get("history") or [])
    run.meter = EpochMeter(**state["epoch_meter"]) if not state.get("epoch_done") else EpochMeter()
    run.best_metric = state.get("best_metric")
    run.best_epoch = state.get("best_epoch")
    run.train_images = float(state.get("train_images", 0.0))
    run.train_time_s = float(state.get("train_time_s", 0.0))
    rng = state.get("rng") or []
    if rng:
        restore_rng_state(rng[run.dist.rank] if run.dist.rank < len(rng) else rng[0])


#: entries of a scheduler's state that say where it is, not what schedule it follows
_POSITION_KEYS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial"})


def _schedule_settings(state: Any) -> Any:
    """A scheduler state without its position: equal for two schedulers that follow the same schedule."""
    if isinstance(state, dict):
        return {k: _schedule_settings(v) for k, v in state.items() if k not in _POSITION_KEYS}
    if isinstance(state, (list, tuple)):
        return [_schedule_settings(v) for v in state]
    return state


def _restore_scheduler(scheduler: LRScheduler, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                       step: int) -> None:
    """Load the saved schedule state when it is this run's schedule (exact resume); otherwise (a
    checkpoint from before the torch schedulers, or changed schedule settings) step this run's
    schedule from its start to ``step``, so the LR follows the current settings."""
    if _schedule_settings(saved) == _schedule_settings(scheduler.state_dict()):
        scheduler.load_state_dict(saved)
        return
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the LR at step 0 (the optimizer state holds the saved run's)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(step):
            scheduler.step()

"""The settings of a training run (:class:`TrainConfig`), what it produced (:class:`TrainResult`) and
the error a diverged run raises (:class:`TrainingDiverged`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import QatSteError
from ..validation import check_choice
from .distill import check_distill
from .ema import check_decay
from .metrics import LOG_FORMATS, format_table

__all__ = ["AMP_MODES", "AUTO", "OPTIMIZERS", "SCHEDULES", "TrainConfig", "TrainResult", "TrainingDiverged",
           "check_int"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
AUTO = "auto"


@dataclass
class TrainConfig:
    """Every setting of a training run (plain values only, so it is stored in checkpoints).

    - ``epochs``, ``batch_size`` (per process; the global batch is ``batch_size x world_size``),
      ``eval_batch_size`` (default: 2 x batch_size), ``drop_last``.
    - ``optimizer`` (``sgd``/``adamw``), ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
      ``norm_weight_decay`` and ``alpha_weight_decay`` (decay of normalisation parameters and
      learned steps alpha; 0 by default), ``alpha_lr`` (None: ``lr``), ``label_smoothing``,
      ``grad_clip`` (max global gradient norm, None: off).
    - ``schedule`` (``cosine``/``multistep``/``constant``, stepped every iteration), ``milestones``
      (epochs; None: half and three quarters of ``epochs``), ``gamma``, ``warmup_epochs`` (may be
      fractional; linear warmup from ``warmup_start_factor x lr``).
    - ``amp``: ``auto`` (bf16 autocast on CUDA, off on CPU), ``bf16``, ``fp16`` (CUDA, with a grad
      scaler) or ``off``. ``compile`` and ``channels_last``: True/False or ``auto`` (on with CUDA).
    - ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``. ``seed``.
    - ``out_dir``: where ``last.pt``, ``best.pt``, the metrics log and ``curves.png`` go (None:
      write nothing). ``checkpoint_every_steps``: also write ``last.pt`` every N steps (0: only per
      epoch). ``eval_every``: evaluate every N epochs (and after the last).
    - ``progress`` (tqdm bar), ``verbose`` (one line per epoch and notes such as calibration or
      resume), ``log_format`` (``csv``/``jsonl``/``none``), ``tensorboard`` (used if installed),
      ``plot``, ``print_summary`` (the table at the end).
    - ``resume``: a checkpoint path, or True for ``out_dir/last.pt``. ``force_resume``: resume even
      when the checkpoint's metadata (model, data, quantization) differs from this run's (a warning
      instead of an error). ``stop_after_steps``: stop (saving ``last.pt``) once this many optimizer
      steps are done in total, as if interrupted.
    - ``calibrate_batches``/``calibrate_method``: calibration of still-uninitialised quantizers.
    - ``sync_bn`` (SyncBatchNorm under DDP), ``find_unused_parameters`` (DDP).
    - ``workers``: data loading worker processes per rank for streamed data (None: automatic).
    - Fine-tuning recipe: ``distill_weight`` (w in [0, 1]; > 0 needs ``train(..., teacher=)``) and
      ``distill_temperature`` (T) of the distillation loss (1 - w)·CE + w·T²·KL(teacher/T ‖ student/T)
      (qat_ste.train.distill); ``ema_decay`` (None: off) keeps an EMA of the weights that is
      evaluated, picks best.pt and is left in the model at the end (qat_ste.train.ema);
      ``freeze_bn_after_steps`` (None: never) puts BatchNorm in eval mode from that step on
      (qat_ste.train.bn_policy).
    """

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int | None = None
    drop_last: bool = False
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    norm_weight_decay: float = 0.0
    alpha_weight_decay: float = 0.0
    alpha_lr: float | None = None
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    schedule: str = "cosine"
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    amp: str = AUTO
    compile: bool | str = AUTO
    channels_last: bool | str = AUTO
    device: str = AUTO
    seed: int = 0
    out_dir: str | None = None
    eval_every: int = 1
    checkpoint_every_steps: int = 0
    progress: bool = True
    verbose: bool = True
    log_format: str = "csv"
    tensorboard: bool = True
    plot: bool = True
    print_summary: bool = True
    resume: str | bool | None = None
    force_resume: bool = False
    stop_after_steps: int | None = None
    calibrate_batches: int = 4
    calibrate_method: str = "mse"
    sync_bn: bool = False
    find_unused_parameters: bool = False
    workers: int | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    ema_decay: float | None = None
    freeze_bn_after_steps: int | None = None

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)
        if isinstance(self.resume, Path):
            self.resume = str(self.resume)
        if self.milestones is not None:
            self.milestones = tuple(int(m) for m in self.milestones)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("eval_every", self.eval_every, 1)
        check_int("checkpoint_every_steps", self.checkpoint_every_steps, 0)
        check_int("calibrate_batches", self.calibrate_batches, 1)
        if self.stop_after_steps is not None:
            check_int("stop_after_steps", self.stop_after_steps, 1)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("log_format", self.log_format, LOG_FORMATS)
        if not isinstance(self.force_resume, bool):
            raise QatSteError(f"force_resume={self.force_resume!r} must be True or False", "pass force_resume=True")
        for name in ("compile", "channels_last"):
            if getattr(self, name) not in (True, False, AUTO):
                raise QatSteError(f"{name}={getattr(self, name)!r} is not valid", f"use True, False or '{AUTO}'")
        for name in ("lr", "momentum", "weight_decay", "norm_weight_decay", "alpha_weight_decay", "gamma",
                     "warmup_epochs", "label_smoothing"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise QatSteError(f"{name}={value!r} must be a finite number >= 0", f"pass e.g. {name}=0.1")
        if self.lr <= 0:
            raise QatSteError(f"lr={self.lr} must be > 0", "pass a positive learning rate, e.g. lr=0.05")
        if self.alpha_lr is not None and not (isinstance(self.alpha_lr, (int, float)) and self.alpha_lr > 0):
            raise QatSteError(f"alpha_lr={self.alpha_lr!r} must be > 0 or None", "pass e.g. alpha_lr=0.01, or None")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise QatSteError(f"grad_clip={self.grad_clip!r} must be > 0 or None", "pass e.g. grad_clip=5.0")
        if not 0 < self.warmup_start_factor <= 1:
            raise QatSteError(f"warmup_start_factor={self.warmup_start_factor} must be in (0, 1]", "use e.g. 0.1")
        if self.label_smoothing >= 1:
            raise QatSteError(f"label_smoothing={self.label_smoothing} must be < 1", "use e.g. 0.1")
        if self.workers is not None:
            check_int("workers", self.workers, 0)
        check_distill(self.distill_weight, self.distill_temperature)
        if self.ema_decay is not None:
            self.ema_decay = check_decay(self.ema_decay)
        if self.freeze_bn_after_steps is not None:
            check_int("freeze_bn_after_steps", self.freeze_bn_after_steps, 0)
        if self.milestones is not None and any(m < 1 for m in self.milestones):
            raise QatSteError(f"milestones {self.milestones} must be epochs >= 1", "pass e.g. milestones=(30, 60)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (what checkpoints store)."""
        out = asdict(self)
        out["milestones"] = list(self.milestones) if self.milestones is not None else None
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def check_int(name: str, value: Any, minimum: int) -> int:
    """Validate an integer option (not a bool) that must be at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise QatSteError(f"{name}={value!r} must be an integer >= {minimum}", f"pass e.g. {name}={max(minimum, 1)}")
    return int(value)


@dataclass
class TrainResult:
    """What a run produced. ``history`` has one dict per epoch (see metrics.HISTORY_COLUMNS).

    ``stop_reason`` (when ``stopped_early``): ``"interrupted (Ctrl-C)"`` for SIGINT, ``"SIGTERM"``
    for SIGTERM, ``"stop_after_steps=N"``."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    final_val_accuracy: float | None = None
    final_val_loss: float | None = None
    final_train_loss: float | None = None
    final_train_accuracy: float | None = None
    epochs_completed: int = 0
    steps: int = 0
    images_per_s: float = 0.0
    train_time_s: float = 0.0
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None
    metrics_path: str | None = None
    plot_path: str | None = None
    stopped_early: bool = False
    stop_reason: str = ""
    device: str = "cpu"
    world_size: int = 1
    amp: str = "off"
    compiled: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for JSON reports)."""
        return asdict(self)

    def table(self) -> str:
        """The summary table printed at the end of a run."""
        best = None if self.best_val_accuracy is None else f"{self.best_val_accuracy:.4f} (epoch {self.best_epoch})"
        rows = [
            ("epochs completed", self.epochs_completed), ("optimizer steps", self.steps),
            ("final train loss", self.final_train_loss), ("final train accuracy", self.final_train_accuracy),
            ("final val loss", self.final_val_loss), ("final val accuracy", self.final_val_accuracy),
            ("best val accuracy", best), ("images/s (train)", round(self.images_per_s, 1)),
            ("train time (s)", round(self.train_time_s, 1)),
            ("device", f"{self.device} x {self.world_size}" if self.world_size > 1 else self.device),
            ("amp / compiled", f"{self.amp} / {'yes' if self.compiled else 'no'}"),
            ("last checkpoint", self.last_checkpoint), ("best checkpoint", self.best_checkpoint),
            ("metrics", self.metrics_path), ("curves", self.plot_path),
        ]
        if self.stopped_early:
            rows.append(("stopped early", self.stop_reason))
        return format_table(rows, title="training summary")


class TrainingDiverged(QatSteError):
    """The loss (or a gradient norm, or a weight) became NaN or infinite; the run stopped."""

    def __init__(self, problem: str, fix: str, *, step: int, last_checkpoint: str | None) -> None:
        super().__init__(problem, fix)
        self.step = step
        self.last_checkpoint = last_checkpoint

"""The training engine: one plain loop for float and quantized models, on CPU, one GPU or many.

    from qat_ste.train import TrainConfig, train, evaluate
    result = train(qmodel, train_set, val_set, TrainConfig(epochs=5, lr=0.01, out_dir="runs/x"))

What a run does, in order (in the spirit of torchvision's references/classification/train.py):

1. Pick the device (``auto``: ``cuda:LOCAL_RANK`` if there is a GPU, else CPU) and, under
   ``torchrun``, join the process group (NCCL on GPU, gloo on CPU). Each rank reads its shard of
   every epoch through :class:`~qat_ste.train.data.TensorLoader`, so the global batch is
   ``batch_size x world_size``.
2. On resume, load model, optimizer, scheduler, grad scaler, loader position, RNG states, history
   and best metric from ``last.pt``; the run then continues exactly as if never stopped. A checkpoint
   whose ``metadata`` (model, data, quantization) differs from this run's is refused unless
   ``force_resume``.
3. Quantized sites whose step alpha is not initialised yet are calibrated on a few training batches
   (``qat_ste.calibrate`` averages the ranges over ranks, so all ranks start identical).
4. Optimizer groups: weights with ``weight_decay``; normalisation parameters and the learned steps
   alpha without decay (``norm_weight_decay`` / ``alpha_weight_decay``, both 0 by default).
5. Per step: forward (bf16 autocast on CUDA by default), cross-entropy, backward, optional gradient
   clipping, optimizer step, ``qat_ste.project_alphas``, per-step LR schedule (warmup then
   multistep / cosine / constant). A non-finite loss stops the run before the update, keeping the
   last good checkpoint.
6. Per epoch: evaluation, a history row (CSV or JSON lines, TensorBoard if installed), ``last.pt``
   and ``best.pt`` (atomic, with a digest checked on load). ``last.pt`` is also written every
   ``checkpoint_every_steps`` steps and when the run is stopped by Ctrl-C or SIGTERM (the first
   signal stops after the current step; ``TrainResult.stop_reason`` says which) or by
   ``stop_after_steps``. Temporary files that an interrupted write left in ``out_dir`` are removed
   when a run starts there.
7. At the end: a PNG of the curves and a summary table. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..atomic import remove_stale_temp_files
from ..errors import QatSteError
from ..nn_utils import logits_of
from ..quantize import AlphaProjector, calibrate, quant_modules
from .checkpoint import (
    CHECKPOINT_FORMAT, atomic_save, atomic_write_bytes, capture_rng_state, load_checkpoint, load_model_state,
    restore_rng_state,
)
from .data import TensorImageDataset, TensorLoader
from .distributed import (
    DistInfo, all_reduce_sum, barrier, env_world, gather_to_main, resolve_device, setup_distributed,
    teardown_distributed,
)
from .config import AMP_MODES, AUTO, OPTIMIZERS, SCHEDULES, TrainConfig, TrainingDiverged, TrainResult
from .evaluation import evaluate
from .metrics import MetricsLog, plot_curves
from .optim import NORM_TYPES, build_optimizer, build_scheduler, lr_factor, parameter_groups
from .precision import autocast, input_dtype, prepare_inputs, resolve_flags, upcast
from .signals import STOP_SIGNALS, StopRequest

__all__ = [
    "AMP_MODES", "AUTO", "NORM_TYPES", "OPTIMIZERS", "SCHEDULES", "TrainConfig", "TrainResult", "TrainingDiverged", "train", "evaluate", "parameter_groups",
    "build_optimizer", "build_scheduler", "lr_factor",
]

#: the former name of :class:`~qat_ste.train.signals.StopRequest`
_StopRequest = StopRequest


# =============================================================================================
# The run
# =============================================================================================


@dataclass
class _EpochMeter:
    """Sums over the current epoch's steps (global over ranks)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    time_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class _Run:
    """Everything a running training loop holds."""

    config: TrainConfig
    model: nn.Module  # the module as given (what checkpoints store)
    step_model: nn.Module  # DDP and/or compiled wrapper used for training steps
    eager_model: nn.Module  # the model or its DDP wrapper, never compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    loader: TensorLoader
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
    meter: _EpochMeter = field(default_factory=_EpochMeter)
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
        return self.out_dir is not None and self.dist.is_main


def _as_train_loader(data: Any, config: TrainConfig, info: DistInfo, device: torch.device) -> TensorLoader:
    if isinstance(data, TensorLoader):
        if (data.rank, data.world_size) != (info.rank, info.world_size):
            raise QatSteError(
                f"the TensorLoader is set up for rank {data.rank} of {data.world_size}, but this process is "
                f"rank {info.rank} of {info.world_size}",
                "pass the TensorImageDataset itself and let train() shard it, or build the loader with "
                "rank=RANK, world_size=WORLD_SIZE",
            )
        return data
    if isinstance(data, TensorImageDataset):
        return TensorLoader(data, config.batch_size, shuffle=True, seed=config.seed, drop_last=config.drop_last,
                            rank=info.rank, world_size=info.world_size, device=device)
    raise QatSteError(
        f"train() needs the training data as a TensorImageDataset or TensorLoader, got {type(data).__name__}",
        "load it with qat_ste.train.data.load_dataset(spec, 'train') (or wrap your tensors in "
        "TensorImageDataset(images_uint8, labels, info))",
    )


def _uninitialised_sites(model: nn.Module) -> list[str]:
    return [name for name, m in quant_modules(model) if not m.is_initialized]


def _calibrate_if_needed(model: nn.Module, train_data: Any, config: TrainConfig, info: DistInfo,
                         device: torch.device, say: Any) -> None:
    missing = _uninitialised_sites(model)
    if not missing:
        return
    dataset = train_data.dataset if isinstance(train_data, TensorLoader) else train_data
    loader = TensorLoader(dataset.with_augment(False), config.batch_size, shuffle=True, seed=config.seed + 7919,
                          rank=info.rank, world_size=info.world_size, device=device)
    say(f"calibrating {len(missing)} quantized site(s) on {min(config.calibrate_batches, len(loader))} "
        f"batch(es) ({config.calibrate_method})")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batches = (images.to(dtype) for images, _ in loader)
    calibrate(model, batches, config.calibrate_method, num_batches=config.calibrate_batches)


def _wrap_model(model: nn.Module, config: TrainConfig, info: DistInfo, device: torch.device,
                compile_: bool) -> tuple[nn.Module, nn.Module]:
    """(model for training steps, its uncompiled form): DDP under torchrun, then torch.compile."""
    eager = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        eager = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)
    return (torch.compile(eager) if compile_ else eager), eager


def _check_resume_config(saved: dict[str, Any], config: TrainConfig) -> None:
    """Warn when settings that shape the run differ from the checkpoint's."""
    keys = ("epochs", "batch_size", "optimizer", "lr", "schedule", "milestones", "warmup_epochs", "seed",
            "weight_decay", "momentum", "amp", "grad_clip")
    current = config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if k in saved and saved[k] != current[k]]
    if changed:
        warnings.warn("resuming with settings that differ from the checkpoint's, so the run will not match an "
                      "uninterrupted one: " + "; ".join(changed), stacklevel=4)


#: metadata entries that must match on resume: what the model, its data and its quantization are
RESUME_METADATA_KEYS = ("model", "data", "quant", "num_classes", "in_channels", "image_size", "stage")


def _check_resume_metadata(saved: dict[str, Any], current: dict[str, Any], config: TrainConfig,
                           path: Path | None) -> None:
    """Refuse (or, with force_resume, warn) when the checkpoint was written for another model, data
    or quantization than this run's: the weights would be trained and saved under the wrong labels."""
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


def _differences(key: str, saved: Any, now: Any) -> list[str]:
    """``key: saved -> now`` for each difference; dicts compare their common entries one by one."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for sub in [k for k in saved if k in now]:
            out += _differences(f"{key}.{sub}", saved[sub], now[sub])
        return out
    return [] if saved == now else [f"{key}: {saved!r} -> {now!r}"]


def _open_out_dir(run: _Run, say: Callable[[str], None]) -> MetricsLog:
    """Create out_dir, remove the temporary files an interrupted write left there, open the log."""
    out_dir = Path(str(run.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temp_files(out_dir)
    if removed:
        say(f"removed {len(removed)} temporary file(s) that an interrupted write left in {out_dir}: "
            + ", ".join(p.name for p in removed[:5]))
    log = MetricsLog(out_dir, run.config.log_format, tensorboard=run.config.tensorboard)
    log.restart(run.history)
    return log


def _stop_message(run: _Run, reason: str) -> str:
    """What a stopped run prints: why, where, and how to continue."""
    if run.last_checkpoint is None:
        return f"stopped ({reason}) at step {run.step}; no checkpoint was written (no out_dir)"
    return (f"stopped ({reason}) at step {run.step}; saved {run.last_checkpoint}: to continue, run again "
            "with resume=True (qat-ste convert --resume)")


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume is None or config.resume is False:
        return None
    if config.resume is True:
        if config.out_dir is None:
            raise QatSteError("resume=True needs out_dir (it resumes from out_dir/last.pt)",
                              "set out_dir, or pass resume= the checkpoint path")
        return Path(config.out_dir) / "last.pt"
    return Path(str(config.resume)).expanduser()


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain Python (what a weights-only checkpoint can hold); Paths become strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise QatSteError(f"{where} holds a {type(value).__name__}; checkpoints store only plain values",
                      "pass strings, numbers, booleans, lists and dicts of them")


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


def _save_checkpoint(run: _Run, epoch_done: bool, best: bool = False) -> None:
    """Write last.pt (and best.pt) on rank 0; every rank must call it (RNG states are gathered)."""
    if run.out_dir is None:
        return
    if not _params_finite(run.model):
        raise _diverged(run, "a weight became NaN or infinite")
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


def _diverged(run: _Run, what: str) -> TrainingDiverged:
    kept = str(run.last_checkpoint) if run.last_checkpoint is not None else None
    where = f"at epoch {run.epoch + 1}, step {run.step + 1}"
    kept_text = (f"the last good checkpoint {kept} is kept" if kept else
                 "no checkpoint was written before it" if run.out_dir is not None else "no out_dir was set")
    return TrainingDiverged(
        f"training stopped: {what} {where}; {kept_text}",
        "lower the learning rate (lr), add warmup (warmup_epochs) or gradient clipping (grad_clip), or check "
        "the data for NaNs; then resume from the checkpoint with the new settings or start afresh",
        step=run.step, last_checkpoint=kept)


def _restore(run: _Run, state: dict[str, Any]) -> None:
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise QatSteError(f"the checkpoint's optimizer/scheduler state does not fit this run ({error})",
                          "resume with the same model and optimizer settings as the interrupted run") from None
    run.loader.load_state_dict(state["loader"])
    run.epoch = int(state["epoch"])
    run.step = int(state["step"])
    run.history = list(state.get("history") or [])
    run.meter = _EpochMeter(**state["epoch_meter"]) if not state.get("epoch_done") else _EpochMeter()
    run.best_metric = state.get("best_metric")
    run.best_epoch = state.get("best_epoch")
    run.train_images = float(state.get("train_images", 0.0))
    run.train_time_s = float(state.get("train_time_s", 0.0))
    rng = state.get("rng") or []
    if rng:
        restore_rng_state(rng[run.dist.rank] if run.dist.rank < len(rng) else rng[0])


def _train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, stop: StopRequest
                ) -> tuple[list[float], str]:
    """One optimizer step. Returns the global (loss sum, correct, count) and the signal ("SIGINT",
    "SIGTERM", or "" for none) with which any rank asked to stop (read after the backward pass, so a
    signal during this step stops after it; SIGTERM wins, so every rank stops the same way at the same
    step). Raises TrainingDiverged (before updating the weights) on a non-finite loss or gradient norm."""
    images, labels = prepare_inputs(images, labels, run.device, run.channels_last, run.input_dtype)
    run.optimizer.zero_grad(set_to_none=True)
    with autocast(run.device, run.amp):
        logits = logits_of(run.step_model(images))
    loss = run.criterion(upcast(logits), labels)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()
    grad_norm = None
    if run.config.grad_clip is not None:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    n = labels.numel()
    exact = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
    zero = torch.zeros((), dtype=exact, device=loss.device)
    stats = torch.stack([
        loss.detach().to(exact) * n,
        (logits.detach().argmax(1) == labels).sum().to(exact),
        zero + n,
        zero + (1.0 if stop.requested else 0.0),
        grad_norm.detach().to(exact) if grad_norm is not None and run.scaler is None else zero,
        zero + (1.0 if stop.signal == "SIGTERM" else 0.0),
    ])
    values = all_reduce_sum(stats).tolist()
    if not math.isfinite(values[0]):
        raise _diverged(run, f"the loss became {values[0]}")
    if not math.isfinite(values[4]):
        raise _diverged(run, f"the gradient norm became {values[4]}")
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.project_alphas()
    run.scheduler.step()
    run.step += 1
    return values[:3], "SIGTERM" if values[5] > 0 else "SIGINT" if values[3] > 0 else ""


def _is_compile_error(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor"))


def _checked_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, stop: StopRequest
                  ) -> tuple[list[float], str]:
    """A training step; if torch.compile fails on the very first one, warn and continue eagerly."""
    if not run.compiled or run.compile_verified:
        return _train_step(run, images, labels, stop)
    try:
        out = _train_step(run, images, labels, stop)
    except Exception as error:  # only compiler failures are handled; anything else propagates
        if not _is_compile_error(error):
            raise
        warnings.warn(f"torch.compile failed on this model ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); "
                      "training continues without compiling (pass compile=False to skip the attempt)",
                      stacklevel=2)
        run.step_model, run.compiled = run.eager_model, False
        out = _train_step(run, images, labels, stop)
    run.compile_verified = True
    return out


def _progress_bar(run: _Run) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=len(run.loader), initial=run.loader.batch_index, leave=False, dynamic_ncols=True,
                desc=f"epoch {run.epoch + 1}/{run.config.epochs}",
                disable=not (run.config.progress and run.dist.is_main), unit="batch")


def _train_one_epoch(run: _Run, stop: StopRequest) -> str:
    """Run the rest of the current epoch. Returns '' when it completed, else why it stopped."""
    run.step_model.train()
    run.loader.set_epoch(run.epoch)
    if run.loader.batch_index >= len(run.loader):  # saved right after the epoch's last step
        return ""
    bar = _progress_bar(run)
    every = run.config.checkpoint_every_steps
    try:
        tick = time.perf_counter()
        for images, labels in run.loader:
            (loss_sum, correct, count), stop_now = _checked_step(run, images, labels, stop)
            now = time.perf_counter()
            run.meter.time_s += now - tick
            run.meter.loss_sum += loss_sum
            run.meter.correct += correct
            run.meter.count += count
            run.train_images += count
            run.train_time_s += now - tick
            bar.update(1)
            if bar.n % 5 == 0 or bar.n == bar.total:
                bar.set_postfix(loss=f"{run.meter.loss_sum / run.meter.count:.4f}",
                                acc=f"{run.meter.correct / run.meter.count:.3f}",
                                img_s=f"{run.meter.count / max(run.meter.time_s, 1e-9):.0f}", refresh=False)
            reason = ""
            if stop_now:
                reason = STOP_SIGNALS[stop_now]
                stop.handled = True
            elif run.config.stop_after_steps is not None and run.step >= run.config.stop_after_steps:
                reason = f"stop_after_steps={run.config.stop_after_steps}"
            if reason:
                _save_checkpoint(run, epoch_done=False)
                return reason
            last_batch = run.loader.batch_index >= len(run.loader)
            if every and run.step % every == 0 and not last_batch:
                _save_checkpoint(run, epoch_done=False)
            tick = time.perf_counter()
        return ""
    finally:
        bar.close()


def _finish_epoch(run: _Run, log: MetricsLog | None, say: Any) -> None:
    config = run.config
    epoch = run.epoch
    evaluate_now = run.val_data is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs)
    val = None
    if evaluate_now:
        val = evaluate(run.model, run.val_data, config.eval_batch_size or 2 * config.batch_size, run.device,
                       amp=run.amp, channels_last=run.channels_last)
    meter = run.meter
    row = {
        "epoch": epoch + 1,
        "step": run.step,
        "lr": float(run.optimizer.param_groups[0]["lr"]),
        "train_loss": meter.loss_sum / meter.count if meter.count else None,
        "train_accuracy": meter.correct / meter.count if meter.count else None,
        "val_loss": val["loss"] if val else None,
        "val_accuracy": val["accuracy"] if val else None,
        "images_per_s": meter.count / meter.time_s if meter.time_s > 0 else None,
        "epoch_time_s": meter.time_s,
    }
    run.history.append(row)
    if run.val_data is not None:
        metric = row["val_accuracy"]
    else:
        metric = -row["train_loss"] if row["train_loss"] is not None else None
    improved = metric is not None and (run.best_metric is None or metric > run.best_metric)
    if improved:
        run.best_metric, run.best_epoch = metric, epoch + 1
    run.epoch = epoch + 1
    run.meter = _EpochMeter()
    _save_checkpoint(run, epoch_done=True, best=improved)
    if log is not None:
        log.append(row)
    parts = [f"epoch {row['epoch']}/{config.epochs}", f"lr {row['lr']:.3g}"]
    if row["train_loss"] is not None:
        parts.append(f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}")
    if val:
        parts.append(f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}")
    if row["images_per_s"]:
        parts.append(f"{row['images_per_s']:.0f} img/s")
    say("  ".join(parts))


def _result(run: _Run, stop_reason: str, metrics_path: Path | None, plot_path: Path | None) -> TrainResult:
    evaluated = [r for r in run.history if r.get("val_accuracy") is not None]
    last = run.history[-1] if run.history else {}
    best_val = None
    if evaluated:
        best_val = max(r["val_accuracy"] for r in evaluated)
    best_ckpt = run.out_dir / "best.pt" if run.out_dir is not None and (run.out_dir / "best.pt").exists() else None
    return TrainResult(
        history=[dict(r) for r in run.history],
        best_val_accuracy=best_val,
        best_epoch=run.best_epoch if run.val_data is not None else None,
        final_val_accuracy=evaluated[-1]["val_accuracy"] if evaluated else None,
        final_val_loss=evaluated[-1]["val_loss"] if evaluated else None,
        final_train_loss=last.get("train_loss"),
        final_train_accuracy=last.get("train_accuracy"),
        epochs_completed=run.epoch,
        steps=run.step,
        images_per_s=run.train_images / run.train_time_s if run.train_time_s > 0 else 0.0,
        train_time_s=run.train_time_s,
        last_checkpoint=str(run.last_checkpoint) if run.last_checkpoint is not None else None,
        best_checkpoint=str(best_ckpt) if best_ckpt is not None else None,
        metrics_path=str(metrics_path) if metrics_path is not None else None,
        plot_path=str(plot_path) if plot_path is not None else None,
        stopped_early=bool(stop_reason),
        stop_reason=stop_reason,
        device=str(run.device),
        world_size=run.dist.world_size,
        amp=run.amp,
        compiled=run.compiled,
    )


def train(
    model: nn.Module,
    train_data: TensorImageDataset | TensorLoader,
    val_data: TensorImageDataset | TensorLoader | None = None,
    config: TrainConfig | None = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (float, or returned by ``qat_ste.quantize``) in place; see the module doc.

    ``train_data``: a TensorImageDataset (shuffled and sharded here) or a TensorLoader; ``val_data``
    (optional) is evaluated every ``config.eval_every`` epochs. ``metadata`` (plain values) is
    stored in the checkpoints, e.g. what is needed to rebuild the model. Under ``torchrun`` the
    same call trains with DistributedDataParallel. Raises :class:`TrainingDiverged` on a non-finite
    loss, QatSteError on bad settings or an unreadable checkpoint.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise QatSteError(f"config must be a TrainConfig, got {type(config).__name__}",
                          "pass qat_ste.train.TrainConfig(...)")
    if not isinstance(model, nn.Module):
        raise QatSteError(f"train() takes a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    device = resolve_device(config.device, env_world()[2])
    info = setup_distributed(device)
    try:
        return _train(model, train_data, val_data, config, metadata or {}, info, device)
    finally:
        teardown_distributed(info)


def _train(model: nn.Module, train_data: Any, val_data: Any, config: TrainConfig, metadata: dict[str, Any],
           info: DistInfo, device: torch.device) -> TrainResult:
    def say(message: str) -> None:
        if info.is_main and config.verbose:
            from tqdm.auto import tqdm

            tqdm.write(message)

    amp, compile_, channels_last = resolve_flags(config, device)
    out_dir = Path(config.out_dir).expanduser() if config.out_dir is not None else None
    resume_from = _resume_path(config)
    state = load_checkpoint(resume_from) if resume_from is not None else None

    torch.manual_seed(config.seed + info.rank)
    np.random.seed((config.seed + info.rank) % 2 ** 32)
    random.seed(config.seed + info.rank)

    loader = _as_train_loader(train_data, config, info, device)
    if val_data is not None and not isinstance(val_data, (TensorImageDataset, TensorLoader)):
        raise QatSteError(f"val_data must be a TensorImageDataset or TensorLoader, got {type(val_data).__name__}",
                          "load it with qat_ste.train.data.load_dataset(spec, 'val')")
    model.to(device)
    if state is not None:
        _check_resume_metadata(state.get("metadata") or {}, _plain(metadata, "metadata"), config, resume_from)
        _check_resume_config(state.get("config", {}), config)
        load_model_state(model, state["model"], f"checkpoint {resume_from}",
                         "resume with the same model (and quantization settings) as the interrupted run")
        model.to(device)
    else:
        _calibrate_if_needed(model, loader, config, info, device, say)
    if config.sync_bn and info.distributed:
        if device.type != "cuda":
            raise QatSteError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU)",
                              "turn sync_bn off for CPU runs")
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:
            raise QatSteError("sync_bn cannot convert a model that is itself a BatchNorm layer",
                              "wrap it in a module or turn sync_bn off")
    if channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(loader))
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    step_model, eager_model = _wrap_model(model, config, info, device, compile_)
    run = _Run(config=config, model=model, step_model=step_model, eager_model=eager_model,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, loader=loader, val_data=val_data,
               dist=info, device=device, amp=amp, channels_last=channels_last, compiled=compile_,
               out_dir=out_dir, metadata=_plain(metadata, "metadata"),
               criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing))
    run.input_dtype = input_dtype(model, amp)
    run.project_alphas = AlphaProjector(model)  # the same alpha tensors as the optimizer's
    if state is not None:
        _restore(run, state)
        run.last_checkpoint = resume_from
        say(f"resumed from {resume_from}: epoch {run.epoch + 1}, step {run.step}")

    log = _open_out_dir(run, say) if run.files else None
    stop_reason = ""
    try:
        with StopRequest() as stop:
            while run.epoch < config.epochs:
                stop_reason = _train_one_epoch(run, stop)
                if stop_reason:
                    say(_stop_message(run, stop_reason))
                    break
                _finish_epoch(run, log, say)
    finally:
        if log is not None:
            log.close()
    plot_path = None
    if run.files and config.plot:
        plot_path = plot_curves(run.history, out_dir / "curves.png", title=str(metadata.get("title", "")))
    barrier(info)
    result = _result(run, stop_reason, log.path if log is not None else None, plot_path)
    if info.is_main and config.print_summary:
        from tqdm.auto import tqdm

        tqdm.write(result.table())
    return result

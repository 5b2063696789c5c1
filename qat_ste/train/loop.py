"""The training loop: one plain loop for float and quantized models, on CPU, one GPU or many.

    from qat_ste.train import TrainConfig, train, evaluate
    result = train(qmodel, train_set, val_set, TrainConfig(epochs=5, lr=0.01, out_dir="runs/x"))

What :func:`train` does, in order (as torchvision's references/classification/train.py does):

1. Pick the device (``auto``: ``cuda:LOCAL_RANK`` if there is a GPU, else CPU) and, under
   ``torchrun``, join the process group (NCCL on GPU, gloo on CPU). Each rank reads its shard of
   every epoch through :class:`~qat_ste.train.data.TensorLoader`, so the global batch is
   ``batch_size x world_size``.
2. On resume, load the model's weights from ``last.pt``, refusing a checkpoint whose ``metadata``
   (model, data, quantization, calibration) differs from this run's unless ``force_resume``.
   Otherwise, calibrate the quantized sites whose step is not set yet on a few training batches
   (``qat_ste.calibrate`` averages the ranges over ranks, so all ranks start identical). Then
   every step must be a finite number > 0 (``qat_ste.check_steps``).
3. Build the optimizer (weights with ``weight_decay``; normalisation parameters and the learned
   steps without decay by default) and the per-step schedule (warmup, then cosine / multistep /
   constant, from torch's schedulers); on resume put back optimizer, schedule, grad scaler,
   loader position, RNG states, history and best metric, so the run continues exactly as if
   never stopped.
4. Per step (:func:`_train_step`): BatchNorm frozen from ``freeze_bn_after_steps`` on, forward
   (bf16 autocast on CUDA by default), cross-entropy (mixed with the distillation loss against
   ``teacher`` when ``distill_weight`` > 0), backward, optional gradient clipping, optimizer step,
   the steps projected into their valid range, the weight EMA updated (``ema_decay``), schedule
   step. A non-finite loss or gradient norm stops the run before the update, keeping the last good
   checkpoint.
5. Per epoch (:func:`_finish_epoch`): evaluation (of the EMA weights when ``ema_decay`` is set),
   a history row (CSV or JSON lines, TensorBoard if installed), ``last.pt`` and ``best.pt``
   (atomic, with a digest checked on load).
   ``last.pt`` is also written every ``checkpoint_every_steps`` steps and when the run is stopped
   by Ctrl-C or SIGTERM (the first signal stops after the current step; ``TrainResult.stop_reason``
   says which) or by ``stop_after_steps``. Temporary files that an interrupted write left in
   ``out_dir`` are removed when a run starts there.
6. At the end: a PNG of the curves and a summary table; with ``ema_decay`` a completed run leaves
   the EMA weights in the model. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import QatSteError
from ..nn_utils import logits_of
from ..quantize import check_steps
from ..quantizer.weight import mark_epoch
from .bn_policy import BatchNormFreeze
from .checkpoint import load_checkpoint, load_model_state
from .config import TrainConfig, TrainResult
from .data import StreamImageDataset, StreamLoader, TensorImageDataset, TensorLoader
from .distill import Teacher, distillation_loss
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    env_world,
    resolve_device,
    setup_distributed,
    teardown_distributed,
)
from .ema import WeightEma
from .evaluation import evaluate
from .metrics import MetricsLog, plot_curves
from .optim import lr_factor
from .precision import autocast, prepare_inputs, resolve_flags, upcast
from .run_state import (
    EpochMeter,
    Run,
    check_resume_config,
    check_resume_metadata,
    diverged,
    plain,
    restore,
    resume_path,
    save_checkpoint,
)
from .setup import (
    as_train_loader,
    calibrate_if_needed,
    check_val_data,
    new_run,
    open_out_dir,
    prepare_model,
    seed_everything,
)
from .signals import STOP_SIGNALS, StopRequest

__all__ = ["train"]


def train(
    model: nn.Module,
    train_data: TensorImageDataset | TensorLoader | StreamImageDataset | StreamLoader,
    val_data: TensorImageDataset | TensorLoader | StreamImageDataset | StreamLoader | None = None,
    config: TrainConfig | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` (float, or returned by ``qat_ste.quantize``) in place; see the module doc.

    ``train_data``: a TensorImageDataset (in memory) or a StreamImageDataset (an image folder decoded by
    worker processes), shuffled and sharded here, or a TensorLoader / StreamLoader; ``val_data``
    (optional) is evaluated every ``config.eval_every`` epochs. ``metadata`` (plain values) is
    stored in the checkpoints, e.g. what is needed to rebuild the model. ``teacher``: the float
    model to distill from (``config.distill_weight`` > 0); train() freezes it in place (eval mode,
    no gradients, moved to the device, bf16 on CUDA), so pass a copy you do not need. Under ``torchrun`` the
    same call trains with DistributedDataParallel. Raises :class:`TrainingDiverged` on a non-finite
    loss, QatSteError on bad settings, a non-finite or non-positive step, or an unreadable checkpoint.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise QatSteError(f"config must be a TrainConfig, got {type(config).__name__}",
                          "pass qat_ste.train.TrainConfig(...)")
    if not isinstance(model, nn.Module):
        raise QatSteError(f"train() takes a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    _check_teacher(teacher, config)
    device = resolve_device(config.device, env_world()[2])
    info = setup_distributed(device)
    try:
        return _train(model, train_data, val_data, config, metadata or {}, info, device, teacher)
    finally:
        teardown_distributed(info)


def _train(model: nn.Module, train_data: Any, val_data: Any, config: TrainConfig, metadata: dict[str, Any],
           info: DistInfo, device: torch.device, teacher: nn.Module | None) -> TrainResult:
    say = _printer(info, config)
    flags = resolve_flags(config, device)  # amp, compile, channels_last
    resume_from = resume_path(config)
    state = load_checkpoint(resume_from) if resume_from is not None else None
    seed_everything(config.seed + info.rank)
    loader = as_train_loader(train_data, config, info, device)
    check_val_data(val_data)

    metadata = plain(metadata, "metadata")
    model.to(device)
    if state is not None:
        check_resume_metadata(state.get("metadata") or {}, metadata, config, resume_from)
        check_resume_config(state.get("config", {}), config)
        load_model_state(model, state["model"], f"checkpoint {resume_from}",
                         "resume with the same model (and quantization settings) as the interrupted run")
        model.to(device)  # steps resized while loading come from the checkpoint's (CPU) tensors
    else:
        calibrate_if_needed(model, loader, config, info, device, say)
    check_steps(model)  # no training from a NaN, infinite or non-positive step
    prepare_model(model, config, info, device, channels_last=flags[2])
    run = new_run(model, loader, val_data, config, metadata, info, device, flags)
    recipe = _Recipe.start(run, teacher)  # before restore(): the EMA comes back with the optimizer state
    if state is not None:
        restore(run, state)
        run.last_checkpoint = resume_from
        say(f"resumed from {resume_from}: epoch {run.epoch + 1}, step {run.step}")

    log = open_out_dir(run, say) if run.files else None
    stop_reason = ""
    try:
        with StopRequest() as stop:
            while run.epoch < config.epochs:
                stop_reason = _train_one_epoch(run, stop, recipe)
                if stop_reason:
                    say(_stop_message(run, stop_reason))
                    break
                _finish_epoch(run, log, say, recipe)
    finally:
        if log is not None:
            log.close()
    if recipe.ema is not None and not stop_reason:
        recipe.ema.copy_to()
        say("the model now holds the EMA weights (ema_decay)")

    plot_path = None
    if run.files and config.plot and run.out_dir is not None:
        plot_path = plot_curves(run.history, run.out_dir / "curves.png", title=str(metadata.get("title", "")))
    barrier(info)
    result = _result(run, stop_reason, log.path if log is not None else None, plot_path)
    if info.is_main and config.print_summary:
        from tqdm.auto import tqdm

        tqdm.write(result.table())
    return result


def _train_one_epoch(run: Run, stop: StopRequest, recipe: _Recipe) -> str:
    """Run the rest of the current epoch. Returns '' when it completed, else why it stopped."""
    run.step_model.train()
    run.loader.set_epoch(run.epoch)
    if run.loader.batch_index >= len(run.loader):  # saved right after the epoch's last step
        return ""
    if run.loader.batch_index == 0:
        mark_epoch(run.model)  # quantized weights: the codes the report's "changed this epoch" compares with
    bar = _progress_bar(run)
    every = run.config.checkpoint_every_steps
    try:
        tick = time.perf_counter()
        for images, labels in run.loader:
            (loss_sum, correct, count), stop_now = _checked_step(run, images, labels, stop, recipe)
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
                save_checkpoint(run, epoch_done=False)
                return reason
            last_batch = run.loader.batch_index >= len(run.loader)
            if every and run.step % every == 0 and not last_batch:
                save_checkpoint(run, epoch_done=False)
            tick = time.perf_counter()
        return ""
    finally:
        bar.close()


def _checked_step(run: Run, images: torch.Tensor, labels: torch.Tensor, stop: StopRequest, recipe: _Recipe
                  ) -> tuple[list[float], str]:
    """A training step; if torch.compile fails on the very first one, warn and continue eagerly."""
    if not run.compiled or run.compile_verified:
        return _train_step(run, images, labels, stop, recipe)
    try:
        out = _train_step(run, images, labels, stop, recipe)
    except Exception as error:  # only compiler failures are handled; anything else propagates
        if not _is_compile_error(error):
            raise
        warnings.warn(f"torch.compile failed on this model ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); "
                      "training continues without compiling (pass compile=False to skip the attempt)",
                      stacklevel=2)
        run.step_model, run.compiled = run.eager_model, False
        out = _train_step(run, images, labels, stop, recipe)
    run.compile_verified = True
    return out


def _train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, stop: StopRequest, recipe: _Recipe
                ) -> tuple[list[float], str]:
    """One optimizer step. Returns the global (loss sum, correct, count) and the signal ("SIGINT",
    "SIGTERM", or "" for none) with which any rank asked to stop (read after the backward pass, so a
    signal during this step stops after it; SIGTERM wins, so every rank stops the same way at the same
    step). Raises TrainingDiverged (before updating the weights) on a non-finite loss or gradient norm."""
    images, labels = prepare_inputs(images, labels, run.device, run.channels_last, run.input_dtype)
    run.optimizer.zero_grad(set_to_none=True)
    recipe.bn.before_step(run.step)
    with autocast(run.device, run.amp):
        logits = logits_of(run.step_model(images))
    loss = recipe.loss(run, upcast(logits), labels, images)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()
    grad_norm = None
    if run.config.grad_clip is not None:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    # one all-reduce for the step's sums, the stop requests and the gradient norm of every rank
    values = all_reduce_sum(_step_sums(loss, logits, labels, grad_norm if run.scaler is None else None,
                                       stop)).tolist()
    if not math.isfinite(values[0]):
        raise diverged(run, f"the loss became {values[0]}")
    if not math.isfinite(values[4]):
        raise diverged(run, f"the gradient norm became {values[4]}")
    if run.scaler is not None:  # skips the update (and lowers the scale) on inf/NaN gradients
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.project_alphas()
    if recipe.ema is not None:
        recipe.ema.update()
    run.scheduler.step()
    run.step += 1
    return values[:3], "SIGTERM" if values[5] > 0 else "SIGINT" if values[3] > 0 else ""


def _step_sums(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, grad_norm: torch.Tensor | None,
               stop: StopRequest) -> torch.Tensor:
    """This rank's (loss sum, correct, count, stop asked, gradient norm, SIGTERM asked) of a step."""
    n = labels.numel()
    exact = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
    zero = torch.zeros((), dtype=exact, device=loss.device)
    return torch.stack([
        loss.detach().to(exact) * n,
        (logits.detach().argmax(1) == labels).sum().to(exact),
        zero + n,
        zero + (1.0 if stop.requested else 0.0),
        grad_norm.detach().to(exact) if grad_norm is not None else zero,
        zero + (1.0 if stop.signal == "SIGTERM" else 0.0),
    ])


def _finish_epoch(run: Run, log: MetricsLog | None, say: Callable[[str], None], recipe: _Recipe) -> None:
    """End of an epoch: evaluate (every ``eval_every`` epochs and after the last; the EMA weights
    when there is an EMA), add the history row, save last.pt (and best.pt when the metric
    improved), log and print the row."""
    config = run.config
    val = None
    if run.val_data is not None and ((run.epoch + 1) % config.eval_every == 0 or run.epoch + 1 == config.epochs):
        with recipe.evaluated_weights():
            val = evaluate(run.model, run.val_data, config.eval_batch_size or 2 * config.batch_size, run.device,
                           amp=run.amp, channels_last=run.channels_last)
    meter = run.meter
    row = {
        "epoch": run.epoch + 1,
        "step": run.step,
        "lr": _epoch_lr(run),
        "train_loss": meter.loss_sum / meter.count if meter.count else None,
        "train_accuracy": meter.correct / meter.count if meter.count else None,
        "val_loss": val["loss"] if val else None,
        "val_accuracy": val["accuracy"] if val else None,
        "images_per_s": meter.count / meter.time_s if meter.time_s > 0 else None,
        "epoch_time_s": meter.time_s,
    }
    run.history.append(row)
    # the best epoch: highest val accuracy, or lowest train loss without validation data
    metric = row["val_accuracy"] if run.val_data is not None else (
        -row["train_loss"] if row["train_loss"] is not None else None)
    improved = metric is not None and (run.best_metric is None or metric > run.best_metric)
    if improved:
        run.best_metric, run.best_epoch = metric, run.epoch + 1
    run.epoch += 1
    run.meter = EpochMeter()
    save_checkpoint(run, epoch_done=True, best=improved)
    if log is not None:
        log.append(row)
    say(_epoch_line(row, config.epochs))


def _epoch_lr(run: Run) -> float:
    """The learning rate the epoch ``run.epoch`` (0-based) trained at: the mean over its steps of the
    first parameter group's per-step LR (the schedule's :func:`lr_factor`), i.e. the epoch's LR under a
    step schedule. (The optimizer's current LR is already the next step's: one epoch late at a milestone,
    0 after the last step of a cosine schedule.)"""
    steps = max(len(run.loader), 1)
    base = float(run.optimizer.param_groups[0].get("initial_lr", run.optimizer.param_groups[0]["lr"]))
    first = run.epoch * steps
    factors = [lr_factor(step, run.config, steps) for step in range(first, first + steps)]
    if min(factors) == max(factors):  # a constant epoch: its lr exactly, not a rounded mean
        return base * factors[0]
    return base * math.fsum(factors) / steps


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The line printed after an epoch."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.3g}"]
    if row["train_loss"] is not None:
        parts.append(f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}")
    if row["val_loss"] is not None:
        parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}")
    if row["images_per_s"]:
        parts.append(f"{row['images_per_s']:.0f} img/s")
    return "  ".join(parts)


def _result(run: Run, stop_reason: str, metrics_path: Path | None, plot_path: Path | None) -> TrainResult:
    """The TrainResult of a finished or stopped run."""
    evaluated = [r for r in run.history if r.get("val_accuracy") is not None]
    last = run.history[-1] if run.history else {}
    best_ckpt = run.out_dir / "best.pt" if run.out_dir is not None and (run.out_dir / "best.pt").exists() else None
    return TrainResult(
        history=[dict(r) for r in run.history],
        best_val_accuracy=max(r["val_accuracy"] for r in evaluated) if evaluated else None,
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


# ---- the fine-tuning recipe -------------------------------------------------------------------------


@dataclass
class _Recipe:
    """A run's fine-tuning extras: the distillation teacher, the weight EMA, the BatchNorm freeze."""

    config: TrainConfig
    teacher: Teacher | None
    ema: WeightEma | None
    bn: BatchNormFreeze

    @classmethod
    def start(cls, run: Run, teacher: nn.Module | None) -> _Recipe:
        """The extras of ``run`` at step 0 (the EMA carried by the optimizer's state dict)."""
        config = run.config
        ema = None
        if config.ema_decay is not None:
            ema = WeightEma(run.model, config.ema_decay)  # the unwrapped model, also under DDP
            ema.attach(run.optimizer)
        frozen = Teacher(teacher, run.device, run.channels_last) if teacher is not None else None
        return cls(config, frozen, ema, BatchNormFreeze(run.model, config.freeze_bn_after_steps))

    def loss(self, run: Run, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The criterion, mixed with the distillation loss when there is a teacher."""
        hard = run.criterion(logits, labels)
        if self.teacher is None:
            return hard
        return distillation_loss(logits, self.teacher.logits(images), hard, self.config.distill_weight,
                                 self.config.distill_temperature)

    def evaluated_weights(self) -> contextlib.AbstractContextManager:
        """The weights evaluation sees: the EMA's (swapped in for the block) or the model's own."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()


def _check_teacher(teacher: nn.Module | None, config: TrainConfig) -> None:
    """A teacher goes with distill_weight > 0, and the other way round."""
    if teacher is None and config.distill_weight > 0:
        raise QatSteError(f"distill_weight={config.distill_weight} needs a teacher to distill from",
                          "pass train(..., teacher=float_model), or distill_weight=0")
    if teacher is not None and config.distill_weight == 0:
        raise QatSteError("a teacher was passed but distill_weight is 0, so it would not be used",
                          "set TrainConfig(distill_weight=...) (e.g. 0.5), or drop teacher=")


# ---- small helpers ----------------------------------------------------------------------------------


def _printer(info: DistInfo, config: TrainConfig) -> Callable[[str], None]:
    """``say(message)``: print a note above the progress bar (rank 0, when ``verbose``)."""
    def say(message: str) -> None:
        if info.is_main and config.verbose:
            from tqdm.auto import tqdm

            tqdm.write(message)

    return say


def _progress_bar(run: Run) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=len(run.loader), initial=run.loader.batch_index, leave=False, dynamic_ncols=True,
                desc=f"epoch {run.epoch + 1}/{run.config.epochs}",
                disable=not (run.config.progress and run.dist.is_main), unit="batch")


def _is_compile_error(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor"))


def _stop_message(run: Run, reason: str) -> str:
    """What a stopped run prints: why, where, and how to continue."""
    if run.last_checkpoint is None:
        return f"stopped ({reason}) at step {run.step}; no checkpoint was written (no out_dir)"
    return (f"stopped ({reason}) at step {run.step}; saved {run.last_checkpoint}: to continue, run again "
            "with resume=True (qat-ste convert --resume)")

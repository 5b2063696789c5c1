"""Setting a run up before its first step: seeds, the training loader, calibration of steps that
are not set yet, SyncBatchNorm and channels-last, the optimizer (and BCGD's weight blend) and
schedule, the DDP and torch.compile wrappers, and the output folder."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn

from ..atomic import remove_stale_temp_files
from ..data.loaders import StreamLoader, TrainLoader, make_loader
from ..data.stream import StreamImageDataset
from ..data.tensor import TensorImageDataset, TensorLoader
from ..errors import QatSteError
from ..quantize import AlphaProjector, calibrate, quant_modules
from ..quantizer.blend import attach_bcgd
from .config import TrainConfig
from .distributed import DistInfo
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler
from .precision import input_dtype, param_dtype
from .run_state import Run

__all__ = ["as_train_loader", "calibrate_if_needed", "check_val_data", "new_run", "open_out_dir", "prepare_model",
           "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's generators (each rank with its own seed)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def as_train_loader(data: Any, config: TrainConfig, info: DistInfo, device: torch.device) -> TrainLoader:
    """The training data as this rank's shuffled loader: a TensorLoader for an in-memory data set, a
    StreamLoader (``config.workers`` processes) for a streamed one; a given loader must fit the rank."""
    if isinstance(data, (TensorLoader, StreamLoader)):
        if (data.rank, data.world_size) != (info.rank, info.world_size):
            raise QatSteError(
                f"the {type(data).__name__} is set up for rank {data.rank} of {data.world_size}, but this process "
                f"is rank {info.rank} of {info.world_size}",
                "pass the data set itself and let train() shard it, or build the loader with "
                "rank=RANK, world_size=WORLD_SIZE",
            )
        return data
    if isinstance(data, (TensorImageDataset, StreamImageDataset)):
        return make_loader(data, config.batch_size, shuffle=True, seed=config.seed, drop_last=config.drop_last,
                           rank=info.rank, world_size=info.world_size, device=device, workers=config.workers)
    raise QatSteError(
        f"train() needs the training data as a TensorImageDataset, StreamImageDataset or their loader, got "
        f"{type(data).__name__}",
        "load it with qat_ste.data.load_dataset(spec, 'train') or qat_ste.data.stream_imagefolder(...) (or wrap "
        "your tensors in TensorImageDataset(images_uint8, labels, info))",
    )


def check_val_data(data: Any) -> None:
    """Refuse validation data that evaluate() would not read as (images, labels) of a data set."""
    accepted = (TensorImageDataset, TensorLoader, StreamImageDataset, StreamLoader)
    if data is not None and not isinstance(data, accepted):
        raise QatSteError(f"val_data must be a TensorImageDataset, StreamImageDataset or their loader, got "
                          f"{type(data).__name__}",
                          "load it with qat_ste.data.load_dataset(spec, 'val') or qat_ste.data.stream_imagefolder")


def calibrate_if_needed(model: nn.Module, train_data: TrainLoader, config: TrainConfig, info: DistInfo,
                        device: torch.device, say: Callable[[str], None]) -> None:
    """Calibrate the quantized sites whose step is not set yet on a few un-augmented training batches."""
    missing = [name for name, m in quant_modules(model) if not m.is_initialized]
    if not missing:
        return
    dataset = train_data.dataset
    loader = make_loader(dataset.with_augment(False), config.batch_size, shuffle=True, seed=config.seed + 7919,
                         rank=info.rank, world_size=info.world_size, device=device, workers=config.workers,
                         persistent=False)
    say(f"calibrating {len(missing)} quantized site(s) on {min(config.calibrate_batches, len(loader))} "
        f"batch(es) ({config.calibrate_method})")
    dtype = param_dtype(model)
    batches = (images.to(dtype) for images, _ in loader)
    calibrate(model, batches, config.calibrate_method, num_batches=config.calibrate_batches)


def prepare_model(model: nn.Module, config: TrainConfig, info: DistInfo, device: torch.device,
                  channels_last: bool) -> None:
    """SyncBatchNorm under DDP (when asked) and the channels-last memory format, in place."""
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


def _wrap_model(model: nn.Module, config: TrainConfig, info: DistInfo, device: torch.device,
                compile_: bool) -> tuple[nn.Module, nn.Module]:
    """(model for training steps, its uncompiled form): DDP under torchrun, then torch.compile."""
    eager: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        eager = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)
    # torch.compile of a module returns a module (OptimizedModule); its annotation says a callable
    step_model = cast(nn.Module, torch.compile(eager)) if compile_ else eager
    return step_model, eager


def new_run(model: nn.Module, loader: TrainLoader, val_data: Any, config: TrainConfig, metadata: dict[str, Any],
            info: DistInfo, device: torch.device, flags: tuple[str, bool, bool]) -> Run:
    """The Run at step 0: optimizer (with BCGD's weight blend attached when the model's quantized weights
    train with BCGD), per-step schedule, grad scaler (fp16), DDP/compile wrappers, loss."""
    amp, compile_, channels_last = flags
    optimizer = build_optimizer(model, config)
    attach_bcgd(model, optimizer)  # blends w toward Q(w) before each optimizer step (stateless)
    scheduler = build_scheduler(optimizer, config, len(loader))
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    step_model, eager_model = _wrap_model(model, config, info, device, compile_)
    return Run(config=config, model=model, step_model=step_model, eager_model=eager_model,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, loader=loader, val_data=val_data,
               dist=info, device=device, amp=amp, channels_last=channels_last, compiled=compile_,
               out_dir=Path(config.out_dir).expanduser() if config.out_dir is not None else None,
               metadata=metadata,
               criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
               input_dtype=input_dtype(model, amp),
               project_alphas=AlphaProjector(model))  # the same step tensors as the optimizer's


def open_out_dir(run: Run, say: Callable[[str], None]) -> MetricsLog:
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

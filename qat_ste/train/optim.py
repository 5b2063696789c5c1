"""The optimizer and the learning-rate schedule of a run.

- :func:`parameter_groups` / :func:`build_optimizer`: SGD or AdamW over up to three groups
  (weights with ``weight_decay``; normalisation parameters and the learned steps without decay
  by default, the steps with their own ``alpha_lr`` if set).
- :func:`build_scheduler`: torch's schedulers, stepped after every optimizer step: a
  ``LinearLR`` warmup over ``warmup_epochs`` (left out when it has no steps), then
  ``CosineAnnealingLR`` (to 0 at the last step), ``MultiStepLR`` (``gamma`` at each milestone
  epoch) or ``ConstantLR(factor=1)``, joined by ``SequentialLR``.
- :func:`lr_factor`: the same schedule as a closed form (the multiplier of the base LR at a step),
  for reading and for checking the schedulers against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from ..errors import QatSteError
from ..quantize import alpha_parameters
from .config import TrainConfig

__all__ = ["NORM_TYPES", "build_optimizer", "build_scheduler", "lr_factor", "parameter_groups", "warmup_steps"]

#: normalisation layers whose parameters get ``norm_weight_decay`` (class names containing "Norm"
#: are treated the same, which covers timm's and most custom norm layers)
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in up to three optimizer groups, each with a ``name``: ``weights``
    (``weight_decay``), ``norm`` (parameters of normalisation layers, ``norm_weight_decay``) and
    ``alpha`` (learned quantizer steps, ``alpha_weight_decay`` and ``alpha_lr``)."""
    alpha_ids = {id(p) for p in alpha_parameters(model)}
    norm_ids = {id(p) for m in model.modules() if _is_norm_module(m) for p in m.parameters(recurse=False)}
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "norm": [], "alpha": []}
    seen: set[int] = set()
    for _, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        key = "alpha" if id(parameter) in alpha_ids else "norm" if id(parameter) in norm_ids else "weights"
        groups[key].append(parameter)
    settings = {
        "weights": {"weight_decay": config.weight_decay},
        "norm": {"weight_decay": config.norm_weight_decay},
        "alpha": {"weight_decay": config.alpha_weight_decay,
                  **({"lr": config.alpha_lr} if config.alpha_lr is not None else {})},
    }
    out = [{"params": params, "name": key, **settings[key]} for key, params in groups.items() if params]
    if not out:
        raise QatSteError("the model has no trainable parameters (requires_grad is False everywhere)",
                          "unfreeze some parameters before training")
    return out


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over :func:`parameter_groups`."""
    groups = parameter_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """How many optimizer steps the linear warmup lasts (``warmup_epochs`` rounded to whole steps)."""
    return int(round(config.warmup_epochs * max(int(steps_per_epoch), 1)))


def _milestone_epochs(config: TrainConfig) -> tuple[int, ...]:
    """The multistep schedule's milestones: as given, or half and three quarters of ``epochs``."""
    if config.milestones is not None:
        return config.milestones
    return tuple(sorted({max(1, config.epochs // 2), max(1, (3 * config.epochs) // 4)}))


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """The LR multiplier for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_epochs`` from ``warmup_start_factor`` to 1, then the schedule (multistep by epoch,
    cosine to 0 over the remaining steps, or constant). :func:`build_scheduler` follows it."""
    steps_per_epoch = max(int(steps_per_epoch), 1)
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps(config, steps_per_epoch)
    if step < warmup:
        return config.warmup_start_factor + (1.0 - config.warmup_start_factor) * step / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "multistep":
        epoch = step // steps_per_epoch
        return config.gamma ** sum(1 for m in _milestone_epochs(config) if epoch >= m)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """The per-step schedule of :func:`lr_factor` from torch's schedulers (call ``step()`` after
    every optimizer step). The warmup is a ``LinearLR`` stage; a warmup of 0 steps is left out
    rather than given to ``SequentialLR`` as a milestone at 0."""
    steps_per_epoch = max(int(steps_per_epoch), 1)
    warmup = warmup_steps(config, steps_per_epoch)
    ramp = None
    if warmup > 0:
        ramp = LinearLR(optimizer, start_factor=config.warmup_start_factor, end_factor=1.0, total_iters=warmup)
    main: LRScheduler
    if config.schedule == "constant":
        main = ConstantLR(optimizer, factor=1.0)
    elif config.schedule == "multistep":
        # the main stage counts its steps from the end of the warmup; a milestone inside the
        # warmup applies from the first step after it, as in lr_factor
        steps = [max(0, m * steps_per_epoch - warmup) for m in _milestone_epochs(config)]
        main = MultiStepLR(optimizer, milestones=steps, gamma=config.gamma)
    else:
        main = CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * steps_per_epoch - warmup), eta_min=0.0)
    if ramp is None:
        return main
    return SequentialLR(optimizer, schedulers=[ramp, main], milestones=[warmup])

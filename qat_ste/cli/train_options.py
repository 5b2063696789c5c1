"""The training settings of ``qat-ste convert``: TrainConfig values from the command line, the
start weights, and the fine-tuning defaults of a pretrained start."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

#: what the options left at their 'auto' default (None) become: (for a start from random init or
#: float pre-training, for a pretrained start: --weights with --float-epochs 0)
FINETUNE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "warmup_epochs": (0.0, 0.1),
    "distill": (False, True),
    "freeze_bn_after": ("never", 200),
}


def pretrained_start(args: argparse.Namespace) -> bool:
    """Whether convert fine-tunes given weights without float pre-training (--weights, --float-epochs 0)."""
    return bool(args.model_weights) and not args.float_epochs


def resolve_finetune_defaults(args: argparse.Namespace) -> list[str]:
    """Put the final value into every option left at 'auto' (None): --float-epochs (3, or 0 with
    --weights) and the :data:`FINETUNE_DEFAULTS` of this start. Returns the options that took the
    pretrained-start values (empty for another start)."""
    if args.float_epochs is None:
        args.float_epochs = 0 if args.model_weights else 3
    pretrained = pretrained_start(args)
    filled = []
    for name, (plain, for_pretrained) in FINETUNE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, for_pretrained if pretrained else plain)
            filled.append(name)
    return filled if pretrained else []


def describe_pretrained_defaults(args: argparse.Namespace, filled: list[str]) -> str:
    """The line convert prints when a pretrained start took its fine-tuning defaults."""
    parts = {"warmup_epochs": f"warmup {args.warmup_epochs:g} epoch(s)",
             "distill": (f"distillation from the float model (weight {args.distill_weight:g}, temperature "
                         f"{args.distill_temperature:g})" if args.distill else "no distillation"),
             "freeze_bn_after": f"BatchNorm statistics frozen after {args.freeze_bn_after} step(s)"}
    return ("pretrained start (--weights, --float-epochs 0): fine-tuning defaults " +
            ", ".join(parts[name] for name in filled))


def _finetune_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings of the quantized fine-tuning stage only (the recipe)."""
    freeze = args.freeze_bn_after
    return {"distill_weight": args.distill_weight if args.distill else 0.0,
            "distill_temperature": args.distill_temperature, "ema_decay": args.ema,
            "freeze_bn_after_steps": None if freeze in (None, "never") else int(freeze)}


def _teacher(model: Any, args: argparse.Namespace) -> Any:
    """With --distill, a copy of the float model for train(..., teacher=) (train() freezes it)."""
    return copy.deepcopy(model) if args.distill and args.distill_weight > 0 else None


def _load_start_weights(model: Any, args: argparse.Namespace, say: Callable[[str], None]) -> list[str]:
    """Load --weights (refused unless it fits, or --allow-partial; a classifier for another number of
    classes becomes a new head, said); the names left at random init. Without float pre-training a
    model with random tensors cannot be the distillation teacher: --distill is turned off, said."""
    from ..train.build import load_weights_file

    if not args.model_weights:
        return []
    skipped = load_weights_file(model, args.model_weights, allow_partial=args.allow_partial,
                                on_partial=lambda message: say(f"warning: {message}"), on_note=say)
    say(f"weights: {args.model_weights}" + (f" ({len(skipped)} tensor(s) kept their random init: "
                                            f"{', '.join(skipped[:4])})" if skipped else ""))
    if skipped and getattr(args, "distill", False) and not args.float_epochs:
        args.distill = False  # a teacher with an untrained head (or other random tensors) teaches noise
        say("distillation off: the float model has untrained tensors (a new head), so it cannot teach; "
            "pre-train it with --float-epochs N to distill from it")
    return skipped


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings both stages share."""
    return {"batch_size": args.batch_size, "optimizer": args.optimizer, "weight_decay": args.weight_decay,
            "schedule": args.schedule, "warmup_epochs": args.warmup_epochs, "amp": args.amp,
            "compile": {"auto": "auto", "on": True, "off": False}[args.compile], "device": args.device,
            "seed": args.seed, "progress": not args.no_progress, "print_summary": False,
            "checkpoint_every_steps": args.checkpoint_every, "force_resume": args.force_resume,
            "workers": args.workers, "label_smoothing": args.label_smoothing}

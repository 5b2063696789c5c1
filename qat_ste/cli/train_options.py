"""The training settings of ``qat-ste convert``: TrainConfig values from the command line, and the
start weights."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _load_start_weights(model: Any, args: argparse.Namespace, say: Callable[[str], None]) -> list[str]:
    """Load --weights (refused unless it fits, or --allow-partial; a classifier for another number of
    classes becomes a new head, said); the names left at random init."""
    from ..train.build import load_weights_file

    if not args.model_weights:
        return []
    skipped = load_weights_file(model, args.model_weights, allow_partial=args.allow_partial,
                                on_partial=lambda message: say(f"warning: {message}"), on_note=say)
    say(f"weights: {args.model_weights}" + (f" ({len(skipped)} tensor(s) kept their random init: "
                                            f"{', '.join(skipped[:4])})" if skipped else ""))
    return skipped


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings both stages share."""
    return {"batch_size": args.batch_size, "optimizer": args.optimizer, "weight_decay": args.weight_decay,
            "schedule": args.schedule, "warmup_epochs": args.warmup_epochs, "amp": args.amp,
            "compile": {"auto": "auto", "on": True, "off": False}[args.compile], "device": args.device,
            "seed": args.seed, "progress": not args.no_progress, "print_summary": False,
            "checkpoint_every_steps": args.checkpoint_every, "force_resume": args.force_resume,
            "workers": args.workers}

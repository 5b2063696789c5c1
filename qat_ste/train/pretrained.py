"""Pretrained weights from local files: state dicts and checkpoints, never downloaded."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import QatSteError
from .checkpoint import CHECKPOINT_FORMAT, describe_state_mismatch, read_torch_file

__all__ = ["load_weights_file", "HUB_WORDS"]

#: --weights values that ask for downloaded weights (refused: this tool never downloads)
HUB_WORDS = ("hub", "pretrained", "default", "imagenet", "download", "true", "yes")
_WEIGHTS_FIX = ("qat-ste never downloads weights: get a state dict file yourself (e.g. on a machine with "
                "internet: torch.save(torchvision.models.resnet18(weights='DEFAULT').state_dict(), 'r18.pt')) "
                "and pass it with --weights r18.pt")


def load_weights_file(model: nn.Module, path: str | Path, *, allow_partial: bool = False,
                      on_partial: Callable[[str], None] | None = None) -> list[str]:
    """Load a local state dict file into ``model``; returns the names of the model's tensors that
    kept their random init (empty for a complete load).

    Accepts a plain state dict, a dict holding it under ``state_dict`` / ``model`` /
    ``model_state_dict``, or a qat_ste training checkpoint. A file that does not fit the model
    exactly (missing, unexpected or wrong-shape tensors, e.g. another architecture or a classifier
    for another number of classes) is refused with the mismatched keys listed, unless
    ``allow_partial``: then the tensors that fit are loaded and ``on_partial`` (default:
    ``warnings.warn``) gets the same list. Raises QatSteError for hub requests, a missing or
    unreadable file, or when nothing fits.
    """
    file = _weights_path(path)
    state = _read_state_dict(file)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not fitting:
        raise QatSteError(f"no tensor of {file} fits this model ({describe_state_mismatch(model, state)})",
                          "pass weights saved from the same architecture")
    mismatch = describe_state_mismatch(model, state, counters_optional=True)
    if mismatch and not allow_partial:
        raise QatSteError(
            f"weights file {file} does not fit this model: {mismatch}",
            "pass weights saved from the same architecture (and number of classes), or --allow-partial "
            "(allow_partial=True) to load the tensors that fit and keep the rest at random init")
    if mismatch:
        message = f"weights file {file} fits this model only in part ({mismatch}); the rest keeps its random init"
        (on_partial or (lambda text: warnings.warn(text, stacklevel=3)))(message)
    skipped = sorted(k for k in own if k not in fitting and (k in state or not k.endswith("num_batches_tracked")))
    model.load_state_dict(fitting, strict=False)
    return skipped


def _weights_path(path: str | Path) -> Path:
    """The local file behind a --weights value (hub requests and missing files refused)."""
    text = str(path).strip()
    if text.lower() in HUB_WORDS or text.upper().startswith("IMAGENET") or "://" in text or text.startswith("hf-hub:"):
        raise QatSteError(f"--weights {text!r} asks for downloaded weights", _WEIGHTS_FIX)
    file = Path(text).expanduser()
    if not file.is_file():
        raise QatSteError(f"weights file {file} does not exist", "pass the path of a local state dict file (.pt/.pth)")
    return file


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file (DDP ``module.`` and compile ``_orig_mod.`` prefixes removed)."""
    loaded = read_torch_file(file, "weights file")  # integrity checked, unsafe pickles refused
    state = loaded
    if isinstance(loaded, dict):
        if loaded.get("format") == CHECKPOINT_FORMAT:
            state = loaded["model"]
        else:
            for key in ("state_dict", "model_state_dict", "model"):
                if isinstance(loaded.get(key), dict):
                    state = loaded[key]
                    break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QatSteError(f"{file} does not hold a state dict of tensors",
                          "pass a file saved with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}

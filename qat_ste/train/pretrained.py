"""Pretrained weights from local files: state dicts and checkpoints, never downloaded.

:func:`load_weights_file` reads what users have on disk:

- a plain state dict (``torch.save(model.state_dict(), path)``, torchvision's files);
- a training checkpoint holding it under ``state_dict_ema`` / ``model_ema`` (preferred, as timm does),
  ``state_dict``, ``model`` or ``model_state_dict`` (timm's ``.pth.tar``, qat_ste's ``last.pt``);
  timm's ``args`` entry (an ``argparse.Namespace``) is allowed, nothing else that is not a tensor or
  a plain value;
- a ``.safetensors`` file (read with the safetensors package, which timm installs).

Keys lose the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes. When the only tensors
that do not fit are those of the model's classifier and they are for another number of classes
(e.g. an ImageNet file for a 10-class model), everything else is loaded and the classifier keeps
its fresh random initialisation: a new head, which is said. The classifier is the model's own: timm's
``pretrained_cfg["classifier"]``, else the last ``nn.Linear``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import QatSteError
from .checkpoint import CHECKPOINT_FORMAT, describe_state_mismatch, read_torch_file

__all__ = ["load_weights_file", "HUB_WORDS", "classifier_names", "read_state_dict"]

#: --weights values that ask for downloaded weights (refused: this tool never downloads)
HUB_WORDS = ("hub", "pretrained", "default", "imagenet", "download", "true", "yes")
_WEIGHTS_FIX = ("qat-ste never downloads weights: get a state dict file yourself (e.g. on a machine with "
                "internet: torch.save(torchvision.models.resnet18(weights='DEFAULT').state_dict(), 'r18.pt')) "
                "and pass it with --weights r18.pt")
#: entries of a checkpoint dict that hold the state dict, in order of preference (EMA weights first)
STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state_dict")
#: prefixes that wrappers add to every key: DDP, torch.compile (either order)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_weights_file(model: nn.Module, path: str | Path, *, allow_partial: bool = False,
                      on_partial: Callable[[str], None] | None = None,
                      on_note: Callable[[str], None] | None = None) -> list[str]:
    """Load a local weights file into ``model``; returns the names of the model's tensors that kept
    their random init (empty for a complete load; the new head's tensors when one was made).

    Accepts the formats listed in the module doc. When only the model's classifier differs from the
    file's in its number of classes, everything else is loaded and ``on_note`` (default:
    ``warnings.warn``) gets ``"new head: fc (1000 → 10 classes), randomly initialised"``. Any other
    mismatch (missing, unexpected or wrong-shape tensors) is refused with the mismatched keys
    listed, unless ``allow_partial``: then the tensors that fit are loaded and ``on_partial``
    (default: ``warnings.warn``) gets the same list. Raises QatSteError for hub requests, a missing,
    unreadable or damaged file, or when nothing fits.
    """
    file = _weights_path(path)
    state = read_state_dict(file)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not fitting:
        raise QatSteError(f"no tensor of {file} fits this model ({describe_state_mismatch(model, state)})",
                          "pass weights saved from the same architecture")
    mismatch = describe_state_mismatch(model, state, counters_optional=True)
    head = _new_head(model, state, own)
    if head is not None and not allow_partial:
        # the head's tensors are taken as fitting (they keep the model's fresh init)
        rest = describe_state_mismatch(model, {**state, **{k: own[k] for k in head[1]}}, counters_optional=True)
        if not rest:
            mismatch = ""
            (on_note or _warn)(head[0])
    if mismatch and not allow_partial:
        raise QatSteError(
            f"weights file {file} does not fit this model: {mismatch}",
            "pass weights saved from the same architecture (a classifier for another number of classes is "
            "replaced by a new head), or --allow-partial (allow_partial=True) to load the tensors that fit and "
            "keep the rest at random init")
    if mismatch:
        message = f"weights file {file} fits this model only in part ({mismatch}); the rest keeps its random init"
        (on_partial or _warn)(message)
    skipped = sorted(k for k in own if k not in fitting and (k in state or not k.endswith("num_batches_tracked")))
    model.load_state_dict(fitting, strict=False)
    return skipped


def _warn(text: str) -> None:
    warnings.warn(text, stacklevel=4)


def classifier_names(model: nn.Module) -> list[str]:
    """The module names of the model's classifier: timm's ``pretrained_cfg["classifier"]`` (one
    name or several, e.g. a distilled ViT's two heads), else the last ``nn.Linear`` (torchvision,
    the zoo); empty when the model has neither."""
    config = getattr(model, "pretrained_cfg", None)
    names = config.get("classifier") if isinstance(config, dict) else None
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    if isinstance(names, (list, tuple)) and names:
        found = [n for n in names if isinstance(n, str) and n in modules]
        if found:
            return found
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear) and name]
    return linear[-1:]


def _new_head(model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
              ) -> tuple[str, list[str]] | None:
    """(the note, the head's keys) when the file's classifier is for another number of classes than
    the model's (its output dimension differs, the other dimensions agree), else None."""
    notes, keys = [], []
    for name in classifier_names(model):
        head_keys = [k for k in own if k.startswith(f"{name}.") and "." not in k[len(name) + 1:]]
        weight = f"{name}.weight"
        if weight not in head_keys or weight not in state:
            continue
        ours, theirs = own[weight].shape, state[weight].shape
        if ours == theirs or len(ours) != len(theirs) or ours[1:] != theirs[1:]:
            continue
        for key in head_keys:  # the bias (if any) must be the same head's
            if key in state and key != weight and state[key].shape[:1] != theirs[:1]:
                return None
        notes.append(f"new head: {name} ({theirs[0]} → {ours[0]} classes), randomly initialised")
        keys += head_keys
    return ("; ".join(notes), keys) if notes else None


def _weights_path(path: str | Path) -> Path:
    """The local file behind a --weights value (hub requests and missing files refused)."""
    text = str(path).strip()
    if text.lower() in HUB_WORDS or text.upper().startswith("IMAGENET") or "://" in text or text.startswith("hf-hub:"):
        raise QatSteError(f"--weights {text!r} asks for downloaded weights", _WEIGHTS_FIX)
    file = Path(text).expanduser()
    if not file.is_file():
        raise QatSteError(f"weights file {file} does not exist",
                          "pass the path of a local weights file (.pt/.pth/.pth.tar/.safetensors)")
    return file


def read_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see the module doc), wrapper prefixes removed."""
    file = Path(file)
    loaded = _read_safetensors(file) if file.suffix.lower() == ".safetensors" else _read_torch(file)
    state: Any = loaded
    if isinstance(loaded, dict):
        if loaded.get("format") == CHECKPOINT_FORMAT:
            state = loaded["model"]
        else:
            for key in STATE_KEYS:
                if isinstance(loaded.get(key), dict):
                    state = loaded[key]
                    break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QatSteError(f"{file} does not hold a state dict of tensors",
                          "pass a file saved with torch.save(model.state_dict(), path), a timm checkpoint or "
                          "a .safetensors file")
    return {_clean_key(str(k)): v for k, v in state.items()}


def _clean_key(key: str) -> str:
    """A key without the wrapper prefixes (``module._orig_mod.x`` and ``_orig_mod.module.x`` -> ``x``)."""
    while key.startswith(_WRAPPER_PREFIXES):
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
    return key


def _read_torch(file: Path) -> Any:
    """A torch.save file, integrity-checked and loaded weights-only (timm's ``args`` Namespace allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return read_torch_file(file, "weights file")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a damaged or truncated file is a QatSteError."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise QatSteError(f"{file} is a .safetensors file, but the safetensors package is not installed",
                          "pip install safetensors (timm installs it)") from None
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise QatSteError(f"cannot read weights file {file}: not a complete .safetensors file ({detail})",
                          "the file is damaged or truncated: copy or download it again") from None

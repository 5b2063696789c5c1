"""Training checkpoints: atomic writes, safe loading, and the random-number-generator states.

A checkpoint is one ``torch.save`` dict holding only plain Python values and tensors, so it loads
with ``torch.load(weights_only=True)`` (no code runs while loading a file from elsewhere). Every
file is written to a temporary name in the same folder and moved into place with ``os.replace``,
so a crash while writing leaves the previous file intact.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from ..errors import QatSteError

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "describe_state_mismatch",
    "load_model_state",
]

#: the "format" entry of every checkpoint the engine writes
CHECKPOINT_FORMAT = "qat_ste.train/1"


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the engine; a missing, corrupt or foreign file raises QatSteError."""
    path = Path(path).expanduser()
    fix_missing = "check the path, or start afresh without resume"
    if not path.exists():
        raise QatSteError(f"checkpoint {path} does not exist", fix_missing)
    if not path.is_file():
        raise QatSteError(f"checkpoint {path} is not a file", fix_missing)
    fix_corrupt = (
        "the file is truncated or damaged: resume from another checkpoint (e.g. best.pt or an older "
        "copy), or start afresh without resume"
    )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, TypeError, KeyError, IndexError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        unpickler = [line.split("WeightsUnpickler error:", 1)[1].strip() for line in lines
                     if "WeightsUnpickler error:" in line]
        detail = next((d for d in unpickler if d), None) or (
            "not a torch checkpoint (unreadable contents)" if unpickler else (lines or [type(error).__name__])[0])
        raise QatSteError(f"cannot read checkpoint {path}: {detail[:300]}", fix_corrupt) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise QatSteError(
            f"{path} is not a qat_ste training checkpoint (no '{CHECKPOINT_FORMAT}' format entry)",
            "pass a last.pt / best.pt written by qat_ste.train.train or `qat-ste convert`",
        )
    return state


# ---- random number generators ---------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The states of torch's CPU (and, when initialised, CUDA) generators, numpy's and Python's,
    in a form that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states saved by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(_python_state_from_lists(state["python"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda_states[index].cpu(), index)


def _python_state_to_lists(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _python_state_from_lists(state: list) -> tuple:
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)


# ---- model state ----------------------------------------------------------------------------


def describe_state_mismatch(model: torch.nn.Module, state: dict[str, Any]) -> str:
    """Which keys of ``state`` are missing, unexpected or of the wrong shape for ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    return "; ".join(parts) or "the tensors do not fit"


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str, fix: str) -> None:
    """``model.load_state_dict(state)`` (strict); a mismatch raises QatSteError naming the keys."""
    if not isinstance(state, dict):
        raise QatSteError(f"{source} does not hold a state dict (got {type(state).__name__})", fix)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as error:
        detail = describe_state_mismatch(model, state)
        if detail == "the tensors do not fit":
            detail = str(error).strip().splitlines()[-1][:300]
        raise QatSteError(f"{source} does not fit this model: {detail}", fix) from None

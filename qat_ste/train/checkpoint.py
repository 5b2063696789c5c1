"""Training checkpoints: atomic writes, safe loading, and the random-number-generator states.

A checkpoint is one ``torch.save`` dict holding only plain Python values and tensors, so it loads
with ``torch.load(weights_only=True)`` (no code runs while loading a file from elsewhere; a file
that references code is refused). Every file is written to a temporary name in the same folder and
moved into place with ``os.replace``, so a crash while writing leaves the previous file intact; it
carries a sha256 digest, checked (with the zip CRCs) before loading, so a damaged file is refused.
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import (
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_integrity,
    remove_stale_temp_files,
)
from ..errors import QatSteError

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "load_checkpoint",
    "read_torch_file",
    "intact_alternative",
    "check_integrity",
    "remove_stale_temp_files",
    "capture_rng_state",
    "restore_rng_state",
    "describe_state_mismatch",
    "load_model_state",
]

#: the "format" entry of every checkpoint the engine writes
CHECKPOINT_FORMAT = "qat_ste.train/1"


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the engine; a missing, damaged, unsafe or foreign file raises QatSteError."""
    path = Path(path).expanduser()
    state = read_torch_file(path, "checkpoint", map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise QatSteError(
            f"{path} is not a qat_ste training checkpoint (no '{CHECKPOINT_FORMAT}' format entry)",
            "pass a last.pt / best.pt written by qat_ste.train.train or `qat-ste convert`",
        )
    return state


def read_torch_file(path: str | Path, what: str = "checkpoint", *,
                    map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` after checking the file's integrity (zip CRCs and the
    sha256 digest atomic_save stores). Raises QatSteError when the file is missing, damaged (naming an
    intact checkpoint beside it, if any), or holds code/objects that are not plain tensors."""
    path = Path(path).expanduser()
    fix_missing = "check the path, or start afresh without resume"
    if not path.exists():
        raise QatSteError(f"{what} {path} does not exist", fix_missing)
    if not path.is_file():
        raise QatSteError(f"{what} {path} is not a file", fix_missing)
    try:
        damage = check_integrity(path)
    except OSError as error:
        raise QatSteError(f"cannot read {what} {path}: {error.strerror or error}", fix_missing) from None
    if damage is not None:
        raise QatSteError(f"cannot read {what} {path}: the file is damaged: {damage}", _damaged_fix(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, TypeError, KeyError, IndexError) as error:
        raise _load_error(path, what, error) from None


# torch's weights-only unpickler names the object it refuses in these forms (torch 2.11-2.14)
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+?) (?:was not an allowed global|whose module \S+ is blocked)"),
    re.compile(r"unsupported GLOBAL (\S+)"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs to|$)", re.MULTILINE),
    re.compile(r"Can only create new object for .*? but got (.+?)$", re.MULTILINE),
    re.compile(r"(\S+) must be imported to load", re.MULTILINE),
)
# lines of torch's message that give advice rather than say what is wrong
_ADVICE = re.compile(r"weights_only|Weights only load failed|documentation|file an issue|add_safe_globals|"
                     r"safe_globals|trust", re.IGNORECASE)


def _load_error(path: Path, what: str, error: BaseException) -> QatSteError:
    """The QatSteError for a torch.load failure: an unsafe file is refused, anything else is damaged."""
    text = str(error)
    for pattern in _REFUSED_PATTERNS:
        found = pattern.search(text)
        if found:
            name = found.group(1).strip().strip("`")[:200]
            return QatSteError(
                f"refused: {what} {path} contains code/objects that are not plain tensors (global {name})",
                "load only files written by qat_ste (qat-ste convert, qat_ste.train.train); a file that "
                "references code is never loaded: ask its author for a plain state dict of tensors")
    return QatSteError(f"cannot read {what} {path}: {_core_message(error)}", _damaged_fix(path))


def _core_message(error: BaseException) -> str:
    """The line of a torch.load error that says what is wrong, without torch's advice."""
    lines = []
    for line in str(error).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not _ADVICE.search(line):
            lines.append(line)
    detail = lines[0] if lines else type(error).__name__
    if isinstance(error, pickle.UnpicklingError):
        detail = f"not a torch checkpoint (unreadable contents: {detail})"
    return detail[:300]


def _damaged_fix(path: Path) -> str:
    alternative = intact_alternative(path)
    if alternative is not None:
        return (f"resume from the intact checkpoint beside it, {alternative} (e.g. copy it over {path.name}), "
                "or start afresh without resume")
    return "no intact checkpoint is beside it: start afresh without resume (or restore the file from a backup)"


def intact_alternative(path: str | Path, limit: int = 5) -> Path | None:
    """The most recently written intact qat_ste checkpoint beside ``path`` (best.pt, last.pt, a
    periodic checkpoint; ``*.pt``), not ``path`` itself; None if there is none."""
    path = Path(path)
    try:
        siblings = [p for p in path.parent.glob("*.pt") if p.is_file() and not p.is_symlink()]
        siblings.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    candidates = [p for p in siblings if p.resolve() != path.resolve()]
    for candidate in candidates[:limit]:
        if _is_intact_checkpoint(candidate):
            return candidate
    return None


def _is_intact_checkpoint(path: Path) -> bool:
    try:
        if not zipfile.is_zipfile(path) or check_integrity(path) is not None:
            return False
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # only its format is read
    except Exception:  # noqa: BLE001 - any failure means: not a usable alternative
        return False
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


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


def describe_state_mismatch(model: torch.nn.Module, state: dict[str, Any], *, shown: int = 4,
                            counters_optional: bool = False) -> str:
    """'' when ``state`` fits ``model`` key for key and shape for shape; else the missing, unexpected
    and wrong-shape tensors (counts and the first ``shown`` names). ``counters_optional``: BatchNorm's
    ``num_batches_tracked`` counters may be missing from ``state``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (counters_optional and k.endswith("num_batches_tracked"))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = []
    labelled = (("missing from the file", missing), ("unexpected", unexpected), ("of the wrong shape", shapes))
    for label, items in labelled:
        if items:
            more = f", ... ({len(items) - shown} more)" if len(items) > shown else ""
            parts.append(f"{len(items)} tensor(s) {label}: {', '.join(items[:shown])}{more}")
    return "; ".join(parts)


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str, fix: str) -> None:
    """``model.load_state_dict(state)`` (strict); a mismatch raises QatSteError naming the keys."""
    if not isinstance(state, dict):
        raise QatSteError(f"{source} does not hold a state dict (got {type(state).__name__})", fix)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as error:
        detail = describe_state_mismatch(model, state) or str(error).strip().splitlines()[-1][:300]
        raise QatSteError(f"{source} does not fit this model: {detail}", fix) from None

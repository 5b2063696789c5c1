"""The ``convert --out`` folder: what it holds, and whether a run may write, resume or overwrite there."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import is_temp_name
from ..errors import QatSteError
from .output import _pct


def _check_out_is_a_folder(out: Path) -> None:
    """--out (or a folder above it) that is a file is refused before anything is written."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise QatSteError(f"--out {out}: {path} is a file, not a folder",
                                  "pass a folder for --out (it is created when missing), e.g. runs/NAME")
            return


def _describe_run_folder(out: Path, limit: int = 10000) -> str | None:
    """What a non-empty --out holds (a finished run with its accuracy, an interrupted run, N files),
    or None when it holds no files (leftover temporary files aside)."""
    files = []
    for path in out.rglob("*"):
        if path.is_file() and not is_temp_name(path.name):
            files.append(path.relative_to(out).as_posix())
            if len(files) >= limit:
                break
    if not files:
        return None
    count = f"{len(files)}{'+' if len(files) >= limit else ''} file(s)"
    if (out / "report.json").is_file():
        try:
            report = json.loads((out / "report.json").read_text(encoding="utf-8"))
            summary, model = report.get("summary") or {}, (report.get("model") or {}).get("spec")
            what = (f"{model} on {(report.get('data') or {}).get('spec')}, quantized accuracy "
                    f"{_pct(summary.get('quantized_accuracy'))}")
        except (OSError, ValueError, AttributeError):
            what = "unreadable"
        return f"a finished run (report.json: {what}; {count} in all)"
    checkpoints = [name for name in ("qat/last.pt", "float/last.pt") if name in files]
    if checkpoints:
        return f"an interrupted run ({', '.join(checkpoints)}; {count} in all)"
    return f"{count} ({', '.join(sorted(files)[:3])}{', ...' if len(files) > 3 else ''})"


def _check_out_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a --out that holds files unless --resume or --overwrite says what to do."""
    _check_out_is_a_folder(out)
    if resume and overwrite:
        raise QatSteError("--resume and --overwrite contradict each other",
                          "pass --resume to continue the run in --out, or --overwrite to replace it")
    if resume:
        if not ((out / "float" / "last.pt").exists() or (out / "qat" / "last.pt").exists()):
            raise QatSteError(f"--resume: nothing to resume in {out} (no float/last.pt or qat/last.pt)",
                              "drop --resume to start afresh, or pass the --out of the interrupted run")
        return
    contents = None if overwrite or not out.is_dir() else _describe_run_folder(out)
    if contents:
        raise QatSteError(f"--out {out} already holds {contents}",
                          "pass --resume to continue that run, --overwrite to replace its files, or another --out")


def _remove_stale_temp_files(out: Path) -> None:
    """Temporary files a killed run (e.g. during export) left in --out; each stage's training removes
    those of its own folder (float/, qat/) when it starts."""
    from ..atomic import remove_stale_temp_files

    remove_stale_temp_files(out)


def _drop_resume_points(out: Path) -> None:
    """--overwrite: the old run's last.pt files go at once, so that a later --resume cannot continue
    the old run's stage after the new run's; its results (best.pt, report.json, model.onnx) stay until
    the new run replaces them."""
    for stage in ("float", "qat"):
        (out / stage / "last.pt").unlink(missing_ok=True)

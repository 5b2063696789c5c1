"""``qat-ste export`` and ``qat-ste check``, and the checks of an export's --out file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import QatSteError
from .output import EXIT_FAILED, EXIT_OK, _human_bytes, _out
from .parser import _check_thresholds, check_threshold_options
from .sources import _example_input, _source_model, _val_batches


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_export_target(out: Path, inputs: dict[str, str | None], overwrite: bool) -> None:
    """Refuse an --out that is one of the command's inputs (always), a folder, or an existing file
    (unless --overwrite)."""
    for flag, value in inputs.items():
        if value and _same_file(out, Path(value).expanduser()):
            raise QatSteError(f"--out {out} is the {flag} file it would be exported from",
                              "pass another --out, e.g. model.onnx")
    if out.is_dir():
        raise QatSteError(f"--out {out} is a folder", f"pass a file name for --out, e.g. {out / 'model.onnx'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QatSteError(f"--out {out}: {parent} is a file, not a folder", "pass --out inside a folder")
            break
    if out.exists() and not overwrite:
        raise QatSteError(f"--out {out} already exists ({_human_bytes(out.stat().st_size)})",
                          "pass --overwrite to replace it, or another --out")


def _export(args: argparse.Namespace) -> int:
    from ..atomic import remove_stale_temp_files
    from ..export import export_onnx

    out = Path(args.out).expanduser()
    _check_export_target(out, {"--checkpoint": args.checkpoint, "--model-weights": args.model_weights},
                         args.overwrite)
    if out.parent.is_dir():
        remove_stale_temp_files(out.parent)
    qmodel, _, val_set = _source_model(args)
    result = export_onnx(qmodel, out, _example_input(val_set), form=args.form, weight_format=args.weight_format,
                         opset=args.opset)
    _out(f"wrote {result.path} ({_human_bytes(result.file_size)}, form {result.form}, {result.weight_format} "
         f"weights, opset {result.opset}, {len(result.sites)} quantized site(s))"
         + (f"; its weights are in {result.data_path.name} beside it: keep the two together" if result.data_path
            else ""))
    for note in result.notes:
        _out(f"note: {note}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    onnx_path = Path(args.onnx).expanduser()
    if not onnx_path.is_file():
        raise QatSteError(f"ONNX file {onnx_path} does not exist", "pass the file qat-ste convert/export wrote")
    _check_thresholds(args)
    from ..export.runtime import check_runtime

    check_runtime(args.runtime)  # before the model loads: a runtime that is not installed fails at once
    _runtime_options(args.runtime_option)
    qmodel, _, val_set = _source_model(args)
    report = _check_in_runtime(qmodel, onnx_path, val_set, args)
    _out(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if not report.ok:
        print(f"qat-ste check: {onnx_path} fails the parity thresholds: {'; '.join(report.failures)}",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _check_in_runtime(qmodel: Any, onnx_path: Path, val_set: Any, args: argparse.Namespace) -> Any:
    """check_onnx() on --check-samples held-out samples in --runtime, with the command's thresholds."""
    from ..export import check_onnx

    inputs, labels = _val_batches(val_set, args.check_samples)
    return check_onnx(qmodel, onnx_path, inputs, labels, **check_threshold_options(args),
                      latency=not args.no_latency, runtime=args.runtime,
                      runtime_options=_runtime_options(args.runtime_option))


def _runtime_options(given: list[str] | None) -> dict[str, str]:
    """--runtime-option KEY=VALUE (repeatable; a later KEY wins) as a dict."""
    options: dict[str, str] = {}
    for item in given or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise QatSteError(f"--runtime-option {item!r} is not KEY=VALUE",
                              "pass e.g. --runtime-option INFERENCE_PRECISION_HINT=f32")
        options[key.strip()] = value.strip()
    return options

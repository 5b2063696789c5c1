"""``qat-ste convert``: the stages in order, the stop exit codes, report.json and its summary table."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .output import EXIT_FAILED, EXIT_OK, _human_bytes, _out, _pct, _silent, _table
from .parser import _check_positive, _check_thresholds
from .quant_options import _quant_config
from .run_folder import _check_out_folder, _drop_resume_points, _remove_stale_temp_files
from .sources import CONVERT_FORMAT, _resolve_model_and_data
from .stages import (
    _check_qat_resume,
    _ConvertRun,
    _export_stage,
    _float_stage,
    _prepare_model,
    _qat_stage,
    _quantize_stage,
)
from .train_options import (
    _finetune_settings,
    _train_settings,
    describe_pretrained_defaults,
    resolve_finetune_defaults,
)

EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal number, as shells report a stop by a signal


def _check_convert_numbers(args: argparse.Namespace) -> None:
    _check_thresholds(args)
    for name in ("epochs", "batch_size", "calib_batches"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name), allow_zero=name == "epochs")
    _check_positive("--float-epochs", args.float_epochs, allow_zero=True)
    _check_positive("--lr", args.lr)


def _check_training_settings(args: argparse.Namespace) -> None:
    """The fine-tuning settings as TrainConfig checks them, before any stage runs."""
    from ..train import TrainConfig

    TrainConfig(lr=args.lr, **_train_settings(args), **_finetune_settings(args))


def _write_config(args: argparse.Namespace, quant: Any, out: Path, resolved: dict[str, Any]) -> None:
    """OUT/config.yaml: every option's final value (``qat-ste convert --config`` reads it back)."""
    from .config_file import CONFIG_FILE_NAME, option_actions, write_resolved_config
    from .parser import build_parser

    convert = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["convert"]
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out / CONFIG_FILE_NAME, args, option_actions(convert), quant, resolved)


def _stop_exit_code(reason: str) -> int:
    """130 for a run stopped by SIGINT (Ctrl-C), 143 for SIGTERM, else 1."""
    if "SIGTERM" in reason:
        return EXIT_SIGTERM
    if "SIGINT" in reason or "Ctrl-C" in reason:
        return EXIT_SIGINT
    return EXIT_FAILED


def _stopped(result: Any, out: Path, say: Callable[[str], None]) -> int:
    """Say where a stopped stage saved its state and how to resume; the exit code."""
    where = f"{result.last_checkpoint} is saved" if result.last_checkpoint else "no checkpoint was saved"
    say(f"stopped ({result.stop_reason}); {where}. Resume with the same options plus: --out {out} --resume")
    return _stop_exit_code(result.stop_reason)


def _command_line() -> list[str] | None:
    """The command as typed when run as ``qat-ste`` or ``python -m qat_ste.cli``, else None."""
    launcher = Path(sys.argv[0])
    if launcher.name == "qat-ste" or launcher.parts[-2:] == ("cli", "__main__.py"):
        return ["qat-ste", *sys.argv[1:]]
    return None


def _report_document(run: _ConvertRun, quant: Any, report: Any) -> dict[str, Any]:
    """The contents of OUT/report.json."""
    import torch

    import qat_ste

    plain_quant, args, out = quant.to_dict(), run.args, run.out
    float_result, qat_result = run.float_result, run.qat_result
    return {
        "format": CONVERT_FORMAT,
        "command": _command_line(),
        "model": {"spec": str(run.spec), "class": type(run.model).__name__, "parameters": run.parameters,
                  "weights_file": args.model_weights, "tensors_left_random": run.skipped},
        "data": {"spec": run.data, "train_images": len(run.train_set), "val_images": len(run.val_set),
                 **{k: v for k, v in run.train_set.info.to_dict().items() if k != "class_names"}},
        "quantization": {**plain_quant, "alpha": plain_quant["alpha_mode"],  # "alpha": the deprecated name
                         "calibration": {"method": args.calib_method, "batches": args.calib_batches},
                         "sites_quantized": len(report.quantized), "sites_left_float": len(report.skipped)},
        "float": {"epochs": run.float_epochs, **run.float_eval,
                  "history": float_result.history if float_result else []},
        "calibrated": run.calibrated_eval,
        "quantized": {"epochs": args.epochs, **run.quant_eval,
                      "best_val_accuracy": qat_result.best_val_accuracy if qat_result else None,
                      "images_per_s": qat_result.images_per_s if qat_result else None,
                      "history": qat_result.history if qat_result else []},
        "onnx": run.export_result.to_dict() if run.export_result is not None else None,
        "check": run.check.to_dict() if run.check is not None else None,
        "summary": _convert_summary(run.float_eval, run.calibrated_eval, run.quant_eval, run.export_result,
                                    run.check),
        "files": {"report": str(out / "report.json"), "quantization": str(out / "quantization.json"),
                  "onnx": str(out / "model.onnx") if run.export_result is not None else None,
                  "checkpoint": str(out / "qat" / "last.pt") if qat_result else None,
                  "best_checkpoint": qat_result.best_checkpoint if qat_result else None,
                  "float_checkpoint": str(out / "float" / "last.pt") if float_result else None},
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        "device": str(run.device), "world_size": run.world_size,
        "seed": args.seed, "commit": _source_commit(),
        "versions": {"qat_ste": qat_ste.__version__, "torch": str(torch.__version__),
                     "numpy": _version_of("numpy"), "python": platform.python_version()},
    }


def _source_commit() -> str | None:
    """The git commit of the qat_ste source this run used (None unless the package is a git checkout's
    own ``qat_ste/`` folder, e.g. an editable install)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _version_of(module: str) -> str | None:
    """``module.__version__``, or None when it is not installed."""
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return None


def _convert(args: argparse.Namespace) -> int:
    """qat-ste convert: data and model, float stage, quantize and calibrate, qat stage, ONNX, report."""
    from ..atomic import atomic_write_json
    from ..train.distributed import barrier, env_world, resolve_device, setup_distributed, teardown_distributed

    started = time.perf_counter()
    quant = _quant_config(args)
    pretrained_defaults = resolve_finetune_defaults(args)  # the 'auto' options get their final values
    _check_convert_numbers(args)
    _check_training_settings(args)
    spec, data, image_size = _resolve_model_and_data(args)
    out = Path(args.out).expanduser()
    args.resume = args.resume or args.force_resume
    _check_out_folder(out, args.resume, args.overwrite)
    device = resolve_device(args.device, env_world()[2])
    dist_info = setup_distributed(device)
    run = _ConvertRun(args, spec, data, out, device, _out if dist_info.is_main else _silent)
    try:
        if dist_info.is_main:
            _remove_stale_temp_files(out)
        _prepare_model(run, image_size)
        if dist_info.is_main and args.overwrite:
            _drop_resume_points(out)  # once the data and the model are known to load
        _check_qat_resume(run, quant)  # before the float stage trains or writes anything
        if pretrained_defaults:
            run.say(describe_pretrained_defaults(args, pretrained_defaults))
        if dist_info.is_main:
            _write_config(args, quant, out, {"model": str(spec), "data": data, "image_size": image_size})
        stopped = _float_stage(run)
        if stopped is not None and stopped.stopped_early:
            return _stopped(stopped, out, run.say)
        qmodel = _quantize_stage(run, quant)
        stopped = _qat_stage(run, qmodel, quant)
        if stopped is not None and stopped.stopped_early:
            return _stopped(stopped, out, run.say)
        barrier(dist_info)
        if not dist_info.is_main:
            return EXIT_OK
        report = _export_stage(run, qmodel)
        run.timings["total_s"] = time.perf_counter() - started
        run.world_size = dist_info.world_size
        document = _report_document(run, quant, report)
        atomic_write_json(out / "report.json", document)
        run.say("")
        run.say(_summary_table(document))
        run.say(f"\nwrote {out / 'report.json'}")
        if run.check is not None and not run.check.ok:
            run.say("the ONNX check FAILED: " + "; ".join(run.check.failures))
            return EXIT_FAILED
        return EXIT_OK
    finally:
        teardown_distributed(dist_info)


def _convert_summary(float_eval: dict, calibrated_eval: dict | None, quant_eval: dict, export_result: Any,
                     check: Any) -> dict[str, Any]:
    checked = check.to_dict() if check is not None else {}
    return {
        "float_accuracy": float_eval["accuracy"],
        "calibrated_accuracy": calibrated_eval["accuracy"] if calibrated_eval else None,
        "quantized_accuracy": quant_eval["accuracy"],
        "onnx_accuracy": checked.get("accuracy_onnx"),
        "torch_accuracy_on_check_samples": checked.get("accuracy_torch"),
        "check_samples": checked.get("samples"),
        "code_parity": checked.get("site_parity"),
        "chained_code_agreement": checked.get("chained_code_agreement"),
        "code_agreement": checked.get("code_agreement"),
        "top1_agreement": checked.get("top1_agreement"),
        "end_to_end_top1_agreement": checked.get("end_to_end_task_agreement"),
        "max_logit_diff": checked.get("max_logit_diff"),
        "check_ok": checked.get("ok"),
        "onnx_file_size_bytes": export_result.file_size if export_result is not None else None,
        "latency_ms": checked.get("latency_ms"),
    }


def _summary_table(document: dict[str, Any]) -> str:
    s = document["summary"]
    q = document["quantization"]
    d = document["data"]
    latency = s.get("latency_ms")
    latency_text = "-"
    if latency:
        latency_text = (f"quantized {latency['quantized']:.3f} ms, float {latency['float']:.3f} ms "
                        f"(batch {int(latency['batch'])}, ORT CPU)")
    check_text = "-" if s["check_ok"] is None else ("OK" if s["check_ok"] else "FAILED")
    onnx = document["onnx"]
    rows = [
        ("model", f"{document['model']['spec']} ({document['model']['parameters'] / 1e3:.1f}k parameters)"),
        ("data", f"{d['spec']} ({d['train_images']} train / {d['val_images']} val, "
                 f"{d['channels']}x{d['image_size'][0]}x{d['image_size'][1]})"),
        ("quantization", f"{q['bits']}-bit activations, STE {q['ste']}, alpha mode {q['alpha_mode']}, "
                         f"{q['sites_quantized']} site(s)"),
        ("float accuracy", _pct(s["float_accuracy"])),
        ("calibrated accuracy", _pct(s["calibrated_accuracy"])),
        ("quantized accuracy", _pct(s["quantized_accuracy"])),
        ("ORT accuracy", _pct(s["onnx_accuracy"]) + (
            f" (PyTorch {_pct(s['torch_accuracy_on_check_samples'])} on the same {s['check_samples']} images)"
            if s["check_samples"] else "")),
        ("code parity (per site)", _pct(s["code_parity"])),
        ("code agreement (given the file's codes)", _pct(s.get("chained_code_agreement"))),
        ("top-1 agreement (given the file's codes)", _pct(s["top1_agreement"])),
        ("code agreement (end to end)", _pct(s["code_agreement"])),
        ("top-1 agreement (end to end)", _pct(s.get("end_to_end_top1_agreement"))),
        ("ONNX file", f"{onnx['path']} ({_human_bytes(s['onnx_file_size_bytes'])}, {onnx['form']}, "
                      f"{onnx['weight_format']} weights)" if onnx else "-"),
        ("latency", latency_text),
        ("ONNX check", check_text),
        ("time", f"{document['timings_s'].get('total_s', 0.0):.1f} s"),
    ]
    return _table("qat-ste convert summary", rows)

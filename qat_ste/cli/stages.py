"""The stages of ``qat-ste convert``: model, float pre-training, quantization, fine-tuning, export."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .output import _pct
from .sources import (
    _calibrate,
    _data_line,
    _data_shape,
    _example_input,
    _metadata,
    _quantize,
    _run_check,
    _stream_data,
    _streamed_folder,
)
from .train_options import _finetune_settings, _load_start_weights, _teacher, _train_settings


@dataclass
class _ConvertRun:
    """What the stages of one ``qat-ste convert`` share, and what they produced (for report.json)."""

    args: argparse.Namespace
    spec: Any
    data: str
    out: Path
    device: Any
    say: Callable[[str], None]
    train_set: Any = None
    val_set: Any = None
    model: Any = None
    parameters: int = 0
    skipped: list[str] = field(default_factory=list)
    float_epochs: int = 0
    float_result: Any = None
    float_eval: dict[str, Any] = field(default_factory=dict)
    calibrated_eval: dict[str, Any] | None = None
    qat_result: Any = None
    quant_eval: dict[str, Any] = field(default_factory=dict)
    export_result: Any = None
    check: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    world_size: int = 1

    def resume_from(self, stage: str) -> str | None:
        """``OUT/<stage>/last.pt`` when resuming and it exists, else None (a fresh start)."""
        path = self.out / stage / "last.pt"
        return str(path) if self.args.resume and path.exists() else None

    def metadata(self, stage: str, quant: Any | None) -> dict[str, Any]:
        calibration = {"method": self.args.calib_method, "batches": self.args.calib_batches} if quant else None
        preprocess = self.args.preprocess if _streamed_folder(self.data) is not None else None
        return _metadata(self.spec, self.data, self.train_set.info, stage, quant, calibration, preprocess)


def _check_qat_resume(run: _ConvertRun, quant: Any) -> None:
    """--resume with a qat/last.pt: refuse a changed quantization, model or data before the float stage
    runs (the engine checks again when the stage starts, but the float stage would already have
    trained and saved by then)."""
    from ..train import TrainConfig
    from ..train.checkpoint import load_checkpoint
    from ..train.run_state import check_resume_metadata

    resume = run.resume_from("qat")
    if resume is None or run.args.force_resume:
        return  # with --force-resume the engine warns when the stage starts
    saved = load_checkpoint(resume).get("metadata", {})
    check_resume_metadata(saved, run.metadata("qat", quant), TrainConfig(force_resume=run.args.force_resume),
                          Path(resume))


def _prepare_model(run: _ConvertRun, image_size: int) -> None:
    """Load the data, build the model and load --weights into it. A streamed image folder's classes
    are read first; its data sets follow the model, whose preprocessing they use."""
    from ..train.build import build_model
    from ..train.setup import seed_everything

    tick = time.perf_counter()
    seed_everything(run.args.seed)  # before anything random: data, then the model's initialization
    classes, channels, loaded = _data_shape(run.data, image_size, run.args.seed)
    seed_everything(run.args.seed)  # the same initialization whatever loading the data drew
    run.model = build_model(run.spec, classes, channels, image_size)
    run.train_set, run.val_set = loaded or _stream_data(run.data, run.model, image_size, run.args.preprocess,
                                                        run.args.workers)
    run.timings["data_s"] = time.perf_counter() - tick
    run.say(_data_line(run.data, run.train_set, run.val_set))
    run.skipped = _load_start_weights(run.model, run.args, run.say)
    run.parameters = sum(p.numel() for p in run.model.parameters())
    run.say(f"model: {run.spec} ({type(run.model).__name__}, {run.parameters / 1e3:.1f}k parameters)")
    args = run.args
    run.float_epochs = args.float_epochs if args.float_epochs is not None else (0 if args.model_weights else 3)


def _float_stage(run: _ConvertRun) -> Any:
    """Pre-train the float model (unless --float-epochs 0) and evaluate it; the TrainResult or None."""
    from ..train import TrainConfig, evaluate, train

    tick = time.perf_counter()
    result = None
    if run.float_epochs > 0:
        run.say(f"\n== float pre-training: {run.float_epochs} epoch(s) ==")
        config = TrainConfig(epochs=run.float_epochs, lr=run.args.float_lr, out_dir=str(run.out / "float"),
                             resume=run.resume_from("float"), **_train_settings(run.args))
        result = run.float_result = train(run.model, run.train_set, run.val_set, config,
                                          metadata=run.metadata("float", None))
        if result.stopped_early:
            return result
    run.model.to(run.device)
    run.float_eval = evaluate(run.model, run.val_set, 256, run.device)
    run.timings["float_s"] = time.perf_counter() - tick
    run.say(f"float accuracy: {_pct(run.float_eval['accuracy'])} (loss {run.float_eval['loss']:.4f})")
    return result


def _quantize_stage(run: _ConvertRun, quant: Any) -> Any:
    """The quantized model, calibrated unless the qat stage resumes from its checkpoint."""
    import qat_ste

    from ..train import evaluate

    tick = time.perf_counter()
    args = run.args
    qmodel = _quantize(run.model, quant, _example_input(run.val_set).to(run.device))
    report = qat_ste.report(qmodel)
    run.say(f"\n== quantized: {len(report.quantized)} site(s) at {quant.bits} bits, STE {quant.ste}, "
            f"alpha mode {quant.to_dict()['alpha_mode']} ({len(report.skipped)} left float) ==")
    if run.resume_from("qat") is None:
        _calibrate(qmodel, run.train_set, args.calib_method, args.calib_batches, args.batch_size, args.seed)
        run.calibrated_eval = evaluate(qmodel, run.val_set, 256, run.device)
        run.say(f"calibrated ({args.calib_method}, {args.calib_batches} batch(es)): accuracy "
                f"{_pct(run.calibrated_eval['accuracy'])} before fine-tuning")
    run.timings["calibrate_s"] = time.perf_counter() - tick
    return qmodel


def _qat_stage(run: _ConvertRun, qmodel: Any, quant: Any) -> Any:
    """Fine-tune the quantized model (unless --epochs 0) and evaluate it; the TrainResult or None."""
    from ..train import TrainConfig, evaluate, train

    tick = time.perf_counter()
    result = None
    if run.args.epochs > 0:
        run.say(f"\n== quantization-aware fine-tuning: {run.args.epochs} epoch(s) ==")
        config = TrainConfig(epochs=run.args.epochs, lr=run.args.lr, out_dir=str(run.out / "qat"),
                             resume=run.resume_from("qat"), **_train_settings(run.args),
                             **_finetune_settings(run.args))
        result = run.qat_result = train(qmodel, run.train_set, run.val_set, config,
                                        metadata=run.metadata("qat", quant), teacher=_teacher(run.model, run.args))
        if result.stopped_early:
            return result
    run.quant_eval = evaluate(qmodel, run.val_set, 256, run.device)
    run.timings["finetune_s"] = time.perf_counter() - tick
    run.say(f"quantized accuracy: {_pct(run.quant_eval['accuracy'])} (loss {run.quant_eval['loss']:.4f})")
    return result


def _export_stage(run: _ConvertRun, qmodel: Any) -> Any:
    """OUT/quantization.{txt,json}, and unless --no-export OUT/model.onnx and its check; the site report."""
    import qat_ste

    from ..atomic import atomic_write_json, atomic_write_text

    run.out.mkdir(parents=True, exist_ok=True)
    qmodel.cpu().eval()
    report = qat_ste.report(qmodel)
    atomic_write_text(run.out / "quantization.txt", report.table() + "\n")
    atomic_write_json(run.out / "quantization.json", report.to_dict())
    if not run.args.no_export:
        from ..export import export_onnx

        tick = time.perf_counter()
        run.say("\n== ONNX export and ONNX Runtime check ==")
        run.export_result = export_onnx(qmodel, run.out / "model.onnx", _example_input(run.val_set),
                                        form=run.args.form, weight_format=run.args.weight_format,
                                        opset=run.args.opset)
        run.timings["export_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        run.check = _run_check(qmodel, run.out / "model.onnx", run.val_set, run.args)
        run.timings["check_s"] = time.perf_counter() - tick
        run.say(run.check.table())
    return report

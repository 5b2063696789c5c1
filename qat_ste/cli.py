"""The ``qat-ste`` command line.

    qat-ste convert --out runs/quickstart                 # digits + zoo:lenet5, about a minute on a CPU
    qat-ste convert --model torchvision:resnet18 --data cifar10:~/data/cifar --weights r18.pt --out runs/r18
    qat-ste export --checkpoint runs/r18/qat/best.pt --out r18_int8.onnx --weight-format int8
    qat-ste check --onnx runs/r18/model.onnx --checkpoint runs/r18/qat/last.pt --json
    qat-ste list-stes | list-models

Every bad input ends with a one-paragraph message on stderr (the problem and the fix) and exit
code 2; ``check`` exits 1 when the file fails its parity thresholds, ``convert`` exits 1 when
training diverges, 130 when stopped by Ctrl-C (SIGINT) and 143 when stopped by SIGTERM (both
save a checkpoint to ``--resume`` from). Nothing is written over a run in ``--out`` or an existing
export file without ``--resume``/``--overwrite``. Set ``QAT_STE_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QatSteError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CONVERT_FORMAT = "qat_ste.convert/1"
DEFAULT_DATA = "digits"
DEFAULT_MODEL = "zoo:lenet5"


# =============================================================================================
# Argument parsing
# =============================================================================================


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as QatSteError (one paragraph, exit code 2) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QatSteError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's dest and prints a one-line note."""

    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str = "", **kwargs: Any) -> None:
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"qat-ste: note: {option_string} is deprecated; use {self.replacement}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def _train_default(name: str) -> Any:
    """The default of a TrainConfig field (defaults shared by the CLI are defined there, once)."""
    from dataclasses import fields

    from .train import TrainConfig

    return next(f.default for f in fields(TrainConfig) if f.name == name)


def _add_model_arguments(parser: argparse.ArgumentParser, weights_flag: str) -> None:
    parser.add_argument("--model", default=None,
                        help=f"zoo:NAME, torchvision:NAME or timm:NAME (default {DEFAULT_MODEL}); random init")
    parser.add_argument(weights_flag, dest="model_weights", metavar="FILE", default=None,
                        help="local state dict file to start from (nothing is ever downloaded)")
    parser.add_argument("--allow-partial", action="store_true",
                        help=f"load the tensors of {weights_flag} that fit and keep the rest at random init "
                             "(default: refuse a file that does not fit the model exactly)")
    parser.add_argument("--data", default=None,
                        help="digits (default, bundled), synthetic, mnist:FOLDER, cifar10:FOLDER, imagefolder:FOLDER")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side the data is served at (default: MNIST 28, CIFAR-10 32; else 28 for "
                             "lenet5, 32 for other models)")
    _add_quant_arguments(parser)
    calib_method, calib_batches = _train_default("calibrate_method"), _train_default("calibrate_batches")
    parser.add_argument("--calib-method", default=calib_method,
                        help=f"calibration: mse, percentile, gaussian, lsq, max (default {calib_method})")
    parser.add_argument("--calib-batches", type=int, default=calib_batches,
                        help=f"calibration batches (default {calib_batches})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often fastest for small models)")


def _add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    """Every QuantConfig field as an option (default None: not given, so --quant-config or the
    QuantConfig default applies)."""
    group = parser.add_argument_group("quantization (QuantConfig; explicit options override --quant-config)")
    group.add_argument("--quant-config", metavar="FILE.json", default=None,
                       help="a JSON object of QuantConfig fields, e.g. {\"bits\": 4, \"exclude\": [\"fc*\"]}")
    group.add_argument("--bits", type=int, default=None, help="activation bits, 1..8 (default 4)")
    group.add_argument("--ste", default=None,
                       help="straight-through estimator (default clipped_relu; qat-ste list-stes)")
    group.add_argument("--alpha-mode", dest="alpha_mode", default=None,
                       help="step mode: lsq (default), fixed, pact or bcgd")
    group.add_argument("--alpha", dest="alpha_mode", action=_DeprecatedAlias, replacement="--alpha-mode",
                       help=argparse.SUPPRESS)
    group.add_argument("--step-init", type=float, default=None,
                       help="initial step (default: calibrated; fixed mode: a table by bits)")
    group.add_argument("--rounding", default=None, help="nearest (default) or ceil")
    group.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                       help="one step per channel (default off)")
    group.add_argument("--include", action="append", metavar="PATTERN", default=None,
                       help="quantize only sites matching this glob (repeatable; default all)")
    group.add_argument("--exclude", action="append", metavar="PATTERN", default=None,
                       help="leave sites matching this glob float (repeatable)")
    group.add_argument("--override", action="append", metavar="PATTERN:KEY=VALUE[,KEY=VALUE]", default=None,
                       help="per-site settings, e.g. 'layer4.*:bits=8,ste=identity' (repeatable; later wins)")
    group.add_argument("--keep-first", action=argparse.BooleanOptionalAction, default=None,
                       help="leave the first activation float")
    group.add_argument("--keep-last", action=argparse.BooleanOptionalAction, default=None,
                       help="leave the last activation float")
    group.add_argument("--kinds", default=None, metavar="KIND[,KIND]",
                       help="activation kinds to quantize (default: all but the gates)")
    group.add_argument("--quantize-gates", action=argparse.BooleanOptionalAction, default=None,
                       help="also quantize Sigmoid/Hardsigmoid/Softmax gates")


def _add_check_thresholds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check-samples", type=int, default=512,
                        help="held-out images the ONNX check runs (default 512)")
    parser.add_argument("--min-code-agreement", type=float, default=0.9,
                        help="end-to-end share of equal codes required (default 0.9)")
    parser.add_argument("--min-top1-agreement", type=float, default=0.9,
                        help="share of equal top-1 predictions required (default 0.9)")
    parser.add_argument("--max-logit-diff", type=float, default=None, help="largest |logit difference| allowed")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")


def build_parser() -> argparse.ArgumentParser:
    """The ``qat-ste`` argument parser."""
    parser = _Parser(prog="qat-ste", description="Quantization-aware training with straight-through estimators.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    convert = commands.add_parser(
        "convert", help="float model -> calibrated, fine-tuned quantized model -> ONNX, checked",
        description="Load (or pre-train) a float model, quantize, calibrate, fine-tune, export ONNX and check it "
                    "in ONNX Runtime. Writes OUT/report.json, OUT/quantization.{txt,json}, OUT/model.onnx and "
                    "training checkpoints under OUT/float and OUT/qat.")
    _add_model_arguments(convert, "--weights")
    convert.add_argument("--out", default="runs/convert", help="output folder (default runs/convert)")
    convert.add_argument("--float-epochs", type=int, default=None,
                         help="float pre-training epochs (default: 3 without --weights, 0 with)")
    convert.add_argument("--float-lr", type=float, default=0.05, help="float pre-training LR (default 0.05)")
    convert.add_argument("--epochs", type=int, default=3, help="quantized fine-tuning epochs (default 3)")
    convert.add_argument("--batch-size", type=int, default=64, help="per-process batch size (default 64)")
    convert.add_argument("--lr", type=float, default=0.01, help="fine-tuning LR (default 0.01)")
    convert.add_argument("--optimizer", default="sgd", help="sgd (default) or adamw")
    convert.add_argument("--weight-decay", type=float, default=5e-4)
    convert.add_argument("--schedule", default="cosine", help="cosine (default), multistep or constant")
    convert.add_argument("--warmup-epochs", type=float, default=0.0)
    convert.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, off on CPU), bf16, fp16, off")
    convert.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                         help="torch.compile (auto: on CUDA only)")
    convert.add_argument("--checkpoint-every", type=int, default=0, help="also save last.pt every N steps")
    convert.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    convert.add_argument("--force-resume", action="store_true",
                         help="resume even though the model, data, quantization or calibration settings differ "
                              "from the checkpoint's (implies --resume)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace the files of a run already in --out (each as the new run writes it)")
    convert.add_argument("--form", default="deploy", help="ONNX form: deploy (default) or spec")
    convert.add_argument("--weight-format", default="float", help="ONNX weights: float (default) or int8")
    convert.add_argument("--export-weights", dest="weight_format", action=_DeprecatedAlias,
                         replacement="--weight-format", help=argparse.SUPPRESS)
    convert.add_argument("--opset", type=int, default=None)
    convert.add_argument("--no-export", action="store_true", help="stop after training (no ONNX, no check)")
    convert.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_check_thresholds(convert)

    export = commands.add_parser("export", help="export a quantized checkpoint (or a calibrated model) to ONNX",
                                 description="Export the model of a qat-ste checkpoint, or a --model quantized "
                                             "and calibrated on --data, to ONNX.")
    export.add_argument("--checkpoint", default=None, help="last.pt/best.pt of qat-ste convert (OUT/qat/...)")
    _add_model_arguments(export, "--model-weights")
    export.add_argument("--out", required=True, help="ONNX file to write")
    export.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    export.add_argument("--form", default="deploy", help="deploy (default) or spec")
    export.add_argument("--weight-format", default="float", help="ONNX weights: float (default) or int8")
    export.add_argument("--weights", dest="weight_format", action=_DeprecatedAlias, replacement="--weight-format",
                        help=argparse.SUPPRESS)
    export.add_argument("--opset", type=int, default=None)

    check = commands.add_parser("check", help="check an ONNX file against its PyTorch model in ONNX Runtime",
                                description="Compare an exported ONNX file with the model it came from; exits 1 "
                                            "when parity falls below the thresholds.")
    check.add_argument("--onnx", required=True, help="the ONNX file")
    check.add_argument("--checkpoint", default=None, help="the qat-ste checkpoint the file was exported from")
    _add_model_arguments(check, "--model-weights")
    _add_check_thresholds(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    commands.add_parser("list-stes", help="the registered straight-through estimators")
    commands.add_parser("list-models", help="the model zoo (torchvision/timm names come from those libraries)")
    return parser


# =============================================================================================
# Helpers
# =============================================================================================


def _out(message: str = "") -> None:
    print(message, flush=True)


def _silent(message: str = "") -> None:
    """What ranks other than 0 print: nothing."""


def _human_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000.0
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f} %"


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = "-" * (width + 2 + value_width)
    return "\n".join([title, rule] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [rule])


def _check_positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise QatSteError(f"{name} {value} must be {'>= 0' if allow_zero else '> 0'}", f"pass a valid {name}")


def _check_thresholds(args: argparse.Namespace) -> None:
    for name in ("min_code_agreement", "min_top1_agreement"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise QatSteError(f"--{name.replace('_', '-')} {value} is not a share between 0 and 1",
                              "pass e.g. 0.9 (90 %)")
    if args.max_logit_diff is not None and not args.max_logit_diff >= 0:
        raise QatSteError(f"--max-logit-diff {args.max_logit_diff} must be >= 0", "pass e.g. 0.05")
    _check_positive("--check-samples", args.check_samples)


# ---- QuantConfig from options, a JSON file and checkpoint metadata ----------------------------

#: QuantConfig fields the options of _add_quant_arguments set (dest names)
QUANT_OPTIONS = ("bits", "ste", "alpha_mode", "step_init", "rounding", "per_channel", "include", "exclude",
                 "overrides", "keep_first", "keep_last", "kinds", "quantize_gates")


def quant_from_plain(values: dict[str, Any]) -> Any:
    """The QuantConfig of a plain dict (checkpoint metadata, --quant-config; old names accepted)."""
    from .config import QuantConfig

    return QuantConfig.from_dict(values)


def _parse_scalar(text: str) -> Any:
    """An override value: true/false, none, an int, a float, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """--override 'PATTERN:key=value[,key=value]' (repeatable) as QuantConfig.overrides."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        pattern, _, assignments = item.partition(":")
        options: dict[str, Any] = {}
        for assignment in assignments.split(","):
            key, equals, value = assignment.partition("=")
            if not equals or not key.strip():
                options = {}
                break
            options[key.strip()] = _parse_scalar(value)
        if not pattern.strip() or not options:
            raise QatSteError(f"--override {item!r} is not PATTERN:KEY=VALUE[,KEY=VALUE]",
                              "write e.g. --override 'layer4.*:bits=8,ste=identity'")
        overrides.setdefault(pattern.strip(), {}).update(options)
    return overrides


def _read_quant_file(path: str) -> dict[str, Any]:
    """The JSON object of --quant-config FILE."""
    file = Path(path).expanduser()
    fix = "pass a JSON object of QuantConfig fields, e.g. {\"bits\": 4, \"alpha_mode\": \"lsq\"}"
    if not file.is_file():
        raise QatSteError(f"--quant-config {file} does not exist", fix)
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QatSteError(f"cannot read --quant-config {file}: {error}", fix) from None
    if not isinstance(values, dict):
        raise QatSteError(f"--quant-config {file} holds a {type(values).__name__}, not a JSON object", fix)
    return values


def _quant_config(args: argparse.Namespace) -> Any:
    """The QuantConfig of the options: QuantConfig's defaults, then --quant-config, then the options given."""
    values = _read_quant_file(args.quant_config) if getattr(args, "quant_config", None) else {}
    given = {name: getattr(args, name, None) for name in QUANT_OPTIONS if name != "overrides"}
    if getattr(args, "override", None):
        given["overrides"] = _parse_overrides(args.override)
    kinds = given.get("kinds")
    if isinstance(kinds, str):
        given["kinds"] = [k.strip() for k in kinds.split(",") if k.strip()]
    from .config import renamed_options

    values = {**renamed_options(values, f"--quant-config {args.quant_config}"),
              **{k: v for k, v in given.items() if v is not None}}
    return quant_from_plain(values)


def _load_data(spec: str, image_size: int, seed: int) -> tuple[Any, Any]:
    from .train.build import data_options
    from .train.data import load_dataset, parse_dataset_spec

    parse_dataset_spec(spec)
    options = data_options(spec, image_size)
    return load_dataset(spec, "train", **options), load_dataset(spec, "val", **options)


def _resolve_model_and_data(args: argparse.Namespace, metadata: dict[str, Any] | None = None
                            ) -> tuple[Any, str, int]:
    from .train.build import default_image_size, parse_model_spec

    model_text = args.model or (metadata or {}).get("model") or DEFAULT_MODEL
    spec = parse_model_spec(model_text)
    data = args.data or (metadata or {}).get("data") or DEFAULT_DATA
    image_size = args.image_size
    if image_size is None:
        saved = (metadata or {}).get("image_size")
        image_size = int(saved[0]) if saved else default_image_size(spec, data)
    return spec, data, int(image_size)


def _example_input(dataset: Any) -> Any:
    import torch

    images, _ = dataset.get_batch(torch.arange(1))
    return images


def _val_batches(dataset: Any, samples: int, batch_size: int = 128) -> tuple[list[Any], list[Any]]:
    import torch

    count = min(int(samples), len(dataset))
    inputs, labels = [], []
    for start in range(0, count, batch_size):
        images, targets = dataset.get_batch(torch.arange(start, min(start + batch_size, count)))
        inputs.append(images)
        labels.append(targets)
    return inputs, labels


def _metadata(spec: Any, data: str, info: Any, stage: str, quant: Any | None,
              calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint records about the run: the model, the data, the whole QuantConfig (plain
    values) and the calibration; resume refuses a change to any of it (unless --force-resume)."""
    return {
        "kind": CONVERT_FORMAT, "stage": stage, "model": str(spec), "data": data,
        "num_classes": info.num_classes, "in_channels": info.channels, "image_size": list(info.image_size),
        "quant": None if quant is None else quant.to_dict(), "calibration": calibration,
        "title": f"{spec} on {data} ({stage})",
    }


def _quantize(model: Any, quant: Any, example: Any) -> Any:
    import qat_ste

    return qat_ste.quantize(model, config=quant, example_input=example)


def _calibrate(qmodel: Any, train_set: Any, method: str, batches: int, batch_size: int, seed: int) -> None:
    import qat_ste

    from .train.data import TensorLoader

    device = next((p.device for p in qmodel.parameters()), None)
    loader = TensorLoader(train_set.with_augment(False), batch_size, shuffle=True, seed=seed + 7919, device=device)
    qat_ste.calibrate(qmodel, loader, method, num_batches=batches)


def _model_from_checkpoint(path: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any, Any]:
    """(quantized model with the checkpoint's weights, its metadata, train set, val set)."""
    from .train.build import build_model
    from .train.checkpoint import load_checkpoint, load_model_state

    state = load_checkpoint(path)
    meta = state.get("metadata") or {}
    if meta.get("kind") != CONVERT_FORMAT:
        raise QatSteError(f"{path} has no model description (it was not written by qat-ste convert)",
                          "export it from Python with qat_ste.export.export_onnx(model, path, example_input)")
    if meta.get("stage") != "qat" or not meta.get("quant"):
        raise QatSteError(f"{path} is the float pre-training checkpoint", "pass OUT/qat/last.pt or OUT/qat/best.pt")
    spec, data, image_size = _resolve_model_and_data(args, meta)
    if args.model and str(spec) != meta["model"]:
        raise QatSteError(f"--model {args.model} differs from the checkpoint's model {meta['model']}",
                          "leave --model out when passing --checkpoint")
    train_set, val_set = _load_data(data, image_size, args.seed)
    if (train_set.info.num_classes, train_set.info.channels) != (meta["num_classes"], meta["in_channels"]):
        raise QatSteError(f"--data {data} has {train_set.info.num_classes} classes and {train_set.info.channels} "
                          f"channel(s); the checkpoint's model expects {meta['num_classes']} and {meta['in_channels']}",
                          f"use data like the checkpoint's ({meta['data']})")
    model = build_model(spec, meta["num_classes"], meta["in_channels"], image_size)
    qmodel = _quantize(model, quant_from_plain(meta["quant"]), _example_input(val_set))
    load_model_state(qmodel, state["model"], f"checkpoint {path}", "pass a checkpoint written by qat-ste convert")
    qmodel.eval()
    return qmodel, meta, train_set, val_set


def _model_from_arguments(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """A --model quantized and calibrated on --data (post-training quantization)."""
    import torch

    from .train.build import build_model, load_weights_file

    quant = _quant_config(args)
    spec, data, image_size = _resolve_model_and_data(args)
    train_set, val_set = _load_data(data, image_size, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(spec, train_set.info.num_classes, train_set.info.channels, image_size)
    if args.model_weights:
        load_weights_file(model, args.model_weights, allow_partial=args.allow_partial,
                          on_partial=lambda message: print(f"qat-ste: warning: {message}", file=sys.stderr))
    qmodel = _quantize(model, quant, _example_input(val_set))
    _calibrate(qmodel, train_set, args.calib_method, args.calib_batches, 64, args.seed)
    qmodel.eval()
    return qmodel, train_set, val_set


def _source_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    if args.checkpoint:
        qmodel, _, train_set, val_set = _model_from_checkpoint(args.checkpoint, args)
        return qmodel, train_set, val_set
    return _model_from_arguments(args)


def _run_check(qmodel: Any, onnx_path: Path, val_set: Any, args: argparse.Namespace) -> Any:
    from .export import check_onnx

    inputs, labels = _val_batches(val_set, args.check_samples)
    return check_onnx(qmodel, onnx_path, inputs, labels, min_code_agreement=args.min_code_agreement,
                      min_top1_agreement=args.min_top1_agreement, max_logit_diff=args.max_logit_diff,
                      latency=not args.no_latency)


# =============================================================================================
# convert
# =============================================================================================


EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal number, as shells report a stop by a signal


def _check_convert_numbers(args: argparse.Namespace) -> None:
    _check_thresholds(args)
    for name in ("epochs", "batch_size", "calib_batches"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name), allow_zero=name == "epochs")
    _check_positive("--float-epochs", args.float_epochs, allow_zero=True)


def _check_out_is_a_folder(out: Path) -> None:
    """--out (or a folder above it) that is a file is refused before anything is written."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise QatSteError(f"--out {out}: {path} is a file, not a folder",
                                  "pass a folder for --out (it is created when missing), e.g. runs/NAME")
            return


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # qat_ste.atomic's temporary files


def _describe_run_folder(out: Path, limit: int = 10000) -> str | None:
    """What a non-empty --out holds (a finished run with its accuracy, an interrupted run, N files),
    or None when it holds no files (leftover temporary files aside)."""
    files = []
    for path in out.rglob("*"):
        if path.is_file() and not _is_temp_name(path.name):
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
    """Temporary files a killed run left in --out (and its float/ and qat/ folders)."""
    from .atomic import remove_stale_temp_files

    for folder in (out, out / "float", out / "qat"):
        if folder.is_dir():
            remove_stale_temp_files(folder)


def _drop_resume_points(out: Path) -> None:
    """--overwrite: the old run's last.pt files go at once, so that a later --resume cannot continue
    the old run's stage after the new run's; its results (best.pt, report.json, model.onnx) stay until
    the new run replaces them."""
    for stage in ("float", "qat"):
        (out / stage / "last.pt").unlink(missing_ok=True)


def _load_start_weights(model: Any, args: argparse.Namespace, say: Callable[[str], None]) -> list[str]:
    """Load --weights (refused unless it fits, or --allow-partial); the names left at random init."""
    from .train.build import load_weights_file

    if not args.model_weights:
        return []
    skipped = load_weights_file(model, args.model_weights, allow_partial=args.allow_partial,
                                on_partial=lambda message: say(f"warning: {message}"))
    say(f"weights: {args.model_weights}" + (f" ({len(skipped)} tensor(s) kept their random init: "
                                            f"{', '.join(skipped[:4])})" if skipped else ""))
    return skipped


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings both stages share."""
    return {"batch_size": args.batch_size, "optimizer": args.optimizer, "weight_decay": args.weight_decay,
            "schedule": args.schedule, "warmup_epochs": args.warmup_epochs, "amp": args.amp,
            "compile": {"auto": "auto", "on": True, "off": False}[args.compile], "device": args.device,
            "seed": args.seed, "progress": not args.no_progress, "print_summary": False,
            "checkpoint_every_steps": args.checkpoint_every, "force_resume": args.force_resume}


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
        return _metadata(self.spec, self.data, self.train_set.info, stage, quant, calibration)


def _prepare_model(run: _ConvertRun, image_size: int) -> None:
    """Load the data, build the model and load --weights into it."""
    import torch

    from .train.build import build_model

    tick = time.perf_counter()
    run.train_set, run.val_set = _load_data(run.data, image_size, run.args.seed)
    info = run.train_set.info
    run.timings["data_s"] = time.perf_counter() - tick
    run.say(f"data: {run.data}: {len(run.train_set)} train / {len(run.val_set)} val images, "
            f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}, {info.num_classes} classes")
    torch.manual_seed(run.args.seed)
    run.model = build_model(run.spec, info.num_classes, info.channels, image_size)
    run.skipped = _load_start_weights(run.model, run.args, run.say)
    run.parameters = sum(p.numel() for p in run.model.parameters())
    run.say(f"model: {run.spec} ({type(run.model).__name__}, {run.parameters / 1e3:.1f}k parameters)")
    args = run.args
    run.float_epochs = args.float_epochs if args.float_epochs is not None else (0 if args.model_weights else 3)


def _float_stage(run: _ConvertRun) -> Any:
    """Pre-train the float model (unless --float-epochs 0) and evaluate it; the TrainResult or None."""
    from .train import TrainConfig, evaluate, train

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

    from .train import evaluate

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
    from .train import TrainConfig, evaluate, train

    tick = time.perf_counter()
    result = None
    if run.args.epochs > 0:
        run.say(f"\n== quantization-aware fine-tuning: {run.args.epochs} epoch(s) ==")
        config = TrainConfig(epochs=run.args.epochs, lr=run.args.lr, out_dir=str(run.out / "qat"),
                             resume=run.resume_from("qat"), **_train_settings(run.args))
        result = run.qat_result = train(qmodel, run.train_set, run.val_set, config,
                                        metadata=run.metadata("qat", quant))
        if result.stopped_early:
            return result
    run.quant_eval = evaluate(qmodel, run.val_set, 256, run.device)
    run.timings["finetune_s"] = time.perf_counter() - tick
    run.say(f"quantized accuracy: {_pct(run.quant_eval['accuracy'])} (loss {run.quant_eval['loss']:.4f})")
    return result


def _export_stage(run: _ConvertRun, qmodel: Any) -> Any:
    """OUT/quantization.{txt,json}, and unless --no-export OUT/model.onnx and its check; the site report."""
    import qat_ste

    from .atomic import atomic_write_json, atomic_write_text

    run.out.mkdir(parents=True, exist_ok=True)
    qmodel.cpu().eval()
    report = qat_ste.report(qmodel)
    atomic_write_text(run.out / "quantization.txt", report.table() + "\n")
    atomic_write_json(run.out / "quantization.json", report.to_dict())
    if not run.args.no_export:
        from .export import export_onnx

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


def _report_document(run: _ConvertRun, quant: Any, report: Any) -> dict[str, Any]:
    """The contents of OUT/report.json."""
    import torch

    import qat_ste

    plain_quant, args, out = quant.to_dict(), run.args, run.out
    float_result, qat_result = run.float_result, run.qat_result
    return {
        "format": CONVERT_FORMAT,
        "command": ["qat-ste", *sys.argv[1:]] if Path(sys.argv[0]).name in ("qat-ste", "cli.py") else None,
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
        "versions": {"qat_ste": qat_ste.__version__, "torch": str(torch.__version__)},
    }


def _convert(args: argparse.Namespace) -> int:
    """qat-ste convert: data and model, float stage, quantize and calibrate, qat stage, ONNX, report."""
    from .atomic import atomic_write_json
    from .train.distributed import barrier, env_world, resolve_device, setup_distributed, teardown_distributed

    started = time.perf_counter()
    quant = _quant_config(args)
    _check_convert_numbers(args)
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
        "code_agreement": checked.get("code_agreement"),
        "top1_agreement": checked.get("top1_agreement"),
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
        ("code agreement (end to end)", _pct(s["code_agreement"])),
        ("top-1 agreement", _pct(s["top1_agreement"])),
        ("ONNX file", f"{onnx['path']} ({_human_bytes(s['onnx_file_size_bytes'])}, {onnx['form']}, "
                      f"{onnx['weight_format']} weights)" if onnx else "-"),
        ("latency", latency_text),
        ("ONNX check", check_text),
        ("time", f"{document['timings_s'].get('total_s', 0.0):.1f} s"),
    ]
    return _table("qat-ste convert summary", rows)


# =============================================================================================
# export, check, lists
# =============================================================================================


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
    from .atomic import remove_stale_temp_files
    from .export import export_onnx

    out = Path(args.out).expanduser()
    _check_export_target(out, {"--checkpoint": args.checkpoint, "--model-weights": args.model_weights},
                         args.overwrite)
    if out.parent.is_dir():
        remove_stale_temp_files(out.parent)
    qmodel, _, val_set = _source_model(args)
    result = export_onnx(qmodel, out, _example_input(val_set), form=args.form, weight_format=args.weight_format,
                         opset=args.opset)
    _out(f"wrote {result.path} ({_human_bytes(result.file_size)}, form {result.form}, {result.weight_format} "
         f"weights, opset {result.opset}, {len(result.sites)} quantized site(s))")
    for note in result.notes:
        _out(f"note: {note}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    onnx_path = Path(args.onnx).expanduser()
    if not onnx_path.is_file():
        raise QatSteError(f"ONNX file {onnx_path} does not exist", "pass the file qat-ste convert/export wrote")
    _check_thresholds(args)
    qmodel, _, val_set = _source_model(args)
    report = _run_check(qmodel, onnx_path, val_set, args)
    _out(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if not report.ok:
        print(f"qat-ste check: {onnx_path} fails the parity thresholds: {'; '.join(report.failures)}",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _list_stes(args: argparse.Namespace) -> int:
    from .ste import get_ste, list_stes

    names = list_stes()
    width = max(len(n) for n in names)
    for name in names:
        _out(f"{name.ljust(width)}  {get_ste(name).description}")
    return EXIT_OK


def _list_models(args: argparse.Namespace) -> int:
    from .zoo import ZOO_MODELS

    _out("zoo models (--model zoo:NAME):")
    width = max(len(n) for n in ZOO_MODELS)
    for name in sorted(ZOO_MODELS):
        doc = (ZOO_MODELS[name].__doc__ or "").strip().splitlines()
        _out(f"  {name.ljust(width)}  {doc[0] if doc else ''}")
    _out("\ntorchvision:NAME  any name of torchvision.models.list_models() (e.g. resnet18, mobilenet_v3_small)")
    _out("timm:NAME         any name of timm.list_models() (e.g. resnet18, efficientnet_b0), if timm is installed")
    _out("All are built with random weights for the data's classes and channels; start from a local state dict "
         "with --weights FILE (nothing is downloaded).")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert": _convert, "export": _export, "check": _check, "list-stes": _list_stes, "list-models": _list_models,
}


# =============================================================================================
# main
# =============================================================================================


def _fail(problem: str, fix: str | None) -> None:
    text = f"qat-ste: error: {problem.rstrip('.')}."
    if fix:
        text += f" Fix: {fix.rstrip('.')}."
    print(" ".join(text.split()), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qat-ste`` command line; returns the exit code: 0 ok, 1 failed check or run (or an internal
    error, reported as a bug), 2 bad input or environment, 130/143 stopped by SIGINT/SIGTERM."""
    debug = os.environ.get("QAT_STE_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
        threads = getattr(args, "threads", None)
        if threads is not None:
            _check_positive("--threads", threads)
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return COMMANDS[args.command](args)
            finally:
                torch.set_num_threads(previous)
        return COMMANDS[args.command](args)
    except SystemExit as stop:  # --help
        return int(stop.code or 0) if not isinstance(stop.code, str) else EXIT_USAGE
    except QatSteError as error:
        if debug:
            raise
        from .train.engine import TrainingDiverged

        _fail(error.problem, error.fix)
        return EXIT_FAILED if isinstance(error, TrainingDiverged) else EXIT_USAGE
    except KeyboardInterrupt:
        print("qat-ste: interrupted", file=sys.stderr)
        return 130
    except ImportError as error:
        if debug:
            raise
        _fail(f"a required package is missing ({error})",
              "install the extras: pip install 'qat_ste[onnx,timm,data,plot]'")
        return EXIT_USAGE
    except OSError as error:  # the environment: paths, permissions, disk space
        if debug:
            raise
        _fail(f"{type(error).__name__}: {_first_line(error)[:400]}",
              "check the paths, their permissions and the free disk space; set QAT_STE_DEBUG=1 to see the traceback")
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 - anything else is ours: say so, briefly
        if debug:
            raise
        return _internal_error(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _internal_error(error: Exception) -> int:
    """An error qat_ste did not turn into a clear message: exit 1, never blamed on the user's input."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        _fail(f"out of memory: {_first_line(error)[:300]}",
              "lower --batch-size (or --image-size), or use a larger device")
        return EXIT_FAILED
    print(f"qat-ste: internal error: {type(error).__name__}: {_first_line(error)[:400]}\n"
          "  This is a bug in qat_ste (or an input it fails to check). Please report it with the traceback "
          "that QAT_STE_DEBUG=1 shows.", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

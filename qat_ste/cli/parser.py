"""The ``qat-ste`` argument parser and the checks of its numeric options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import QatSteError

DEFAULT_DATA = "digits"


DEFAULT_MODEL = "zoo:lenet5"

#: ``qat-ste check --runtime`` choices (qat_ste.export.runtime.RUNTIMES, not imported: that loads the export package)
CHECK_RUNTIMES = ("onnxruntime", "openvino")

#: --distill-weight's default: the hard and the soft loss weigh the same, as in LSQ's distillation
#: (TrainConfig's own default, 0, means no distillation)
DISTILL_WEIGHT = 0.5


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as QatSteError (one paragraph, exit code 2) instead of exiting."""

    #: whether this (sub)command reads ``--config FILE`` (convert)
    reads_config = False

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QatSteError(f"{self.prog}: {message}", f"see `{self.prog} --help`")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """argparse's parse, with the values of ``--config FILE`` between the defaults and the options given."""
        if not self.reads_config:
            return super().parse_known_args(args, namespace)
        from .config_file import apply_config_file

        return apply_config_file(self, args, namespace, super().parse_known_args)


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

    from ..train import TrainConfig

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
    group.add_argument("--weight-bits", default=None, metavar="1|ternary|2..8",
                       help="quantize the weights of convolutions and linear layers too: 1 (binary), ternary, "
                            "or 2..8 bits (default: float weights)")
    group.add_argument("--weight-method", default=None, choices=("bcgd", "binaryconnect"),
                       help="training rule for quantized weights (default bcgd: blended coarse gradient descent)")
    group.add_argument("--bcgd-rho", type=float, default=None,
                       help="BCGD's blending factor rho in w <- (1 - rho) w + rho Q(w) - lr g (default 1e-5)")
    group.add_argument("--integer-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="add the 8-bit quantization points a fully integer runtime needs (graph input, "
                            "residual adds/concats, classifier input...): every conv/matmul exports as an integer "
                            "kernel (the ONNX file then has int8 weights by default)")
    group.add_argument("--kernel", default=None, choices=("auto", "triton", "torch"),
                       help="quantizer implementation: auto (default: fused Triton kernels on CUDA, torch "
                            "elsewhere), triton or torch")


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tuning recipe (qat_ste.train.distill / ema / bn_policy): distillation, EMA, label
    smoothing, BatchNorm freeze. 'auto' defaults depend on whether the start is pretrained."""
    group = parser.add_argument_group(
        "fine-tuning recipe (a pretrained start, --weights with --float-epochs 0, turns on distillation and "
        "the BatchNorm freeze by default)")
    group.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                       help="distill from the float model (a frozen copy) during quantized fine-tuning "
                            "(default: on for a pretrained start, else off)")
    group.add_argument("--distill-weight", type=float, default=DISTILL_WEIGHT,
                       help=f"w in (1-w)*CE + w*T^2*KL when --distill is on (default {DISTILL_WEIGHT})")
    temperature = _train_default("distill_temperature")
    group.add_argument("--distill-temperature", type=float, default=temperature,
                       help=f"distillation temperature T (default {temperature:g})")
    group.add_argument("--ema", dest="ema", type=float, metavar="DECAY", default=None,
                       help="keep an EMA of the weights with this decay (e.g. 0.999): it is evaluated, picks "
                            "best.pt and is exported (default off)")
    group.add_argument("--label-smoothing", type=float, default=_train_default("label_smoothing"),
                       help="label smoothing of the cross-entropy (default 0)")
    group.add_argument("--freeze-bn-after", metavar="STEPS|never", type=_steps_or_never, default=None,
                       help="BatchNorm statistics frozen from this fine-tuning step on (default: 200 for a "
                            "pretrained start, else never)")


def _steps_or_never(text: str) -> int | str:
    """--freeze-bn-after: a step count >= 0, or 'never'."""
    if str(text).strip().lower() in ("never", "off", "none"):
        return "never"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count or 'never'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (or 'never')")
    return value


def _share_or_none(text: str) -> float | None:
    """A share between 0 and 1, or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1 or 'none'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a share between 0 and 1 (or 'none')")
    return value


def _add_check_thresholds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check-samples", type=int, default=512,
                        help="held-out images the ONNX check runs (default 512)")
    parser.add_argument("--min-chained-code-agreement", type=_share_or_none, default=0.999, metavar="SHARE|none",
                        help="share of PyTorch's codes equal to the file's, given the file's codes at every site "
                             "upstream, required (default 0.999)")
    parser.add_argument("--min-top1-agreement", type=float, default=0.9,
                        help="share of equal top-1 predictions required, PyTorch given the file's codes at every "
                             "site (default 0.9)")
    parser.add_argument("--min-code-agreement", type=_share_or_none, default=None, metavar="SHARE|none",
                        help="end-to-end share of equal codes required, each runtime computing every site itself "
                             "(default none: reported only)")
    parser.add_argument("--min-end-to-end-agreement", type=_share_or_none, default=None, metavar="SHARE|none",
                        help="end-to-end share of equal top-1 predictions required (default none: reported only)")
    parser.add_argument("--max-logit-diff", type=float, default=None,
                        help="largest end-to-end |logit difference| allowed")
    parser.add_argument("--min-default-agreement", type=_share_or_none, default=0.9, metavar="SHARE|none",
                        help="share of equal top-1 predictions required under ONNX Runtime's default session "
                             "options, where Q/DQ become integer kernels, PyTorch given the codes the file "
                             "computes there (default 0.9; none: reported only)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")


def _add_convert_arguments(convert: argparse.ArgumentParser) -> None:
    """The options of ``qat-ste convert``."""
    _add_model_arguments(convert, "--weights")
    convert.add_argument("--out", default="runs/convert", help="output folder (default runs/convert)")
    convert.add_argument("--float-epochs", type=int, default=None,
                         help="float pre-training epochs (default: 3 without --weights, 0 with)")
    convert.add_argument("--float-lr", type=float, default=0.05, help="float pre-training LR (default 0.05)")
    convert.add_argument("--epochs", type=int, default=3, help="quantized fine-tuning epochs (default 3)")
    convert.add_argument("--batch-size", type=int, default=64, help="per-process batch size (default 64)")
    convert.add_argument("--preprocess", default="auto", metavar="auto|WEIGHTS",
                         help="preprocessing of streamed image folders: auto (the model's own: timm's pretrained "
                              "config; torchvision's 224/256 resize-crop) or a torchvision weights name such as "
                              "ResNet18_Weights.IMAGENET1K_V1 (its transforms; nothing is downloaded)")
    convert.add_argument("--workers", type=int, default=None,
                         help="data loading worker processes per rank for streamed image folders "
                              "(default: up to 8, from the CPU count)")
    convert.add_argument("--config", metavar="FILE.yaml", default=None,
                         help="a YAML or JSON file of convert options (keys: the long option names, with - or _); "
                              "options given on the command line win; OUT/config.yaml is such a file")
    convert.add_argument("--lr", type=float, default=0.01, help="fine-tuning LR (default 0.01)")
    convert.add_argument("--optimizer", default="sgd", help="sgd (default) or adamw")
    convert.add_argument("--weight-decay", type=float, default=5e-4)
    convert.add_argument("--schedule", default="cosine", help="cosine (default), multistep or constant")
    convert.add_argument("--warmup-epochs", type=float, default=None,
                         help="linear LR warmup (default 0; 0.1 for a pretrained start)")
    _add_finetune_arguments(convert)
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
    convert.add_argument("--weight-format", default=None, choices=("float", "int8"),
                         help="ONNX weights: float or int8 (default: int8 for an --integer-graph model, else float)")
    convert.add_argument("--export-weights", dest="weight_format", action=_DeprecatedAlias,
                         replacement="--weight-format", help=argparse.SUPPRESS)
    convert.add_argument("--opset", type=int, default=None)
    convert.add_argument("--no-export", action="store_true", help="stop after training (no ONNX, no check)")
    convert.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_check_thresholds(convert)


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
    convert.reads_config = True
    _add_convert_arguments(convert)

    export = commands.add_parser("export", help="export a quantized checkpoint (or a calibrated model) to ONNX",
                                 description="Export the model of a qat-ste checkpoint, or a --model quantized "
                                             "and calibrated on --data, to ONNX.")
    export.add_argument("--checkpoint", default=None, help="last.pt/best.pt of qat-ste convert (OUT/qat/...)")
    _add_model_arguments(export, "--model-weights")
    export.add_argument("--out", required=True, help="ONNX file to write")
    export.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    export.add_argument("--form", default="deploy", help="deploy (default) or spec")
    export.add_argument("--weight-format", default=None, choices=("float", "int8"),
                         help="ONNX weights: float or int8 (default: int8 for an --integer-graph model, else float)")
    export.add_argument("--weights", dest="weight_format", action=_DeprecatedAlias, replacement="--weight-format",
                        help=argparse.SUPPRESS)
    export.add_argument("--opset", type=int, default=None)

    check = commands.add_parser("check", help="check an ONNX file against its PyTorch model in ONNX Runtime or "
                                              "OpenVINO",
                                description="Compare an exported ONNX file with the model it came from, run in "
                                            "--runtime; exits 1 when parity falls below the thresholds.")
    check.add_argument("--onnx", required=True, help="the ONNX file")
    check.add_argument("--runtime", default="onnxruntime", choices=CHECK_RUNTIMES,
                       help="runtime that runs the file: onnxruntime (default) or openvino (needs "
                            "pip install 'qat_ste[openvino]')")
    check.add_argument("--runtime-option", action="append", metavar="KEY=VALUE", default=None,
                       help="an option of the file as deployed and of the latency runs (repeatable): an OpenVINO "
                            "property, e.g. INFERENCE_PRECISION_HINT=f32 (bf16 is its default on CPUs that have it), "
                            "or an ONNX Runtime session config entry")
    check.add_argument("--checkpoint", default=None, help="the qat-ste checkpoint the file was exported from")
    _add_model_arguments(check, "--model-weights")
    _add_check_thresholds(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    commands.add_parser("list-stes", help="the registered straight-through estimators")
    commands.add_parser("list-models", help="the model zoo (torchvision/timm names come from those libraries)")
    return parser


def _check_positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise QatSteError(f"{name} {value} must be {'>= 0' if allow_zero else '> 0'}", f"pass a valid {name}")


def check_threshold_options(args: argparse.Namespace) -> dict[str, Any]:
    """check_onnx()'s threshold arguments from the command's options."""
    return {name: getattr(args, name) for name in (
        "min_chained_code_agreement", "min_top1_agreement", "min_code_agreement", "min_end_to_end_agreement",
        "max_logit_diff", "min_default_agreement")}


def _check_thresholds(args: argparse.Namespace) -> None:
    for name in ("min_top1_agreement",):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise QatSteError(f"--{name.replace('_', '-')} {value} is not a share between 0 and 1",
                              "pass e.g. 0.9 (90 %)")
    if args.max_logit_diff is not None and not args.max_logit_diff >= 0:
        raise QatSteError(f"--max-logit-diff {args.max_logit_diff} must be >= 0", "pass e.g. 0.05")
    _check_positive("--check-samples", args.check_samples)

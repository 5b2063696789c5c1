"""Deployment benchmark: float ONNX vs our deploy file vs ONNX Runtime's own int8 quantization, in
ONNX Runtime and OpenVINO, side by side in one run.

For each model (random weights, nothing downloaded, 224 px): the ``float`` file; ``deploy``, ours
(``qat_ste.quantize`` with ``--bits`` activation bits, calibrated on generated images,
``export_onnx(form="deploy", weight_format="int8")``; with ``integer_graph=True`` when QuantConfig
has that field, which the header says); ``peer``, ONNX Runtime's ``quant_pre_process`` +
``quantize_static`` of the float file (QDQ, per-channel int8 weights, uint8 activations) calibrated
on the same images. Each file runs in each runtime with its default options (threads set), at every
batch x thread count. Columns: integer kernels / convolutions+matmuls (ORT: in its optimized graph
against the float file's Conv+Gemm+MatMul; OpenVINO: u8/i8 layers of its executable graph), size,
top-1 agreement with the float PyTorch model on the bench images, median latency, x float (the same
runtime's float ms / this ms) and x peer (the peer's ms / this ms; > 1 is faster).

    python -m tools.bench_deploy                                 # the default table (~30-60 min on 2 cores)
    python -m tools.bench_deploy --models resnet18 --runtimes openvino --batches 1 --threads all
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qat_ste.atomic import atomic_write_json, atomic_write_text
from tools import deploy_lib as lib
from tools.deploy_lib import log

EXPORTERS = ("float", "deploy", "peer")


def make_files(name: str, model: torch.nn.Module, calibration: list[torch.Tensor], bits: int,
               directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The three files of ``model`` (paths) and, for each that failed, why."""
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    example = calibration[0][:1]
    steps = {
        "float": lambda: lib.export_float(model, directory / f"{name}-float.onnx", example),
        "deploy": lambda: lib.export_deploy(lib.quantize_model(model, bits, calibration),
                                            directory / f"{name}-deploy.onnx", example),
        "peer": lambda: lib.export_peer(paths["float"], directory / f"{name}-peer.onnx", calibration),
    }
    for kind in EXPORTERS:
        if kind == "peer" and "float" not in paths:
            errors[kind] = "peer quantization skipped: the float export failed"
            continue
        log(f"{name}: {'quantizing (ORT quantize_static)' if kind == 'peer' else 'exporting'} {kind}")
        try:
            paths[kind] = steps[kind]()
        except Exception as error:  # noqa: BLE001 - a failed model gets a row saying why, the bench goes on
            what = "peer quantization" if kind == "peer" else f"{kind} export"
            errors[kind] = f"{what} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
            log(f"{name}: {errors[kind]}")
    return paths, errors


def file_rows(name: str, paths: dict[str, Path], errors: dict[str, str], runtimes: list[str]) -> list[dict]:
    """One row per file and runtime with what does not need timing: size, integer kernels, error."""
    compute = lib.compute_op_count(paths["float"]) if "float" in paths else None
    rows = []
    for kind in EXPORTERS:
        ops = lib.ort_optimized_ops(paths[kind]) if kind in paths else {}
        for runtime in runtimes:
            row: dict[str, Any] = {
                "model": name, "file": kind, "runtime": runtime, "error": errors.get(kind),
                "form": {"float": "float32", "deploy": lib.deploy_form_name(),
                         "peer": "ORT quantize_static QDQ u8/s8 per-channel"}[kind],
                "size_mb": paths[kind].stat().st_size / 2 ** 20 if kind in paths else None,
                "int_kernels": None, "compute_ops": None, "weight_only": None, "top1": None, "precision": None,
                "ms": {}, "times": {}, "x_float": {}, "x_peer": {}}
            if kind in paths and runtime == "onnxruntime":
                row.update(int_kernels=lib.ort_integer_kernels(ops), compute_ops=compute,
                           weight_only=lib.ort_weight_only_kernels(ops), ort_ops=ops)
            rows.append(row)
    return rows


def time_rows(rows: list[dict], paths: dict[str, Path], eval_images: torch.Tensor, reference: np.ndarray,
              args: argparse.Namespace) -> None:
    """Fill latency and top-1 agreement: per runtime and batch x threads the three files in turn."""
    top1_setting = (max(args.batches), max(args.threads))
    for runtime in args.runtimes:
        for batch in args.batches:
            x = eval_images[:batch].numpy() if len(eval_images) >= batch else \
                eval_images[:1].expand(batch, *eval_images.shape[1:]).numpy()
            for threads in args.threads:
                setting = f"b{batch}_t{threads}"
                for row in rows:
                    if row["runtime"] != runtime or row["error"] or row["file"] not in paths:
                        continue
                    log(f"{row['model']}: {runtime} {row['file']} batch {batch}, {threads} thread(s)")
                    try:
                        run, info = lib.RUNNERS[runtime](paths[row["file"]], batch, threads, args.openvino_precision)
                        row["ms"][setting], row["times"][setting] = lib.median_ms(run, x, args.runs, args.warmup)
                        if (batch, threads) == top1_setting:
                            agree = lib.predictions(run, eval_images, batch) == reference
                            row["top1"] = float(agree.mean())
                    except Exception as error:  # noqa: BLE001 - the row says why, the bench goes on
                        row["error"] = f"{runtime} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
                        log(f"{row['model']}: {row['error']}")
                        continue
                    if runtime == "openvino":
                        row.update(int_kernels=info["ov_integer"], compute_ops=info["ov_compute"],
                                   precision=info["precision"])
    add_ratios(rows)


def add_ratios(rows: list[dict]) -> None:
    """x float = the same runtime's float ms / ms; x peer = the peer's ms / ms (same setting)."""
    index = {(r["model"], r["file"], r["runtime"]): r for r in rows}
    for row in rows:
        for setting, ms in row["ms"].items():
            for key, other in (("x_float", "float"), ("x_peer", "peer")):
                base = index.get((row["model"], other, row["runtime"]))
                if base is not None and setting in base["ms"]:
                    row[key][setting] = base["ms"][setting] / ms


def bench_model(name: str, args: argparse.Namespace, directory: Path) -> list[dict]:
    """Every row of one model; a model that cannot even be built gets one failed row per file/runtime."""
    log(f"{name}: building (random weights)")
    try:
        model, size = lib.build_model(name)
        calibration = lib.batches_of(lib.generate_images(args.calibration_images, size, seed=1), 8)
        eval_images = lib.generate_images(args.images, size, seed=2)
        with torch.no_grad():
            reference = np.concatenate([model(b).argmax(1).numpy() for b in lib.batches_of(eval_images, 32)])
    except Exception as error:  # noqa: BLE001 - the bench goes on with the next model
        why = f"model failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        log(f"{name}: {why}")
        return file_rows(name, {}, dict.fromkeys(EXPORTERS, why), args.runtimes)
    paths, errors = make_files(name, model, calibration, args.bits, directory)
    rows = file_rows(name, paths, errors, args.runtimes)
    time_rows(rows, paths, eval_images, reference, args)
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _kernels(row: dict) -> str:
    if row["int_kernels"] is None:
        return "-"
    text = f"{row['int_kernels']}/{row['compute_ops'] if row['compute_ops'] is not None else '?'}"
    return text + (f" +{row['weight_only']}w" if row.get("weight_only") else "")


def _cell(row: dict, setting: str) -> str:
    ms = row["ms"].get(setting)
    if ms is None:
        return "-"
    ratios = [_fmt(row[key].get(setting), ".2f", "x") for key in ("x_float", "x_peer")]
    return f"{ms:.3g} / {ratios[0]} / {ratios[1]}" if ms < 100 else f"{ms:.0f} / {ratios[0]} / {ratios[1]}"


def table(rows: list[dict], settings: list[str]) -> str:
    """The markdown table: one row per model, file and runtime; per batch x threads setting one cell
    ``ms / x float / x peer``."""
    head = ["model", "file", "runtime", "int kernels", "MB", "top-1"]
    head += [f"{s.replace('_', ' ')}: ms / x float / x peer" for s in settings] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["file"], r["runtime"], _kernels(r), _fmt(r["size_mb"], ".1f"),
                 _fmt(None if r["top1"] is None else 100 * r["top1"], ".1f", " %")]
        cells += [_cell(r, s) for s in settings]
        note = r["error"] or (f"OpenVINO precision {r['precision']}" if r.get("precision") else "")
        lines.append("| " + " | ".join(cells + [note.replace("|", "/")]) + " |")
    return "\n".join(lines)


def header(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime

    meta: dict[str, Any] = {"tool": "tools.bench_deploy", "cpu": lib.cpu_summary(), "torch": torch.__version__,
                            "onnxruntime": onnxruntime.__version__, "deploy_form": lib.deploy_form_name(),
                            "bits": args.bits, "runs": args.runs, "warmup": args.warmup,
                            "openvino_precision": args.openvino_precision, "images": args.images,
                            "calibration_images": args.calibration_images, "batches": list(args.batches),
                            "threads": list(args.threads), "runtimes": list(args.runtimes)}
    if "openvino" in args.runtimes:
        import openvino

        meta["openvino"] = openvino.__version__
    return meta


def describe(meta: dict[str, Any]) -> str:
    cpu = meta["cpu"]
    versions = ", ".join(f"{k} {meta[k]}" for k in ("onnxruntime", "openvino", "torch") if k in meta)
    return (f"{cpu['name']} ({cpu['cpus']} CPUs; {', '.join(cpu['flags']) or 'no AVX2'}); {versions}. "
            f"Our deploy file: {meta['deploy_form']}, {meta['bits']}-bit activations, int8 weights. "
            f"OpenVINO inference precision: {meta['openvino_precision']}. Median of {meta['runs']} runs after "
            f"{meta['warmup']} warm-up; top-1 agreement with float PyTorch on {meta['images']} generated images; "
            "x float/x peer: that file's ms / this ms (> 1 is faster).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default=",".join(lib.MODELS), help="comma-separated: " + ", ".join(lib.MODELS))
    parser.add_argument("--batches", default="1,32", help="batch sizes (default 1,32)")
    parser.add_argument("--threads", default="1,all", help="thread counts; 'all' = os.cpu_count() (default 1,all)")
    parser.add_argument("--runtimes", default=",".join(lib.RUNTIMES), help="onnxruntime, openvino (default both)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement, median (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    parser.add_argument("--openvino-precision", choices=("default", "f32"), default="default",
                        help="OpenVINO's INFERENCE_PRECISION_HINT: its default (bf16 on CPUs with AVX512-BF16/AMX) "
                             "or f32")
    parser.add_argument("--bits", type=int, default=8, help="our activation bits (default 8)")
    parser.add_argument("--images", type=int, default=64, help="bench images for top-1 agreement (default 64)")
    parser.add_argument("--calibration-images", type=int, default=32, help="calibration images (default 32)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_deploy"),
                        help="folder for results.json and table.md (default runs/bench_deploy)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the ONNX files here (default: a temp dir)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in lib.MODELS + lib.HIDDEN_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(lib.MODELS)}")
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not args.runtimes or any(r not in lib.RUNTIMES for r in args.runtimes):
        parser.error(f"--runtimes {','.join(args.runtimes)}: choose from {', '.join(lib.RUNTIMES)}")
    if "openvino" in args.runtimes:
        try:
            import openvino  # noqa: F401
        except ImportError:
            parser.error("openvino is not installed: pip install openvino, or pass --runtimes onnxruntime")
    try:
        args.batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
        args.threads = lib.parse_threads(args.threads)
    except ValueError as error:
        parser.error(str(error))
    if not args.batches or min(args.batches) < 1 or args.runs < 1 or args.images < 1 or args.calibration_images < 1:
        parser.error("--batches, --runs, --images and --calibration-images must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads))
    meta = header(args)
    settings = lib.settings_of(args.batches, args.threads)
    log(f"deploy file: {meta['deploy_form']}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            rows += bench_model(name, args, directory)
            atomic_write_json(args.out / "results.json", {"meta": meta, "settings": settings, "rows": rows})
    text = f"{describe(meta)}\n\n{table(rows, settings)}\n"
    atomic_write_text(args.out / "table.md", text)
    print(text)
    log(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

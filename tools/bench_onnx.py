"""ONNX Runtime CPU latency of float vs deploy-int8 vs spec exports.

For each model (random weights, BatchNorm statistics randomised so folded convolutions carry
biases), quantize the activations, calibrate on random data, export

- ``float``: the float model (every quantized site replaced by the activation it wraps),
- ``deploy-int8``: uint8 activation codes + per-channel int8 weights (ORT's default session options),
- ``spec``: narrowest code types (UINT4 / UINT2) + int8 weights (``session.disable_quant_qdq=1``),

then time each at batch 1 and 8 with a fixed intra-op thread count (median of ``--runs`` runs,
one process, one run of the whole table) and count the integer kernels in ORT's optimized graph.

    python -m tools.bench_onnx --threads 2 --runs 10
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import qat_ste
from qat_ste.export import export_float_onnx, export_onnx
from qat_ste.export.runtime import is_integer_op, make_session, median_latency_ms, optimized_op_counts

MODELS = ("resnet18", "mobilenet_v3_large", "lenet5")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A model with random weights and its input shape (without the batch)."""
    if name == "lenet5":
        from qat_ste.zoo import lenet5

        model, shape = lenet5(), (1, 28, 28)
    else:
        import torchvision

        model, shape = getattr(torchvision.models, name)(), (3, 224, 224)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval(), shape


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_model(name: str, bits: int, threads: int, runs: int, batches: tuple[int, ...], directory: Path) -> list[dict]:
    log(f"{name}: building and quantizing ({bits}-bit activations)")
    model, shape = build(name)
    torch.manual_seed(0)
    qmodel = qat_ste.quantize(model, bits=bits, example_input=torch.randn(1, *shape))
    log(f"{name}: calibrating on random data")
    qat_ste.calibrate(qmodel, [torch.randn(4, *shape) for _ in range(2)])
    example = torch.randn(1, *shape)
    files: list[tuple[str, Path, dict[str, str], str]] = []
    log(f"{name}: exporting float")
    files.append(("float", export_float_onnx(qmodel, directory / f"{name}-float.onnx", example), {}, "float32"))
    log(f"{name}: exporting deploy-int8")
    r = export_onnx(qmodel, directory / f"{name}-deploy-int8.onnx", example, weight_format="int8")
    files.append(("deploy-int8", r.path, r.session_config, "/".join(sorted({s.container for s in r.sites}))))
    log(f"{name}: exporting spec (int8 weights)")
    r = export_onnx(qmodel, directory / f"{name}-spec.onnx", example, form="spec", weight_format="int8")
    files.append(("spec", r.path, r.session_config, "/".join(sorted({s.container for s in r.sites}))))
    rows = []
    for variant, path, config, codes in files:
        ops = optimized_op_counts(path, config)
        integer = {k: v for k, v in ops.items() if is_integer_op(k)}
        row = {"model": name, "variant": variant, "codes": codes, "size_mb": path.stat().st_size / 2 ** 20,
               "integer_ops": ", ".join(f"{v} {k}" for k, v in sorted(integer.items())) or "-",
               "options": ", ".join(f"{k}={v}" for k, v in config.items()) or "defaults"}
        session = make_session(path, config, threads=threads)
        feed_name = session.get_inputs()[0].name
        for batch in batches:
            log(f"{name}: timing {variant} at batch {batch}")
            x = torch.randn(batch, *shape).numpy()
            row[f"b{batch}"] = median_latency_ms(session, {feed_name: x}, runs=runs)
        rows.append(row)
    return rows


def table(rows: list[dict], batches: tuple[int, ...]) -> str:
    floats = {(r["model"]): r for r in rows if r["variant"] == "float"}
    head = f"{'model':<19} {'variant':<12} {'act. codes':<11} {'size MB':>8}  "
    head += "  ".join(f"{'b' + str(b) + ' ms':>9} {'speedup':>7}" for b in batches)
    head += f"  {'ORT options':<28} integer kernels (optimized graph)"
    lines = [head, "-" * len(head)]
    for r in rows:
        base = floats[r["model"]]
        line = f"{r['model']:<19} {r['variant']:<12} {r['codes']:<11} {r['size_mb']:>8.2f}  "
        line += "  ".join(f"{r[f'b{b}']:>9.2f} {base[f'b{b}'] / r[f'b{b}']:>6.2f}x" for b in batches)
        line += f"  {r['options']:<28} {r['integer_ops']}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--bits", type=int, default=4, help="activation bits (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--keep", type=Path, default=None, help="write the exports here instead of a temp dir")
    args = parser.parse_args(argv)
    import onnxruntime

    batches = tuple(int(b) for b in args.batches.split(","))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for name in models:
            rows += bench_model(name, args.bits, args.threads, args.runs, batches, directory)
    print(f"ONNX Runtime {onnxruntime.__version__} CPU, {args.threads} thread(s), {cpu_name()}; "
          f"{args.bits}-bit activations, median of {args.runs} runs; speedup = float ms / variant ms")
    print(table(rows, batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())

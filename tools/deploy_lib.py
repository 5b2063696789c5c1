"""The pieces of ``tools.bench_deploy``: models, images, the three files, runners, counts, the table.

Three ONNX files per model: ``float`` (the float model), ``deploy`` (ours: ``qat_ste.quantize`` with
8-bit activations by default, calibrated, ``export_onnx(form="deploy", weight_format="int8")``, with
``integer_graph=True`` once ``QuantConfig`` has that field) and ``peer`` (ONNX Runtime's own
``quant_pre_process`` + ``quantize_static`` of the float file: QDQ, per-channel int8 weights, uint8
activations, calibrated on the same images). Each runs in ONNX Runtime and OpenVINO with the
runtime's default options except the thread count.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import qat_ste

#: the models of the default run (torchvision and timm, random weights; nothing is downloaded)
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
          "vit_small_patch16_224")
#: accepted by --models but not advertised: a small residual CNN at 32 px for the tests
HIDDEN_MODELS = ("tiny_cnn",)
FILES = ("float", "deploy", "peer")
RUNTIMES = ("onnxruntime", "openvino")
#: compute ops of a float graph that integer kernels replace (counted in the float ONNX file)
COMPUTE_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
#: ONNX Runtime kernels that compute a convolution or a matrix product on integers
ORT_INTEGER_KERNELS = frozenset({
    "QLinearConv", "NhwcQLinearConv", "QLinearConvTranspose", "QGemm", "QLinearMatMul", "MatMulInteger",
    "MatMulIntegerToFloat", "ConvInteger", "DynamicQuantizeMatMul", "QAttention",
})
#: ORT kernels with integer weights but float activations (weight-only quantization): counted apart
ORT_WEIGHT_ONLY_KERNELS = frozenset({"MatMulNBits", "GatherBlockQuantized"})
#: OpenVINO CPU executable-graph layer types that compute a convolution or a matrix product
OV_COMPUTE_LAYERS = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                               "Gemm", "BinaryConvolution"})


def log(message: str) -> None:
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Models and images
# --------------------------------------------------------------------------------------------

class TinyCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block, pooling and a linear classifier (3 x 32 x 32 input)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.act(x + self.conv2(self.conv1(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str) -> tuple[nn.Module, int]:
    """A model with random weights (BatchNorm statistics randomised too) and its image size."""
    torch.manual_seed(0)
    model: nn.Module
    if name == "tiny_cnn":
        model, size = TinyCNN(), 32
    elif name.startswith("vit_"):
        import timm

        model, size = timm.create_model(name, pretrained=False), 224
    else:
        import torchvision

        if not hasattr(torchvision.models, name):
            raise ValueError(f"unknown model {name!r}")
        model, size = getattr(torchvision.models, name)(weights=None), 224
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None \
                and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval(), size


def generate_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` smooth random images (low-frequency colour fields plus a little noise), about unit variance."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 7, 7, generator=g)
    images = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (images + 0.1 * torch.randn(n, 3, size, size, generator=g)).contiguous()


def batches_of(images: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [images[i:i + batch] for i in range(0, len(images), batch)]


# --------------------------------------------------------------------------------------------
# The three files
# --------------------------------------------------------------------------------------------

def integer_graph_available() -> bool:
    """Whether ``QuantConfig`` has the ``integer_graph`` field (issue 14's fully integer deploy form)."""
    from qat_ste.config import QuantConfig

    return "integer_graph" in {f.name for f in dataclasses.fields(QuantConfig)}


def deploy_form_name() -> str:
    return "integer_graph=True" if integer_graph_available() else "current deploy form (no integer_graph field)"


def quantize_model(model: nn.Module, bits: int, calibration: Sequence[torch.Tensor]) -> nn.Module:
    """Our quantized model: activations at ``bits`` (fully integer graph when available), calibrated."""
    options: dict[str, Any] = {"integer_graph": True} if integer_graph_available() else {}
    qmodel = qat_ste.quantize(model, bits=bits, example_input=calibration[0][:1], **options)
    qat_ste.calibrate(qmodel, list(calibration))
    return qmodel.eval()


def export_float(qmodel: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """The float file: every quantized site replaced by the activation it wraps (BatchNorm folded)."""
    from qat_ste.export import export_float_onnx

    return export_float_onnx(qmodel, path, example)


def export_deploy(qmodel: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Our deploy file: integer activation codes and per-channel int8 weights."""
    from qat_ste.export import export_onnx

    return export_onnx(qmodel, path, example, form="deploy", weight_format="int8").path


def export_peer(float_path: Path, path: Path, calibration: Sequence[torch.Tensor]) -> Path:
    """ONNX Runtime's static int8 quantization of the float file (QDQ, per-channel int8 weights,
    uint8 activations, MinMax calibration on ``calibration``), after its ``quant_pre_process``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    input_name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: b.numpy()} for b in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    pre = path.with_name(path.stem + "-pre.onnx")
    quant_pre_process(str(float_path), str(pre))
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    pre.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Counting integer kernels
# --------------------------------------------------------------------------------------------

def compute_op_count(model: Any) -> int:
    """Conv, Gemm, MatMul (and ConvTranspose) nodes of an ONNX model (path or ModelProto), subgraphs
    and local functions included."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    graphs = [proto.graph]
    count = 0
    nodes: list[Any] = [n for f in proto.functions for n in f.node]
    while graphs:
        graph = graphs.pop()
        nodes.extend(graph.node)
    while nodes:
        node = nodes.pop()
        count += node.op_type in COMPUTE_OPS
        for attribute in node.attribute:
            subgraphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
            for sub in subgraphs:
                nodes.extend(sub.node)
    return count


def ort_integer_kernels(op_counts: Mapping[str, int]) -> int:
    """Integer convolution / matrix-product kernels among ORT optimized-graph op counts."""
    return sum(n for op, n in op_counts.items() if op in ORT_INTEGER_KERNELS)


def ort_weight_only_kernels(op_counts: Mapping[str, int]) -> int:
    """Weight-only quantized kernels (integer weights, float activations) among ORT op counts."""
    return sum(n for op, n in op_counts.items() if op in ORT_WEIGHT_ONLY_KERNELS)


def ort_optimized_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs for ``path`` with default session options."""
    from qat_ste.export.runtime import optimized_op_counts

    return optimized_op_counts(path, {})


def ov_integer_kernels(compiled: Any) -> tuple[int, int]:
    """(integer, all) convolution / matrix-product layers of an OpenVINO compiled model's
    executable graph; integer means the layer's runtime precision is u8 or i8."""
    integer = total = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or info["layerType"].astype(str) not in OV_COMPUTE_LAYERS:
            continue
        total += 1
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
        integer += precision in ("u8", "i8")
    return integer, total


# --------------------------------------------------------------------------------------------
# Runtimes
# --------------------------------------------------------------------------------------------

Runner = Callable[[np.ndarray], np.ndarray]


def ort_runner(path: Path, batch: int, threads: int, precision: str = "default") -> tuple[Runner, dict[str, Any]]:
    """An ONNX Runtime CPU session (default options, ``threads`` intra-op threads) as a function;
    ``precision`` is OpenVINO's setting and is not used here."""
    from qat_ste.export.runtime import make_session

    session = make_session(path, {}, threads=threads)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run, {}


def ov_runner(path: Path, batch: int, threads: int, precision: str = "default") -> tuple[Runner, dict[str, Any]]:
    """An OpenVINO CPU compiled model (input reshaped to ``batch``, INFERENCE_NUM_THREADS=threads;
    ``precision`` "f32" sets INFERENCE_PRECISION_HINT, "default" leaves OpenVINO's choice)."""
    import openvino

    core = openvino.Core()
    model = core.read_model(str(path))
    dims = [d.get_length() if d.is_static else -1 for d in model.inputs[0].get_partial_shape()]
    dims[0] = batch
    model.reshape({model.inputs[0].get_any_name(): dims})
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer({0: x})[compiled.outputs[0]])

    integer, total = ov_integer_kernels(compiled)
    info = {"ov_integer": integer, "ov_compute": total,
            "precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))}
    return run, info


def _type_name(value: Any) -> str:
    """``openvino.Type.bf16`` -> ``"bf16"`` (other values as text)."""
    return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)


RUNNERS: dict[str, Callable[[Path, int, int, str], tuple[Runner, dict[str, Any]]]] = {
    "onnxruntime": ort_runner, "openvino": ov_runner}


def median_ms(run: Runner, x: np.ndarray, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``run(x)`` over ``runs`` runs after ``warmup``, in ms (and every time)."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def predictions(run: Runner, images: torch.Tensor, batch: int) -> np.ndarray:
    """Top-1 classes of ``run`` on ``images`` in batches of ``batch`` (the last one padded)."""
    out = []
    for chunk in batches_of(images, batch):
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
        out.append(np.asarray(run(chunk.numpy())).reshape(batch, -1)[:n].argmax(1))
    return np.concatenate(out)


def parse_threads(text: str) -> tuple[int, ...]:
    """``"1,all"`` -> (1, os.cpu_count()); duplicates dropped, order kept."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        value = (os.cpu_count() or 1) if part == "all" else int(part)
        if value < 1:
            raise ValueError(f"thread count must be >= 1, got {part!r}")
        if value not in values:
            values.append(value)
    return tuple(values)


def settings_of(batches: Iterable[int], threads: Iterable[int]) -> list[str]:
    return [f"b{b}_t{t}" for b in batches for t in threads]


def cpu_summary() -> dict[str, Any]:
    """The CPU's name, core count and the instruction sets that matter for integer kernels."""
    name, flags = "unknown CPU", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {"name": name, "cpus": os.cpu_count(), "flags": [f for f in wanted if f in flags]}

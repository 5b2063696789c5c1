"""OpenVINO (CPU) helpers: compiled models with explicit properties, the kernels it runs, outputs by name.

OpenVINO is optional (``pip install 'qat_ste[openvino]'``); nothing here imports it before a
function is called. OpenVINO reads an ONNX file's QuantizeLinear/DequantizeLinear pairs as
FakeQuantize and, through its low-precision transformations, runs the convolutions and matrix
products between them as u8/i8 kernels on CPU; the compiled model's runtime graph says which ones
(each node's ``layerType`` and ``runtimePrecision``).
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import QatSteError

#: layer types of OpenVINO's CPU runtime graph that do the heavy arithmetic (what integer kernels replace)
COMPUTE_LAYER_TYPES = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                                 "Gemm"})
#: runtime precisions of integer kernels
INTEGER_PRECISIONS = frozenset({"u8", "i8", "u4", "i4"})
#: the property that sets the precision of OpenVINO's float arithmetic (bf16/f16 by default on CPUs that have it)
PRECISION_HINT = "INFERENCE_PRECISION_HINT"
THREADS = "INFERENCE_NUM_THREADS"


def import_openvino() -> Any:
    """The ``openvino`` module, or a QatSteError saying how to install it."""
    try:
        import openvino  # type: ignore[import-untyped,import-not-found,unused-ignore]  # no stubs
    except ImportError as e:
        raise QatSteError(f"the OpenVINO runtime (the 'openvino' package) is not installed ({e})",
                          "pip install 'qat_ste[openvino]' (or pip install openvino), or use "
                          "runtime='onnxruntime'") from e
    return openvino


def compile_model(model: str | os.PathLike | bytes, properties: Mapping[str, str] | None = None, *,
                  threads: int | None = None) -> Any:
    """An OpenVINO CPU compiled model of an ONNX file (a path, or its serialized bytes) with
    ``properties`` (empty: OpenVINO's defaults) and ``threads`` inference threads (None: its default)."""
    ov = import_openvino()
    config = {str(k): str(v) for k, v in (properties or {}).items()}
    if threads:
        config[THREADS] = str(threads)
    core = ov.Core()
    what = "the instrumented copy of the file" if isinstance(model, bytes) else str(model)
    try:
        if isinstance(model, bytes):  # through a file: read_model of ONNX bytes is not in every version >= 2024
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                with open(path, "wb") as f:
                    f.write(model)
                read = core.read_model(path)
        else:
            read = core.read_model(str(model))
        return core.compile_model(read, "CPU", config)
    except RuntimeError as e:
        reason = " ".join(line.strip() for line in str(e).strip().splitlines()[-2:])
        raise QatSteError(f"OpenVINO {ov.get_version().split('-')[0]} cannot load {what}: {reason}",
                          "export the deploy form (uint8 codes: export_onnx(form='deploy')), which OpenVINO reads, "
                          "or check the file with runtime='onnxruntime'") from e


def output_index(compiled: Any) -> dict[str, int]:
    """Every tensor name of each output of ``compiled`` -> the output's position (OpenVINO keeps the
    ONNX names; one output may carry several)."""
    index: dict[str, int] = {}
    for k, port in enumerate(compiled.outputs):
        for name in port.get_names():
            index.setdefault(name, k)
    return index


def input_names(compiled: Any) -> list[str]:
    """The name of each input of ``compiled`` (its first tensor name)."""
    return [port.get_any_name() for port in compiled.inputs]


def run(compiled: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs of one inference, in output order, as arrays of their own (OpenVINO reuses its buffers)."""
    names = set(input_names(compiled))
    result = compiled({k: np.ascontiguousarray(v) for k, v in feeds.items() if k in names})
    return [np.array(result[k], copy=True) for k in range(len(compiled.outputs))]


def kernel_counts(compiled: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(integer, float) compute kernels of OpenVINO's runtime graph, by layer type."""
    integer: collections.Counter[str] = collections.Counter()
    floating: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()
        if layer not in COMPUTE_LAYER_TYPES:
            continue
        precision = str(info["runtimePrecision"].astype(str)).lower() if "runtimePrecision" in info else "?"
        (integer if precision in INTEGER_PRECISIONS else floating)[layer] += 1
    return dict(integer), dict(floating)


def describe_properties(compiled: Any, properties: Mapping[str, str] | None = None) -> str:
    """A readable line: the properties asked for, and the float precision and threads the compiled model uses."""
    asked = [f"{k}={v}" for k, v in (properties or {}).items()] or ["default properties"]
    facts = []
    for key, label in ((PRECISION_HINT, "float arithmetic in"), (THREADS, "threads")):
        try:
            value = compiled.get_property(key)
        except Exception:  # noqa: BLE001 - a property this version does not report
            continue
        facts.append(f"{label} {value.get_type_name() if hasattr(value, 'get_type_name') else value}")
    return "OpenVINO CPU, " + ", ".join(asked + facts)

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
import uuid
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
                  threads: int | None = None, data_dir: str | None = None) -> Any:
    """An OpenVINO CPU compiled model of an ONNX file (a path, or its serialized bytes) with
    ``properties`` (empty: OpenVINO's defaults) and ``threads`` inference threads (None: its default).
    Bytes whose tensors lie in an external data file in ``data_dir`` are read from a temporary copy in
    that folder, removed once read: OpenVINO reads external data only from the model's own folder."""
    ov = import_openvino()
    config = {str(k): str(v) for k, v in (properties or {}).items()}
    if threads:
        config[THREADS] = str(threads)
    core = ov.Core()
    what = "the instrumented copy of the file" if isinstance(model, bytes) else str(model)
    try:
        if isinstance(model, bytes):  # through a file: read_model of ONNX bytes is not in every version >= 2024
            read = _read_beside(core, model, data_dir) if data_dir else _read_copy(core, model)
        else:
            read = core.read_model(str(model))
        return core.compile_model(read, "CPU", config)
    except RuntimeError as e:
        reason = " ".join(line.strip() for line in str(e).strip().splitlines()[-2:])
        raise QatSteError(f"OpenVINO {ov.get_version().split('-')[0]} cannot load {what}: {reason}",
                          "export the deploy form (uint8 codes: export_onnx(form='deploy')), which OpenVINO reads, "
                          "or check the file with runtime='onnxruntime'") from e


def _read_copy(core: Any, model: bytes) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(model)
        return core.read_model(path)


def _read_beside(core: Any, model: bytes, folder: str) -> Any:
    """``model`` read from a temporary file in ``folder`` (named as qat_ste.atomic names its temporary
    files, so qat_ste.atomic.remove_stale_temp_files clears one a crash leaves), removed once read."""
    path = os.path.join(folder, f".qat_ste_check.onnx.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(path, "xb") as f:
            f.write(model)
    except OSError as e:
        raise QatSteError(f"OpenVINO reads the external data of the file in {folder} only through a copy of the "
                          f"file in that folder, which cannot be written: {e}",
                          "make the folder writable, or check the file with runtime='onnxruntime'") from e
    try:
        return core.read_model(path)
    finally:
        os.unlink(path)


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

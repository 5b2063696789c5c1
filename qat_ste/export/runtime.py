"""Runtime helpers: ONNX Runtime (CPU) sessions with explicit options, its optimized graph, latency;
and ``Runner``, one ONNX file loaded in either runtime check_onnx() supports (ONNX Runtime or
OpenVINO, see ``openvino_runtime``)."""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QatSteError

#: the runtimes check_onnx() runs a file in -> how reports name them
RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}

#: ops that run on integers in ORT's optimized graph
INTEGER_OP_NAMES = frozenset({
    "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QAttention", "NhwcQLinearConv",
})
#: float compute ops (what integer kernels would replace)
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul",
                               "FusedMatMul", "ConvTranspose"})


#: ORT's session config entry naming the folder of the external data of a model given as bytes
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
#: metadata_props key under which check_onnx() keeps, in memory only, the folder of a loaded file's
#: external data (its copies, handed to a runtime as bytes, read the data from there)
DATA_DIR_KEY = "qat_ste.data_dir"


class SerializedModel(bytes):
    """A serialized ONNX model whose tensors may be stored in external data files in ``data_dir``
    (a copy of a file export_onnx() wrote with ``external_data``): the runtimes read them from there."""

    data_dir: str | None

    def __new__(cls, data: bytes, data_dir: str | os.PathLike | None = None) -> SerializedModel:
        model = super().__new__(cls, data)
        model.data_dir = None if data_dir is None else os.fspath(data_dir)
        return model


def data_dir_of(model: str | os.PathLike | bytes) -> str | None:
    """The folder of the external data of ``model`` when it is a :class:`SerializedModel`, else None
    (a path's external data lies next to it; plain bytes have none)."""
    return model.data_dir if isinstance(model, SerializedModel) else None


def is_integer_op(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in INTEGER_OP_NAMES


def describe_options(config: Mapping[str, str], threads: int | None = None) -> str:
    """A readable line for a set of session options."""
    parts = [f"{k}={v}" for k, v in config.items()] or ["default session options"]
    parts.append("all graph optimizations")
    if threads:
        parts.append(f"{threads} intra-op thread(s)")
    return ", ".join(parts)


def make_session(
    model: str | os.PathLike | bytes,
    config: Mapping[str, str] | None = None,
    *,
    threads: int | None = None,
    optimized_path: str | None = None,
) -> Any:
    """An ORT CPU session with ``config`` session entries (empty: ORT's defaults). A
    :class:`SerializedModel` reads its external data from its ``data_dir``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    config = dict(config or {})
    if data_dir_of(model) is not None:
        config[EXTERNAL_DATA_FOLDER] = str(data_dir_of(model))
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def optimized_op_counts(model: str | os.PathLike | bytes, config: Mapping[str, str] | None = None) -> dict[str, int]:
    """Op type counts of the graph ORT actually runs (its optimized graph) under ``config``."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        # the tensors go to a data file next to it (only the graph is read): one file holds at most 2 GiB
        written = {"session.optimized_model_external_initializers_file_name": "optimized.onnx.data",
                   "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}
        make_session(model, {**(config or {}), **written}, optimized_path=path)
        graph = onnx.load(path, load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


def median_latency_ms(session: Any, feeds: dict[str, np.ndarray], runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``session.run`` over ``runs`` runs (after ``warmup``), in milliseconds."""
    return median_call_ms(lambda: session.run(None, feeds), runs, warmup)


def median_call_ms(call: Callable[[], Any], runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``call()`` over ``runs`` calls (after ``warmup``), in milliseconds."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---- one file in either runtime --------------------------------------------------------------------


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one check_onnx() supports, else a QatSteError listing them."""
    if runtime not in RUNTIMES:
        raise QatSteError(f"unknown runtime {runtime!r}", f"pass one of: {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        from .openvino_runtime import import_openvino

        import_openvino()
    return runtime


@dataclass(frozen=True)
class Runner:
    """One ONNX model loaded in one runtime on CPU."""

    runtime: str                 # a key of RUNTIMES
    inputs: tuple[str, ...]      # input names
    outputs: dict[str, int]      # each output's tensor name(s) -> its position in run()'s list
    description: str             # the options it runs with, readable
    handle: Any                  # the ORT InferenceSession or the OpenVINO CompiledModel
    call: Callable[[dict[str, np.ndarray]], list[np.ndarray]]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for ``feeds`` (input name -> array), in output order."""
        return self.call(feeds)

    def named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for ``feeds`` by tensor name."""
        values = self.call(feeds)
        return {name: values[k] for name, k in self.outputs.items()}

    def close(self) -> None:
        """Release the session (and the copy of the model's weights it holds); run() fails afterwards."""
        def closed(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError(f"the {RUNTIMES.get(self.runtime, self.runtime)} session was closed")
        object.__setattr__(self, "handle", None)  # frozen: the fields stay, the session goes
        object.__setattr__(self, "call", closed)


def open_runner(runtime: str, model: str | os.PathLike | bytes, config: Mapping[str, str] | None = None, *,
                threads: int | None = None) -> Runner:
    """``model`` (a path or serialized ONNX) loaded in ``runtime`` with ``config``: ORT session config
    entries, or OpenVINO properties (empty: the runtime's defaults); ``threads`` intra-op threads."""
    check_runtime(runtime)
    if runtime == "openvino":
        from . import openvino_runtime as ovr

        compiled = ovr.compile_model(model, config, threads=threads, data_dir=data_dir_of(model))
        return Runner(runtime, tuple(ovr.input_names(compiled)), ovr.output_index(compiled),
                      ovr.describe_properties(compiled, config), compiled, lambda feeds: ovr.run(compiled, feeds))
    session = make_session(model, config, threads=threads)
    return Runner(runtime, tuple(i.name for i in session.get_inputs()),
                  {o.name: k for k, o in enumerate(session.get_outputs())}, describe_options(config or {}, threads),
                  session, lambda feeds: list(session.run(None, feeds)))

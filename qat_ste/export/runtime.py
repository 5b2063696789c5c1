"""ONNX Runtime (CPU) helpers: sessions with explicit options, the optimized graph, latency."""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

#: ops that run on integers in ORT's optimized graph
INTEGER_OP_NAMES = frozenset({
    "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QAttention", "NhwcQLinearConv",
})
#: float compute ops (what integer kernels would replace)
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul",
                               "FusedMatMul", "ConvTranspose"})


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
    """An ORT CPU session with ``config`` session entries (empty: ORT's defaults)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (config or {}).items():
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
        make_session(model, config, optimized_path=path)
        graph = onnx.load(path, load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


def median_latency_ms(session: Any, feeds: dict[str, np.ndarray], runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``session.run`` over ``runs`` runs (after ``warmup``), in milliseconds."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)

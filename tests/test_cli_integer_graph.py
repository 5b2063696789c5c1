"""qat-ste convert --integer-graph: points in the report, an int8 file whose convs fuse, the integer reference."""

from __future__ import annotations

import json

import pytest

from qat_ste.cli import main
from qat_ste.export.runtime import optimized_op_counts
from qat_ste.train.checkpoint import load_checkpoint

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")


def test_convert_with_integer_graph_exports_a_fully_integer_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["convert", "--out", str(out), "--float-epochs", "1", "--epochs", "1", "--batch-size", "128",
                 "--calib-batches", "1", "--check-samples", "64", "--no-progress", "--no-latency",
                 "--integer-graph"]) == 0
    state = load_checkpoint(out / "qat" / "last.pt")
    assert state["metadata"]["quant"]["integer_graph"] is True
    quantization = json.loads((out / "quantization.json").read_text())
    points = [s for s in quantization["sites"] if s["kind"] == "point"]
    assert points and all(s["bits"] == 8 and s["method"] == "integer point" for s in points)
    report = json.loads((out / "report.json").read_text())
    onnx_path = next(out.glob("*.onnx"))
    ops = optimized_op_counts(onnx_path, {})
    assert "Conv" not in ops and "Gemm" not in ops and ops.get("QLinearConv", 0) >= 2
    check = report["check"]
    assert check["weight_format"] == "int8" and check["code_agreement"] == 1.0
    assert check["reference"].startswith("the integer reference")

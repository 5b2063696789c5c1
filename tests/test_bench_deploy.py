"""tools.bench_deploy: the integer-kernel counts on a hand-built graph, a smoke run on a tiny CNN
(table columns, JSON) and the row of a model whose peer quantization fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tools import bench_deploy  # noqa: E402
from tools import deploy_lib as lib  # noqa: E402

SMOKE = ["--models", "tiny_cnn", "--runs", "1", "--warmup", "0", "--images", "6", "--calibration-images", "8",
         "--batches", "1,4", "--threads", "1"]
HEAD = ("| model | file | runtime | int kernels | MB | top-1 | b1 t1: ms / x float / x peer | "
        "b4 t1: ms / x float / x peer | note |")


def _known_graph(path: Path) -> Path:
    """x -> Q/DQ -> Conv (int8 per-channel weights, int32 bias) -> Q/DQ -> y1 (fuses to QLinearConv);
    x -> Conv (float weights) -> y2 and x -> Reshape -> MatMul (float) -> y3 stay float."""
    rng = np.random.default_rng(0)
    w_scale = np.full(4, 0.01, np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "s_in"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp_in"),
        numpy_helper.from_array(rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "w1_q"),
        numpy_helper.from_array(w_scale, "w1_s"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w1_zp"),
        numpy_helper.from_array(rng.integers(-50, 50, 4).astype(np.int32), "b1_q"),
        numpy_helper.from_array(w_scale * 0.02, "b1_s"),
        numpy_helper.from_array(np.zeros(4, np.int32), "b1_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s_out"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp_out"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1, 192], np.int64), "flat"),
        numpy_helper.from_array(rng.standard_normal((192, 5)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", "zp_in"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s_in", "zp_in"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_zp"], ["w1"], axis=0),
        helper.make_node("DequantizeLinear", ["b1_q", "b1_s", "b1_zp"], ["b1"], axis=0),
        helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c1", "s_out", "zp_out"], ["c1q"]),
        helper.make_node("DequantizeLinear", ["c1q", "s_out", "zp_out"], ["y1"]),
        helper.make_node("Conv", ["x", "w2"], ["y2"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["x", "flat"], ["xf"]),
        helper.make_node("MatMul", ["xf", "w3"], ["y3"]),
    ]
    shapes = {"y1": [1, 4, 8, 8], "y2": [1, 4, 8, 8], "y3": [1, 5]}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    graph = helper.make_graph(nodes, "known", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_integer_kernel_counts_on_a_known_graph(tmp_path: Path) -> None:
    path = _known_graph(tmp_path / "known.onnx")
    assert lib.compute_op_count(path) == 3
    ops = lib.ort_optimized_ops(path)
    assert ops.get("QLinearConv", 0) + ops.get("NhwcQLinearConv", 0) == 1
    assert lib.ort_integer_kernels(ops) == 1
    assert lib.ort_weight_only_kernels(ops) == 0


def test_openvino_runner_precision_and_integer_layers(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    path = _known_graph(tmp_path / "known.onnx")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    run, info = lib.ov_runner(path, 1, 1, "f32")
    assert info["precision"] == "f32"
    assert run(x).shape == (1, 4, 8, 8)
    assert (info["ov_integer"], info["ov_compute"]) == (1, 3)   # the Q/DQ conv of 2 convs and a MatMul


def test_integer_kernel_count_of_op_counts() -> None:
    ops = {"QLinearConv": 3, "QGemm": 1, "QLinearMatMul": 2, "MatMulInteger": 1, "QLinearAdd": 4, "Conv": 5,
           "MatMulNBits": 2, "QuantizeLinear": 7}
    assert lib.ort_integer_kernels(ops) == 7
    assert lib.ort_weight_only_kernels(ops) == 2


def test_parse_threads_and_settings() -> None:
    import os

    assert lib.parse_threads("1,all,1") == tuple(dict.fromkeys((1, os.cpu_count() or 1)))
    assert lib.settings_of((1, 32), (1, 2)) == ["b1_t1", "b1_t2", "b32_t1", "b32_t2"]
    with pytest.raises(ValueError, match="thread count must be >= 1"):
        lib.parse_threads("0")


def _runtimes() -> str:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "onnxruntime"
    return "onnxruntime,openvino"


@pytest.mark.slow
def test_smoke_run_on_a_tiny_cnn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runtimes = _runtimes().split(",")
    assert bench_deploy.main([*SMOKE, "--runtimes", ",".join(runtimes), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table.strip() in printed.strip()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == HEAD
    assert len(lines) == 2 + 3 * len(runtimes)
    assert f"Our deploy file: {lib.deploy_form_name()}, 8-bit activations" in table
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["settings"] == ["b1_t1", "b4_t1"]
    assert result["meta"]["deploy_form"] == lib.deploy_form_name()
    rows = {(r["model"], r["file"], r["runtime"]): r for r in result["rows"]}
    assert sorted(rows) == sorted(("tiny_cnn", f, rt) for f in ("float", "deploy", "peer") for rt in runtimes)
    for (_, kind, _), row in rows.items():
        assert row["error"] is None, row["error"]
        assert sorted(row["ms"]) == ["b1_t1", "b4_t1"] and all(v > 0 for v in row["ms"].values())
        assert sorted(row["x_float"]) == sorted(row["x_peer"]) == ["b1_t1", "b4_t1"]
        assert row["top1"] is not None and 0.0 <= row["top1"] <= 1.0
        if kind == "float":
            assert row["x_float"]["b1_t1"] == 1.0 and row["int_kernels"] == 0 and row["top1"] == 1.0
        if kind == "peer":
            assert row["x_peer"]["b4_t1"] == 1.0
    ort = {k: rows[("tiny_cnn", k, "onnxruntime")] for k in ("float", "deploy", "peer")}
    assert [ort[k]["compute_ops"] for k in ort] == [4, 4, 4]   # 3 convs + the classifier's Gemm
    assert ort["peer"]["int_kernels"] == 4
    if lib.integer_graph_available():
        assert ort["deploy"]["int_kernels"] == 4
    assert ort["deploy"]["x_peer"]["b1_t1"] == pytest.approx(ort["peer"]["ms"]["b1_t1"] / ort["deploy"]["ms"]["b1_t1"])


@pytest.mark.slow
def test_a_failing_peer_gets_a_row_saying_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("calibration tensor has no range\nsecond line")

    monkeypatch.setattr(lib, "export_peer", fail)
    argv = [*SMOKE, "--runtimes", "onnxruntime", "--batches", "1", "--out", str(tmp_path)]
    assert bench_deploy.main(argv) == 0
    rows = {r["file"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    why = "peer quantization failed: RuntimeError: calibration tensor has no range"
    assert rows["peer"]["error"] == why
    assert rows["peer"]["ms"] == {} and rows["peer"]["size_mb"] is None and rows["peer"]["int_kernels"] is None
    assert rows["deploy"]["error"] is None and rows["deploy"]["x_peer"] == {} and "b1_t1" in rows["deploy"]["ms"]
    assert rows["float"]["x_float"] == {"b1_t1": 1.0}
    peer_line = next(line for line in capsys.readouterr().out.splitlines() if "| peer |" in line)
    assert peer_line == f"| tiny_cnn | peer | onnxruntime | - | - | - | - | {why} |"


def test_a_model_that_cannot_be_built_gets_failed_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> object:
        raise ValueError(f"no such model {name}")

    monkeypatch.setattr(lib, "build_model", fail)
    argv = [*SMOKE, "--runtimes", "onnxruntime", "--out", str(tmp_path)]
    assert bench_deploy.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["file"] for r in rows] == ["float", "deploy", "peer"]
    assert {r["error"] for r in rows} == {"model failed: ValueError: no such model tiny_cnn"}


def test_unknown_model_and_runtime_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_deploy.parse_args(["--models", "resnet19"])
    assert "unknown model(s) resnet19" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_deploy.parse_args(["--runtimes", "tensorrt"])
    assert "--runtimes tensorrt: choose from onnxruntime, openvino" in capsys.readouterr().err

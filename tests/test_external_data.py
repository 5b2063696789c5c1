"""ONNX files with an external data file (models over protobuf's 2 GiB): written atomically next to
the .onnx, checked by onnx's checker, run by ONNX Runtime and OpenVINO, and checked by check_onnx()
with the same figures as the same model in one file. PROTOBUF_LIMIT is patched small, so tiny models
take the path a 2.4 GiB one takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

import qat_ste  # noqa: E402
from qat_ste.errors import QatSteError  # noqa: E402
from qat_ste.export import check_onnx, export_float_onnx, export_onnx, exporters, onnx_export, read_metadata  # noqa: E402
from qat_ste.export.runtime import make_session  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (3, 8, 8)
LIMIT = 4096  # bytes: every model here is bigger


class Net(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> linear -> ReLU -> a 1 MiB linear (aligned in the data file); the
    middle layers get 2-bit weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.fc1, self.act3 = nn.Linear(512, 64), nn.ReLU()
        self.fc2 = nn.Linear(64, 4096)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc2(self.act3(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    q = qat_ste.quantize(Net().eval(), bits=4, weight_bits=2, keep_first_weights=True, keep_last_weights=True)
    qat_ste.calibrate(q, [torch.randn(8, *SHAPE)])
    return q.eval()


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", LIMIT)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """form -> (the file in one piece, the same export with its data file), each in a folder of its own."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for form in ("deploy", "spec"):
        one, two = root / f"{form}_one", root / f"{form}_two"
        one.mkdir()
        two.mkdir()
        export_onnx(model, one / "m.onnx", torch.randn(1, *SHAPE), form=form, external_data=False)
        export_onnx(model, two / "m.onnx", torch.randn(1, *SHAPE), form=form, external_data=True)
        out[form] = (one / "m.onnx", two / "m.onnx")
    return out


def _external(path: Path) -> list[onnx.TensorProto]:
    proto = onnx.load(str(path), load_external_data=False)
    return [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def test_a_model_over_the_limit_writes_its_weights_to_a_data_file(model, small_limit, tmp_path) -> None:
    result = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPE))
    data = tmp_path / "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporary left
    assert result.data_path == data and result.to_dict()["data_path"] == str(data)
    assert result.file_size == os.path.getsize(result.path) + os.path.getsize(data)
    assert read_metadata(onnx.load(str(result.path), load_external_data=False))["external_data"] == "m.onnx.data"
    external = _external(result.path)
    infos = [{e.key: e.value for e in t.external_data} for t in external]
    assert {i["location"] for i in infos} == {"m.onnx.data"}
    assert sum(int(i["length"]) for i in infos) <= os.path.getsize(data)
    big = [int(i["offset"]) for i in infos if int(i["length"]) == 64 * 4096 * 4]  # fc2's weight
    assert len(big) == 1 and big[0] % 2**16 == 0  # 1 MiB and more: aligned, so a runtime may map it
    assert all(int(i["length"]) >= 1024 for i in infos)
    assert "fc1/weight_codes" in {t.name for t in external}  # the 2-bit codes too
    onnx.checker.check_model(str(result.path), full_check=True)


def test_the_data_file_holds_the_same_tensors_as_one_file(exports) -> None:
    for one, two in exports.values():
        a, b = onnx.load(str(one)), onnx.load(str(two))  # onnx loads the data file
        assert [(t.name, t.data_type, list(t.dims)) for t in a.graph.initializer] == [
            (t.name, t.data_type, list(t.dims)) for t in b.graph.initializer]
        for t, u in zip(a.graph.initializer, b.graph.initializer, strict=True):
            assert numpy_helper.to_array(t).tobytes() == numpy_helper.to_array(u).tobytes()
        x = np.random.default_rng(0).standard_normal((3, *SHAPE)).astype(np.float32)
        outs = [make_session(p, onnx_export.DISABLE_QDQ).run(None, {"x": x})[0] for p in (one, two)]
        assert np.array_equal(outs[0], outs[1])


def test_below_the_limit_one_file_and_external_data_false_refuses(model, small_limit, tmp_path) -> None:
    with pytest.raises(QatSteError, match=r"one ONNX file holds at most 2 GiB \(external_data=False\)") as e:
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPE), external_data=False)
    assert "external_data=None" in str(e.value.fix)
    assert not list(tmp_path.iterdir())
    with pytest.raises(QatSteError, match="external_data='yes' is not None, True or False"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPE), external_data="yes")  # type: ignore[arg-type]


def test_a_model_under_the_limit_stays_one_file(model, tmp_path) -> None:
    result = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPE))
    assert result.data_path is None and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert "external_data" not in read_metadata(onnx.load(str(result.path)))


@pytest.mark.parametrize("form", ["deploy", "spec"])
def test_check_onnx_gives_the_same_figures_as_for_one_file(model, exports, form) -> None:
    one, two = exports[form]
    inputs = [torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    before = sorted(p.name for p in two.parent.iterdir())
    # random weights: ORT's fused kernels flip a near-tie; the figure is compared below, not thresholded
    reports = [check_onnx(model, path, inputs, latency=False, min_default_agreement=None).to_dict()
               for path in (one, two)]
    assert sorted(p.name for p in two.parent.iterdir()) == before  # the check leaves no file behind
    assert reports[1]["ok"], reports[1]["failures"]
    assert reports[1]["weight_layers"] and reports[1]["weight_layers"][0]["ort_exact"]
    assert reports[0].pop("onnx_path") != reports[1].pop("onnx_path")
    assert reports[0] == reports[1]


def test_check_onnx_in_openvino_reads_the_data_file(model, exports) -> None:
    pytest.importorskip("openvino")
    one, two = exports["deploy"]
    inputs = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    options = {"INFERENCE_PRECISION_HINT": "f32"}
    reports = [check_onnx(model, path, inputs, latency=False, runtime="openvino", runtime_options=options).to_dict()
               for path in (one, two)]
    assert sorted(p.name for p in two.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # its temporary copy is gone
    assert reports[1]["site_parity"] == 1.0 and reports[1]["weight_layers"][0]["ort_exact"]
    reports[0].pop("onnx_path"), reports[1].pop("onnx_path")
    assert reports[0] == reports[1]


def test_float_export_and_latency_with_data_files(model, exports, tmp_path, monkeypatch) -> None:
    x = torch.randn(1, *SHAPE)
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "PROTOBUF_LIMIT", LIMIT)
        path = export_float_onnx(model, tmp_path / "float.onnx", x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "float.onnx.data"]
    assert _external(path)
    (tmp_path / "one").mkdir()
    one = export_float_onnx(model, tmp_path / "one" / "float.onnx", x)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, *SHAPE)).astype(np.float32)}
    assert np.array_equal(make_session(path).run(None, feeds)[0], make_session(one).run(None, feeds)[0])
    # check_onnx's latency exports the float model (here with a data file too) to a temporary folder
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", LIMIT)
    report = check_onnx(model, exports["deploy"][1], torch.randn(2, *SHAPE), latency_runs=1, min_default_agreement=None)
    assert report.ok and report.latency_ms is not None and report.latency_ms["quantized"] > 0


def test_a_failure_while_writing_leaves_no_file_and_keeps_the_previous_pair(model, small_limit, tmp_path,
                                                                            monkeypatch) -> None:
    export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPE))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("checker failed")

    monkeypatch.setattr(onnx_export, "_check_written", broken)  # after both files are written to temporaries
    with pytest.raises(RuntimeError, match="checker failed"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPE))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(RuntimeError, match="checker failed"):
        export_onnx(model, tmp_path / "other.onnx", torch.randn(1, *SHAPE))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_a_failed_rename_of_the_graph_leaves_no_data_file(model, small_limit, tmp_path, monkeypatch) -> None:
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "m.onnx":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(onnx_export.os, "replace", replace)
    with pytest.raises(QatSteError, match="cannot write .*m.onnx and its data file m.onnx.data"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPE))
    assert calls == ["m.onnx.data", "m.onnx"]  # the data file first
    assert not list(tmp_path.iterdir())


def test_a_missing_or_truncated_data_file_is_named(model, exports, tmp_path) -> None:
    source = exports["deploy"][1]
    path = tmp_path / "m.onnx"
    path.write_bytes(source.read_bytes())  # the graph without its data file
    with pytest.raises(QatSteError, match=r"the external data file .*m\.onnx\.data of .*m\.onnx is missing") as e:
        check_onnx(model, path, torch.randn(2, *SHAPE), latency=False)
    assert "re-export the model with export_onnx()" in str(e.value.fix)
    data = source.with_name("m.onnx.data").read_bytes()
    (tmp_path / "m.onnx.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(QatSteError, match=r"m\.onnx\.data of .*m\.onnx is truncated or not its own: "
                                          rf"{len(data) // 2:,} bytes") as e:
        check_onnx(model, path, torch.randn(2, *SHAPE), latency=False)
    assert "keep m.onnx and its data file together" in str(e.value.fix)


def test_detached_tensors_pass_the_version_converter_and_come_back() -> None:
    from onnx import helper, numpy_helper, version_converter

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    detached = exporters.detach_large_tensors(proto, threshold=1024)
    assert list(detached) == ["w"] and not proto.graph.initializer[0].HasField("raw_data")
    converted = version_converter.convert_version(proto, 21)
    exporters.attach_tensors(converted, detached)
    assert converted.opset_import[0].version == 21
    assert np.array_equal(numpy_helper.to_array(converted.graph.initializer[0]), w)
    assert converted.graph.initializer[0].data_location == TensorProto.DEFAULT


def test_the_torchscript_path_with_a_data_file(small_limit, tmp_path, monkeypatch) -> None:
    """torch.export fails on a data-dependent slice: the TorchScript path, spec form (the version
    converter, with the weights detached), then a data file."""

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 32, 3), nn.ReLU()
            self.conv2, self.act2 = nn.Conv2d(32, 4, 3), nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act2(self.conv2(self.act(self.conv(x))))
            return y[: int(y.sum() > -1e9) + 1].flatten(1)

    monkeypatch.setattr(exporters, "DETACH_THRESHOLD", 1024)
    torch.manual_seed(0)
    q = qat_ste.quantize(DataDependent(), bits=4)
    qat_ste.calibrate(q, [torch.randn(4, *SHAPE)])
    result = export_onnx(q.eval(), tmp_path / "m.onnx", torch.randn(1, *SHAPE), form="spec")
    assert result.exporter == "torchscript" and result.opset == 21 and result.data_path is not None
    assert "conv2.weight" in {t.name for t in _external(result.path)}
    report = check_onnx(q, result.path, torch.randn(3, *SHAPE), latency=False)
    assert report.ok and report.site_parity == 1.0, report.table()


def test_a_data_file_outside_the_folder_is_refused(model, exports, tmp_path) -> None:
    proto = onnx.load(str(exports["deploy"][1]), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../m.onnx.data"
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(QatSteError, match=rf"tensor {tensor.name} points at external data '../m.onnx.data' outside"):
        check_onnx(model, path, torch.randn(2, *SHAPE), latency=False)

"""check_onnx(): figures, thresholds, report formats, and detection of a wrong file."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402

import qat_ste  # noqa: E402
from qat_ste.errors import QatSteError  # noqa: E402
from qat_ste.export import CheckReport, check_onnx, export_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (3, 12, 12)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.act3 = nn.Hardswish()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(self.act3(x.mean(dim=(2, 3))))


@pytest.fixture(scope="module")
def quantized() -> nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    q = qat_ste.quantize(model, bits=4)
    qat_ste.calibrate(q, [torch.randn(16, *SHAPE) for _ in range(2)])
    return q.eval()


@pytest.fixture(scope="module")
def files(quantized, tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("check")
    out = {}
    for weights in ("float", "int8"):
        out[weights] = str(export_onnx(quantized, directory / f"{weights}.onnx", torch.randn(1, *SHAPE),
                                       weight_format=weights).path)
    return out


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(24, *SHAPE, generator=g), torch.randint(0, 4, (24,), generator=g)


@pytest.fixture(scope="module")
def report_float(quantized, files, data) -> CheckReport:
    x, y = data
    return check_onnx(quantized, files["float"], [x[:12], x[12:]], [y[:12], y[12:]], latency=True,
                      latency_runs=3, threads=1)


def test_good_file_passes_with_every_figure(report_float, quantized) -> None:
    r = report_float
    assert r.ok and not r.failures, r.table()
    assert r.samples == 24 and r.form == "deploy" and r.weight_format == "float"
    assert [s.name for s in r.sites] == [n for n, _ in qat_ste.quant_modules(quantized)]
    assert r.site_parity == 1.0 and all(s.dequant_exact for s in r.sites)
    assert 0.99 <= r.code_agreement <= 1.0
    assert r.max_logit_diff < 1e-3 and r.top1_agreement == 1.0
    assert r.accuracy_torch == r.accuracy_onnx and 0.0 <= r.accuracy_torch <= 1.0
    assert set(r.latency_ms) == {"quantized", "float", "speedup", "batch"} and r.latency_ms["quantized"] > 0
    assert "disable_quant_qdq=1" in r.options["site_parity"]
    assert {"site_parity", "end_to_end_codes", "logits", "integer_ops", "latency"} <= set(r.options)


def test_table_and_dict(report_float) -> None:
    text = report_float.table()
    assert "OK" in text and "act1" in text and "per-site code parity" in text and "latency" in text
    lines = text.splitlines()
    column = next(line for line in lines if "per-site code parity" in line).index("100.0000%")
    for label, value in (("latency, batch", "quantized"), ("accuracy (", "PyTorch"), ("top-1 agreement", "100.00%")):
        assert next(line for line in lines if label in line).index(value) == column, label  # values in one column
    wide = dataclasses.replace(report_float, latency_ms={**report_float.latency_ms, "batch": 128.0}).table()
    assert next(line for line in wide.splitlines() if "latency, batch 128" in line).index("quantized") == column
    d = json.loads(json.dumps(report_float.to_dict()))
    assert d["ok"] is True and d["sites"][0]["name"] == "act1"
    assert d["thresholds"]["min_chained_code_agreement"] == 0.999
    assert d["thresholds"]["min_code_agreement"] is None  # end to end: reported, limited only when asked


def test_int8_file_reports_integer_ops(quantized, files, data) -> None:
    r = check_onnx(quantized, files["int8"], data[0], latency=False)
    assert r.ok, r.table()
    assert r.integer_ops.get("QLinearConv", 0) >= 1
    assert r.integer_ops_default_options == r.integer_ops  # this file runs with ORT's defaults
    assert "int8 weights" in r.reference and r.latency_ms is None
    assert r.max_logit_diff > 0


def test_float_weights_report_what_ort_defaults_would_do(report_float) -> None:
    assert report_float.integer_ops == {}  # run as recommended: no re-quantized weights
    assert isinstance(report_float.integer_ops_default_options, dict)


@pytest.mark.parametrize("threshold, message", [
    ({"min_code_agreement": 1.01}, "end-to-end code agreement"),
    ({"max_logit_diff": 1e-12}, "logit difference"),
    ({"min_top1_agreement": 1.01}, "top-1 agreement"),
])
def test_violated_thresholds_fail(quantized, files, data, threshold, message) -> None:
    r = check_onnx(quantized, files["int8"], data[0], latency=False, **threshold)
    assert not r.ok
    assert any(message in f for f in r.failures), r.failures
    assert "FAILED" in r.table()


def test_a_wrong_scale_in_the_file_breaks_parity(quantized, files, data, tmp_path) -> None:
    proto = onnx.load(files["float"])
    for t in proto.graph.initializer:
        if t.name == "act2/scale":
            value = onnx.numpy_helper.to_array(t) * np.float32(1.01)
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    r = check_onnx(quantized, bad, data[0], latency=False)
    assert not r.ok
    act2 = next(s for s in r.sites if s.name == "act2")
    assert act2.parity < 1.0 and r.site_parity < 1.0
    assert any("act2" in f and "same input" in f for f in r.failures)


def test_bad_arguments(quantized, files, data, tmp_path) -> None:
    with pytest.raises(QatSteError, match="no ONNX file"):
        check_onnx(quantized, tmp_path / "missing.onnx", data[0])
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(plain))
    with pytest.raises(QatSteError, match="no qat_ste metadata"):
        check_onnx(quantized, plain, data[0])
    other = qat_ste.quantize(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), bits=4, alpha_mode="fixed")
    with pytest.raises(QatSteError, match="has no quantized site"):
        check_onnx(other, files["float"], data[0])
    with pytest.raises(QatSteError, match="labels do not match"):
        check_onnx(quantized, files["float"], data[0], data[1][:3])


def test_the_report_names_its_runtime(report_float) -> None:
    assert report_float.runtime == "onnxruntime" and report_float.runtime_name == "ONNX Runtime"
    assert "in ONNX Runtime (form=deploy" in report_float.table() and "ORT options per figure" in report_float.table()
    assert report_float.to_dict()["runtime"] == "onnxruntime"


def test_unknown_runtime_lists_the_choices(quantized, files, data) -> None:
    with pytest.raises(QatSteError, match="unknown runtime 'tensorrt'") as caught:
        check_onnx(quantized, files["float"], data[0], runtime="tensorrt")
    assert "onnxruntime, openvino" in caught.value.fix


def test_missing_openvino_is_a_clear_error(quantized, files, data, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError, as when not installed
    with pytest.raises(QatSteError, match="'openvino' package\\) is not installed") as caught:
        check_onnx(quantized, files["float"], data[0], runtime="openvino")
    assert "pip install 'qat_ste[openvino]'" in caught.value.fix


def _labels_with_known_accuracy(model: nn.Module, x: torch.Tensor, wrong: int) -> torch.Tensor:
    """The model's own top-1 with the first ``wrong`` labels moved to another class."""
    with torch.no_grad():
        labels = model(x).argmax(-1)
    labels[:wrong] = (labels[:wrong] + 1) % 4
    return labels


def test_accuracy_of_pytorch_and_of_the_file_side_by_side(quantized, files, data) -> None:
    x = data[0]
    y = _labels_with_known_accuracy(quantized, x, wrong=6)
    r = check_onnx(quantized, files["float"], [x[:12], x[12:]], [y[:12], y[12:]], latency=False)
    assert r.top1_agreement == 1.0
    assert r.accuracy_torch == r.accuracy_onnx == r.accuracy_model == 18 / 24
    assert "accuracy (24 labelled samples)       PyTorch 75.00%, ONNX Runtime 75.00% (+0.00 points)" in r.table()
    assert "accuracy of the model as given" not in r.table()  # the reference is the model as given
    unlabelled = check_onnx(quantized, files["float"], x, latency=False)
    assert unlabelled.accuracy_torch is unlabelled.accuracy_onnx is unlabelled.accuracy_model is None
    assert "accuracy" not in unlabelled.table()


def test_accuracy_of_an_int8_file_and_of_the_model_as_given(quantized, files, data) -> None:
    from qat_ste.export.check import int8_weight_reference

    x = data[0]
    y = _labels_with_known_accuracy(quantized, x, wrong=6)
    with torch.no_grad():
        rounded = int8_weight_reference(quantized)(x).argmax(-1)
    r = check_onnx(quantized, files["int8"], x, y, latency=False)
    assert r.accuracy_model == 18 / 24  # the model as given
    assert r.accuracy_torch == int((rounded == y).sum()) / 24  # the reference: the file's int8 weights
    session = onnxruntime.InferenceSession(files["int8"], providers=["CPUExecutionProvider"])
    top = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(-1)
    assert r.accuracy_onnx == int((top == y.numpy()).sum()) / 24
    assert f"accuracy of the model as given       {18 / 24:.2%}" in r.table()
    assert r.to_dict()["accuracy_model"] == 0.75


def test_runtime_options_reach_the_deployed_run(quantized, files, data) -> None:
    r = check_onnx(quantized, files["int8"], data[0], latency=False,
                   runtime_options={"session.disable_quant_qdq": "1"})
    assert "session.disable_quant_qdq=1" in r.options["logits"]
    assert r.integer_ops == {}  # ORT ran the file without its QDQ fusions
    assert r.ok, r.table()


def test_cli_check_runtime_option(files, capsys, monkeypatch) -> None:
    from qat_ste.cli import main
    from qat_ste.cli.parser import CHECK_RUNTIMES
    from qat_ste.export.runtime import RUNTIMES

    assert CHECK_RUNTIMES == tuple(RUNTIMES)
    base = ["check", "--onnx", files["float"], "--model", "zoo:lenet5"]
    assert main([*base, "--runtime", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tensorrt'" in err and "onnxruntime" in err and "openvino" in err
    assert main([*base, "--runtime-option", "INFERENCE_PRECISION_HINT"]) == 2
    err = capsys.readouterr().err
    assert "--runtime-option 'INFERENCE_PRECISION_HINT' is not KEY=VALUE" in err
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main([*base, "--runtime", "openvino"]) == 2  # refused before the model is built
    err = capsys.readouterr().err
    assert "not installed" in err and "pip install 'qat_ste[openvino]'" in err and "Traceback" not in err


def test_at_most_two_sessions_hold_the_weights_at_once(quantized, files, data, monkeypatch) -> None:
    """Each ORT session holds a copy of the weights (GiBs for vit_h_14): the file's own two run and
    close before the default-options two open."""
    import qat_ste.export.check as check_module

    opened: list = []
    most = []
    real = check_module.open_runner

    def tracking(*args, **kwargs):
        runner = real(*args, **kwargs)
        opened.append(runner)
        most.append(sum(r.handle is not None for r in opened))
        return runner

    monkeypatch.setattr(check_module, "open_runner", tracking)
    r = check_onnx(quantized, files["float"], data[0], latency=False)
    assert r.ok and r.default_task_agreement is not None, r.table()
    assert len(opened) >= 4 and max(most) == 2
    assert all(runner.handle is None for runner in opened[:4])  # closed once their batches ran
    with pytest.raises(RuntimeError, match="session was closed"):
        opened[0].run({})

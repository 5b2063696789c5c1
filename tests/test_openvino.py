"""check_onnx(runtime="openvino") and ``qat-ste check --runtime openvino``: the exported file in OpenVINO
against PyTorch (skipped when openvino is not installed: the optional extra ``qat_ste[openvino]``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("openvino")

import onnx  # noqa: E402

import qat_ste  # noqa: E402
from qat_ste.export import check_onnx, export_onnx  # noqa: E402
from qat_ste.export.check import _instrumented  # noqa: E402
from qat_ste.export.passes import site_tensors  # noqa: E402
from qat_ste.export.runtime import open_runner  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (3, 16, 16)


class TinyCnn(nn.Module):
    """conv -> ReLU -> pool -> conv (no bias, as before a BatchNorm) -> ReLU -> pool -> linear: the second
    convolution reads the first site's codes, so OpenVINO runs it as an integer kernel with the next
    quantizer fused (OpenVINO 2026.4 gets that site's codes wrong when the convolution's output is also
    a graph output: check_onnx must not expose it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.conv1(x)))
        x = self.pool(self.act2(self.conv2(x)))
        return self.fc(x.flatten(1))


def _quantized(**options) -> nn.Module:
    torch.manual_seed(0)
    q = qat_ste.quantize(TinyCnn().eval(), bits=4, **options)
    qat_ste.calibrate(q, [torch.randn(16, *SHAPE) for _ in range(2)])
    return q.eval()


@pytest.fixture(scope="module")
def quantized() -> nn.Module:
    return _quantized()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, *SHAPE, generator=g), torch.randint(0, 5, (16,), generator=g)


@pytest.fixture(scope="module")
def int8_file(quantized, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("openvino") / "int8.onnx"
    return str(export_onnx(quantized, path, torch.randn(1, *SHAPE), weight_format="int8").path)


@pytest.fixture(scope="module")
def report_openvino(quantized, int8_file, data):
    x, y = data
    return check_onnx(quantized, int8_file, [x[:8], x[8:]], [y[:8], y[8:]], runtime="openvino", latency=True,
                      latency_runs=2, threads=1)


def test_openvino_parity_on_a_small_quantized_cnn(report_openvino, quantized) -> None:
    r = report_openvino
    assert r.ok and not r.failures, r.table()
    assert r.runtime == "openvino" and r.runtime_name == "OpenVINO" and r.samples == 16
    assert [s.name for s in r.sites] == ["act1", "act2"]
    assert r.site_parity == 1.0 and all(s.dequant_exact and s.values > 0 for s in r.sites)
    assert r.code_agreement >= 0.99 and r.top1_agreement == 1.0
    assert r.max_logit_diff < 0.05  # bf16 float arithmetic where the CPU has it (OpenVINO's default)
    assert r.integer_ops.get("Convolution", 0) >= 1  # conv2 runs on u8 codes in OpenVINO's runtime graph
    assert r.integer_ops_default_options == r.integer_ops
    assert "fed PyTorch's u" in r.options["site_parity"] and "INFERENCE_PRECISION_HINT=f32" in r.options["site_parity"]
    assert "OpenVINO CPU" in r.options["logits"] and "threads 1" in r.options["latency"]
    assert r.latency_ms is not None and r.latency_ms["quantized"] > 0 and r.latency_ms["float"] > 0
    text = r.table()
    assert "in OpenVINO (form=deploy" in text and "OpenVINO options per figure" in text
    assert "integer kernels (runtime graph)" in text
    assert json.loads(json.dumps(r.to_dict()))["runtime"] == "openvino"


def test_openvino_agrees_with_onnxruntime(report_openvino, quantized, int8_file, data) -> None:
    x, y = data
    ort = check_onnx(quantized, int8_file, [x[:8], x[8:]], [y[:8], y[8:]], latency=False)
    assert ort.runtime == "onnxruntime" and ort.ok
    assert ort.accuracy_torch == report_openvino.accuracy_torch
    assert ort.accuracy_onnx == report_openvino.accuracy_onnx  # top-1 equal in both runtimes
    assert [s.parity for s in ort.sites] == [s.parity for s in report_openvino.sites] == [1.0, 1.0]


def test_the_quantizers_alone_give_the_codes_the_whole_file_gives(quantized, int8_file, data) -> None:
    """The instrumented file without the sites' u as outputs (OpenVINO 2026.4 miscomputes codes after
    an integer convolution whose float output is also a graph output) gives ONNX Runtime's codes."""
    proto = onnx.load(int8_file)
    tensors = site_tensors(proto)
    instrumented, codes_as = _instrumented(proto, tensors, expose_inputs=False)
    x = data[0].numpy()
    ov = open_runner("openvino", instrumented, {"INFERENCE_PRECISION_HINT": "f32"}).named({"x": x})
    ort = open_runner("onnxruntime", instrumented, {"session.disable_quant_qdq": "1"}).named({"x": x})
    for t in tensors:
        np.testing.assert_array_equal(ov[codes_as[t.codes]], ort[codes_as[t.codes]])


def test_spec_form_with_4_bit_codes(quantized, data, tmp_path) -> None:
    path = export_onnx(quantized, tmp_path / "spec.onnx", torch.randn(1, *SHAPE), form="spec").path
    r = check_onnx(quantized, path, data[0], runtime="openvino", latency=False)
    assert r.ok, r.table()
    assert {s.container for s in r.sites} == {"uint4"} and r.site_parity == 1.0


def test_a_wrong_scale_breaks_parity_in_openvino(quantized, int8_file, data, tmp_path) -> None:
    proto = onnx.load(int8_file)
    for t in proto.graph.initializer:
        if t.name == "act2/scale":
            value = onnx.numpy_helper.to_array(t) * np.float32(1.02)
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    r = check_onnx(quantized, bad, data[0], runtime="openvino", latency=False)
    assert not r.ok
    act2 = next(s for s in r.sites if s.name == "act2")
    assert act2.parity < 1.0 and not act2.dequant_exact
    assert next(s for s in r.sites if s.name == "act1").parity == 1.0
    assert any("act2" in f and "same input" in f for f in r.failures)


def test_quantized_weights_in_openvino(data, tmp_path) -> None:
    q = _quantized(weight_bits=2, keep_first_weights=False, keep_last_weights=False)
    path = export_onnx(q, tmp_path / "w2.onnx", torch.randn(1, *SHAPE)).path
    # a random net's logits lie close together: float32 arithmetic keeps the top-1 (bf16 is the default on some CPUs)
    r = check_onnx(q, path, data[0], runtime="openvino", latency=False,
                   runtime_options={"INFERENCE_PRECISION_HINT": "f32"})
    assert r.ok, r.table()
    assert "INFERENCE_PRECISION_HINT=f32, float arithmetic in f32" in r.options["logits"]
    assert r.top1_agreement == 1.0
    assert [w.name for w in r.weight_layers] == ["conv1", "conv2", "fc"]
    assert all(w.exact and w.ort_exact and w.outside == 0 for w in r.weight_layers)  # OpenVINO's DQ = Q(w)
    assert "OpenVINO=Q(w)" in r.table()


@pytest.mark.slow  # two CLI runs (export, check) of LeNet-5 on digits: ~6 s
def test_cli_check_runtime_openvino(tmp_path, capsys) -> None:
    from qat_ste.cli import main

    target = tmp_path / "lenet5.onnx"
    common = ["--model", "zoo:lenet5", "--calib-batches", "1", "--seed", "0"]
    assert main(["export", *common, "--out", str(target), "--weight-format", "int8"]) == 0
    capsys.readouterr()
    code = main(["check", "--onnx", str(target), *common, "--runtime", "openvino", "--json", "--check-samples", "32",
                 "--no-latency"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report["failures"]
    assert report["runtime"] == "openvino" and report["samples"] == 32 and report["site_parity"] == 1.0
    assert report["accuracy_torch"] is not None and report["accuracy_onnx"] is not None
    assert main(["check", "--onnx", str(target), *common, "--runtime", "openvino", "--check-samples", "32",
                 "--no-latency", "--runtime-option", "INFERENCE_PRECISION_HINT=f32"]) == 0
    out = capsys.readouterr().out
    assert "in OpenVINO" in out and "INFERENCE_PRECISION_HINT=f32, float arithmetic in f32" in out


def test_per_channel_sites_in_openvino(data, tmp_path) -> None:
    q = _quantized(per_channel=True)
    path = export_onnx(q, tmp_path / "channels.onnx", torch.randn(1, *SHAPE)).path
    x = data[0]
    r = check_onnx(q, path, [x[:8], x[8:11]], runtime="openvino", latency=False)  # two batch shapes
    assert r.ok, r.table()
    assert r.site_parity == 1.0 and all(s.dequant_exact for s in r.sites) and r.samples == 11


def test_a_file_openvino_cannot_read_is_a_clear_error(quantized, int8_file, data, tmp_path) -> None:
    proto = onnx.load(int8_file)
    output = proto.graph.output[0].name
    last = next(n for n in proto.graph.node if output in n.output)
    last.output[0] = "before_custom"
    proto.graph.node.append(onnx.helper.make_node("Unknown", ["before_custom"], [output], domain="example.custom"))
    proto.opset_import.append(onnx.helper.make_opsetid("example.custom", 1))
    custom = tmp_path / "custom.onnx"
    onnx.save(proto, str(custom))
    with pytest.raises(qat_ste.QatSteError, match="OpenVINO .* cannot load .*custom.onnx") as caught:
        check_onnx(quantized, custom, data[0], runtime="openvino", latency=False)
    assert "runtime='onnxruntime'" in caught.value.fix


def test_a_code_at_a_rounding_boundary_is_explained_not_failed(tmp_path) -> None:
    """OpenVINO quantizes as u * (1/step): 0.38476387 / 0.05919444 = 6.5000005 rounds to 7 in ONNX and
    PyTorch, but 0.38476387 * (1 / 0.05919444) = 6.5 rounds (half to even) to 6 in OpenVINO."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()
    q = qat_ste.quantize(model, bits=4, alpha_mode="fixed", step_init=0.05919444).eval()
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(0))
    x[0, :2] = 0.38476387
    path = export_onnx(q, tmp_path / "boundary.onnx", x[:1]).path
    ort = check_onnx(q, path, x, latency=False)
    assert ort.ok and ort.sites[0].parity == 1.0 and ort.sites[0].near_boundary == 0
    ov = check_onnx(q, path, x, runtime="openvino", latency=False)
    assert ov.ok, ov.failures
    (site,) = ov.sites
    assert site.values == 32 and site.parity == 30 / 32 and site.near_boundary == 2 and site.dequant_exact
    assert any("2 code(s) given the same u differ by one" in n and "u * (1/step)" in n for n in ov.notes)

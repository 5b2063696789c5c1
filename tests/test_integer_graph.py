"""integer_graph=True: the quantization points of a fully integer graph, and what ONNX Runtime fuses."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from integer_models import DepthwiseCNN, ResidualCNN, SqueezeExciteCNN, TinyTransformer

import qat_ste
from qat_ste.config import QuantConfig
from qat_ste.errors import QatSteError
from qat_ste.export import export_onnx
from qat_ste.export.runtime import optimized_op_counts

#: ONNX Runtime's integer kernels for convolutions and matrix products
INTEGER_PRODUCTS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger")
FLOAT_PRODUCTS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul", "NchwcConv")


def _quantized(model: nn.Module, x: torch.Tensor, **options) -> nn.Module:
    torch.manual_seed(0)
    q = qat_ste.quantize(model.eval(), bits=4, integer_graph=True, example_input=x[:1], **options)
    qat_ste.calibrate(q, [x])
    return q.eval()


def _points(q: nn.Module) -> dict[str, str]:
    return {s.name: s.original for s in qat_ste.report(q).points}


def test_points_of_a_residual_cnn_are_the_graph_input_the_shortcut_adds_and_the_classifier_input():
    x = torch.randn(4, 3, 16, 16)
    q = _quantized(ResidualCNN(), x)
    points = _points(q)
    # the graph input is read by the stem's conv (a child), so the point sits in the root, before it
    assert points == {
        "input_point1": "input of Sequential",
        "b1.bn2_point1": "add input",            # out += identity: the conv branch (the identity is codes)
        "b2.bn2_point1": "add input",
        "b2.down_point1": "add input",           # the downsampling shortcut
        "flatten_point1": "linear input",        # after average pooling, before the classifier
    }
    report = qat_ste.report(q)
    assert all(s.kind == "point" and s.method == "integer point" and s.module.bits == 8 for s in report.points)
    assert report.points_skipped == {}
    assert "integer graph: 5 quantization point(s)" in report.table()


def test_a_model_without_integer_graph_has_no_points_and_its_config_dict_is_unchanged():
    x = torch.randn(2, 3, 16, 16)
    q = qat_ste.quantize(ResidualCNN().eval(), bits=4, example_input=x)
    assert qat_ste.report(q).points == []
    assert "integer_graph" not in QuantConfig(bits=4).to_dict()
    cfg = QuantConfig(bits=4, integer_graph=True)
    assert cfg.to_dict()["integer_graph"] is True
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_points_follow_the_float_models_values_until_they_quantize():
    x = torch.randn(4, 3, 16, 16)
    model = ResidualCNN().eval()
    q = _quantized(model, x)
    codes_step = [m.alpha.item() for m in q.modules() if isinstance(m, qat_ste.QuantAct) and m.kind.name == "point"]
    assert len(codes_step) == 5 and all(a > 0 for a in codes_step)
    with torch.no_grad():
        exact = qat_ste.quantize(model, bits=8, integer_graph=True, example_input=x[:1])
        qat_ste.calibrate(exact, [x])
        rel = (exact.eval()(x) - model(x)).norm() / model(x).norm()
    assert rel < 0.05  # 8-bit everywhere: close to the float model


@pytest.mark.parametrize("factory, expected", [
    (ResidualCNN, {"QLinearConv": 6, "QGemm": 1, "QLinearAdd": 2}),
    (DepthwiseCNN, {"QLinearConv": 7, "QGemm": 1, "QLinearAdd": 2}),
    (SqueezeExciteCNN, {"QLinearConv": 5, "QGemm": 1, "QLinearConcat": 1, "QLinearMul": 1}),
    (TinyTransformer, {"QLinearConv": 1, "QGemm": 1, "QLinearMatMul": 2, "MatMulIntegerToFloat": 4,
                       "QLinearAdd": 2, "QLinearSoftmax": 1}),
])
def test_every_conv_and_matmul_runs_as_an_integer_kernel_in_onnx_runtime(tmp_path, factory, expected):
    x = torch.randn(4, 3, 16, 16)
    q = _quantized(factory(), x)
    result = export_onnx(q, tmp_path / "m.onnx", x[:1])
    assert result.weight_format == "int8"  # the default for an integer graph
    assert result.session_config == {}  # meant for ORT's default options
    ops = optimized_op_counts(tmp_path / "m.onnx", {})  # ORT's default options, as users run it
    assert {k: ops.get(k, 0) for k in expected} == expected
    assert not [k for k in ops if k in FLOAT_PRODUCTS]
    n_products = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in factory().modules())
    attention_matmuls = 2 if factory is TinyTransformer else 0
    assert sum(ops.get(k, 0) for k in INTEGER_PRODUCTS) == n_products + attention_matmuls


def test_without_points_the_same_model_leaves_convs_in_float(tmp_path):
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    q = qat_ste.quantize(ResidualCNN().eval(), bits=4, example_input=x[:1])
    qat_ste.calibrate(q, [x])
    export_onnx(q.eval(), tmp_path / "m.onnx", x[:1], weight_format="int8")
    ops = optimized_op_counts(tmp_path / "m.onnx", {})
    assert ops.get("QLinearConv", 0) < 6 and ops.get("QLinearAdd", 0) == 0


@pytest.mark.parametrize("factory", [ResidualCNN, SqueezeExciteCNN, TinyTransformer])
def test_per_site_code_parity_is_exact_at_the_points_too(tmp_path, factory):
    x = torch.randn(6, 3, 16, 16)
    q = _quantized(factory(), x)
    export_onnx(q, tmp_path / "m.onnx", x[:1])
    report = qat_ste.check_onnx(q, tmp_path / "m.onnx", x)
    points = set(_points(q))
    checked = {s.name: s for s in report.sites}
    assert points <= set(checked)
    assert all(checked[p].parity == 1.0 for p in points)
    assert report.ok, report.failures


def test_points_are_selected_by_include_exclude_and_overrides():
    x = torch.randn(2, 3, 16, 16)
    q = _quantized(ResidualCNN(), x, exclude=("b2.*_point*",), overrides={"flatten_point*": {"bits": 6}})
    report = qat_ste.report(q)
    left = {s.name: s.reason for s in report.points if not s.quantized}
    assert left == {"b2.bn2_point1": "excluded by include/exclude patterns",
                    "b2.down_point1": "excluded by include/exclude patterns"}
    bits = {s.name: s.module.bits for s in report.points if s.quantized}
    assert bits == {"input_point1": 8, "b1.bn2_point1": 8, "flatten_point1": 6}


def test_functional_add_cat_and_inplace_add_each_get_their_points():
    x = torch.randn(2, 3, 16, 16)
    counts = collections.Counter(_points(_quantized(SqueezeExciteCNN(), x)).values())
    assert counts == {"cat output": 1, "mul output": 1, "mul input": 1, "hardswish input": 1,
                      "hardsigmoid input": 1, "conv input": 1, "input of Sequential": 1, "linear input": 1}
    counts = collections.Counter(_points(_quantized(DepthwiseCNN(), x)).values())
    assert counts == {"add output": 2, "add input": 2, "input of Sequential": 1, "linear input": 1}


def test_integer_graph_on_a_model_that_fails_on_the_example_input_is_a_clear_error():
    with pytest.raises(QatSteError, match="integer_graph needs one run of the model") as e:
        qat_ste.quantize(ResidualCNN(), bits=4, integer_graph=True, example_input=torch.randn(1, 5, 16, 16))
    assert "example_input" in e.value.fix


def test_integer_graph_must_be_a_bool():
    with pytest.raises(QatSteError, match="integer_graph"):
        QuantConfig(integer_graph="yes")


def test_a_quantized_integer_graph_trains_and_its_points_learn(tmp_path):
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    q = _quantized(ResidualCNN(), x).train()
    point = q.get_submodule("b1.bn2_point1")
    before = point.alpha.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(q(x), y).backward()
        assert point.alpha.grad is not None and torch.isfinite(point.alpha.grad).all()
        opt.step()
    assert not torch.equal(point.alpha.detach(), before)


def test_the_check_of_an_integer_graph_compares_the_deployed_integer_kernels_with_the_integer_reference(tmp_path):
    x = torch.randn(8, 3, 16, 16)
    model = ResidualCNN().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    q = _quantized(model, x)
    export_onnx(q, tmp_path / "m.onnx", x[:1])
    report = qat_ste.check_onnx(q, tmp_path / "m.onnx", x, latency=False)
    assert report.ok, report.failures
    assert report.reference == "the integer reference: what the file's integer kernels compute"
    assert report.code_agreement == 1.0 and report.site_parity == 1.0
    assert report.max_logit_diff < 1e-5
    assert report.options["end_to_end_codes"].startswith("default session options")
    assert any("6 BatchNorm(s) folded, 7 layer(s) as integer kernels" in n for n in report.notes)


def test_openvino_runs_an_integer_graph_with_int8_convolutions(tmp_path):
    pytest.importorskip("openvino")
    x = torch.randn(8, 3, 16, 16)
    q = _quantized(ResidualCNN(), x)
    export_onnx(q, tmp_path / "m.onnx", x[:1])
    report = qat_ste.check_onnx(q, tmp_path / "m.onnx", x, latency=False, runtime="openvino")
    assert report.ok, report.failures
    assert report.site_parity == 1.0 or all(s.near_boundary for s in report.sites if s.parity < 1.0)
    assert report.top1_agreement == 1.0
    assert report.integer_ops == {"Convolution": 6, "FullyConnected": 1} and report.float_ops == {}


class _DataDependent(nn.Module):
    """A residual block FX cannot trace (a branch on a value): the rewrite cannot place its points."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if float(y.mean()) > -1e9:
            y = y + x
        return self.act(y)


def test_an_owner_fx_cannot_trace_is_reported_without_points():
    model = nn.Sequential(_DataDependent(), nn.Conv2d(3, 4, 1), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    q = qat_ste.quantize(model.eval(), bits=4, integer_graph=True, example_input=x)
    report = qat_ste.report(q)
    assert list(report.points_skipped) == ["0"]
    assert "FX cannot trace it" in report.points_skipped["0"] or "run time" in report.points_skipped["0"]
    assert "integer graph: no points inside 0:" in report.table()
    # what the untraced block reads is unknown, so its input gets no point; the conv after it reads the
    # block's quantized ReLU: no point either
    assert report.points == []


def test_spec_form_with_int8_weights_and_per_channel_3_bit_sites_exports_and_checks(tmp_path):
    # the int8 weight pass rebuilt the node list before the spec pass narrowed the containers: the
    # spec pass then looked for nodes no longer in the graph (ValueError)
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    q = qat_ste.quantize(ResidualCNN().eval(), bits=3, per_channel=True, example_input=x[:1])
    qat_ste.calibrate(q, [x])
    result = export_onnx(q.eval(), tmp_path / "m.onnx", x[:1], form="spec", weight_format="int8")
    assert result.form == "spec" and result.weight_format == "int8"
    report = qat_ste.check_onnx(q, tmp_path / "m.onnx", x, latency=False)
    assert report.site_parity == 1.0, report.failures

"""ONNX export: Q/DQ per site, exact per-site code parity in ONNX Runtime, deploy and spec forms,
dynamic batch, metadata, ORT integer-kernel fusion, bad input, atomic writes.

Dynamo exports take seconds each, so every exported file is built once per module (``exports``).
"""

from __future__ import annotations

import json
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
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto  # noqa: E402

import qat_ste  # noqa: E402
from qat_ste.errors import QatSteError  # noqa: E402
from qat_ste.export import check_onnx, export_onnx, onnx_export, passes, read_metadata  # noqa: E402  # noqa: E402
from qat_ste.export.runtime import optimized_op_counts  # noqa: E402
from qat_ste.zoo import lenet5  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folded convolutions get real biases."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class ReluNet(nn.Module):
    """conv-BN-ReLU, maxpool, conv-BN-ReLU, linear-BN-ReLU, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.fc1, self.bn3, self.act3 = nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.pool(self.act2(self.bn2(self.conv2(x))))
        return self.fc2(self.act3(self.bn3(self.fc1(x.flatten(1)))))


class SmoothNet(nn.Module):
    """GELU and SiLU sites: quantized outputs with non-zero zero points."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


IMAGE = (3, 16, 16)


def make_quantized(kind: str, bits: int, **options) -> nn.Module:
    torch.manual_seed(0)
    if kind == "lenet":
        model, shape = _randomize_bn(lenet5()), (1, 28, 28)
    else:
        model, shape = _randomize_bn(ReluNet() if kind == "relu" else SmoothNet()), IMAGE
    q = qat_ste.quantize(model, bits=bits, example_input=torch.randn(2, *shape), **options)
    qat_ste.calibrate(q, [torch.randn(16, *shape) for _ in range(2)])
    return q.eval()


def input_shape(kind: str) -> tuple[int, ...]:
    return (1, 28, 28) if kind == "lenet" else IMAGE


# name -> (model kind, bits, quantize options, export options)
CASES = {
    "relu4_deploy": ("relu", 4, {}, {}),
    "relu4_int8": ("relu", 4, {}, {"weight_format": "int8"}),
    "relu4_spec": ("relu", 4, {}, {"form": "spec"}),
    "relu8_int8": ("relu", 8, {}, {"weight_format": "int8"}),
    "relu4_ceil": ("relu", 4, {"rounding": "ceil"}, {"weight_format": "int8"}),
    "smooth3_deploy": ("smooth", 3, {"per_channel": True}, {}),
    "smooth3_spec": ("smooth", 3, {"per_channel": True}, {"form": "spec"}),
    "lenet2_spec": ("lenet", 2, {}, {"form": "spec"}),
}


class Exports:
    """Builds each case's quantized model and file once."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.models: dict[tuple, nn.Module] = {}
        self.done: dict[str, tuple[nn.Module, onnx_export.ExportResult]] = {}

    def model(self, kind: str, bits: int, options: dict) -> nn.Module:
        key = (kind, bits, tuple(sorted(options.items())))
        if key not in self.models:
            self.models[key] = make_quantized(kind, bits, **options)
        return self.models[key]

    def __call__(self, case: str) -> tuple[nn.Module, onnx_export.ExportResult]:
        if case not in self.done:
            kind, bits, qopts, eopts = CASES[case]
            model = self.model(kind, bits, qopts)
            result = export_onnx(model, self.directory / f"{case}.onnx", torch.randn(1, *input_shape(kind)), **eopts)
            self.done[case] = (model, result)
        return self.done[case]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("onnx"))


def session(path, config=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for k, v in (config or {}).items():
        options.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- every file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_file_is_valid_standard_onnx_with_qdq_per_site(exports, case) -> None:
    model, result = exports(case)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert proto.ir_version <= 13
    assert result.file_size == os.path.getsize(result.path)
    names = [n for n, _ in qat_ste.quant_modules(model)]
    assert [s.name for s in result.sites] == names
    by_name = {n.name: n for n in proto.graph.node}
    for site in result.sites:
        q, dq = by_name[f"{site.name}/quantize"], by_name[f"{site.name}/dequantize"]
        assert q.op_type == "QuantizeLinear" and dq.op_type == "DequantizeLinear"
        assert dq.input[0] == site.codes


@pytest.mark.parametrize("case", list(CASES))
def test_codes_match_pytorch_exactly_at_every_site(exports, case) -> None:
    model, result = exports(case)
    kind = CASES[case][0]
    report = check_onnx(model, result.path, torch.randn(6, *input_shape(kind)) * 1.5, latency=False)
    assert report.site_parity == 1.0, report.table()
    assert all(s.parity == 1.0 and s.dequant_exact for s in report.sites)
    assert report.ok, report.table()
    assert report.code_agreement > 0.9


@pytest.mark.parametrize("case", ["relu4_deploy", "smooth3_spec", "lenet2_spec"])
def test_dynamic_batch(exports, case) -> None:
    model, result = exports(case)
    sess = session(result.path, result.session_config)
    name = sess.get_inputs()[0].name
    assert isinstance(sess.get_inputs()[0].shape[0], str)
    for batch in (1, 3):
        x = torch.randn(batch, *input_shape(CASES[case][0]))
        out = sess.run(None, {name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, atol=1e-4)


def test_metadata_holds_every_site_setting(exports) -> None:
    model, result = exports("smooth3_deploy")
    meta = read_metadata(onnx.load(str(result.path)))
    assert meta["form"] == "deploy" and meta["weight_format"] == "float" and meta["opset"] == result.opset
    assert meta["session_config"] == {"session.disable_quant_qdq": "1"}
    modules = dict(qat_ste.quant_modules(model))
    assert [s["name"] for s in meta["sites"]] == list(modules)
    for s in meta["sites"]:
        m = modules[s["name"]]
        assert s["bits"] == 3 and s["axis"] == 1 and s["rounding"] == "nearest"
        assert s["step"] == pytest.approx(m.alpha.detach().tolist(), rel=0, abs=0)
        assert s["zero_point"] == [int(z) for z in m.zero_point.tolist()]
        assert any(z > 0 for z in s["zero_point"])  # GELU/SiLU go negative
    json.dumps(result.to_dict())


def test_export_leaves_the_model_unchanged(exports) -> None:
    model = exports.model("relu", 4, {})
    model.train()
    x = torch.randn(4, *IMAGE)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    export_onnx(model, exports.directory / "again.onnx", x[:1])
    assert model.training and all(m.training for m in model.modules())
    assert all(m.mode == "quantize" for _, m in qat_ste.quant_modules(model))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


# ---- deploy form -----------------------------------------------------------------------------------


def test_deploy_carries_uint8_codes_limited_by_an_integer_clip(exports) -> None:
    _, result = exports("relu4_deploy")
    proto = onnx.load(str(result.path))
    inits = {t.name: t for t in proto.graph.initializer}
    by_name = {n.name: n for n in proto.graph.node}
    for site in result.sites:
        assert site.container == "uint8" and site.range_limit == "integer_clip"
        assert inits[f"{site.name}/zero_point"].data_type == TensorProto.UINT8
        clip = by_name[f"{site.name}/clip"]
        assert onnx.numpy_helper.to_array(inits[clip.input[2]]) == 15


def test_deploy_int8_fuses_into_qlinearconv_with_default_options(exports) -> None:
    _, result = exports("relu4_int8")
    assert result.session_config == {}
    assert result.weight_counts["weights"] == 4 and result.weight_counts["biases"] >= 2
    ops = optimized_op_counts(result.path)  # ORT's default session options
    assert ops.get("QLinearConv", 0) >= 1  # conv2 (conv1 reads the float image input)
    assert ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0) >= 1  # fc1


def test_bits8_has_no_clip_and_fuses(exports) -> None:
    _, result = exports("relu8_int8")
    proto = onnx.load(str(result.path))
    assert not any(n.op_type == "Clip" for n in proto.graph.node)
    assert all(s.range_limit == "none" and s.container == "uint8" for s in result.sites)
    assert optimized_op_counts(result.path).get("QLinearConv", 0) >= 1


def test_ceil_rounding_is_exported_exactly(exports) -> None:
    model, result = exports("relu4_ceil")
    proto = onnx.load(str(result.path))
    assert sum(n.op_type == "Ceil" for n in proto.graph.node) == len(result.sites)
    assert any("ceil" in note for note in result.notes)
    assert all(s.rounding == "ceil" for s in result.sites)
    # round-to-nearest would disagree with ceil on about half the values
    report = check_onnx(model, result.path, torch.randn(5, *IMAGE), latency=False)
    assert report.site_parity == 1.0 and report.ok


# ---- spec form -------------------------------------------------------------------------------------


def _zero_point_types(result) -> dict[str, int]:
    proto = onnx.load(str(result.path))
    inits = {t.name: t for t in proto.graph.initializer}
    return {s.name: inits[f"{s.name}/zero_point"].data_type for s in result.sites}


def test_spec_uses_uint4_for_4_bits(exports) -> None:
    _, result = exports("relu4_spec")
    assert result.opset == 21
    assert set(_zero_point_types(result).values()) == {TensorProto.UINT4}
    assert all(s.container == "uint4" and s.range_limit == "none" for s in result.sites)
    assert not any(n.op_type == "Clip" for n in onnx.load(str(result.path)).graph.node)


def test_spec_uses_uint2_for_2_bits(exports) -> None:
    _, result = exports("lenet2_spec")
    assert result.opset == 25 and result.ir_version == 13
    assert set(_zero_point_types(result).values()) == {TensorProto.UINT2}


def test_spec_3_bits_uint4_with_a_float_range_limit(exports) -> None:
    _, result = exports("smooth3_spec")
    assert all(s.container == "uint4" and s.range_limit == "float_limit" for s in result.sites)
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert ops.count("Max") == ops.count("Min") == len(result.sites)


def test_spec_and_deploy_give_identical_outputs(exports) -> None:
    _, deploy = exports("smooth3_deploy")
    _, spec = exports("smooth3_spec")
    x = {"x": torch.randn(4, *IMAGE).numpy()}
    a = session(deploy.path, deploy.session_config).run(None, x)[0]
    b = session(spec.path, spec.session_config).run(None, x)[0]
    assert np.array_equal(a, b)


# ---- bad input -------------------------------------------------------------------------------------


def test_uninitialised_alpha_is_refused(tmp_path) -> None:
    q = qat_ste.quantize(ReluNet().eval(), bits=4)
    with pytest.raises(QatSteError, match="never initialised"):
        export_onnx(q, tmp_path / "m.onnx", torch.randn(1, *IMAGE))
    assert not list(tmp_path.iterdir())


class UnusedActivation(nn.Module):
    """Like torchvision's quantizable Bottleneck: ``relu`` is kept from the base class, the forward
    calls ``relu1`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.relu1 = nn.Conv2d(IMAGE[0], 4, 3), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu1(self.conv(x)).flatten(1)


def test_an_activation_module_the_forward_never_calls_does_not_block_the_export(tmp_path) -> None:
    q = qat_ste.quantize(UnusedActivation().eval(), bits=4)
    with pytest.warns(UserWarning):  # calibration names the site it never saw
        qat_ste.calibrate(q, [torch.randn(4, *IMAGE)])
    assert not q.relu.is_initialized and q.relu1.is_initialized
    result = export_onnx(q, tmp_path / "m.onnx", torch.randn(1, *IMAGE))  # was: "relu ... never initialised"
    assert [s.name for s in result.sites] == ["relu1"]
    assert any("did not run" in n and "relu" in n for n in result.notes)
    assert check_onnx(q, result.path, torch.randn(3, *IMAGE), latency=False).site_parity == 1.0


def test_model_without_quantized_sites_is_refused(tmp_path) -> None:
    with pytest.raises(QatSteError, match="no quantized activations"):
        export_onnx(ReluNet().eval(), tmp_path / "m.onnx", torch.randn(1, *IMAGE))


@pytest.mark.parametrize("opset", [12, 17, 26, "21", 21.0])
def test_unsupported_opset_is_refused(exports, tmp_path, opset) -> None:
    model = exports.model("relu", 4, {})
    with pytest.raises(QatSteError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *IMAGE), opset=opset)


def test_spec_with_2_bits_needs_opset_25(exports, tmp_path) -> None:
    model = exports.model("lenet", 2, {})
    with pytest.raises(QatSteError, match="opset >= 25"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28), form="spec", opset=21)


@pytest.mark.parametrize("option", [{"form": "tiny"}, {"weight_format": "int4"}])
def test_unknown_form_or_weights_is_refused(exports, tmp_path, option) -> None:
    with pytest.raises(QatSteError):
        export_onnx(exports.model("relu", 4, {}), tmp_path / "m.onnx", torch.randn(1, *IMAGE), **option)


def test_unwritable_paths_are_refused(exports, tmp_path) -> None:
    model = exports.model("relu", 4, {})
    x = torch.randn(1, *IMAGE)
    with pytest.raises(QatSteError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", x)
    with pytest.raises(QatSteError, match="is a directory"):
        export_onnx(model, tmp_path, x)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(QatSteError, match="permission"):
                export_onnx(model, locked / "m.onnx", x)
        finally:
            locked.chmod(0o700)


def test_wrong_input_shape_is_reported_cleanly(exports, tmp_path) -> None:
    model = exports.model("relu", 4, {})
    with pytest.raises(QatSteError, match=r"does not run on the example input of shape \(1, 1, 16, 16\)"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 16, 16))
    with pytest.raises(QatSteError, match="example_input must be a tensor"):
        export_onnx(model, tmp_path / "m.onnx", [1, 2, 3])
    assert not list(tmp_path.iterdir())


# ---- atomic write ----------------------------------------------------------------------------------


def test_failed_write_leaves_no_file_and_keeps_the_old_one(exports, tmp_path, monkeypatch) -> None:
    model = exports.model("relu", 4, {})
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export.os, "replace", broken_replace)
    with pytest.raises(QatSteError, match="disk full"):
        export_onnx(model, target, torch.randn(1, *IMAGE))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left


def test_failure_mid_export_leaves_no_file(exports, tmp_path, monkeypatch) -> None:
    model = exports.model("relu", 4, {})

    def broken(*args, **kwargs):
        raise RuntimeError("pass failed")

    monkeypatch.setattr(passes, "narrow_containers", broken)
    with pytest.raises(RuntimeError, match="pass failed"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *IMAGE), form="spec")
    assert not list(tmp_path.iterdir())


def test_model_over_the_protobuf_limit_is_refused_clearly_without_external_data(monkeypatch) -> None:
    """With external_data=False, models whose weights exceed one ONNX file's 2 GiB get a clear error
    before exporting (by default their weights go to a data file: tests/test_external_data.py)."""
    from qat_ste.export import onnx_export

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    q = qat_ste.quantize(model, step_init=0.1)
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 100)  # the toy model's weights exceed 100 bytes
    with pytest.raises(QatSteError, match="at most 2 GiB") as e:
        onnx_export.export_onnx(q, "unused.onnx", torch.randn(1, 1, 8, 8), external_data=False)
    assert "external_data=None" in str(e.value.fix)


def test_per_channel_token_steps_loaded_from_a_state_dict_export_on_the_channel_axis(tmp_path) -> None:
    """A (B, N, C) site whose per-channel steps were loaded, not calibrated, exports along C."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(4, 5, 8)
    calibrated = qat_ste.quantize(model, per_channel=True)
    qat_ste.calibrate(calibrated, [x])
    fresh = qat_ste.quantize(model, per_channel=True)
    fresh.load_state_dict(calibrated.state_dict())
    fresh.eval()
    export_onnx(fresh, tmp_path / "tokens.onnx", x)
    report = check_onnx(fresh, tmp_path / "tokens.onnx", x, latency=False)
    assert report.site_parity == 1.0
    assert torch.allclose(fresh(x), calibrated.eval()(x))


# ---- vocabulary: weight_format / step, with the old names as deprecated aliases -------------------


def test_deprecated_weights_alias_still_exports_int8(exports, tmp_path) -> None:
    model = exports.model("relu", 4, {})
    with pytest.warns(DeprecationWarning, match="weight_format"):
        result = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *IMAGE), weights="int8")
    assert result.weight_format == "int8" and result.weight_counts["weights"] == 4
    with pytest.warns(DeprecationWarning, match="weight_format"):
        assert result.weights == "int8"


def test_first_format_metadata_reads_with_current_names(exports) -> None:
    _, result = exports("relu4_deploy")
    proto = onnx.load(str(result.path))
    meta = read_metadata(proto)
    old = dict(meta, format="qat_ste.onnx/1", weights=meta["weight_format"],
               sites=[{**{k: v for k, v in s.items() if k != "step"}, "scale": s["step"]} for s in meta["sites"]])
    del old["weight_format"]
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {onnx_export.METADATA_KEY: json.dumps(old)})
    again = read_metadata(proto)
    assert again["weight_format"] == meta["weight_format"] and "weights" not in again
    assert [s["step"] for s in again["sites"]] == [s["step"] for s in meta["sites"]]
    assert meta["format"] == "qat_ste.onnx/2"


def test_int8_weights_in_the_file_equal_the_checks_rounding(exports) -> None:
    """Export and check share one int8 rounding: the file's dequantized weights equal, bit for bit,
    the weights of the PyTorch reference that check_onnx compares with."""
    from qat_ste.export.check import int8_weight_reference
    from qat_ste.export.weights import dequantize_per_channel

    model, result = exports("relu4_int8")
    proto = onnx.load(str(result.path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("/int8")]
    file_weights = [dequantize_per_channel(inits[n.input[0]], inits[n.input[1]],
                                           next(a.i for a in n.attribute if a.name == "axis")) for n in dequantize]
    assert len(file_weights) == 4
    for n in dequantize:
        codes = inits[n.input[0]]
        assert codes.dtype == np.int8 and codes.min() >= -127 and codes.max() <= 127
    # fc2 has no BatchNorm after it (the others are folded and rescaled), so its weight in the file
    # must equal the reference's exactly (stored as Gemm [out, in] or MatMul [in, out])
    fc2 = int8_weight_reference(model).fc2.weight.detach().numpy()
    assert not np.array_equal(fc2, model.fc2.weight.detach().numpy())  # the reference was rounded
    assert sum(np.array_equal(w, fc2) or np.array_equal(w, fc2.T) for w in file_weights) == 1

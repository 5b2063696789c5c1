"""Export paths: a root module on the runtime fallback, multi-input models, and the exporter
fallback chain (torch.export/dynamo, then the TorchScript exporter)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import qat_ste  # noqa: E402
from qat_ste.errors import QatSteError  # noqa: E402
from qat_ste.export import check_onnx, export_onnx, read_metadata  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


class RootFallback(nn.Module):
    """A root forward FX cannot trace (``x.dim()`` in a condition) with a functional ReLU in it:
    quantize() sends the root module itself to the runtime fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x * 2.0
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class TwoInputs(nn.Module):
    """Two images concatenated along the channels, then a conv and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([left, right], 1))).mean((2, 3))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_root_fallback_exports_with_a_dynamic_batch(tmp_path) -> None:
    qmodel = qat_ste.quantize(RootFallback(), bits=4)
    assert "*" not in str(inspect.signature(qmodel.forward))  # the fallback keeps forward(x)
    assert list(inspect.signature(qmodel.forward).parameters) == ["x"]
    qat_ste.calibrate(qmodel, [torch.randn(4, 3, 8, 8)])
    result = export_onnx(qmodel, tmp_path / "root.onnx", torch.randn(1, 3, 8, 8))
    assert result.dynamic_batch and result.input_names == ("x",) and len(result.sites) == 1
    for batch in (2, 5):
        report = check_onnx(qmodel.eval(), result.path, torch.randn(batch, 3, 8, 8), latency=False)
        assert report.ok, report.table()
        assert report.site_parity == 1.0


def test_two_input_model_exports_named_inputs_with_a_dynamic_batch(tmp_path) -> None:
    qmodel = qat_ste.quantize(TwoInputs(), bits=4)
    qat_ste.calibrate(qmodel, [{"left": torch.randn(4, 3, 8, 8), "right": torch.randn(4, 3, 8, 8)}])
    qmodel.eval()
    result = export_onnx(qmodel, tmp_path / "two.onnx", (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)))
    assert result.input_names == ("left", "right")
    session = _session(result.path)
    assert [i.shape[0] for i in session.get_inputs()] == ["batch", "batch"]
    left, right = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    (out,) = session.run(None, {"left": left.numpy(), "right": right.numpy()})
    with torch.no_grad():
        expected = qmodel(left, right).numpy()
    assert out.shape == (5, 8)
    np.testing.assert_allclose(out, expected, atol=1e-5)


# ---- the exporter chain ----------------------------------------------------------------------------


@torch.library.custom_op("qat_ste_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    """An op no ONNX exporter knows (no translation, no symbolic)."""
    return x.clone()


@_opaque.register_fake
def _opaque_fake(x):
    return torch.empty_like(x)


class DataDependent(nn.Module):
    """A slice whose length depends on the data: torch.export cannot guard on it
    (GuardOnDataDependentSymNode), the TorchScript exporter traces it as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 4, 3), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act(self.bn(self.conv(x)))))
        return y[: int(y.sum() > -1e9) + 1].flatten(1)


class Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qat_ste_test.opaque(self.act(self.conv(x)))


class FusedAttention(nn.Module):
    """Stands for a timm attention block: ``fused_attn`` picks a path no exporter takes."""

    def __init__(self) -> None:
        super().__init__()
        self.fused_attn = True
        self.proj, self.act = nn.Linear(8, 8), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.proj(x))
        if self.fused_attn:
            return torch.ops.qat_ste_test.opaque(y)
        return torch.softmax(y @ y.transpose(-1, -2), -1) @ y


def _calibrated(model: nn.Module, shape: tuple[int, ...], bits_override: int = 4, **options) -> nn.Module:
    qmodel = qat_ste.quantize(model, bits=bits_override, **options)
    qat_ste.calibrate(qmodel, [torch.randn(4, *shape[1:])])
    return qmodel.eval()


@pytest.fixture(scope="module")
def data_dependent() -> nn.Module:
    torch.manual_seed(0)
    return _calibrated(DataDependent(), (1, 3, 8, 8))


@pytest.mark.parametrize("form", ["deploy", "spec"])
def test_torchscript_path_when_torch_export_fails(data_dependent, tmp_path, form) -> None:
    result = export_onnx(data_dependent, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), form=form)
    assert result.exporter == "torchscript"
    assert any("dynamo: " in n and "GuardOnDataDependentSymNode" in n for n in result.notes)
    # the exporter's own opset unless the file's types need more (spec's UINT4: the version converter)
    assert result.opset == (20 if form == "deploy" else 21)
    assert any("the file has opset 20, not the requested 21" in n for n in result.notes) == (form == "deploy")
    model = onnx.load(result.path)
    assert read_metadata(model)["exporter"] == "torchscript"
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # markers removed
    assert [s.name for s in result.sites] == ["act", "act2"]
    assert result.input_names == ("x",) and result.output_names == ("output",)
    assert [s.container for s in result.sites] == (["uint4"] * 2 if form == "spec" else ["uint8"] * 2)
    for batch in (2, 5):
        report = check_onnx(data_dependent, result.path, torch.randn(batch, 3, 8, 8), latency=False)
        assert report.ok, report.table()
        assert [s.parity for s in report.sites] == [1.0, 1.0]


def test_torchscript_path_exports_quantized_weights_and_int8_float_weights(tmp_path) -> None:
    qmodel = _calibrated(DataDependent(), (1, 3, 8, 8), weight_bits=2, keep_first_weights=False,
                         keep_last_weights=False)
    result = export_onnx(qmodel, tmp_path / "w.onnx", torch.randn(1, 3, 8, 8), weight_format="int8")
    assert result.exporter == "torchscript"
    assert [w.name for w in result.weight_layers] == ["conv", "conv2"]
    assert all(set(w.distinct_codes) <= set(w.allowed_codes) for w in result.weight_layers)
    report = check_onnx(qmodel, result.path, torch.randn(3, 3, 8, 8), latency=False)
    assert report.ok, report.table()
    assert report.site_parity == 1.0


@torch.jit._script_if_tracing
def _scale_if_positive(total: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if bool(total > 0):  # scripted while tracing: an If node whose branches read y from outside
        return y * 2
    return y - 1


class BranchReadsOuterTensor(DataDependent):
    """Like torchvision's detection post-processing (batched_nms is scripted while tracing): the
    TorchScript file holds an If whose branches alone read a tensor of the main graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act(self.bn(self.conv(x)))))
        y = y[: int(y.sum() > -1e9) + 1]
        return _scale_if_positive(y.sum(), y.flatten(1) + 1)


def test_tensors_only_subgraphs_read_survive_the_passes(tmp_path) -> None:
    torch.manual_seed(0)
    qmodel = _calibrated(BranchReadsOuterTensor(), (1, 3, 8, 8))
    result = export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))  # was: "not topologically sorted"
    assert result.exporter == "torchscript"
    graph = onnx.load(result.path).graph
    branches = [a.g for n in graph.node if n.op_type == "If" for a in n.attribute]
    outer = {o for n in graph.node for o in n.output}
    read_from_outside = {i for g in branches for n in g.node for i in n.input
                         if i and i not in {o for m in g.node for o in m.output} and i not in
                         {t.name for t in g.initializer}}
    assert read_from_outside and read_from_outside <= outer  # the If reads main-graph tensors, all kept
    report = check_onnx(qmodel, result.path, torch.randn(1, 3, 8, 8), latency=False)
    assert report.ok, report.table()
    assert [s.parity for s in report.sites] == [1.0, 1.0]


def test_dynamo_is_the_first_path(tmp_path) -> None:
    result = export_onnx(_calibrated(RootFallback(), (1, 3, 8, 8)), tmp_path / "d.onnx", torch.randn(1, 3, 8, 8))
    assert result.exporter == "dynamo" and not any("earlier paths failed" in n for n in result.notes)
    assert read_metadata(onnx.load(result.path))["exporter"] == "dynamo"


def test_fused_attention_is_switched_off_when_it_blocks_the_export(tmp_path) -> None:
    qmodel = _calibrated(FusedAttention(), (1, 5, 8))
    result = export_onnx(qmodel, tmp_path / "a.onnx", torch.randn(1, 5, 8))
    assert result.exporter == "dynamo, timm fused attention off"
    assert qmodel.fused_attn is True  # restored
    session = _session(result.path)
    x = torch.randn(3, 5, 8)
    qmodel.fused_attn = False
    with torch.no_grad():
        expected = qmodel(x).numpy()
    qmodel.fused_attn = True
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=1e-5)


def test_a_model_no_exporter_takes_names_every_path(tmp_path) -> None:
    qmodel = _calibrated(Unexportable(), (1, 3, 8, 8))
    with pytest.raises(QatSteError) as info:
        export_onnx(qmodel, tmp_path / "u.onnx", torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "every ONNX exporter failed" in message
    assert "dynamo: " in message and "torchscript: " in message and "fused attention" not in message
    assert not (tmp_path / "u.onnx").exists()


def test_torchscript_path_reaches_opset_25_for_2_bit_spec(tmp_path) -> None:
    qmodel = _calibrated(DataDependent(), (1, 3, 8, 8), bits_override=2)
    result = export_onnx(qmodel, tmp_path / "s2.onnx", torch.randn(1, 3, 8, 8), form="spec")
    assert result.exporter == "torchscript" and result.opset == 25
    assert [s.container for s in result.sites] == ["uint2", "uint2"]
    report = check_onnx(qmodel, result.path, torch.randn(3, 3, 8, 8), latency=False)
    assert report.ok, report.table()
    assert report.site_parity == 1.0


class BatchSpecialised(nn.Module):
    """Code that branches on the batch size: torch.export specialises the batch it traced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        return y * 2 if x.shape[0] == 2 else y


def test_a_batch_the_exporter_fixes_is_the_example_inputs_and_reported(tmp_path) -> None:
    qmodel = _calibrated(BatchSpecialised(), (1, 3, 8, 8))
    result = export_onnx(qmodel, tmp_path / "b.onnx", torch.randn(1, 3, 8, 8))
    assert result.exporter == "dynamo" and result.dynamic_batch is False
    assert any("fixed the batch size" in n and "(1)" in n for n in result.notes)
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 8, 8]
    report = check_onnx(qmodel, result.path, torch.randn(1, 3, 8, 8), latency=False)
    assert report.ok and report.site_parity == 1.0, report.table()

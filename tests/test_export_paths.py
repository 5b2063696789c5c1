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
import onnxruntime as ort  # noqa: E402

import qat_ste  # noqa: E402
from qat_ste.export import check_onnx, export_onnx  # noqa: E402

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

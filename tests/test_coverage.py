"""The fast CI subset of tools.coverage: real torchvision/timm models, random weights.

Each model is quantized, calibrated, trained one step (finite gradients), and its quantized sites
are compared with an independent run-time census of the float model, in eval and training mode.
A few are also exported to ONNX and checked for 100 % per-site code parity in ONNX Runtime.
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm")

from tools.coverage_lib import CI_MODELS, check_model, rows_to_markdown  # noqa: E402

EXPORTED = {"torchvision:resnet18", "timm:mobilenetv3_small_050", "timm:levit_128s"}


@pytest.mark.slow
@pytest.mark.parametrize("spec", CI_MODELS)
def test_model_is_quantized_completely(spec: str, single_thread) -> None:
    row = check_model(spec, export=spec in EXPORTED)
    assert row.passed, row.reason
    assert row.sites_found == row.sites_counted == row.quantized_calls > 0
    if spec in EXPORTED:
        assert row.exported == "ok" and row.site_parity == 1.0


def test_failures_are_reported_not_raised() -> None:
    row = check_model("timm:no_such_model_name")
    assert not row.passed and row.sites_found == 0
    assert "no_such_model_name" in row.reason or "Unknown model" in row.reason
    table = rows_to_markdown([row])
    assert "| timm:no_such_model_name | 0 | 0 | FAIL |" in table and "0/1 models pass" in table

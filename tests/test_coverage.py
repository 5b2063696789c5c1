"""The fast CI subset of tools.coverage: real torchvision/timm models, random weights.

Each model is quantized, calibrated, trained one step (finite gradients), and its quantized sites
are compared with an independent run-time census of the float model, in eval and training mode.
A few are also exported to ONNX and checked for 100 % per-site code parity in ONNX Runtime, and one
model of every task (detection, segmentation, video, optical flow, a quantizable classifier) is
exported and passes its task's check.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from qat_ste.export.exporters import PATHS  # noqa: E402
from tools.coverage_lib import (  # noqa: E402
    CI_MODELS,
    CI_TASK_MODELS,
    CoverageRow,
    check_model,
    rows_to_markdown,
    summary_table,
    task_of,
)

EXPORTED = {"torchvision:resnet18", "timm:mobilenetv3_small_050", "timm:levit_128s"}


@pytest.mark.slow
@pytest.mark.parametrize("spec", CI_MODELS)
def test_model_is_quantized_completely(spec: str, single_thread) -> None:
    row = check_model(spec, export=spec in EXPORTED)
    assert row.passed, row.reason
    assert row.sites_found == row.sites_counted == row.quantized_calls > 0
    if spec in EXPORTED:
        assert row.exported == "ok" and row.site_parity == 1.0


def test_zero_initialised_heads_get_random_weights() -> None:
    from tools.coverage_lib import build_model

    model, x = build_model("torchvision:vit_b_32")  # torchvision starts ViT heads at zero
    assert bool(model.heads.head.weight.any())
    logits = model.eval()(x)
    assert logits.shape == (2, 10) and bool((logits - logits.mean(dim=1, keepdim=True)).abs().gt(0).all())


def test_the_summary_counts_each_table_and_task() -> None:
    def row(model: str, task: str, end_to_end: float | None, float64: float | None = None, **kw) -> CoverageRow:
        return CoverageRow(model=model, task=task, census_ok=True, trained=True, site_parity=1.0, passed=True,
                           end_to_end_agreement=end_to_end, float64_agreement=float64, **kw)
    rows = [row("torchvision:a", "classification", 1.0), row("torchvision:b", "classification", 0.5, 0.75),
            row("torchvision:c", "classification", 0.5, 1.0), row("torchvision:quantized_d", "classification", 1.0),
            row("torchvision:raft", "optical_flow", 0.2, 0.15),
            CoverageRow(model="torchvision:big", census_ok=True, trained=True, reason="export failed")]
    text = summary_table({"tasks": rows})
    assert "| tasks | classification | 4 | 4 | 3 | 3 | 3 | 1 of 3 | 1 of 2 |" in text
    assert "| tasks | classification (quantizable variants) | 1 | 1 | 1 | 1 | 1 | 1 of 1 | 0 of 0 |" in text
    assert "| tasks | optical_flow | 1 | 1 | 1 | 1 | 1 | 0 of 1 | 1 of 1 |" in text  # an error: lower is better


def test_failures_are_reported_not_raised() -> None:
    row = check_model("timm:no_such_model_name")
    assert not row.passed and row.sites_found == 0
    assert "no_such_model_name" in row.reason or "Unknown model" in row.reason
    table = rows_to_markdown([row])
    assert "| timm:no_such_model_name | classification | 0 | 0 | " + "- | " * 10 + "FAIL |" in table
    assert "0/1 models pass (classification: 0/1)" in table


TASKS = {"torchvision:fasterrcnn_mobilenet_v3_large_320_fpn": ("detection", "matched boxes"),
         "torchvision:lraspp_mobilenet_v3_large": ("segmentation", "per-pixel class agreement"),
         "torchvision:r3d_18": ("video", "top-1 agreement"),
         "torchvision:raft_small": ("optical_flow", "relative error"),
         "torchvision:quantized_mobilenet_v2": ("classification", "top-1 agreement")}


def test_the_ci_subset_has_one_model_of_every_task() -> None:
    assert set(CI_TASK_MODELS) == set(TASKS)
    assert {task_of(m) for m in CI_TASK_MODELS} | {task_of(m) for m in CI_MODELS} == {
        "classification", "detection", "segmentation", "video", "optical_flow"}


@pytest.mark.slow
@pytest.mark.parametrize("spec", CI_TASK_MODELS)
def test_every_task_exports_and_passes_its_check(spec: str, single_thread) -> None:
    row = check_model(spec, export=True)
    assert row.passed, row.reason
    task, figure = TASKS[spec]
    assert row.task == task and row.task_figure.startswith(figure)
    assert row.census_ok and row.trained and row.sites_found > 0
    assert row.sites_counted == row.quantized_calls > 0
    assert row.exporter in PATHS and row.site_parity == 1.0
    if task == "optical_flow":
        assert row.task_agreement is not None and 0 <= row.task_agreement <= 0.1
    else:
        assert row.task_agreement is not None and row.task_agreement >= 0.9
    assert row.default_agreement is not None  # measured under ORT's default options too
    assert row.chained_codes is not None and row.chained_codes >= 0.999  # the file's segments compute PyTorch's
    assert row.end_to_end_agreement is not None  # shown beside it
    table = rows_to_markdown([row])
    assert f"| {spec} | {task} | {row.sites_found} |" in table and f"{task}: 1/1" in table


def test_rows_written_before_the_task_columns_still_load_and_render() -> None:
    old = {"model": "timm:resnet18", "sites_found": 17, "sites_counted": 17, "quantized_calls": 17,
           "methods": "module swap: 17", "exported": "ok", "site_parity": 1.0, "passed": True, "reason": "",
           "seconds": 3.0}
    table = rows_to_markdown([CoverageRow(**old)])
    # census and train were not recorded then, but the row passed only when both held
    assert "| timm:resnet18 | classification | 17 | 17 | ok | ok | ok (path not recorded) | 1.0000 | - |" in table
    assert "1/1 models pass (classification: 1/1)" in table


class _Float32Grid(torch.nn.Module):
    """Builds a float32 tensor inside its forward (as RAFT's coordinate grid): cannot run in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = torch.nn.Linear(6, 4), torch.nn.ReLU()

    def forward(self, x):
        return torch.mm(self.act(self.fc(x)), torch.ones(4, 3, dtype=torch.float32))


def test_the_rounding_baseline_compares_float64_or_inputs_one_ulp_apart() -> None:
    import qat_ste
    from tools.coverage_lib import ModelCase, _rounding_baseline

    torch.manual_seed(0)
    for model, how in ((torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)),
                        "in float32 and in float64"), (_Float32Grid(), "inputs one ulp apart")):
        q = qat_ste.quantize(model.eval(), bits=4)
        x = torch.randn(16, 6)
        qat_ste.calibrate(q, [x])
        case = ModelCase(q, "classification", (x,), (x,), lambda out: out.sum(), x[:1], [x])
        said, figure, codes = _rounding_baseline(q.eval(), case, "classification")
        assert how in said
        assert 0.9 <= codes <= 1.0 and 0.8 <= figure <= 1.0  # a 2-layer net barely moves

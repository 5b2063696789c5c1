"""check_onnx(): multi-input models, task-aware agreement (classification, segmentation, detection,
regression), tuple/dict outputs, and the figures under ONNX Runtime's default session options."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import qat_ste  # noqa: E402
from qat_ste.errors import QatSteError  # noqa: E402
from qat_ste.export import check_onnx, export_onnx  # noqa: E402
from qat_ste.export.tasks import TASKS, Agreement, matched_boxes, resolve_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1)
        self.act, self.fc = nn.ReLU(), nn.Linear(4, 5)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.a(image) + self.b(extra)).mean(dim=(2, 3)))


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class Detector(nn.Module):
    """Five boxes per image, with scores and labels: a dict of tensors, like a detector after its
    post-processing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.box, self.cls = nn.Linear(8, 20), nn.Linear(8, 15)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.act(self.conv(x)).mean(dim=(2, 3))
        raw = self.box(f).reshape(-1, 5, 4)
        boxes = torch.cat([raw[..., :2], raw[..., :2] + raw[..., 2:].exp()], dim=-1)
        scores, labels = self.cls(f).reshape(-1, 5, 3).softmax(-1).max(-1)
        return {"boxes": boxes, "scores": scores, "labels": labels}


def _quantized(module: nn.Module, *example: torch.Tensor, bits: int = 8) -> nn.Module:
    torch.manual_seed(0)
    q = qat_ste.quantize(module.eval(), bits=bits)
    with torch.no_grad():
        q(*example)
    return q.eval()


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory) -> tuple[nn.Module, str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 2, 8, 8, generator=g)
    q = _quantized(TwoInputs(), x, e)
    path = export_onnx(q, tmp_path_factory.mktemp("two") / "two.onnx", (x[:1], e[:1])).path
    return q, str(path), (x, e)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> tuple[nn.Module, str, torch.Tensor]:
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    q = _quantized(Segmenter(), x)
    return q, str(export_onnx(q, tmp_path_factory.mktemp("seg") / "seg.onnx", x[:1]).path), x


def test_two_input_model_is_fed_by_name(two_inputs) -> None:
    q, path, (x, e) = two_inputs
    r = check_onnx(q, path, (x, e), torch.randint(0, 5, (8,)), latency=False)
    assert r.ok, r.table()
    assert r.samples == 8 and r.task == "classification" and r.task_figure == "top-1 agreement"
    assert r.top1_agreement == r.task_agreement == 1.0 and r.site_parity == 1.0
    assert r.accuracy_torch == r.accuracy_onnx
    batches = check_onnx(q, path, [(x[:4], e[:4]), (x[4:], e[4:])], latency=False)
    assert batches.ok and batches.samples == 8


def test_two_input_model_times_its_latency_with_both_inputs(two_inputs) -> None:
    q, path, (x, e) = two_inputs
    r = check_onnx(q, path, (x, e), latency=True, latency_runs=1)
    assert r.latency_ms is not None and r.latency_ms["batch"] == 8.0, r.notes


@pytest.mark.parametrize("inputs, given", [("one", 1), ("three", 3)])
def test_wrong_number_of_input_tensors_is_a_clear_error(two_inputs, inputs, given) -> None:
    q, path, (x, e) = two_inputs
    batch = x if inputs == "one" else [(x, e, e)]
    with pytest.raises(QatSteError, match=f"the file takes 2 input.s., but a batch of {given} tensor") as info:
        check_onnx(q, path, batch, latency=False)
    assert "forward arguments" in info.value.fix


def test_segmentation_agreement_is_over_the_channel_axis(segmenter) -> None:
    q, path, x = segmenter
    labels = torch.randint(0, 3, (4, 6, 6))
    r = check_onnx(q, path, x, labels, latency=False)
    assert r.ok and r.task == "segmentation" and r.task_figure == "per-pixel class agreement", r.table()
    assert r.task_agreement == 1.0 and r.accuracy_torch == r.accuracy_onnx
    assert "per-pixel class agreement" in r.table() and "per pixel" in r.table()
    assert r.thresholds["min_pixel_agreement"] == 0.9
    # the figure counts pixels (N*H*W), and argmax over channels, not over the width
    a = torch.zeros(1, 3, 2, 2)
    a[0, 0] = 1.0
    b = a.clone()
    b[0, 0, 0, 0], b[0, 1, 0, 0] = 0.0, 1.0  # one pixel changes class; every row's argmax over width stays
    tally = Agreement("segmentation")
    tally.add([a], [b])
    assert (tally.agree, tally.total) == (3, 4)


def test_regression_reports_relative_error(segmenter) -> None:
    q, path, x = segmenter
    r = check_onnx(q, path, x, task="regression", latency=False)
    assert r.ok and r.task == "regression" and r.task_figure == "relative error", r.table()
    assert r.task_agreement == r.relative_drift < 1e-5 and r.top1_agreement != r.top1_agreement  # NaN
    assert "relative error" in r.table() and r.thresholds["max_relative_error"] == 0.1
    failed = check_onnx(q, path, x, task="regression", max_relative_error=0.0, latency=False)
    assert failed.ok == (failed.task_agreement == 0.0)
    tally = Agreement("regression")
    tally.add([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])])
    assert tally.value == pytest.approx(0.1)  # ||(0, 0.5)|| / ||(3, 4)||
    assert resolve_task(None, [torch.zeros(4, 1)]) == "regression"


def test_detection_dict_outputs_are_matched_box_by_box(tmp_path) -> None:
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    q = _quantized(Detector(), x)
    path = export_onnx(q, tmp_path / "det.onnx", x[:1]).path
    r = check_onnx(q, path, x, latency=False)
    assert r.ok and r.task == "detection" and r.task_figure.startswith("matched boxes"), r.table()
    assert r.task_agreement == 1.0 and r.default_task_agreement == 1.0
    assert r.max_logit_diff < 1e-4  # over boxes and scores, in the file's output order


def test_box_matching_needs_iou_and_label() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 20.0, 10.0, 30.0]])
    moved = boxes.clone()
    moved[1] += torch.tensor([1.0, 0.0, 1.0, 0.0])  # IoU 9/11 < 0.9
    labels = torch.tensor([1, 2, 3])
    assert matched_boxes(boxes, boxes, labels, labels) == 3
    assert matched_boxes(boxes, moved, labels, labels) == 2
    assert matched_boxes(boxes, boxes, labels, torch.tensor([1, 2, 0])) == 2
    tally = Agreement("detection")
    tally.add([boxes, labels], [boxes[:2], labels[:2]])  # the file found two of three: 2 / max(3, 2)
    assert tally.value == pytest.approx(2 / 3)
    assert resolve_task(None, [boxes, torch.rand(3), labels]) == "detection"


def test_flat_boxes_match_when_their_coordinates_agree() -> None:
    """fcos_resnet50_fpn clips random-weight boxes to the image and keeps flat ones (y1 == y2): the
    file's are the same boxes, but a box of zero area has no IoU with itself."""
    flat = torch.tensor([[86.434372, 48.0, 88.0, 48.0], [32.0, 62.4, 32.0, 64.0]])
    labels = torch.tensor([3, 1])
    assert matched_boxes(flat, flat, labels, labels) == 2
    assert matched_boxes(flat, flat + 1e-3, labels, labels) == 2  # within 1e-4 of the largest coordinate
    assert matched_boxes(flat, flat + torch.tensor([0.0, 0.5, 0.0, 0.5]), labels, labels) == 0
    assert matched_boxes(flat, flat, labels, labels.flip(0)) == 0
    assert matched_boxes(flat[:1], torch.tensor([[86.0, 40.0, 88.0, 48.0]])) == 0  # flat vs a real box: IoU 0


def test_tuple_outputs_are_compared_per_tensor(tmp_path) -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.act(self.conv(x)).mean(dim=(2, 3))
            return self.fc(f), f * 2

    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    q = _quantized(Pair(), x)
    path = export_onnx(q, tmp_path / "pair.onnx", x[:1]).path
    r = check_onnx(q, path, x, latency=False)
    assert r.ok and r.task == "classification" and r.task_agreement == 1.0, r.table()
    assert r.max_logit_diff < 1e-4


def test_default_options_are_a_separate_figure(two_inputs) -> None:
    q, path, (x, e) = two_inputs
    r = check_onnx(q, path, (x, e), latency=False)
    assert "disable_quant_qdq=1" in r.options["logits"]
    assert "default session options" in r.options["default_options"]
    assert r.default_task_agreement is not None and r.default_max_logit_diff is not None
    assert r.default_relative_drift is not None and r.default_relative_drift >= 0.0
    assert "ORT default options (Q/DQ fused" in r.table() and r.thresholds["min_default_agreement"] == 0.9
    failed = check_onnx(q, path, (x, e), latency=False, min_default_agreement=1.01, max_default_logit_diff=-1.0)
    assert not failed.ok
    assert any("top-1 agreement under ORT's default options" in f for f in failed.failures), failed.failures
    assert any("|logit difference| under ORT's default options" in f for f in failed.failures), failed.failures
    assert failed.task_agreement == 1.0  # the file's own mode is unaffected


def test_a_file_ort_defaults_cannot_load_is_noted_not_failed(segmenter, monkeypatch) -> None:
    import qat_ste.export.check as check_module

    q, path, x = segmenter
    real = check_module.open_runner

    def refuse_defaults(runtime, model, config=None, **kwargs):
        if config == {} and str(model) == path:  # as ORT refuses some 4-bit spec files with its defaults
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed:\nNo kernel for 4-bit Q/DQ")
        return real(runtime, model, config, **kwargs)

    monkeypatch.setattr(check_module, "open_runner", refuse_defaults)
    r = check_onnx(q, path, x, latency=False)
    assert r.ok and r.task_agreement == 1.0, r.table()
    assert r.default_task_agreement is None and r.default_max_logit_diff is None
    assert r.options["default_options"] == "not loadable with ORT's default options: No kernel for 4-bit Q/DQ"
    assert any("does not load with ORT's default session options" in n for n in r.notes)
    assert "not loadable with ORT's default options" in r.table()


def test_unknown_task_lists_the_choices(segmenter) -> None:
    q, path, x = segmenter
    with pytest.raises(QatSteError, match="unknown task 'pose'") as info:
        check_onnx(q, path, x, task="pose", latency=False)
    assert all(t in info.value.fix for t in TASKS)


def test_two_input_model_in_openvino(two_inputs) -> None:
    pytest.importorskip("openvino")
    q, path, (x, e) = two_inputs
    r = check_onnx(q, path, (x, e), runtime="openvino", latency=False,
                   runtime_options={"INFERENCE_PRECISION_HINT": "f32"})
    assert r.ok and r.runtime == "openvino" and r.task_agreement == 1.0, r.table()
    assert r.options["default_options"] == "the same as the file as deployed (OpenVINO's defaults)"
    assert r.default_task_agreement == r.task_agreement


def test_a_model_whose_outputs_do_not_match_the_file_is_compared_by_its_scores(two_inputs) -> None:
    q, path, (x, e) = two_inputs

    class MoreOutputs(nn.Module):  # the same sites, one more output than the file
        def __init__(self) -> None:
            super().__init__()
            self.inner = q

        def forward(self, image: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner(image, extra), image

    wrapped = MoreOutputs().eval()
    r = check_onnx(wrapped, path, (x, e), latency=False)
    assert r.task == "classification" and r.task_agreement == 1.0 and r.max_logit_diff < 1e-4, r.table()
    assert any("output (2 tensors) does not flatten to the file's 1 output tensor(s)" in n for n in r.notes), r.notes


@pytest.mark.parametrize("task", ["detection", "classification"])
def test_a_site_the_file_runs_on_other_boxes_is_noted_for_detection_only(task) -> None:
    """After NMS the file may keep other proposals than PyTorch: a box head's site then has another
    shape. For detection that is noted and left to the boxes' figure; elsewhere it is a failure."""
    import types

    import numpy as np

    from qat_ste.export.check import _count_site, _SiteTally, _Tally
    from qat_ste.export.ops import reference_codes

    torch.manual_seed(0)
    q = qat_ste.quantize(nn.Sequential(nn.ReLU()), bits=4)
    qat_ste.calibrate(q, [torch.rand(16, 8) * 2])
    module = q[0]
    u = torch.rand(5, 8) * 2  # the file kept 5 boxes ...
    with torch.no_grad():
        codes = reference_codes(module, u)
        step, zero_point = module.grid(u)
        y = ((codes - zero_point) * step).float()
    given = {"u": u.numpy(), "c": codes.numpy().astype(np.uint8), "y": y.numpy()}
    occurrence = types.SimpleNamespace(input="u", codes="c", output="y")
    tally = _Tally(sites={"head": _SiteTally(occurrences=1)}, task=task)
    _count_site(tally, "head", module, [occurrence], (given, {"c": given["c"]}), {"c": "c"},
                [torch.rand(7, 8)])  # ... PyTorch 7
    counts = tally.sites["head"]
    assert counts.values == 40 and counts.parity == 40  # per-site parity is still exact
    if task == "detection":
        assert tally.failures == [] and counts.not_compared == 40
        assert tally.notes == ["site head: shaped (5, 8) in the file and (7, 8) in PyTorch (a data-dependent "
                               "selection such as NMS kept other boxes); its end-to-end codes are not compared there"]
    else:
        assert tally.failures == ["site head: occurrence 0 has no PyTorch counterpart of the same shape"]
        assert counts.not_compared == 0

"""check_onnx()'s figures given the file's codes (qat_ste.export.chained): PyTorch runs with every
site's output replaced by the file's codes, so a difference upstream does not carry on downstream,
and a wrong op between two sites shows at the site after it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import qat_ste  # noqa: E402
from qat_ste.export import check_onnx, export_onnx  # noqa: E402
from qat_ste.export.chained import ChainedCounts, chained_notes, file_codes, forcing_hook, pooled_agreement  # noqa: E402
from qat_ste.export.ops import export_routing, quant_sites  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, str, torch.Tensor]:
    q = qat_ste.quantize(_net(), bits=4)
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    qat_ste.calibrate(q, [x])
    path = str(tmp_path_factory.mktemp("chained") / "net.onnx")
    export_onnx(q, path, x[:1])
    return q.eval(), path, x


def test_a_correct_file_agrees_given_its_codes(exported) -> None:
    q, path, x = exported
    r = check_onnx(q, path, x, latency=False)
    assert r.ok, r.table()
    assert [s.name for s in r.sites] == ["1", "3", "5"] and all(s.chained == 1.0 for s in r.sites)
    assert r.chained_code_agreement == 1.0 and r.task_agreement == r.top1_agreement == 1.0
    assert r.chained_relative_drift < 1e-6 and r.end_to_end_task_agreement == 1.0
    assert r.default_chained_code_agreement is not None and r.default_task_agreement is not None
    assert "given the file's codes at every site" in r.table() and "given codes" in r.table()
    assert "PyTorch given those codes" in r.options["given_codes"]


def test_an_upstream_difference_does_not_carry_on_given_the_files_codes(exported) -> None:
    """The PyTorch model's first conv moves by 1 % after export: its codes at site 1 differ from the
    file's, and end to end those differences move the later sites' codes; given the file's codes,
    sites 3 and 5 agree exactly."""
    q, path, x = exported
    moved = copy.deepcopy(q)
    with torch.no_grad():
        moved[0].weight.mul_(1.01)
    r = check_onnx(moved, path, x, latency=False, min_chained_code_agreement=None)
    first, second, third = r.sites
    assert first.chained < 0.999 and first.chained >= first.end_to_end  # the same codes, some at a tie
    assert second.end_to_end < 1.0 and third.end_to_end < 1.0
    assert second.chained == 1.0 and third.chained == 1.0
    assert r.code_agreement < r.chained_code_agreement < 1.0


def test_a_wrong_op_between_two_sites_fails_there(exported) -> None:
    """A bias off by half a step in the conv between sites 1 and 3: per-site parity (same u) cannot see
    it; given the file's codes site 3 differs, and the failure names it."""
    q, path, x = exported
    wrong = copy.deepcopy(q)
    step = float(wrong[3].alpha.detach())
    with torch.no_grad():
        wrong[2].bias.add_(0.5 * step)
    r = check_onnx(wrong, path, x, latency=False)
    assert not r.ok and r.site_parity == 1.0
    by_name = {s.name: s for s in r.sites}
    assert by_name["1"].chained == 1.0 and by_name["3"].chained < 0.9
    failure = next(f for f in r.failures if "given the file's codes" in f and "code agreement" in f)
    assert "lowest: 3 " in failure and "< 99.90%" in failure


def test_the_threshold_names_its_figure(exported) -> None:
    q, path, x = exported
    r = check_onnx(q, path, x, latency=False, min_top1_agreement=1.01, min_end_to_end_agreement=1.01,
                   min_chained_code_agreement=1.01, min_default_agreement=1.01)
    assert not r.ok
    assert any(f.startswith("top-1 agreement given the file's codes 100.00% < 101.00%") for f in r.failures)
    assert any(f.startswith("top-1 agreement end to end 100.00% < 101.00%") for f in r.failures)
    assert any(f.startswith("code agreement given the file's codes 100.0000% < 101.00%") for f in r.failures)
    assert any("under ORT's default options, given its codes" in f for f in r.failures)


def test_forcing_hook_outputs_the_given_codes_and_counts() -> None:
    q = qat_ste.quantize(nn.Sequential(nn.Identity(), nn.ReLU()), bits=2, step_init=1.0)
    sites = {s.name: s for s in quant_sites(q)}
    x = torch.tensor([[0.2, 1.4, 2.4, 9.0]])
    given = np.array([[0, 1, 2, 0]], dtype=np.uint8)   # the last differs from PyTorch's own code 3
    counts: dict[str, ChainedCounts] = {}
    with export_routing(q, list(sites.values()), forcing_hook({"1": [given]}, counts)):
        out = q(x)
    assert out.tolist() == [[0.0, 1.0, 2.0, 0.0]]  # the given codes times the step
    assert counts["1"].values == 4 and counts["1"].equal == 3 and counts["1"].unforced == 0
    with export_routing(q, list(sites.values()), forcing_hook({"1": [np.zeros((2, 2), np.uint8)]}, counts)):
        own = q(x)  # a shape that does not fit: PyTorch keeps its own codes
    assert own.tolist() == [[0.0, 1.0, 2.0, 3.0]] and counts["1"].unforced == 4
    assert pooled_agreement(counts) == 0.75 and pooled_agreement({}) == 1.0
    assert chained_notes(counts) == ["4 value(s) at site(s) 1 kept PyTorch's own codes in the run given the file's "
                                     "codes (the file had none of that shape there)"]


def test_file_codes_reads_each_occurrence_by_its_exposed_name() -> None:
    class T:
        def __init__(self, codes: str) -> None:
            self.codes = codes
    a = np.zeros(3, np.uint8)
    assert file_codes({"c0/as_uint8": a}, [T("c0"), T("c1")], {"c0": "c0/as_uint8", "c1": "c1/as_uint8"}) == [a, None]

"""Calibration refuses non-finite data and never sets a non-finite or non-positive step; steps are
checked after quantize()/calibrate(); the per-rank ranges are averaged in ONE collective; models
calibration cannot handle (meta device, TorchScript) get a clear error."""

from __future__ import annotations

import datetime
import importlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import qat_ste
from qat_ste import QatSteError
from qat_ste.quantize import check_steps
from qat_ste.quantizer.alpha import INIT_METHODS

pytestmark = pytest.mark.usefixtures("single_thread")

quantize_module = importlib.import_module("qat_ste.quantize")  # qat_ste.quantize is also the function

BAD = {"NaN": float("nan"), "+Inf": float("inf"), "-Inf": float("-inf")}


def _model() -> nn.Module:
    """Site '0' sees the input itself (exact counts); site '2' a GELU after a convolution."""
    torch.manual_seed(0)
    return nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 1), nn.GELU())


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]


def _state(q: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", INIT_METHODS)
@pytest.mark.parametrize("bad", list(BAD))
def test_non_finite_calibration_data_is_refused(bad: str, method: str, per_channel: bool) -> None:
    q = qat_ste.quantize(_model(), bits=4, per_channel=per_channel)
    qat_ste.calibrate(q, _batches(), method=method)  # clean data first: these steps must survive
    before = _state(q)
    batches = _batches()
    batches[1][0, 1, 2, 3] = BAD[bad]
    with pytest.raises(QatSteError) as e:
        qat_ste.calibrate(q, batches, method=method)
    counts = {name: int(name == bad) for name in BAD}
    problem = e.value.problem
    assert problem.startswith("calibration batch 1 (counting from 0) gives non-finite values at quantized "
                              f"site '0': {counts['NaN']} NaN, {counts['+Inf']} +Inf, {counts['-Inf']} -Inf "
                              "of 96 values")
    if bad != "-Inf":  # ReLU(-inf) = 0 would be finite for a real ReLU; the quantizer sees its input
        assert "and at 1 later site(s) (2)" in problem
    assert f"The batch itself holds {counts['NaN']} NaN, {counts['+Inf']} +Inf, {counts['-Inf']} -Inf" in problem
    assert "clean the calibration data" in e.value.fix and "torch.isfinite(batch)" in e.value.fix
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step changed
    assert q.training and all(m.mode == "quantize" for _, m in qat_ste.quant_modules(q))


def test_uncalibrated_model_keeps_uninitialised_steps_after_a_refusal() -> None:
    q = qat_ste.quantize(_model(), bits=4)
    batches = _batches()
    batches[0][1, 0, 0, 0] = float("nan")
    with pytest.raises(QatSteError, match="calibration batch 0 "):
        qat_ste.calibrate(q, batches)
    assert not any(m.is_initialized for _, m in qat_ste.quant_modules(q))


def test_non_finite_values_made_by_the_model_name_the_first_site() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite weights whose products overflow to +-inf
    q = qat_ste.quantize(model, bits=4)
    with pytest.raises(QatSteError) as e:
        qat_ste.calibrate(q, [torch.ones(2, 4)], method="max")
    assert "at quantized site '1': 0 NaN, 8 +Inf, 0 -Inf of 8 values" in e.value.problem
    assert "The batch itself is finite" in e.value.problem
    assert "check the model's float outputs before site '1'" in e.value.fix


def test_dict_batches_are_checked_too() -> None:
    class Keyword(nn.Module):
        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * scale)

    q = qat_ste.quantize(Keyword(), bits=4)
    with pytest.raises(QatSteError, match=r"1 NaN, 0 \+Inf, 0 -Inf of 4 values.*The batch itself holds 1 NaN"):
        qat_ste.calibrate(q, [{"x": torch.tensor([1.0, float("nan"), 2.0, 3.0]), "scale": torch.ones(4)}])


# ---- check_steps --------------------------------------------------------------------------------


def test_check_steps_names_every_bad_site() -> None:
    q = qat_ste.quantize(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.GELU(),
                                       nn.Linear(3, 3), nn.ReLU()), bits=4, step_init=0.25)
    check_steps(q)  # all good
    with torch.no_grad():
        q[1].alpha.fill_(float("nan"))
        q[3].alpha.fill_(0.0)
    with pytest.raises(QatSteError) as e:
        check_steps(q)
    assert e.value.problem == ("2 of 3 quantized site(s) have a step that is not a finite number > 0: "
                               "1 (step nan); 3 (step 0)")
    assert "qat_ste.calibrate" in e.value.fix
    with torch.no_grad():
        q[1].alpha.fill_(0.25)
        q[3].alpha.fill_(0.25)
        q[5].alpha.set_(torch.tensor([0.1, -1.0, float("inf")]))
    with pytest.raises(QatSteError, match=r"1 of 3 .*: 5 \(2 of 3 channel steps wrong: -1, inf\)"):
        check_steps(q)
    check_steps(nn.Linear(2, 2))  # nothing quantized: nothing to check


def test_calibrate_ends_with_check_steps() -> None:
    q = qat_ste.quantize(_model(), bits=4, alpha_mode="fixed")
    with torch.no_grad():
        q[0].alpha.fill_(-1.0)
    with pytest.raises(QatSteError, match="1 of 2 quantized site"):
        qat_ste.calibrate(q, _batches())  # fixed sites are not calibrated, but checked


# ---- one collective under torch.distributed -------------------------------------------------------


class _FakeDist:
    """torch.distributed as calibrate() sees it on 2 ranks whose other rank has identical data
    (or, with ``other_rank_fault``, reports non-finite data)."""

    def __init__(self, other_rank_fault: bool = False) -> None:
        self.calls: list[torch.Tensor] = []
        self.other_rank_fault = other_rank_fault
        self.ReduceOp = torch.distributed.ReduceOp

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def get_backend(self) -> str:
        return "gloo"

    def all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        self.calls.append(tensor.clone())
        tensor.mul_(2)
        if self.other_rank_fault:
            tensor[0] += 1


def test_ranges_are_averaged_in_one_all_reduce(monkeypatch) -> None:
    reference = qat_ste.quantize(_model(), bits=4, per_channel=True)
    qat_ste.calibrate(reference, _batches(), method="mse")
    fake = _FakeDist()
    monkeypatch.setattr(quantize_module, "dist", fake)
    q = qat_ste.quantize(_model(), bits=4, per_channel=True)
    qat_ste.calibrate(q, _batches(), method="mse")
    assert len(fake.calls) == 1  # one collective for both sites
    # the flat tensor: this rank's fault flag, then lo and hi of every site
    assert fake.calls[0].shape == (1 + 2 * 3 + 2 * 4,) and fake.calls[0][0] == 0
    for (_, a), (_, b) in zip(qat_ste.quant_modules(q), qat_ste.quant_modules(reference), strict=True):
        torch.testing.assert_close(a.alpha, b.alpha)
        assert torch.equal(a.zero_point, b.zero_point)


def test_a_fault_on_another_rank_is_refused_on_every_rank(monkeypatch) -> None:
    fake = _FakeDist(other_rank_fault=True)
    monkeypatch.setattr(quantize_module, "dist", fake)
    q = qat_ste.quantize(_model(), bits=4)
    with pytest.raises(QatSteError, match="1 other rank\\(s\\) saw non-finite values") as e:
        qat_ste.calibrate(q, _batches())
    assert len(fake.calls) == 1 and "clean their data" in e.value.fix
    assert not any(m.is_initialized for _, m in qat_ste.quant_modules(q))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, out_dir: str, fault_rank: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), original(t, *a, **k))[1]
    try:
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
        batches = [torch.randn(2, 3, 4, 4, generator=g) * (1 + rank) for _ in range(2)]
        if rank == fault_rank:
            batches[0][0, 0, 0, 0] = float("nan")
        q = qat_ste.quantize(_model(), bits=4, per_channel=True)
        try:
            qat_ste.calibrate(q, batches, method="max")
            result = {"alpha": [m.alpha.detach() for _, m in qat_ste.quant_modules(q)]}
        except QatSteError as e:
            result = {"error": str(e)}
        result["calls"] = calls
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = original
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("fault_rank", [-1, 1])
def test_two_gloo_ranks_calibrate_identically_with_one_collective(tmp_path, fault_rank: int) -> None:
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path), fault_rank), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["calls"] for r in results] == [[1 + 2 * 3 + 2 * 4]] * 2  # one all-reduce on each rank
    if fault_rank < 0:
        for a, b in zip(results[0]["alpha"], results[1]["alpha"], strict=True):
            assert torch.equal(a, b)
        # the average of the two ranks' own ranges ("max": lo = 0 for the ReLU site)
        expected = []
        for rank in range(2):
            g = torch.Generator().manual_seed(10 + rank)
            batches = [torch.randn(2, 3, 4, 4, generator=g) * (1 + rank) for _ in range(2)]
            q = qat_ste.quantize(_model(), bits=4, per_channel=True)
            qat_ste.calibrate(q, batches, method="max")
            expected.append(q[0].alpha.detach())
        torch.testing.assert_close(results[0]["alpha"][0], (expected[0] + expected[1]) / 2)
    else:
        assert "calibration batch 0 (counting from 0) gives non-finite values" in results[1]["error"]
        assert "1 other rank(s) saw non-finite values" in results[0]["error"]


# ---- models calibration cannot handle ---------------------------------------------------------------


def test_meta_device_model_is_refused_by_calibrate_and_quantize() -> None:
    q = qat_ste.quantize(_model(), bits=4).to("meta")
    meta = "calibrate\\(\\): 8 parameter\\(s\\)/buffer\\(s\\) .* on the meta device"
    with pytest.raises(QatSteError, match=meta) as e:
        qat_ste.calibrate(q, [torch.randn(1, 3, 4, 4, device="meta")])
    assert "model.to_empty(device=" in e.value.fix and "load_state_dict" in e.value.fix
    with torch.device("meta"):
        model = _model()
    with pytest.raises(QatSteError, match="quantize\\(\\): 2 parameter\\(s\\)/buffer\\(s\\) .*: 1.weight, 1.bias"):
        qat_ste.quantize(model)
    model.to_empty(device="cpu")  # the fix works: real storage, then real weights (to_empty leaves garbage,
    model.load_state_dict(_model().state_dict())  # which held NaN now and then: a flaky calibration)
    qat_ste.calibrate(qat_ste.quantize(model, bits=4), _batches())


def test_torchscript_module_is_refused_with_the_real_cause() -> None:
    model = _model()
    for scripted in (torch.jit.trace(model, torch.randn(1, 3, 4, 4)), torch.jit.script(model)):
        with pytest.raises(QatSteError, match="quantize\\(\\) got a TorchScript module") as e:
            qat_ste.quantize(scripted)
        assert "quantize() rewrites Python nn.Modules" in e.value.problem
        assert "pass the original nn.Module, before torch.jit.script/trace" == e.value.fix
        with pytest.raises(QatSteError, match="calibrate\\(\\) got a TorchScript module"):
            qat_ste.calibrate(scripted, _batches())

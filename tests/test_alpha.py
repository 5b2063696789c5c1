"""The step alpha: the fixed table, initialisation methods, and calibrate() (reference section 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import integrate, optimize, special, stats

import qat_ste
from qat_ste import QatSteError
from qat_ste.quantizer.alpha import (
    AUTHORS_STEP,
    FIXED_STEP_CHOICES,
    HALF_GAUSSIAN_CEIL_STEP,
    HALF_GAUSSIAN_STEP,
    INIT_METHODS,
    fixed_step,
    half_gaussian_mse,
    mse_optimal_step,
    range_from_samples,
    step_and_zero_point,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# ---- the fixed step table -----------------------------------------------------------------------


def _segment(lo: float, hi: float, level: float) -> float:
    """Integral of (x - level)^2 phi(x) over [lo, hi] (closed form of the Gaussian moments)."""
    def anti(x: float) -> float:
        if math.isinf(x):
            return special.ndtr(x) * (1 + level * level)
        phi = math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return (special.ndtr(x) - x * phi) + 2 * level * phi + level * level * special.ndtr(x)
    return anti(hi) - anti(lo)


def _half_gaussian_mse(alpha: float, bits: int) -> float:
    """E (sigma_alpha(X) - X)^2 for X half-normal, nearest rounding, levels 0..L (section 1)."""
    L = 2 ** bits - 1
    total = 0.0
    for k in range(L + 1):
        lo = max((k - 0.5) * alpha, 0.0)
        hi = (k + 0.5) * alpha if k < L else math.inf
        total += 2 * _segment(lo, hi, k * alpha)
    return total


def test_closed_form_matches_numerical_integration() -> None:
    for bits, alpha in ((1, 1.2236), (2, 0.6), (4, 0.2)):
        L = 2 ** bits - 1
        quad = 0.0
        for k in range(L + 1):
            lo = max((k - 0.5) * alpha, 0.0)
            hi = (k + 0.5) * alpha if k < L else np.inf
            quad += integrate.quad(lambda x, k=k, alpha=alpha: (x - k * alpha) ** 2 * 2 * stats.norm.pdf(x), lo, hi,
                                   epsabs=1e-13, epsrel=1e-11)[0]
        assert _half_gaussian_mse(alpha, bits) == pytest.approx(quad, rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("bits", range(1, 9))
def test_half_gaussian_step_table(bits: int) -> None:
    res = optimize.minimize_scalar(_half_gaussian_mse, bounds=(1e-3, 3.0), args=(bits,), method="bounded",
                                   options={"xatol": 1e-9})
    assert res.success
    assert HALF_GAUSSIAN_STEP[bits] == pytest.approx(res.x, abs=5e-4)
    # and it is a minimum: a step 2% off either side is worse
    for off in (0.98, 1.02):
        assert _half_gaussian_mse(res.x * off, bits) > _half_gaussian_mse(res.x, bits)


def _half_gaussian_ceil_mse(alpha: float, bits: int) -> float:
    """E (sigma_alpha(X) - X)^2 for X half-normal, ceil rounding: level k on ((k-1) alpha, k alpha], the
    top level L on ((L-1) alpha, inf) (section 1)."""
    L = 2 ** bits - 1
    return sum(2 * _segment((k - 1) * alpha, k * alpha if k < L else math.inf, k * alpha) for k in range(1, L + 1))


@pytest.mark.parametrize("bits", range(1, 9))
def test_ceil_step_table_is_mse_optimal_for_ceil(bits: int) -> None:
    res = optimize.minimize_scalar(_half_gaussian_ceil_mse, bounds=(1e-3, 3.0), args=(bits,), method="bounded",
                                   options={"xatol": 1e-10})
    assert res.success
    assert HALF_GAUSSIAN_CEIL_STEP[bits] == round(res.x, 4)  # the table: the optimum to 4 decimals
    assert mse_optimal_step(bits, "ceil") == pytest.approx(res.x, abs=1e-6)
    assert half_gaussian_mse(0.9 * res.x, bits, "ceil") == pytest.approx(_half_gaussian_ceil_mse(0.9 * res.x, bits),
                                                                          rel=1e-12)
    assert half_gaussian_mse(0.9, bits) == pytest.approx(_half_gaussian_mse(0.9, bits), rel=1e-12)  # nearest
    assert mse_optimal_step(bits, "nearest") == pytest.approx(HALF_GAUSSIAN_STEP[bits], abs=5e-4)


def test_ceil_step_exact_values() -> None:
    assert HALF_GAUSSIAN_CEIL_STEP == {1: 0.7979, 2: 0.4866, 3: 0.2893, 4: 0.1666, 5: 0.0938, 6: 0.0520,
                                       7: 0.0284, 8: 0.0154}
    assert mse_optimal_step(1, "ceil") == pytest.approx(math.sqrt(2 / math.pi), abs=1e-7)  # the half-normal mean
    # the authors' constants are not MSE-optimal for ceil: +32.4 % error at 2 bits, +15.0 % at 4 bits
    assert half_gaussian_mse(0.6511, 2, "ceil") / half_gaussian_mse(mse_optimal_step(2, "ceil"), 2, "ceil") \
        == pytest.approx(1.32397, abs=1e-4)
    assert half_gaussian_mse(0.1946, 4, "ceil") / half_gaussian_mse(mse_optimal_step(4, "ceil"), 4, "ceil") \
        == pytest.approx(1.14994, abs=1e-4)


def test_fixed_step_choice() -> None:
    assert FIXED_STEP_CHOICES == ("nearest", "ceil", "paper_ceil")
    assert AUTHORS_STEP == {2: 0.6511, 4: 0.1946}
    assert fixed_step(2, "paper_ceil") == 0.6511 and fixed_step(4, "paper_ceil") == 0.1946
    assert fixed_step(2) == 0.6509 and fixed_step(4, "nearest") == 0.1932
    assert fixed_step(1) == 1.2236 and fixed_step(3) == 0.3532
    for bits in range(1, 9):  # ceil: the MSE-optimal step for ceil, every bit width
        assert fixed_step(bits, "ceil") == HALF_GAUSSIAN_CEIL_STEP[bits]
    with pytest.raises(QatSteError, match="no fixed step for 3 bits"):
        fixed_step(3, "paper_ceil")
    with pytest.raises(QatSteError, match="unknown fixed-step choice 'floor'"):
        fixed_step(2, "floor")
    q = qat_ste.quantize(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), bits=4, alpha_mode="fixed", rounding="ceil")
    assert q[1].alpha.item() == pytest.approx(0.1666)
    q = qat_ste.quantize(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), bits=4, alpha_mode="fixed", rounding="ceil",
                         step_init=fixed_step(4, "paper_ceil"))  # the authors' constant, asked for explicitly
    assert q[1].alpha.item() == pytest.approx(0.1946)


# ---- range_from_samples ------------------------------------------------------------------------


def _uniform(n=200_000, lo=0.0, hi=1.0, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(channels, n, generator=g)


def test_max_method() -> None:
    x = _uniform(lo=-1, hi=2)
    lo, hi = range_from_samples(x, 15, "max", relu_family=True)
    assert lo.item() == 0 and hi.item() == pytest.approx(x.max().item())
    lo, hi = range_from_samples(x, 15, "max", relu_family=False)
    assert lo.item() == pytest.approx(x.min().item()) and hi.item() == pytest.approx(x.max().item())
    # a cap (ReLU6): never above it
    lo, hi = range_from_samples(x * 5, 15, "max", relu_family=True, cap=6.0)
    assert hi.item() == pytest.approx(6.0)
    # outputs that never go negative: lo = 0
    lo, hi = range_from_samples(x.abs() + 1, 15, "max", relu_family=False)
    assert lo.item() == 0 and hi.item() == pytest.approx((x.abs() + 1).max().item())


def test_percentile_method() -> None:
    x = _uniform(lo=-1, hi=3)
    lo, hi = range_from_samples(x, 15, "percentile", relu_family=True)
    assert lo.item() == 0
    assert hi.item() == pytest.approx(np.percentile(np.clip(x.numpy(), 0, None), 99.99), rel=1e-5)
    assert hi.item() == pytest.approx(3.0, abs=2e-3)  # uniform: 99.99th percentile ~ the top
    lo, hi = range_from_samples(x, 15, "percentile", relu_family=False, percentile=99.0)
    assert lo.item() == pytest.approx(np.percentile(x.numpy(), 1.0), rel=1e-5)
    assert lo.item() == pytest.approx(-1 + 0.04, abs=0.01)
    assert hi.item() == pytest.approx(np.percentile(x.numpy(), 99.0), rel=1e-4)
    # an outlier barely moves the percentile, unlike max
    y = torch.cat([x, torch.tensor([[1000.0]])], dim=1)
    assert range_from_samples(y, 15, "percentile", relu_family=True)[1].item() < 3.01
    assert range_from_samples(y, 15, "max", relu_family=True)[1].item() == 1000.0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_lsq_method_exact(bits: int) -> None:
    L = 2 ** bits - 1
    x = torch.randn(3, 5000) * torch.tensor([[0.5], [1.0], [2.0]])
    lo, hi = range_from_samples(x, L, "lsq", relu_family=True)
    alpha, z = step_and_zero_point(lo, hi, L)
    expected = 2 * x.abs().mean(-1) / math.sqrt(L)
    torch.testing.assert_close(alpha, expected, rtol=1e-6, atol=0)
    assert (z == 0).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_gaussian_method(bits: int) -> None:
    L = 2 ** bits - 1
    x = torch.randn(1, 100_000) * 2.5
    lo, hi = range_from_samples(x, L, "gaussian", relu_family=True, bits=bits)
    alpha = (hi - lo) / L
    assert alpha.item() == pytest.approx(HALF_GAUSSIAN_STEP[bits] * x.std().item(), rel=1e-5)
    assert alpha.item() == pytest.approx(HALF_GAUSSIAN_STEP[bits] * 2.5, rel=0.02)


def _np_err(x: np.ndarray, alpha: float, L: int) -> float:
    target = np.clip(x, 0, None)
    q = np.clip(np.rint(x / alpha), 0, L) * alpha
    return float(np.mean((q - target) ** 2))


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_method_is_a_local_grid_minimum(bits: int) -> None:
    L = 2 ** bits - 1
    x = torch.randn(1, 50_000)
    lo, hi = range_from_samples(x, L, "mse", relu_family=True)
    assert lo.item() == 0
    top = x.clamp(min=0).max().item()
    alpha = hi.item() / L
    step = 0.01 * top / L  # the search grid: fractions linspace(0.05, 1, 96) of the top, 0.01 apart
    k = (alpha * L / top - 0.05) / 0.01
    assert k == pytest.approx(round(k), abs=1e-3) and 0 <= round(k) <= 95  # a point of the grid
    xn = x.numpy().ravel()
    e = _np_err(xn, alpha, L)
    assert e <= _np_err(xn, alpha - step, L) + 1e-9
    assert e <= _np_err(xn, alpha + step, L) + 1e-9
    # and for N(0, 1) data the MSE step is the half-Gaussian step, up to the grid resolution
    assert alpha == pytest.approx(HALF_GAUSSIAN_STEP[bits], abs=1.5 * step + 0.01)


def test_mse_method_per_channel() -> None:
    L = 15
    scales = torch.tensor([[0.5], [1.0], [3.0]])
    x = torch.randn(3, 20_000) * scales
    lo, hi = range_from_samples(x, L, "mse", relu_family=True)
    assert lo.shape == hi.shape == (3,)
    alpha = (hi / L).numpy()
    for c in range(3):
        xn = x[c].numpy()
        step = 0.01 * float(x[c].clamp(min=0).max()) / L
        e = _np_err(xn, alpha[c], L)
        assert e <= _np_err(xn, alpha[c] - step, L) + 1e-9 and e <= _np_err(xn, alpha[c] + step, L) + 1e-9
        assert alpha[c] == pytest.approx(HALF_GAUSSIAN_STEP[4] * scales[c].item(), rel=0.15)


def test_mse_generic_grid_uses_zero_point() -> None:
    # GELU outputs: lo = min < 0, the MSE target is the output itself
    x = F.gelu(torch.randn(1, 20_000) * 2)
    lo, hi = range_from_samples(x, 15, "mse", relu_family=False)
    assert lo.item() == pytest.approx(x.min().item())
    assert hi.item() > 0


def test_range_errors() -> None:
    with pytest.raises(QatSteError, match="unknown alpha initialisation 'median'") as e:
        range_from_samples(torch.randn(1, 10), 15, "median", relu_family=True)
    for m in INIT_METHODS:
        assert m in str(e.value)
    with pytest.raises(QatSteError, match="no calibration samples"):
        range_from_samples(torch.empty(1, 0), 15, "max", relu_family=True)


def test_degenerate_samples_keep_alpha_positive() -> None:
    lo, hi = range_from_samples(torch.zeros(1, 100), 15, "max", relu_family=True)
    alpha, z = step_and_zero_point(lo, hi, 15)
    assert alpha.item() == pytest.approx(1e-4) and z.item() == 0


def test_step_and_zero_point() -> None:
    alpha, z = step_and_zero_point(torch.tensor([-0.3, 0.0, -5.0]), torch.tensor([1.2, 3.0, 1.0]), 15)
    torch.testing.assert_close(alpha, torch.tensor([0.1, 0.2, 0.4]))
    assert z.tolist() == [3.0, 0.0, 12.0]


# ---- calibrate() ------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.fc(torch.relu(x).mean((2, 3)))


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]


def _site_inputs(model: SmallCNN, batches) -> dict[str, torch.Tensor]:
    """What each site's quantizer sees, computed on the float model."""
    with torch.no_grad():
        a1 = torch.cat([model.conv1(b) for b in batches])
        c2 = model.conv2(F.relu(a1))
    return {"act1": a1, "gelu_fn1": F.gelu(c2), "relu_fn1": F.gelu(c2)}


@pytest.mark.parametrize("method", INIT_METHODS)
def test_calibrate_initialises_every_site(method: str, batches) -> None:
    model = SmallCNN()
    q = qat_ste.quantize(model, bits=4)
    sites = dict(qat_ste.quant_modules(q))
    assert set(sites) == {"act1", "gelu_fn1", "relu_fn1"}
    assert not any(m.is_initialized for m in sites.values())
    assert qat_ste.calibrate(q, batches, method=method) is q
    assert q.training  # modes restored
    inputs = _site_inputs(model, batches)
    for name, m in sites.items():
        assert m.is_initialized and bool(m.initialized) and m.alpha.shape == ()
        u = inputs[name]
        if method == "max":
            if m.quantizes_input:
                assert m.alpha.item() == pytest.approx(u.max().item() / 15, rel=1e-5)
            else:
                assert m.alpha.item() == pytest.approx((u.max() - u.min()).item() / 15, rel=1e-5)
                assert m.zero_point.item() == round(-u.min().item() / m.alpha.item())
        if method == "lsq":
            assert m.alpha.item() == pytest.approx(2 * u.abs().mean().item() / math.sqrt(15), rel=1e-5)
    q.eval()
    out = q(batches[0])
    assert out.shape == (4, 5) and torch.isfinite(out).all()


def test_calibrate_per_channel(batches) -> None:
    model = SmallCNN()
    q = qat_ste.quantize(model, bits=4, per_channel=True)
    qat_ste.calibrate(q, batches, method="max")
    inputs = _site_inputs(model, batches)
    for name, m in qat_ste.quant_modules(q):
        channels = 6 if name == "act1" else 8
        assert m.alpha.shape == (channels,) and m.zero_point.shape == (channels,)
        u = inputs[name].transpose(0, 1).reshape(channels, -1)
        lo = u.amin(1).clamp(max=0) if not m.quantizes_input else torch.zeros(channels)
        hi = u.amax(1)
        torch.testing.assert_close(m.alpha.detach(), (hi - lo) / 15, rtol=1e-5, atol=1e-7)
    for method in ("mse", "percentile", "gaussian", "lsq"):
        qat_ste.calibrate(q, batches, method=method)
        assert all(m.alpha.shape == (6 if n == "act1" else 8,) for n, m in qat_ste.quant_modules(q))
    assert q.eval()(batches[0]).shape == (4, 5)


def test_calibrate_num_batches_and_batch_forms(batches) -> None:
    model = SmallCNN()
    q = qat_ste.quantize(model, bits=4)
    qat_ste.calibrate(q, iter(batches), method="max", num_batches=1)
    one = q.act1.alpha.item()
    with torch.no_grad():
        assert one == pytest.approx(model.conv1(batches[0]).max().item() / 15, rel=1e-5)
    qat_ste.calibrate(q, [(b, torch.zeros(4)) for b in batches], method="max")
    with torch.no_grad():
        full = max(model.conv1(b).max().item() for b in batches) / 15
    assert q.act1.alpha.item() == pytest.approx(full, rel=1e-5)


def test_calibrate_errors(batches) -> None:
    q = qat_ste.quantize(SmallCNN(), bits=4)
    with pytest.raises(QatSteError, match="got no batches") as e:
        qat_ste.calibrate(q, [])
    assert "DataLoader" in e.value.fix
    with pytest.raises(QatSteError, match="unknown calibration method 'minmax'") as e:
        qat_ste.calibrate(q, batches, method="minmax")
    assert "mse" in str(e.value)
    assert not q.act1.is_initialized
    assert q.act1.mode == "quantize"  # cleaned up after the failure


def test_calibrate_skips_fixed_sites_unless_asked(batches) -> None:
    q = qat_ste.quantize(SmallCNN(), bits=2, alpha_mode="fixed")
    qat_ste.calibrate(q, batches, method="max")
    assert q.act1.alpha.item() == pytest.approx(HALF_GAUSSIAN_STEP[2])
    qat_ste.calibrate(q, batches, method="max", include_fixed=True)
    assert q.act1.alpha.item() != pytest.approx(HALF_GAUSSIAN_STEP[2])
    assert not isinstance(q.act1.alpha, nn.Parameter)


# ---- the steps keep their identity (an optimizer built before calibration trains the model's) ----


class TinyResNet(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called at two places, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        return self.head(F.gelu(y).mean((2, 3)))


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    model.train()
    for x in batches:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def _optimizer_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_optimizer_built_before_per_channel_calibration_trains_the_models_steps(batches) -> None:
    q = qat_ste.quantize(TinyResNet(), bits=4, per_channel=True)
    steps = qat_ste.alpha_parameters(q)
    zero_points = [m.zero_point for _, m in qat_ste.quant_modules(q)]
    assert len(steps) == 3 and all(s.shape == () for s in steps)
    optimizer = torch.optim.SGD(q.parameters(), lr=0.5)
    project = qat_ste.AlphaProjector(q)
    qat_ste.calibrate(q, batches, method="max")
    after = qat_ste.alpha_parameters(q)
    assert all(a is s for a, s in zip(after, steps, strict=True))  # the same objects, resized in place
    assert [a.shape for a in after] == [(6,), (6,), (6,)]
    assert all(m.zero_point is z for (_, m), z in zip(qat_ste.quant_modules(q), zero_points, strict=True))
    assert {id(a) for a in after} <= _optimizer_params(optimizer)
    calibrated = [a.detach().clone() for a in after]
    _train_steps(q, optimizer, batches)
    for a, before in zip(qat_ste.alpha_parameters(q), calibrated, strict=True):
        assert not torch.equal(a.detach(), before)  # the optimizer updated the model's steps
    with torch.no_grad():
        after[0].fill_(-1.0)
    project()  # built before calibration, it still holds the model's steps
    assert torch.all(q.get_submodule(qat_ste.quant_modules(q)[0][0]).alpha == 1e-4)


def test_optimizer_keeps_the_steps_through_loading_a_per_channel_state(batches) -> None:
    source = qat_ste.quantize(TinyResNet(), bits=4, per_channel=True)
    qat_ste.calibrate(source, batches, method="mse")
    fresh = qat_ste.quantize(TinyResNet(), bits=4, per_channel=True)  # one step per site so far
    steps = qat_ste.alpha_parameters(fresh)
    optimizer = torch.optim.Adam(fresh.parameters(), lr=0.01)
    fresh.load_state_dict(source.state_dict())
    loaded = qat_ste.alpha_parameters(fresh)
    assert all(a is s for a, s in zip(loaded, steps, strict=True))
    for a, b in zip(loaded, qat_ste.alpha_parameters(source), strict=True):
        assert a.shape == (6,) and torch.equal(a.detach(), b.detach())
    assert {id(a) for a in loaded} <= _optimizer_params(optimizer)
    _train_steps(fresh, optimizer, batches)
    for a, b in zip(qat_ste.alpha_parameters(fresh), qat_ste.alpha_parameters(source), strict=True):
        assert not torch.equal(a.detach(), b.detach())
    # and back: a per-tensor state into the per-channel module, same objects again
    per_tensor = qat_ste.quantize(TinyResNet(), bits=4, step_init=0.3)
    fresh.load_state_dict(per_tensor.state_dict())
    assert all(a is s and a.shape == () and a.item() == pytest.approx(0.3)
               for a, s in zip(qat_ste.alpha_parameters(fresh), steps, strict=True))

"""The fake quantizer and QuantAct (reference ste-math.md sections 1-3).

Expected values are written out by hand or computed with plain Python / NumPy loops that follow the
formulas of the reference, never with qat_ste's own helpers.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qat_ste import AlphaProjector, QatSteError, QuantAct, get_ste, list_stes, project_alphas
from qat_ste.kinds import GELU, HARDSWISH, LEAKY_RELU, RELU, SILU, ActivationKind
from qat_ste.quantizer.functional import fake_quantize, lsq_grad_scale, quantize_codes

ALL_STES = ["identity", "relu", "clipped_relu", "log_tailed_relu"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _fq(u, alpha, z=0.0, bits=2, ste="clipped_relu", mode="fixed", rounding="nearest", scale=1.0):
    alpha = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    z = z if isinstance(z, torch.Tensor) else torch.tensor(float(z))
    return fake_quantize(u, alpha, z, 2 ** bits - 1, get_ste(ste), mode, rounding, scale)


def _round_half_even(r: float) -> int:
    return round(r)  # Python's round() is round-half-to-even


# ---- forward: the codes of section 1 ------------------------------------------------------------


def test_half_to_even_ties() -> None:
    u = torch.tensor([0.5, 1.5, 2.5, 3.5, 0.49999997, 0.50000006])
    codes = quantize_codes(u, torch.tensor(1.0), torch.tensor(0.0), 255)
    assert codes.tolist() == [0, 2, 2, 4, 0, 1]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.1])
def test_nearest_codes_all_bits(bits: int, alpha: float) -> None:
    L = 2 ** bits - 1
    ratios = [-5.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.5, 2.5, L - 0.5, L - 0.25, L, L + 0.5, L + 3]
    u = torch.tensor([r * alpha for r in ratios], dtype=torch.float32)
    # ties are exact only when u / alpha is exact in float32: recompute the ratio as torch sees it
    exact = (u / torch.tensor(alpha)).tolist()
    expected = [min(max(_round_half_even(r), 0), L) for r in exact]
    if alpha in (0.5, 0.25):  # exact binary steps: the ties really are ties
        assert exact == ratios
        assert expected[ratios.index(0.5)] == 0 and expected[ratios.index(-0.5)] == 0
        if L >= 3:
            assert expected[ratios.index(1.5)] == 2 and expected[ratios.index(2.5)] == 2
    y = _fq(u, alpha, bits=bits)
    codes = quantize_codes(u, torch.tensor(alpha), torch.tensor(0.0), L)
    assert codes.tolist() == expected
    torch.testing.assert_close(y, torch.tensor(expected, dtype=torch.float32) * alpha, rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_ceil_codes_all_bits(bits: int) -> None:
    L = 2 ** bits - 1
    alpha = 0.25
    ratios = [-3.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 1.001, 1.5, L - 1 + 1e-3, L - 0.5, L, L + 1e-3, L + 4]
    u = torch.tensor([r * alpha for r in ratios])
    exact = (u / alpha).tolist()
    expected = [0 if r <= 0 else min(math.ceil(r), L) for r in exact]  # section 1, ceil
    codes = quantize_codes(u, torch.tensor(alpha), torch.tensor(0.0), L, "ceil")
    assert codes.tolist() == expected
    assert expected[ratios.index(1.0)] == min(1, L) and expected[ratios.index(1.001)] == min(2, L)
    assert expected[ratios.index(0.0)] == 0 and expected[ratios.index(1e-3)] == 1
    y = _fq(u, alpha, bits=bits, rounding="ceil")
    assert y.tolist() == [c * alpha for c in expected]


def test_codes_match_numpy_on_random_data() -> None:
    u = torch.randn(4096) * 2
    for bits in (1, 3, 8):
        L = 2 ** bits - 1
        alpha = 0.37
        r = u.numpy().astype(np.float32) / np.float32(alpha)
        expected = np.clip(np.rint(r), 0, L)  # np.rint: half to even
        got = quantize_codes(u, torch.tensor(alpha), torch.tensor(0.0), L)
        np.testing.assert_array_equal(got.numpy(), expected)
        expected_ceil = np.where(r <= 0, 0, np.minimum(np.ceil(r), L))
        np.testing.assert_array_equal(quantize_codes(u, torch.tensor(alpha), torch.tensor(0.0), L, "ceil").numpy(),
                                      expected_ceil)


def test_true_division_not_reciprocal() -> None:
    # a near-tie where u * (1/alpha) and u / alpha round differently in float32
    alpha = torch.tensor(0.1)
    found = None
    for k in range(1, 2000):
        u = torch.tensor((k + 0.5) * 0.1, dtype=torch.float32)
        if torch.round(u / alpha) != torch.round(u * (1.0 / alpha)):
            found = u
            break
    assert found is not None
    got = quantize_codes(found.reshape(1), alpha, torch.tensor(0.0), 2 ** 16)  # wide grid: no clamp
    assert got.item() == torch.round(found / alpha).item()


def test_bf16_input_same_codes_as_fp32() -> None:
    x = (torch.randn(2, 3, 8, 8) * 2).to(torch.bfloat16)
    alpha = torch.tensor(0.1734)
    for rounding in ("nearest", "ceil"):
        c16 = quantize_codes(x, alpha, torch.tensor(0.0), 15, rounding)
        c32 = quantize_codes(x.float(), alpha, torch.tensor(0.0), 15, rounding)
        assert torch.equal(c16, c32)
    qa = QuantAct(RELU, bits=4, alpha_mode="fixed", step_init=0.1734)
    assert torch.equal(qa.codes(x), qa.codes(x.float()))
    y16 = qa(x)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, qa(x.float()).to(torch.bfloat16))
    # the backward keeps the dtype too
    xg = x.clone().requires_grad_(True)
    qa(xg).sum().backward()
    assert xg.grad.dtype == torch.bfloat16
    assert torch.equal(xg.grad, ((x.float() > 0) & (x.float() <= 15 * 0.1734)).to(torch.bfloat16))


# ---- generic activations: zero points -----------------------------------------------------------


@pytest.mark.parametrize("kind, fn", [
    (GELU, nn.GELU()), (SILU, nn.SiLU()), (HARDSWISH, nn.Hardswish()), (LEAKY_RELU, nn.LeakyReLU(0.1)),
])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_zero_point_for_negative_outputs(kind: ActivationKind, fn: nn.Module, bits: int) -> None:
    L = 2 ** bits - 1
    x = torch.linspace(-7.3, 2.1, 2001)
    f = fn(x)
    lo, hi = f.min().item(), f.max().item()
    assert lo < 0
    qa = QuantAct(kind, fn, bits=bits, alpha_mode="lsq")
    qa.set_range(*qa.range_from(qa.samples_of(f), "max"))
    alpha = (hi - lo) / L
    assert abs(-lo / alpha % 1 - 0.5) > 1e-3  # not a rounding tie
    z = min(max(round(-lo / alpha), 0), L)
    assert qa.alpha.item() == pytest.approx(alpha, rel=1e-6)
    assert qa.zero_point.item() == z and z > 0
    codes = qa.codes(x)
    assert codes.dtype == torch.uint8
    assert int(codes.min()) == 0 and int(codes.max()) <= L
    # independent recomputation of the grid of section 2's non-ReLU rule
    a32 = np.float32(qa.alpha.item())
    ref_codes = np.clip(np.rint(f.detach().numpy() / a32) + z, 0, L)
    np.testing.assert_array_equal(codes.numpy(), ref_codes.astype(np.uint8))
    y = qa(x)
    np.testing.assert_allclose(y.detach().numpy(), (ref_codes - z) * a32, rtol=0, atol=1e-6)
    assert (y < 0).any()  # the negative side survives quantization


def test_fixed_mode_default_zero_points() -> None:
    # fixed mode knows alpha without data: the half-Gaussian step and a zero point from the kind
    qa = QuantAct(GELU, nn.GELU(), bits=4, alpha_mode="fixed")
    assert qa.alpha.item() == pytest.approx(0.1932) and qa.zero_point.item() == round(0.17 / 0.1932)
    qa = QuantAct(LEAKY_RELU, nn.LeakyReLU(), bits=4, alpha_mode="fixed")
    assert qa.zero_point.item() == 15 // 8
    qa = QuantAct(ActivationKind("relu6", "relu", 0.0, 6.0), nn.ReLU6(), bits=3, alpha_mode="fixed")
    assert qa.alpha.item() == pytest.approx(6 / 7) and qa.zero_point.item() == 0
    qa = QuantAct(RELU, bits=2, alpha_mode="fixed", rounding="ceil")
    assert qa.alpha.item() == pytest.approx(0.4866)  # MSE-optimal for ceil (the authors' 0.6511: "paper_ceil")


# ---- backward: grad_u = grad_y * mu'(u) ---------------------------------------------------------

# 2 bits, alpha = 0.5: lo = 0, hi = 1.5; tau (log-tailed) = 0.5
U_B = [-0.5, 0.0, 0.25, 1.5, 1.5001, 2.5]
G_B = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
EXPECTED_GRAD = {
    "identity": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    "relu": [0.0, 0.0, 3.0, 4.0, 5.0, 6.0],
    "clipped_relu": [0.0, 0.0, 3.0, 4.0, 0.0, 0.0],
    "log_tailed_relu": [0.0, 0.0, 3.0, 4.0, 5.0 / (1.5001 - 0.5), 6.0 / (2.5 - 0.5)],
}


@pytest.mark.parametrize("ste", ALL_STES)
@pytest.mark.parametrize("mode", ["fixed", "lsq", "pact", "bcgd"])
def test_input_grad_is_grad_times_ste(ste: str, mode: str) -> None:
    u = torch.tensor(U_B, requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=mode != "fixed")
    y = _fq(u, alpha, bits=2, ste=ste, mode=mode)
    assert y.tolist() == [0.0, 0.0, 0.0, 1.5, 1.5, 1.5]
    y.backward(torch.tensor(G_B))
    torch.testing.assert_close(u.grad, torch.tensor(EXPECTED_GRAD[ste]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("ste", ALL_STES)
def test_quantact_input_grad_relu_family(ste: str) -> None:
    qa = QuantAct(RELU, bits=2, ste=ste, alpha_mode="lsq", step_init=0.5)
    u = torch.tensor(U_B, requires_grad=True)
    qa(u).backward(torch.tensor(G_B))
    torch.testing.assert_close(u.grad, torch.tensor(EXPECTED_GRAD[ste]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("ste", ALL_STES)
def test_quantact_input_grad_generic_chain_rule(ste: str) -> None:
    # non-ReLU rule: the STE acts on y = GELU(x) over [lo, hi]; autograd multiplies by GELU'(x)
    qa = QuantAct(GELU, nn.GELU(), bits=3, ste=ste, alpha_mode="fixed", step_init=0.25)
    z = qa.zero_point.item()
    assert z == 1.0  # round(0.17 / 0.25)
    lo, hi = -z * 0.25, (7 - z) * 0.25
    x = torch.tensor([-6.0, -0.7, -0.3, 0.0, 0.4, 1.0, 1.3, 1.6, 3.0], requires_grad=True)
    g = torch.arange(1.0, 10.0)
    qa(x).backward(g)
    xd = x.detach().clone().requires_grad_(True)
    F.gelu(xd).backward(torch.ones_like(xd))
    dgelu = xd.grad
    y = F.gelu(x.detach())
    expected = []
    for yi, gi, di in zip(y.tolist(), g.tolist(), dgelu.tolist(), strict=True):
        if ste == "identity":
            mu = 1.0
        elif ste == "relu":
            mu = float(yi > lo)
        elif ste == "clipped_relu":
            mu = float(lo < yi <= hi)
        else:
            mu = float(lo < yi <= hi) if yi <= hi else 1.0 / (yi - (hi - 1.0))
        expected.append(gi * mu * di)
    torch.testing.assert_close(x.grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    if ste == "clipped_relu":  # some elements really are outside the range
        assert x.grad[-1] == 0 and x.grad[-2] == 0 and x.grad[4] != 0  # y(3.0), y(1.6) > hi = 1.5


# ---- the step gradients -------------------------------------------------------------------------

# 2 bits (L = 3), alpha = 0.5, z = 0: r = u/alpha = [-1, 0.2, 0.6, 1.2, 3, 4, 3.2, -0.2]
U_A = [-0.5, 0.1, 0.3, 0.6, 1.5, 2.0, 1.6, -0.1]
G_A = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def test_lsq_alpha_grad_hand_values() -> None:
    # dy/dalpha: 0 below (r <= 0), round(r) - r inside (0 < r < 3), L = 3 at/above (r >= 3)
    d = [0.0, 0 - 0.2, 1 - 0.6, 1 - 1.2, 3.0, 3.0, 3.0, 0.0]
    total = sum(g * v for g, v in zip(G_A, d, strict=True))
    assert total == pytest.approx(2 * -0.2 + 3 * 0.4 + 4 * -0.2 + 3 * (5 + 6 + 7))
    # log_tailed_relu keeps the input: exact; the lean state of the other STEs stores the residual
    # to 1/504 per element (functional.py): within 0.125 * sum|g| over the inside elements / 504
    for ste, tolerance in (("log_tailed_relu", 1e-5 * 6.75), ("clipped_relu", 0.125 * (2 + 3 + 4) / 504)):
        alpha = torch.tensor(0.5, requires_grad=True)
        _fq(torch.tensor(U_A), alpha, bits=2, ste=ste, mode="lsq", scale=0.125).backward(torch.tensor(G_A))
        assert alpha.grad.item() == pytest.approx(0.125 * total, abs=tolerance)


def test_pact_alpha_grad_hand_values() -> None:
    # dy/dalpha = L * 1{u >= hi}, hi = 1.5: elements 4 (u = hi), 5, 6
    alpha = torch.tensor(0.5, requires_grad=True)
    _fq(torch.tensor(U_A), alpha, bits=2, mode="pact").backward(torch.tensor(G_A))
    assert alpha.grad.item() == pytest.approx(3 * (5 + 6 + 7))


def test_bcgd_alpha_grad_hand_values_and_clamp() -> None:
    # dsigma/dalpha: 0 (u <= 0), 2^(b-1) = 2 (0 < u <= 1.5), L = 3 (u > 1.5)
    d = [0, 2, 2, 2, 2, 3, 3, 0]
    total = sum(g * v for g, v in zip(G_A, d, strict=True))  # 2*(2+3+4+5) + 3*(6+7) = 67
    assert total == 67
    for factor, expected in ((1.0, 0.67), (0.1, 0.067), (10.0, 1.0), (-10.0, -1.0), (-1.0, -0.67)):
        alpha = torch.tensor(0.5, requires_grad=True)
        _fq(torch.tensor(U_A), alpha, bits=2, mode="bcgd").backward(torch.tensor(G_A) * factor)
        assert alpha.grad.item() == pytest.approx(expected, rel=1e-6)


def test_fixed_mode_has_no_alpha_grad() -> None:
    alpha = torch.tensor(0.5, requires_grad=True)
    u = torch.tensor(U_A, requires_grad=True)
    _fq(u, alpha, bits=2, mode="fixed").backward(torch.tensor(G_A))
    assert alpha.grad is None and u.grad is not None
    qa = QuantAct(RELU, bits=2, alpha_mode="fixed")
    assert not isinstance(qa.alpha, nn.Parameter) and list(qa.parameters()) == []
    assert "alpha" in qa.state_dict()


def _lsq_bound(g, C):
    """The lean lsq state's error bound per channel (axis 1): sum |g| / 504 (functional.py)."""
    return np.abs(np.moveaxis(g, 1, 0).reshape(C, -1)).sum(axis=1) / 504


def _np_alpha_grad(mode, u, g, alpha, z, L, rounding="nearest"):
    """Explicit loop over elements and channels (axis 1) following reference section 3."""
    C = u.shape[1]
    out = np.zeros(C)
    for c in range(C):
        a, zc = float(alpha[c]), float(z[c])
        lo, hi = -zc * a, (L - zc) * a
        for uu, gg in zip(u[:, c].ravel(), g[:, c].ravel(), strict=True):
            r = np.float32(uu) / np.float32(a)
            t = np.rint(r) if rounding == "nearest" else np.ceil(r)
            if mode == "lsq":
                d = -zc if r + zc <= 0 else (L - zc if r + zc >= L else t - r)
            elif mode == "pact":
                d = (L - zc) if uu >= hi else 0.0
            else:  # bcgd
                d = -zc if uu <= lo else ((L + 1) / 2 - zc if uu <= hi else L - zc)
            out[c] += gg * d
    if mode == "bcgd":
        out = np.clip(0.01 * out, -1, 1)
    return out


@pytest.mark.parametrize("mode", ["lsq", "pact", "bcgd"])
@pytest.mark.parametrize("zero_points", [(0.0, 0.0, 0.0), (1.0, 0.0, 3.0)])
@pytest.mark.parametrize("rounding", ["nearest", "ceil"])
def test_per_channel_alpha_grad_against_loop(mode: str, zero_points: tuple, rounding: str) -> None:
    bits, L = 3, 7
    u = torch.randn(4, 3, 5, 5) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    g = torch.randn(4, 3, 5, 5) * 20  # large enough for the bcgd clamp to bite on some channel
    alpha = torch.tensor([0.07, 0.2, 0.5])
    z = torch.tensor(zero_points)
    a = alpha.view(1, 3, 1, 1).clone().requires_grad_(True)
    _fq(u, a, z.view(1, 3, 1, 1), bits=bits, mode=mode, rounding=rounding, scale=1.0).backward(g)
    expected = _np_alpha_grad(mode, u.numpy(), g.numpy(), alpha.numpy(), z.numpy(), L, rounding)
    assert a.grad.shape == (1, 3, 1, 1)
    # lsq's lean state stores the residual to 1/504 per element; pact and bcgd are exact
    bound = _lsq_bound(g.numpy(), 3) if mode == "lsq" else 0.0
    np.testing.assert_array_less(np.abs(a.grad.flatten().numpy() - expected), 1e-4 + 1e-4 * np.abs(expected) + bound)
    # per-tensor is the same sum over everything
    a1 = torch.tensor(0.2, requires_grad=True)
    _fq(u, a1, torch.tensor(zero_points[1]), bits=bits, mode=mode, rounding=rounding).backward(g)
    e1 = _np_alpha_grad(mode, u.reshape(-1, 1).numpy(), g.reshape(-1, 1).numpy(), [0.2], [zero_points[1]], L, rounding)
    bound1 = _lsq_bound(g.reshape(-1, 1).numpy(), 1)[0] if mode == "lsq" else 0.0
    assert abs(a1.grad.item() - e1[0]) < 1e-4 + 1e-4 * abs(e1[0]) + bound1
    if mode == "lsq":  # log_tailed_relu keeps the input: exact
        a2 = torch.tensor(0.2, requires_grad=True)
        _fq(u, a2, torch.tensor(zero_points[1]), bits=bits, ste="log_tailed_relu", mode=mode,
            rounding=rounding).backward(g)
        np.testing.assert_allclose(a2.grad.item(), e1[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantact_lsq_grad_scale(per_channel: bool) -> None:
    # g = 1 / sqrt(N * L), N = features per sample (per channel when per-channel)
    bits, L = 4, 15
    x = torch.randn(2, 3, 4, 4) * 2
    qa = QuantAct(RELU, bits=bits, alpha_mode="lsq", per_channel=per_channel)
    qa.train()
    qa(x)  # lazy init
    assert qa.alpha.shape == ((3,) if per_channel else ())
    qa.alpha.grad = None
    gy = torch.randn_like(x)
    qa(x).backward(gy)
    N = 16 if per_channel else 48
    assert lsq_grad_scale(x, L, 3 if per_channel else 1) == pytest.approx(1 / math.sqrt(N * L))
    alpha = qa.alpha.detach().reshape(-1).numpy()
    if per_channel:
        expected = _np_alpha_grad("lsq", x.numpy(), gy.numpy(), alpha, np.zeros(3), L)
        bound = _lsq_bound(gy.numpy(), 3)
    else:
        expected = _np_alpha_grad("lsq", x.reshape(-1, 1).numpy(), gy.reshape(-1, 1).numpy(), alpha, [0.0], L)
        bound = _lsq_bound(gy.reshape(-1, 1).numpy(), 1)
    # the lean lsq state: the residual to 1/504 per element (functional.py)
    error = np.abs(qa.alpha.grad.reshape(-1).numpy() - expected / math.sqrt(N * L))
    np.testing.assert_array_less(error, 1e-6 + 1e-4 * np.abs(expected / math.sqrt(N * L)) + bound / math.sqrt(N * L))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_backward_matches_the_input_keeping_path(ste_registry, dtype: torch.dtype) -> None:
    # the built-in STEs save a compact state; the same derivative registered under another name keeps
    # the input (user STEs do): forward and input gradient bit for bit, pact/bcgd step gradient exact,
    # lsq's within the residual's 1/504 per element
    from qat_ste import register_ste
    from qat_ste import ste as ste_module

    torch.manual_seed(7)
    u = (torch.randn(4, 3, 6, 6) * 2).to(dtype)
    u.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.5]).to(dtype)
    g = torch.randn(u.shape).to(dtype)
    alpha = torch.tensor([0.1, 0.5, 0.25]).view(1, 3, 1, 1)
    z = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)
    for name in ("identity", "relu", "clipped_relu"):
        register_ste(f"{name}_copy", ste_module.BUILTIN_STES[name])
        for mode in ("fixed", "lsq", "pact", "bcgd"):
            out = []
            for ste in (name, f"{name}_copy"):
                ui, ai = u.clone().requires_grad_(True), alpha.clone().requires_grad_(mode != "fixed")
                y = fake_quantize(ui, ai, z, 7, get_ste(ste), mode, "nearest", 0.5, kernel="torch")
                y.backward(g)
                out.append((y.detach(), ui.grad, ai.grad))
            (y1, g1, a1), (y2, g2, a2) = out
            assert torch.equal(y1.isnan(), y2.isnan()) and torch.equal(y1.nan_to_num(), y2.nan_to_num())
            assert torch.equal(g1.isnan(), g2.isnan()) and torch.equal(g1.nan_to_num(), g2.nan_to_num())
            if mode in ("pact", "bcgd"):
                torch.testing.assert_close(a1, a2, rtol=1e-6, atol=1e-6, equal_nan=True)
            elif mode == "lsq":  # a NaN input gives a NaN step gradient in both (channel 0)
                assert torch.equal(a1.isnan(), a2.isnan()) and a1.flatten()[0].isnan()
                bound = 0.5 * g.float().abs().transpose(0, 1).reshape(3, -1).sum(1) / 504
                assert ((a1 - a2).abs().flatten()[1:] <= bound[1:] + 1e-6).all()


@pytest.mark.parametrize("bits", [1, 2])
def test_lean_state_bit_packing_layout(bits: int) -> None:
    # element i of the saved state sits in byte i // (8 // bits), at bit (i % (8 // bits)) * bits
    from qat_ste.quantizer.functional import _pack, _unpack

    per = 8 // bits
    for n in (1, 7, 8, 9, 63, 1000):
        s = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8)
        packed = _pack(s, bits)
        expected = [0] * ((n + per - 1) // per)
        for i, v in enumerate(s.tolist()):
            expected[i // per] |= v << ((i % per) * bits)
        assert packed[:len(expected)].tolist() == expected and packed.numel() <= len(expected) + 1
        assert torch.equal(_unpack(packed, bits, s.shape), s)
    s = torch.randint(0, 2 ** bits, (2, 3, 4, 5), dtype=torch.uint8)
    assert torch.equal(_unpack(_pack(s, bits), bits, s.shape), s)


# ---- QuantAct: validation, initialisation, state -------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, -1, 4.0, True, "4", None])
def test_bad_bits(bits) -> None:
    with pytest.raises(QatSteError, match="1..8 bits") as e:
        QuantAct(RELU, bits=bits)
    assert "1 to 8" in e.value.fix


@pytest.mark.parametrize("step_init", [0, 0.0, -0.1, "0.1", float("nan"), float("inf"), True])
def test_bad_step_init(step_init) -> None:
    with pytest.raises(QatSteError, match="must be a finite number > 0") as e:
        QuantAct(RELU, step_init=step_init)
    assert e.value.problem.startswith(f"step_init={step_init!r}") and "step_init=None" in e.value.fix


def test_alpha_init_is_a_deprecated_alias_of_step_init() -> None:
    with pytest.warns(DeprecationWarning, match="alpha_init=.*deprecated; use step_init"):
        qa = QuantAct(RELU, bits=4, alpha_mode="fixed", alpha_init=0.125)
    assert qa.alpha.item() == 0.125 and qa.is_initialized
    with pytest.warns(DeprecationWarning), pytest.raises(QatSteError, match=r"alpha_init=-1\.0: the step must"):
        QuantAct(RELU, alpha_init=-1.0)
    with pytest.raises(QatSteError, match="both step_init and its deprecated alias alpha_init"):
        QuantAct(RELU, step_init=0.1, alpha_init=0.1)


def test_bad_rounding_and_alpha_mode_and_ste() -> None:
    with pytest.raises(QatSteError, match="unknown rounding 'floor'") as e:
        QuantAct(RELU, rounding="floor")
    assert "nearest" in str(e.value) and "ceil" in str(e.value)
    with pytest.raises(QatSteError, match="unknown alpha mode 'learned'") as e:
        QuantAct(RELU, alpha_mode="learned")
    for m in ("fixed", "lsq", "pact", "bcgd"):
        assert m in str(e.value)
    with pytest.raises(QatSteError, match="unknown STE"):
        QuantAct(RELU, ste="straight")


def test_eval_forward_uninitialised_raises_with_fix() -> None:
    qa = QuantAct(RELU, alpha_mode="lsq").eval()
    with pytest.raises(QatSteError, match="never initialised") as e:
        qa(torch.randn(4))
    assert "calibrate" in e.value.fix and "step_init" in e.value.fix and "alpha_mode='fixed'" in e.value.fix
    with pytest.raises(QatSteError, match="never initialised"):
        qa.codes(torch.randn(4))
    assert not bool(qa.initialized)


def test_training_forward_lazy_init() -> None:
    x = torch.randn(8, 16) * 3
    qa = QuantAct(RELU, bits=4, alpha_mode="lsq").train()
    assert "uninitialised" in repr(qa)
    qa(x)
    assert bool(qa.initialized) and qa.is_initialized
    # lsq init: 2 * mean|x| / sqrt(L)
    assert qa.alpha.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-5)
    # a second call keeps it
    before = qa.alpha.item()
    qa(x * 10)
    assert qa.alpha.item() == before
    # pact/bcgd: percentile init of the ReLU-clipped input
    qp = QuantAct(RELU, bits=4, alpha_mode="pact").train()
    qp(x)
    expected_hi = np.percentile(np.clip(x.numpy().ravel(), 0, None), 99.99)
    assert qp.alpha.item() == pytest.approx(expected_hi / 15, rel=1e-4)


def test_project_clamps_bcgd_alpha() -> None:
    # the projection is qat_ste.project_alphas / AlphaProjector (QuantAct.project_ was dead code)
    qa = QuantAct(RELU, alpha_mode="bcgd", step_init=0.5)
    project = AlphaProjector(nn.Sequential(qa))
    for value, expected in ((7.0, 5.0), (1e-5, 1e-3), (-1.0, 1e-3), (0.3, 0.3)):
        with torch.no_grad():
            qa.alpha.fill_(value)
        project()
        assert qa.alpha.item() == pytest.approx(expected)
    ql = QuantAct(RELU, alpha_mode="lsq", step_init=0.5)
    with torch.no_grad():
        ql.alpha.fill_(-3.0)
    project_alphas(nn.Sequential(ql))
    assert ql.alpha.item() == pytest.approx(1e-4)
    with torch.no_grad():
        ql.alpha.fill_(70.0)
    project_alphas(nn.Sequential(ql))
    assert ql.alpha.item() == 70.0  # no upper bound outside bcgd
    qf = QuantAct(RELU, alpha_mode="fixed", step_init=9.0)
    project_alphas(nn.Sequential(qf))
    assert qf.alpha.item() == 9.0
    assert not hasattr(QuantAct, "project_")


def test_per_channel_calibration_and_state_dict_round_trip() -> None:
    x = torch.randn(4, 5, 3, 3) * torch.linspace(0.5, 3, 5).view(1, 5, 1, 1)
    qa = QuantAct(GELU, nn.GELU(), bits=4, alpha_mode="lsq", per_channel=True)
    qa.set_range(*qa.range_from(qa.samples_of(F.gelu(x)), "max"))
    assert qa.alpha.shape == (5,) and qa.zero_point.shape == (5,)
    assert isinstance(qa.alpha, nn.Parameter)
    # per channel: alpha_c = (max_c - min_c) / L
    f = F.gelu(x).transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(qa.alpha.detach(), (f.amax(1) - f.amin(1)) / 15)
    sd = qa.state_dict()
    fresh = QuantAct(GELU, nn.GELU(), bits=4, alpha_mode="lsq", per_channel=True)
    assert fresh.alpha.shape == ()
    fresh.load_state_dict(sd)  # strict; alpha and zero point change shape
    assert fresh.alpha.shape == (5,) and isinstance(fresh.alpha, nn.Parameter)
    assert torch.equal(fresh.zero_point, qa.zero_point) and fresh.is_initialized
    fresh.eval()
    qa.eval()
    assert torch.equal(fresh(x), qa(x))
    assert torch.equal(fresh.codes(x), qa.codes(x))


def test_per_channel_tokens_state_dict_round_trip() -> None:
    # (batch, tokens, channels): the channel axis is the last one, also after a load
    x = torch.randn(2, 7, 5) * torch.linspace(0.5, 3, 5)
    qa = QuantAct(RELU, bits=4, alpha_mode="lsq", per_channel=True).train()
    qa(x)
    assert qa.alpha.shape == (5,)
    torch.testing.assert_close(qa.alpha.detach(), 2 * x.reshape(-1, 5).abs().mean(0) / math.sqrt(15))
    fresh = QuantAct(RELU, bits=4, alpha_mode="lsq", per_channel=True)
    fresh.load_state_dict(qa.state_dict())
    assert torch.equal(fresh.eval()(x), qa.eval()(x))


def test_state_dict_back_to_per_tensor() -> None:
    per_tensor = QuantAct(RELU, alpha_mode="lsq", step_init=0.3)
    chan = QuantAct(RELU, alpha_mode="lsq", per_channel=True).train()
    chan(torch.randn(2, 3, 4, 4))
    chan.load_state_dict(per_tensor.state_dict())
    assert chan.alpha.shape == () and chan.alpha.item() == pytest.approx(0.3)
    assert chan.zero_point.shape == ()


def test_deepcopy_equal() -> None:
    qa = QuantAct(SILU, nn.SiLU(), bits=3, ste="log_tailed_relu", alpha_mode="bcgd", per_channel=True).train()
    x = torch.randn(3, 4, 5, 5)
    qa(x)
    with qa.observing(lambda m, u: None):
        assert qa.mode == "observe"
        dup = copy.deepcopy(qa)
    assert qa.mode == "quantize" and dup.mode == "quantize" and dup is not qa
    assert dup.alpha is not qa.alpha and isinstance(dup.alpha, nn.Parameter)
    for k, v in qa.state_dict().items():
        assert torch.equal(v, dup.state_dict()[k]), k
    assert dup.ste is qa.ste or dup.ste.name == qa.ste.name
    assert (dup.bits, dup.alpha_mode, dup.rounding, dup.per_channel, dup.kind) == (
        qa.bits, qa.alpha_mode, qa.rounding, qa.per_channel, qa.kind)
    xg1, xg2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = qa(xg1), dup(xg2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(xg1.grad, xg2.grad) and torch.equal(qa.alpha.grad, dup.alpha.grad)


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "ceil"])
def test_codes_uint8_independent(bits: int, rounding: str) -> None:
    L = 2 ** bits - 1
    x = torch.randn(2, 3, 6, 6) * 2
    alpha = 3.0 / L
    qa = QuantAct(RELU, bits=bits, alpha_mode="fixed", step_init=alpha, rounding=rounding)
    codes = qa.codes(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    r = x.numpy() / np.float32(alpha)
    t = np.rint(r) if rounding == "nearest" else np.ceil(r)
    expected = np.clip(t + 0, 0, L).astype(np.uint8)
    np.testing.assert_array_equal(codes.numpy(), expected)
    # and the forward is codes * alpha
    torch.testing.assert_close(qa(x), codes.float() * torch.tensor(alpha), rtol=0, atol=0)


def test_extra_repr() -> None:
    qa = QuantAct(RELU, bits=3, ste="relu", alpha_mode="pact", step_init=0.25, original="F.relu")
    assert repr(qa) == "QuantAct(F.relu, bits=3, ste=relu, alpha_mode=pact, step=0.25, zero_point=0)"


def test_all_registered_builtins_covered() -> None:
    assert set(ALL_STES) <= set(list_stes())


def test_resizing_keeps_the_step_and_zero_point_objects() -> None:
    qa = QuantAct(GELU, nn.GELU(), bits=4, alpha_mode="lsq", per_channel=True)
    alpha, zero_point = qa.alpha, qa.zero_point
    qa.alpha.grad = torch.tensor(1.0)  # a gradient of the old shape is dropped with the resize
    qa.set_range(torch.tensor([-0.1, -0.2, 0.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert qa.alpha is alpha and qa.zero_point is zero_point and isinstance(qa.alpha, nn.Parameter)
    assert qa.alpha.shape == (3,) and qa.alpha.grad is None
    torch.testing.assert_close(qa.alpha.detach(), torch.tensor([1.1, 2.2, 3.0]) / 15)
    qa.load_state_dict(QuantAct(GELU, nn.GELU(), step_init=0.5).state_dict())
    assert qa.alpha is alpha and qa.zero_point is zero_point and qa.alpha.shape == ()
    fixed = QuantAct(RELU, alpha_mode="fixed", per_channel=True)
    buffer = fixed.alpha
    fixed.set_range(torch.zeros(2), torch.tensor([1.5, 3.0]))
    assert fixed.alpha is buffer and fixed.alpha.tolist() == pytest.approx([0.1, 0.2])


def test_modes_are_explicit_and_restored() -> None:
    qa = QuantAct(RELU, bits=2, step_init=0.5)
    x = torch.tensor([-1.0, 0.2, 0.7, 9.0])
    seen: list[torch.Tensor] = []
    assert qa.mode == "quantize"
    with qa.observing(lambda m, u: seen.append(u)) as same:
        assert same is qa and qa.mode == "observe"
        assert torch.equal(qa(x), x.clamp(min=0))  # the float activation passes through
        with qa.exporting(lambda m, u: u * 0 + 7):  # observing wins while both are active
            assert qa.mode == "observe"
        assert qa.mode == "observe"
    assert qa.mode == "quantize" and len(seen) == 1 and torch.equal(seen[0], x)
    with pytest.raises(RuntimeError, match="boom"), qa.exporting(lambda m, u: u * 0 + 7):
        assert qa.mode == "export" and qa(x).tolist() == [7.0] * 4
        raise RuntimeError("boom")
    assert qa.mode == "quantize" and qa(x).tolist() == [0.0, 0.0, 0.5, 1.5]


def test_set_range_refuses_a_non_finite_step() -> None:
    qa = QuantAct(RELU, bits=4, step_init=0.25)
    qa.site = "layer1.relu"
    with pytest.raises(QatSteError, match="layer1.relu: the range .* gives a non-finite step"):
        qa.set_range(torch.tensor(0.0), torch.tensor(float("nan")))
    assert qa.alpha.item() == 0.25
    lazy = QuantAct(RELU, bits=4).train()  # lazy initialisation in training mode goes through set_range
    with pytest.raises(QatSteError, match="non-finite step"):
        lazy(torch.tensor([1.0, float("inf")]))
    assert not lazy.is_initialized


def test_generic_kind_without_a_float_function_says_so() -> None:
    qa = QuantAct(GELU, step_init=0.1)
    with pytest.raises(QatSteError, match="of kind 'gelu' has no float function to run") as e:
        qa(torch.randn(3))
    assert "second argument" in e.value.fix

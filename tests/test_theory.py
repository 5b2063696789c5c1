"""Tests for tools.theory: the [P1] two-linear-layer model (reference ste-math.md section 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qat_ste import QatSteError, register_ste, unregister_ste
from tools import theory as T

# Check-value model of the reference (m = n = 3, theta = pi/4).
V = np.array([1.0, 0.5, -0.2])
V_STAR = np.array([0.8, -0.3, 0.5])
W = np.array([1.0, 1.0, 0.0])
W_STAR = np.array([1.0, 0.0, 0.0])

CHECK_COARSE = {
    "relu": (0.12725, 0.23696, 0.0),
    "clipped_relu": (0.008965, 0.083862, 0.0),
    "identity": (0.144484, 0.363902, 0.0),
}

# Monte Carlo: 2e5 samples; each estimated component must lie within MC_SIGMAS standard errors
# (SE = sample std / sqrt(N), computed by monte_carlo) of the closed form. With 5 SE a correct
# formula fails with probability < 1e-6 per component; the seed makes the test deterministic.
MC_SAMPLES = 200_000
MC_SIGMAS = 5.0


# ---- check values ------------------------------------------------------------------------------


def test_check_values_loss_and_true_gradients() -> None:
    assert T.angle(W, W_STAR) == pytest.approx(math.pi / 4, abs=1e-12)
    assert T.population_loss(V, W, V_STAR, W_STAR) == pytest.approx(0.22625, abs=1e-5)
    np.testing.assert_allclose(T.loss_grad_v(V, W, V_STAR, W_STAR), [0.225, 0.2375, -0.0375], atol=1e-5)
    np.testing.assert_allclose(T.loss_grad_w(V, W, V_STAR, W_STAR), [-0.043768, 0.043768, 0.0], atol=1e-5)


@pytest.mark.parametrize("ste", sorted(CHECK_COARSE))
def test_check_values_expected_coarse_gradient(ste: str) -> None:
    np.testing.assert_allclose(
        T.expected_coarse_gradient(ste, V, W, V_STAR, W_STAR), CHECK_COARSE[ste], atol=1e-5
    )


def test_check_values_crelu_as_written_with_csc_and_cot() -> None:
    """The evaluated form equals the reference's csc/cot formula at theta = pi/4."""
    theta, w_norm = math.pi / 4, float(np.linalg.norm(W))
    w_hat = W / w_norm
    u = (w_hat + W_STAR) / np.linalg.norm(w_hat + W_STAR)
    h = V @ V + V.sum() ** 2 - V.sum() * V_STAR.sum() + V @ V_STAR
    p, q = T.crelu_p(theta, w_norm), T.crelu_q(theta, w_norm)
    as_written = (
        T.crelu_p(0.0, w_norm) * h / 2 * w_hat
        - (V @ V_STAR) / math.sin(theta / 2) * q * u
        - (V @ V_STAR) * (p - q / math.tan(theta / 2)) * w_hat
    )
    np.testing.assert_allclose(T.expected_coarse_grad_clipped_relu(V, W, V_STAR, W_STAR), as_written, atol=1e-14)


def test_p_and_q_match_their_integral_definitions() -> None:
    """p, q (exact erf forms) against quadrature of the reference's polar integrals, to 1e-10."""
    quad = pytest.importorskip("scipy.integrate").quad

    def integral(trig, theta: float, w_norm: float) -> float:
        def integrand(phi: float) -> float:
            c = math.cos(phi)
            xi = math.sqrt(math.pi / 2) if c <= 0 else T.crelu_xi(1.0 / (w_norm * c))
            return trig(phi) * xi

        lo = theta - math.pi / 2
        return quad(integrand, lo, math.pi / 2, epsabs=1e-13, epsrel=1e-13, limit=200)[0] / (2 * math.pi)

    for theta in (0.0, 0.2, math.pi / 4, 1.5, 2.4, 3.0, math.pi):
        for w_norm in (0.2, 1.0, math.sqrt(2), 4.0, 30.0):
            assert T.crelu_p(theta, w_norm) == pytest.approx(integral(math.cos, theta, w_norm), abs=1e-10)
            assert T.crelu_q(theta, w_norm) == pytest.approx(integral(math.sin, theta, w_norm), abs=1e-10)


def test_xi_is_the_integral_of_r2_exp() -> None:
    r = np.linspace(0.0, 1.7, 200_001)
    numeric = np.trapezoid(r**2 * np.exp(-(r**2) / 2), r)
    assert T.crelu_xi(1.7) == pytest.approx(numeric, abs=1e-9)
    assert T.crelu_xi(0.0) == 0.0


# ---- identities and geometry ---------------------------------------------------------------------


def _random_point(rng: np.random.Generator, m: int = 4, n: int = 5):
    v, v_star = rng.standard_normal(m), rng.standard_normal(m)
    w = rng.standard_normal(n) * rng.uniform(0.3, 3.0)
    w_star = rng.standard_normal(n)
    return v, w, v_star, w_star / np.linalg.norm(w_star)


def test_inner_product_identity_for_relu() -> None:
    """<E g_relu, df/dw> = sin(theta) (v^T v*)^2 / (2 (2 pi)^{3/2} ||w||) >= 0."""
    rng = np.random.default_rng(3)
    points = [(V, W, V_STAR, W_STAR)] + [_random_point(rng) for _ in range(20)]
    for v, w, v_star, w_star in points:
        theta = T.angle(w, w_star)
        inner = T.expected_coarse_grad_relu(v, w, v_star, w_star) @ T.loss_grad_w(v, w, v_star, w_star)
        expected = math.sin(theta) * (v @ v_star) ** 2 / (2 * (2 * math.pi) ** 1.5 * np.linalg.norm(w))
        assert inner == pytest.approx(expected, rel=1e-10, abs=1e-15)
        assert inner >= 0


def test_loss_grad_w_matches_finite_differences() -> None:
    rng = np.random.default_rng(5)
    v, w, v_star, w_star = _random_point(rng)
    eps = 1e-6
    numeric = np.array([
        (T.population_loss(v, w + eps * e, v_star, w_star) - T.population_loss(v, w - eps * e, v_star, w_star))
        / (2 * eps)
        for e in np.eye(w.size)
    ])
    np.testing.assert_allclose(T.loss_grad_w(v, w, v_star, w_star), numeric, atol=1e-8)


# ---- Monte Carlo -------------------------------------------------------------------------------


@pytest.mark.parametrize("ste", ["identity", "relu", "clipped_relu"])
def test_monte_carlo_agrees_with_closed_forms(ste: str) -> None:
    est = T.monte_carlo(ste, V, W, V_STAR, W_STAR, n_samples=MC_SAMPLES, seed=11)
    assert est.n_samples == MC_SAMPLES
    assert abs(est.loss - T.population_loss(V, W, V_STAR, W_STAR)) <= MC_SIGMAS * est.loss_se
    assert np.all(np.abs(est.grad_v - T.loss_grad_v(V, W, V_STAR, W_STAR)) <= MC_SIGMAS * est.grad_v_se)
    closed = T.expected_coarse_gradient(ste, V, W, V_STAR, W_STAR)
    assert np.all(np.abs(est.coarse_grad - closed) <= MC_SIGMAS * est.coarse_grad_se)
    assert np.all(est.coarse_grad_se < 3e-3)  # the tolerance is tight: a few 1e-3 at most


def test_monte_carlo_clipped_relu_depends_on_w_norm() -> None:
    """The clipped-ReLU window (0, 1] sees ||w||: check a second scale against the closed form."""
    w = 0.4 * np.array([0.3, -1.0, 0.7])
    est = T.monte_carlo("clipped_relu", V, w, V_STAR, W_STAR, n_samples=MC_SAMPLES, seed=12)
    closed = T.expected_coarse_grad_clipped_relu(V, w, V_STAR, W_STAR)
    assert np.all(np.abs(est.coarse_grad - closed) <= MC_SIGMAS * est.coarse_grad_se)


def test_monte_carlo_works_for_any_registered_ste() -> None:
    """A user-registered STE is used through the registry with lo=0, hi=1 (same draws, same seed)."""
    name = "test_theory_window_copy"
    register_ste(name, lambda u, lo, hi: ((u > lo) & (u <= hi)).to(u.dtype))
    try:
        mine = T.monte_carlo(name, V, W, V_STAR, W_STAR, n_samples=20_000, seed=4)
        builtin = T.monte_carlo("clipped_relu", V, W, V_STAR, W_STAR, n_samples=20_000, seed=4)
        np.testing.assert_array_equal(mine.coarse_grad, builtin.coarse_grad)
    finally:
        unregister_ste(name)
    tailed = T.monte_carlo("log_tailed_relu", V, W, V_STAR, W_STAR, n_samples=20_000, seed=4)
    assert tailed.coarse_grad.shape == (3,) and np.all(np.isfinite(tailed.coarse_grad))


# ---- critical points and Algorithm 1 ---------------------------------------------------------


def test_global_minimum_is_critical_for_every_closed_form() -> None:
    gm = T.global_minimum(V_STAR, W_STAR, w_norm=2.0)
    assert gm.loss == 0.0 and T.population_loss(gm.v, gm.w, V_STAR, W_STAR) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(T.loss_grad_v(gm.v, gm.w, V_STAR, W_STAR), 0.0, atol=1e-15)
    for ste in T.CLOSED_FORM_STES:
        np.testing.assert_allclose(T.expected_coarse_gradient(ste, gm.v, gm.w, V_STAR, W_STAR), 0.0, atol=1e-15)


def test_saddle_point() -> None:
    sd = T.saddle_point(V_STAR, W_STAR)
    assert 0.0 < sd.theta < math.pi
    assert T.angle(sd.w, W_STAR) == pytest.approx(sd.theta, abs=1e-12)
    assert sd.v @ V_STAR == pytest.approx(0.0, abs=1e-14)
    np.testing.assert_allclose(T.loss_grad_v(sd.v, sd.w, V_STAR, W_STAR), 0.0, atol=1e-14)
    np.testing.assert_allclose(T.loss_grad_w(sd.v, sd.w, V_STAR, W_STAR), 0.0, atol=1e-14)
    # a saddle, not a minimum: f is quadratic in v and linear in theta with cross term
    # (dv^T v*) d theta / (2 pi), so moving v along v* while rotating w towards w* lowers f,
    # rotating away raises it
    e = sd.w - (sd.w @ W_STAR) * W_STAR
    e = e / np.linalg.norm(e)  # unit, orthogonal to w*, in the plane of w* and the saddle's w

    def w_at(theta: float) -> np.ndarray:
        return math.cos(theta) * W_STAR + math.sin(theta) * e

    assert T.angle(w_at(sd.theta), W_STAR) == pytest.approx(sd.theta, abs=1e-12)
    eps, k = 1e-3, 4.0
    assert T.population_loss(sd.v + eps * V_STAR, w_at(sd.theta - k * eps), V_STAR, W_STAR) < sd.loss
    assert T.population_loss(sd.v + eps * V_STAR, w_at(sd.theta + k * eps), V_STAR, W_STAR) > sd.loss
    assert T.population_loss(sd.v + eps * V_STAR, sd.w, V_STAR, W_STAR) > sd.loss


def _start() -> tuple[np.ndarray, np.ndarray]:
    v0, w0 = np.array([1.0, 0.2, -0.4]), np.array([1.0, 1.5, 0.5])
    # the convergence conditions of section 4
    assert v0 @ V_STAR > 0 and T.angle(w0, W_STAR) < math.pi / 2
    assert V_STAR.sum() * v0.sum() <= V_STAR.sum() ** 2
    return v0, w0


@pytest.mark.parametrize("ste", ["relu", "clipped_relu"])
def test_algorithm1_descends_monotonically_to_the_global_minimum(ste: str) -> None:
    v0, w0 = _start()
    hist = T.run_algorithm1(ste, v0, w0, V_STAR, W_STAR, lr=0.5, iters=800)
    assert hist.loss.shape == (801,) and hist.v.shape == (801, 3) and hist.w.shape == (801, 3)
    assert np.all(np.diff(hist.loss) <= 1e-15)  # monotone (up to rounding)
    assert hist.loss[-1] < 1e-12
    assert hist.theta[-1] < 1e-6
    np.testing.assert_allclose(hist.v[-1], V_STAR, atol=1e-6)


def test_algorithm1_with_sampled_gradients_descends() -> None:
    v0, w0 = _start()
    hist = T.run_algorithm1("relu", v0, w0, V_STAR, W_STAR, lr=0.2, iters=300,
                            gradients="sampled", batch_size=256, seed=1)
    assert hist.gradients == "sampled"
    assert hist.loss[-1] < 0.1 * hist.loss[0]
    assert hist.theta[-1] < 0.2
    # a registered STE without closed form runs too
    tailed = T.run_algorithm1("log_tailed_relu", v0, w0, V_STAR, W_STAR, lr=0.2, iters=50,
                              gradients="sampled", batch_size=64, seed=2)
    assert tailed.loss[-1] < tailed.loss[0]


def test_spurious_minimizer_identity_does_not_stop_relu_does() -> None:
    assert T.spurious_minimizer_exists(V_STAR)
    sp = T.spurious_local_minimizer(V_STAR, W_STAR)
    assert sp.theta == pytest.approx(math.pi) and sp.v @ V_STAR < 0
    np.testing.assert_allclose(T.loss_grad_v(sp.v, sp.w, V_STAR, W_STAR), 0.0, atol=1e-15)
    m = V_STAR.size
    closed_norm = 2 * (m - 1) * V_STAR.sum() ** 2 / (math.sqrt(2 * math.pi) * (m + 1) ** 2)
    g_id = T.expected_coarse_gradient("identity", sp.v, sp.w, V_STAR, W_STAR)
    assert np.linalg.norm(g_id) == pytest.approx(closed_norm, rel=1e-12) and closed_norm > 0
    for ste in ("relu", "clipped_relu"):
        np.testing.assert_allclose(T.expected_coarse_gradient(ste, sp.v, sp.w, V_STAR, W_STAR), 0.0, atol=1e-15)

    # start next to it: relu / clipped_relu settle on it, identity drifts away (and here, past
    # w = 0, on to the global minimum)
    v0 = sp.v + np.array([0.01, -0.01, 0.01])
    w0 = sp.w + np.array([0.0, 0.02, 0.01])

    def distance(h: T.Algorithm1History) -> np.ndarray:
        w_hat = h.w / np.linalg.norm(h.w, axis=1, keepdims=True)
        return np.linalg.norm(h.v - sp.v, axis=1) + np.linalg.norm(w_hat - sp.w, axis=1)

    ident = T.run_algorithm1("identity", v0, w0, V_STAR, W_STAR, lr=0.5, iters=300)
    assert distance(ident)[0] < 0.05 and distance(ident)[-1] > 1.0
    assert ident.loss[-1] < 1e-10
    for ste in ("relu", "clipped_relu"):
        hist = T.run_algorithm1(ste, v0, w0, V_STAR, W_STAR, lr=0.5, iters=300)
        assert distance(hist)[-1] < 1e-3 * distance(hist)[0]
        assert hist.loss[-1] == pytest.approx(sp.loss, abs=1e-9)


# ---- unhappy paths -------------------------------------------------------------------------------


def test_errors_for_bad_input() -> None:
    with pytest.raises(QatSteError, match="length"):
        T.population_loss([1.0, 2.0], W, V_STAR, W_STAR)
    with pytest.raises(QatSteError, match="length"):
        T.loss_grad_w(V, [1.0, 0.0], V_STAR, W_STAR)
    with pytest.raises(QatSteError, match="1-D"):
        T.loss_grad_v(np.ones((3, 1)), W, V_STAR, W_STAR)
    with pytest.raises(QatSteError, match="zero vector"):
        T.expected_coarse_gradient("relu", V, np.zeros(3), V_STAR, W_STAR)
    with pytest.raises(QatSteError, match="unit norm"):
        T.population_loss(V, W, V_STAR, [2.0, 0.0, 0.0])
    with pytest.raises(QatSteError, match="NaN"):
        T.population_loss([np.nan, 0.0, 0.0], W, V_STAR, W_STAR)
    with pytest.raises(QatSteError, match="closed-form") as info:
        T.expected_coarse_gradient("log_tailed_relu", V, W, V_STAR, W_STAR)
    assert "monte_carlo" in info.value.fix
    with pytest.raises(QatSteError, match="unknown STE"):
        T.expected_coarse_gradient("no_such_ste", V, W, V_STAR, W_STAR)
    with pytest.raises(QatSteError, match="unknown STE"):
        T.monte_carlo("no_such_ste", V, W, V_STAR, W_STAR, n_samples=10)
    with pytest.raises(QatSteError, match="n_samples"):
        T.monte_carlo("relu", V, W, V_STAR, W_STAR, n_samples=1)
    with pytest.raises(QatSteError, match="closed-form"):
        T.run_algorithm1("log_tailed_relu", V, W, V_STAR, W_STAR, lr=0.1, iters=2)
    with pytest.raises(QatSteError, match="lr"):
        T.run_algorithm1("relu", V, W, V_STAR, W_STAR, lr=-0.1, iters=2)
    with pytest.raises(QatSteError, match="gradients"):
        T.run_algorithm1("relu", V, W, V_STAR, W_STAR, lr=0.1, iters=2, gradients="exact")  # type: ignore[arg-type]
    with pytest.raises(QatSteError, match="shape"):
        T.empirical_loss(V, W, V_STAR, W_STAR, np.zeros((5, 3, 4)))
    with pytest.raises(QatSteError, match="theta"):
        T.crelu_p(4.0, 1.0)


def test_errors_for_critical_points_that_do_not_exist() -> None:
    v_star = np.array([1.0, 1.0, 1.0])  # (1^T v*)^2 = 9 >= (m+1)/2 ||v*||^2 = 6
    assert not T.spurious_minimizer_exists(v_star)
    with pytest.raises(QatSteError, match="spurious"):
        T.spurious_local_minimizer(v_star, W_STAR)
    with pytest.raises(QatSteError, match="saddle"):
        T.saddle_point(v_star, W_STAR)
    with pytest.raises(QatSteError, match="n >= 2"):
        T.saddle_point(V_STAR, [1.0])


def test_algorithm1_reports_reaching_w_zero() -> None:
    """With identity at the spurious point w shrinks along itself; a step landing on w = 0 is reported."""
    sp = T.spurious_local_minimizer(V_STAR, W_STAR)
    g = np.linalg.norm(T.expected_coarse_gradient("identity", sp.v, sp.w, V_STAR, W_STAR))
    with pytest.raises(QatSteError, match="w = 0"):
        T.run_algorithm1("identity", sp.v, sp.w, V_STAR, W_STAR, lr=1.0 / g, iters=3)


def test_float64_torch_not_needed_by_callers() -> None:
    """Public results are float64 numpy arrays even though the STE registry works on torch tensors."""
    est = T.monte_carlo("relu", V, W, V_STAR, W_STAR, n_samples=100, seed=0)
    assert isinstance(est.coarse_grad, np.ndarray) and est.coarse_grad.dtype == np.float64
    assert torch.get_default_dtype() == torch.float32  # the module changed no global torch state


# ---- the figures next to the critical points (tools.theory_figures (d), (e)) ---------------------


def test_algorithm1_next_to_the_spurious_minimizer_and_the_saddle(tmp_path):
    pytest.importorskip("matplotlib")
    from tools import theory_figures as F

    rows = F.figure_near_critical_points(tmp_path, lr=0.1, iters=1500)
    assert (tmp_path / "theory_near_critical_points.png").stat().st_size > 10_000
    end = {(label.split(",")[0], label.split("= ")[1], ste): (f1, t1) for label, ste, _, f1, t1 in rows}
    for ste in ("relu", "clipped_relu"):  # settle at the spurious minimizer (f = 1/8 here, theta = pi)
        f1, t1 = end[("spurious minimizer", "pi - 0.1", ste)]
        assert f1 == pytest.approx(0.125, abs=1e-4) and t1 == pytest.approx(math.pi, abs=1e-3)
        assert end[("saddle", "theta_s - 0.05", ste)][0] < 1e-4  # the saddle's other side: the global minimum
    for start in (("spurious minimizer", "pi - 0.1"), ("saddle", "theta_s + 0.05"), ("saddle", "theta_s - 0.05")):
        f1, t1 = end[(*start, "identity")]
        assert f1 < 1e-8 and t1 < 1e-3  # identity leaves both critical points (to the global minimum here)
    block = F.report_block(rows, F.figure_gradient_path(tmp_path), 0.1, 1500, "cmd")
    assert block.count("**reproduced**") == 4 and "not reproduced" not in block


def test_coarse_gradient_norm_along_the_path_through_the_critical_points(tmp_path):
    pytest.importorskip("matplotlib")
    from tools import theory_figures as F

    rows = {ste: norms for ste, *norms in F.figure_gradient_path(tmp_path)}
    assert (tmp_path / "theory_gradient_path.png").is_file()
    for ste in ("relu", "clipped_relu"):
        assert max(rows[ste]) < 1e-6  # zero at the global min, the saddle and the spurious min
    g_global, g_saddle, g_spurious = rows["identity"]
    assert g_global < 1e-6 and g_saddle == pytest.approx(0.088955, abs=1e-5)
    # the reference's closed form at the spurious minimizer: 2(m-1)(1'v*)^2 / (sqrt(2 pi)(m+1)^2), m = 3, 1'v* = 1
    assert g_spurious == pytest.approx(2 * 2 * 1.0 / (math.sqrt(2 * math.pi) * 16), rel=1e-6)

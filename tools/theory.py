"""The two-linear-layer theory model of [P1] (Yin et al., ICLR 2019), in closed form and by Monte Carlo.

Model (reference ste-math.md section 4): ``Z`` is an ``m x n`` matrix with i.i.d. N(0, 1) entries,
the binary activation is ``sigma(x) = 1{x > 0}``, the student is ``y(Z) = v^T sigma(Z w)`` and the
teacher ``y*(Z) = v*^T sigma(Z w*)`` with ``||w*|| = 1``. The population loss is
``f(v, w) = E 1/2 (y(Z) - y*(Z))^2``, ``theta`` is the angle between ``w`` and ``w*``,
``I = I_m`` and ``J = 1 1^T``.

What is here (all float64 numpy; vectors in, vectors out):

- :func:`angle`, :func:`population_loss`, :func:`loss_grad_v`, :func:`loss_grad_w`: f and its true
  gradients. ``f`` is not differentiable in ``w`` where ``theta`` is 0 or pi (``w`` parallel to
  ``w*``); :func:`loss_grad_w` returns 0 there.
- the expected coarse gradient ``E g_mu`` in closed form for the identity, relu and clipped_relu
  STEs (:func:`expected_coarse_gradient`), with the helper functions ``xi``, ``p`` and ``q`` of the
  clipped ReLU (:func:`crelu_xi`, :func:`crelu_p`, :func:`crelu_q`). ``p`` and ``q`` are the 1-D
  polar integrals of the reference; they are evaluated here through exact erf formulas (derived in
  :func:`crelu_p` and :func:`crelu_q`, checked against numerical quadrature of the integrals in the
  tests to 1e-10).
- :func:`monte_carlo`: sampled estimates (with standard errors) of f, df/dv and ``E g_mu`` for ANY
  registered STE, using the registry's derivative with ``lo = 0``, ``hi = 1`` (so clipped_relu is
  ``mu = min(max(x, 0), 1)`` as in the reference).
- critical points of f: :func:`global_minimum`, :func:`spurious_local_minimizer` (theta = pi),
  :func:`saddle_point` (theta in (0, pi) with ``v^T v* = 0``), with their existence conditions.
- :func:`run_algorithm1`: coarse gradient descent ``v <- v - lr E[dl/dv]``, ``w <- w - lr E[g_mu]``
  with either expected (closed-form) gradients or mini-batch Monte Carlo gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from qat_ste.errors import QatSteError
from qat_ste.ste import STE, get_ste

#: STEs whose expected coarse gradient has a closed form here.
CLOSED_FORM_STES: tuple[str, ...] = ("identity", "relu", "clipped_relu")

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_UNIT_NORM_TOL = 1e-8


# ---- input checks --------------------------------------------------------------------------------


def _as_vector(x: object, name: str, length: int | None = None) -> np.ndarray:
    """``x`` as a finite 1-D float64 array (a copy), with a clear error otherwise."""
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise QatSteError(
            f"{name} must be a 1-D array of numbers, got {type(x).__name__}",
            f"pass {name} as a list or numpy array of floats",
        ) from None
    if arr.ndim != 1 or arr.size == 0:
        raise QatSteError(
            f"{name} must be a non-empty 1-D vector, got shape {arr.shape}",
            f"pass {name} as a flat vector, e.g. np.asarray({name}).ravel()",
        )
    if length is not None and arr.size != length:
        raise QatSteError(
            f"{name} has length {arr.size}, expected {length} to match the other vectors",
            "v and v_star must have the same length m; w and w_star the same length n",
        )
    if not np.all(np.isfinite(arr)):
        raise QatSteError(f"{name} contains NaN or infinite entries", f"pass a finite {name}")
    return arr


def _check_w(w: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        raise QatSteError(
            "w is the zero vector: the angle theta and the model's gradients are undefined there",
            "start from (or step to) a nonzero w",
        )
    return norm


def _check_w_star(w_star: np.ndarray) -> None:
    norm = float(np.linalg.norm(w_star))
    if abs(norm - 1.0) > _UNIT_NORM_TOL:
        raise QatSteError(
            f"w_star must have unit norm (the model assumes ||w*|| = 1), got ||w_star|| = {norm:.6g}",
            "pass w_star / np.linalg.norm(w_star)",
        )


def _checked(
    v: object, w: object, v_star: object, w_star: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert the four model vectors; shapes must agree and w, w* be usable."""
    v_star_arr = _as_vector(v_star, "v_star")
    w_star_arr = _as_vector(w_star, "w_star")
    v_arr = _as_vector(v, "v", length=v_star_arr.size)
    w_arr = _as_vector(w, "w", length=w_star_arr.size)
    _check_w_star(w_star_arr)
    _check_w(w_arr)
    return v_arr, w_arr, v_star_arr, w_star_arr


def _ste_name_for_closed_form(ste: str | STE) -> str:
    name = ste.name if isinstance(ste, STE) else ste
    if name not in CLOSED_FORM_STES:
        get_ste(name)  # an unknown name gets the registry's error (with the list of known STEs)
        raise QatSteError(
            f"no closed-form expected coarse gradient for STE {name!r}; closed forms exist only "
            f"for {', '.join(CLOSED_FORM_STES)}",
            "use monte_carlo(...) (or run_algorithm1(..., gradients='sampled')), which works for "
            "any registered STE",
        )
    return name


# ---- the loss and its true gradients ------------------------------------------------------------


def _angle_parts(w: np.ndarray, w_star: np.ndarray) -> tuple[float, np.ndarray, float, np.ndarray]:
    """(theta, w_hat, ||w||, P w*) with P = I - w_hat w_hat^T; theta via atan2 (accurate near 0, pi)."""
    w_norm = float(np.linalg.norm(w))
    w_hat = w / w_norm
    cos_part = float(w_hat @ w_star)
    perp = w_star - cos_part * w_hat
    theta = math.atan2(float(np.linalg.norm(perp)), cos_part)
    return theta, w_hat, w_norm, perp


def angle(w: object, w_star: object) -> float:
    """The angle theta in [0, pi] between ``w`` and ``w_star``."""
    w_star_arr = _as_vector(w_star, "w_star")
    w_arr = _as_vector(w, "w", length=w_star_arr.size)
    _check_w(w_arr)
    w_star_norm = float(np.linalg.norm(w_star_arr))
    if w_star_norm == 0.0:
        raise QatSteError("w_star is the zero vector", "pass a unit vector w_star")
    return _angle_parts(w_arr, w_star_arr / w_star_norm)[0]


def population_loss(v: object, w: object, v_star: object, w_star: object) -> float:
    """f(v, w) = 1/8 [v^T(I+J)v - 2 v^T((1 - 2 theta/pi) I + J) v* + v*^T(I+J)v*]."""
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    theta = _angle_parts(w, w_star)[0]
    sv, sv_star = v.sum(), v_star.sum()
    a = 1.0 - 2.0 * theta / math.pi
    return float(
        (v @ v + sv**2 - 2.0 * (a * (v @ v_star) + sv * sv_star) + v_star @ v_star + sv_star**2) / 8.0
    )


def loss_grad_v(v: object, w: object, v_star: object, w_star: object) -> np.ndarray:
    """df/dv = 1/4 (I+J) v - 1/4 ((1 - 2 theta/pi) I + J) v*  (also E[dl/dv] of the sampled loss)."""
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    theta = _angle_parts(w, w_star)[0]
    a = 1.0 - 2.0 * theta / math.pi
    return (v + v.sum() - a * v_star - v_star.sum()) / 4.0


def loss_grad_w(v: object, w: object, v_star: object, w_star: object) -> np.ndarray:
    """df/dw = -(v^T v*)/(2 pi ||w||) P w*/||P w*||, P = I - w_hat w_hat^T; 0 where theta is 0 or pi.

    At theta = 0 or pi (w parallel to w*) f has a kink in w and no gradient; 0 is returned there.
    """
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    _, _, w_norm, perp = _angle_parts(w, w_star)
    perp_norm = float(np.linalg.norm(perp))
    if perp_norm == 0.0:
        return np.zeros_like(w)
    return -(v @ v_star) / (2.0 * math.pi * w_norm) * perp / perp_norm


# ---- expected coarse gradients (closed forms) ---------------------------------------------------


def _h(v: np.ndarray, v_star: np.ndarray) -> float:
    """h = ||v||^2 + (1^T v)^2 - (1^T v)(1^T v*) + v^T v*."""
    sv = v.sum()
    return float(v @ v + sv**2 - sv * v_star.sum() + v @ v_star)


def expected_coarse_grad_identity(v: object, w: object, v_star: object, w_star: object) -> np.ndarray:
    """E g_identity = (||v||^2 w_hat - (v^T v*) w*) / sqrt(2 pi)."""
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    w_hat = w / np.linalg.norm(w)
    return ((v @ v) * w_hat - (v @ v_star) * w_star) / _SQRT_2PI


def expected_coarse_grad_relu(v: object, w: object, v_star: object, w_star: object) -> np.ndarray:
    """E g_relu = h/(2 sqrt(2 pi)) w_hat - cos(theta/2) (v^T v*)/sqrt(2 pi) u, u = (w_hat+w*)/||w_hat+w*||.

    Evaluated as ``(h w_hat - (v^T v*)(w_hat + w*)) / (2 sqrt(2 pi))`` (cos(theta/2) u = (w_hat+w*)/2),
    which stays defined at theta = pi.
    """
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    w_hat = w / np.linalg.norm(w)
    return (_h(v, v_star) * w_hat - (v @ v_star) * (w_hat + w_star)) / (2.0 * _SQRT_2PI)


def crelu_xi(x: float) -> float:
    """xi(x) = sqrt(pi/2) erf(x/sqrt 2) - x exp(-x^2/2) = int_0^x r^2 exp(-r^2/2) dr."""
    return math.sqrt(math.pi / 2.0) * math.erf(x / math.sqrt(2.0)) - x * math.exp(-(x**2) / 2.0)


def _check_theta_and_norm(theta: float, w_norm: float) -> tuple[float, float]:
    theta, w_norm = float(theta), float(w_norm)
    if not (0.0 <= theta <= math.pi):
        raise QatSteError(f"theta must lie in [0, pi], got {theta}", "pass the angle between w and w*")
    if not (w_norm > 0.0 and math.isfinite(w_norm)):
        raise QatSteError(f"||w|| must be positive and finite, got {w_norm}", "pass a nonzero w")
    return theta, w_norm


def _q_over_sin(theta: float, w_norm: float) -> float:
    """q(theta, w) / sin(theta) = erf(c / (sqrt 2 sin theta)) / (2 sqrt(2 pi)), c = 1/||w||."""
    s = math.sin(theta)
    c = 1.0 / w_norm
    erf_part = 1.0 if s <= 0.0 else math.erf(c / (math.sqrt(2.0) * s))
    return erf_part / (2.0 * _SQRT_2PI)


def crelu_q(theta: float, w_norm: float) -> float:
    """q(theta, w) = (1/2 pi) int_{theta - pi/2}^{pi/2} sin(phi) xi(sec(phi)/||w||) d phi.

    Exact form used: with s = (s1, s2) ~ N(0, I_2), s1 along w_hat and s2 towards w* in their plane,
    q = E[s2 1{0 < s1 <= c, s . (cos theta, sin theta) > 0}] (c = 1/||w||)
      = int_0^c phi(s1) phi(s1 cot theta) ds1 = sin(theta) erf(c / (sqrt 2 sin theta)) / (2 sqrt(2 pi)).
    """
    theta, w_norm = _check_theta_and_norm(theta, w_norm)
    if theta == 0.0 or theta == math.pi:
        return 0.0
    return math.sin(theta) * _q_over_sin(theta, w_norm)


def crelu_p(theta: float, w_norm: float) -> float:
    """p(theta, w) = (1/2 pi) int_{theta - pi/2}^{pi/2} cos(phi) xi(sec(phi)/||w||) d phi.

    Exact form used (same notation as :func:`crelu_q`, Phi/phi = standard normal cdf/pdf):
    p = int_0^c s phi(s) Phi(s cot theta) ds, integrated by parts:
    p = 1/(2 sqrt(2 pi)) - phi(c) Phi(c cot theta) + cot(theta) q(theta, w).
    p(0, w) = (1 - exp(-c^2/2)) / sqrt(2 pi) and p(pi, w) = 0.
    """
    theta, w_norm = _check_theta_and_norm(theta, w_norm)
    c = 1.0 / w_norm
    pdf_c = math.exp(-(c**2) / 2.0) / _SQRT_2PI
    if theta == 0.0:
        return 1.0 / _SQRT_2PI - pdf_c
    if theta == math.pi:
        return 0.0
    s, co = math.sin(theta), math.cos(theta)
    cdf = 0.5 * math.erfc(-(c * co / s) / math.sqrt(2.0))  # Phi(c cot theta)
    return 1.0 / (2.0 * _SQRT_2PI) - pdf_c * cdf + co * _q_over_sin(theta, w_norm)


def expected_coarse_grad_clipped_relu(
    v: object, w: object, v_star: object, w_star: object
) -> np.ndarray:
    """E g_crelu for mu = min(max(x, 0), 1):
    p(0,w) h/2 w_hat - (v^T v*) csc(theta/2) q(theta,w) u - (v^T v*)(p(theta,w) - cot(theta/2) q(theta,w)) w_hat.

    Evaluated as ``p(0,w) h/2 w_hat - (v^T v*) (p(theta,w) w_hat + q(theta,w)/sin(theta) P w*)``,
    the same vector written without the singular csc/cot at theta = 0 and pi.
    """
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    theta, w_hat, w_norm, perp = _angle_parts(w, w_star)
    toward_teacher = crelu_p(theta, w_norm) * w_hat + _q_over_sin(theta, w_norm) * perp
    return crelu_p(0.0, w_norm) * _h(v, v_star) / 2.0 * w_hat - (v @ v_star) * toward_teacher


_CLOSED_FORMS = {
    "identity": expected_coarse_grad_identity,
    "relu": expected_coarse_grad_relu,
    "clipped_relu": expected_coarse_grad_clipped_relu,
}


def expected_coarse_gradient(
    ste: str | STE, v: object, w: object, v_star: object, w_star: object
) -> np.ndarray:
    """E g_mu in closed form for ``ste`` in :data:`CLOSED_FORM_STES`; other names raise QatSteError."""
    return _CLOSED_FORMS[_ste_name_for_closed_form(ste)](v, w, v_star, w_star)


# ---- Monte Carlo --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonteCarloEstimate:
    """Sample means over ``n_samples`` draws of Z, each with its standard error (std / sqrt(N))."""

    loss: float
    loss_se: float
    grad_v: np.ndarray
    grad_v_se: np.ndarray
    coarse_grad: np.ndarray
    coarse_grad_se: np.ndarray
    n_samples: int


def _sample_terms(
    z: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    v_star: np.ndarray,
    w_star: np.ndarray,
    ste: STE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample loss l, dl/dv and coarse gradient g_mu for a batch z of shape (N, m, n)."""
    pre = z @ w  # (N, m)
    fired = (pre > 0.0).astype(np.float64)
    residual = fired @ v - (z @ w_star > 0.0).astype(np.float64) @ v_star  # (N,)
    pre_t = torch.from_numpy(pre)
    zero = torch.tensor(0.0, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    dmu = ste(pre_t, zero, one).to(torch.float64).numpy()  # mu'(Zw), (N, m)
    coarse = np.einsum("kij,ki->kj", z, dmu * v) * residual[:, None]  # Z^T (mu'(Zw) * v) r
    return 0.5 * residual**2, fired * residual[:, None], coarse


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise QatSteError(f"{name} must be an integer >= {minimum}, got {value!r}", f"pass {name}>={minimum}")
    return int(value)


def monte_carlo(
    ste: str | STE,
    v: object,
    w: object,
    v_star: object,
    w_star: object,
    n_samples: int = 200_000,
    seed: int | None = 0,
    chunk_size: int = 50_000,
) -> MonteCarloEstimate:
    """Monte Carlo estimates of f, df/dv and E g_mu for any registered STE (derivative with lo=0, hi=1).

    g_mu = Z^T (mu'(Zw) * v) (v^T sigma(Zw) - y*), averaged over ``n_samples`` draws of Z
    (drawn in chunks of ``chunk_size`` from ``numpy.random.default_rng(seed)``).
    """
    ste_obj = get_ste(ste)
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    n_samples = _check_count(n_samples, "n_samples", 2)
    chunk_size = _check_count(chunk_size, "chunk_size", 1)
    rng = np.random.default_rng(seed)
    m, n = v.size, w.size
    sums = [0.0, np.zeros(m), np.zeros(n)]
    squares = [0.0, np.zeros(m), np.zeros(n)]
    done = 0
    while done < n_samples:
        size = min(chunk_size, n_samples - done)
        terms = _sample_terms(rng.standard_normal((size, m, n)), v, w, v_star, w_star, ste_obj)
        for k, t in enumerate(terms):
            sums[k] = sums[k] + t.sum(axis=0)
            squares[k] = squares[k] + (t**2).sum(axis=0)
        done += size
    means = [s / n_samples for s in sums]
    ses = [
        np.sqrt(np.maximum(sq / n_samples - mu**2, 0.0) * n_samples / (n_samples - 1) / n_samples)
        for sq, mu in zip(squares, means, strict=True)
    ]
    return MonteCarloEstimate(
        loss=float(means[0]),
        loss_se=float(ses[0]),
        grad_v=means[1],
        grad_v_se=ses[1],
        coarse_grad=means[2],
        coarse_grad_se=ses[2],
        n_samples=n_samples,
    )


def empirical_loss(
    v: object, w: object, v_star: object, w_star: object, z: np.ndarray
) -> float:
    """The empirical loss (1/N) sum_k 1/2 (v^T sigma(Z_k w) - y*(Z_k))^2 on given samples z (N, m, n)."""
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    z = _check_samples(z, v.size, w.size)
    residual = (z @ w > 0.0).astype(np.float64) @ v - (z @ w_star > 0.0).astype(np.float64) @ v_star
    return float(np.mean(0.5 * residual**2))


def empirical_gradients(
    ste: str | STE, v: object, w: object, v_star: object, w_star: object, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(mean dl/dv, mean coarse gradient g_mu) over given samples z of shape (N, m, n)."""
    ste_obj = get_ste(ste)
    v, w, v_star, w_star = _checked(v, w, v_star, w_star)
    z = _check_samples(z, v.size, w.size)
    _, grad_v, coarse = _sample_terms(z, v, w, v_star, w_star, ste_obj)
    return grad_v.mean(axis=0), coarse.mean(axis=0)


def _check_samples(z: object, m: int, n: int) -> np.ndarray:
    arr = np.asarray(z, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1:] != (m, n) or arr.shape[0] == 0:
        raise QatSteError(
            f"samples z must have shape (N, m, n) = (N, {m}, {n}), got {arr.shape}",
            "draw them as rng.standard_normal((N, m, n))",
        )
    return arr


# ---- critical points ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CriticalPoint:
    """A critical point (v, w) of f with its angle theta and loss f(v, w)."""

    kind: Literal["global_minimum", "spurious_local_minimum", "saddle"]
    v: np.ndarray
    w: np.ndarray
    theta: float
    loss: float


def _teacher(v_star: object, w_star: object) -> tuple[np.ndarray, np.ndarray]:
    v_star_arr = _as_vector(v_star, "v_star")
    w_star_arr = _as_vector(w_star, "w_star")
    _check_w_star(w_star_arr)
    return v_star_arr, w_star_arr


def _check_w_norm(w_norm: float) -> float:
    if not (float(w_norm) > 0.0 and math.isfinite(float(w_norm))):
        raise QatSteError(f"w_norm must be positive and finite, got {w_norm}", "pass e.g. w_norm=1.0")
    return float(w_norm)


def _stationary_v(v_star: np.ndarray, theta: float) -> np.ndarray:
    """The v solving df/dv = 0 at angle theta: (I+J)^{-1}((1 - 2 theta/pi) I + J) v*."""
    m = v_star.size
    a = 1.0 - 2.0 * theta / math.pi
    rhs = a * v_star + v_star.sum()
    return rhs - rhs.sum() / (m + 1.0)  # (I + J)^{-1} = I - J/(m+1)


def global_minimum(v_star: object, w_star: object, w_norm: float = 1.0) -> CriticalPoint:
    """The global minimizers (v*, c w*), c > 0, where f = 0 (returned with ||w|| = ``w_norm``)."""
    v_star, w_star = _teacher(v_star, w_star)
    w_norm = _check_w_norm(w_norm)
    return CriticalPoint("global_minimum", v_star.copy(), w_norm * w_star, 0.0, 0.0)


def spurious_minimizer_exists(v_star: object) -> bool:
    """Whether (1^T v*)^2 < (m+1)/2 ||v*||^2, the condition for the spurious minimizer (and saddles)."""
    v_star = _as_vector(v_star, "v_star")
    return bool(v_star.sum() ** 2 < (v_star.size + 1) / 2.0 * (v_star @ v_star))


def spurious_local_minimizer(v_star: object, w_star: object, w_norm: float = 1.0) -> CriticalPoint:
    """theta = pi, v = (I+J)^{-1}(J - I) v*, w = -w_norm w*; exists iff :func:`spurious_minimizer_exists`.

    There v^T v* = 2(1^T v*)^2/(m+1) - ||v*||^2 < 0, so f grows as theta leaves pi.
    """
    v_star, w_star = _teacher(v_star, w_star)
    w_norm = _check_w_norm(w_norm)
    if not spurious_minimizer_exists(v_star):
        raise QatSteError(
            "no spurious local minimizer for this v_star: it needs (1^T v*)^2 < (m+1)/2 ||v*||^2",
            "choose a v_star with a smaller |sum(v_star)| relative to its norm",
        )
    v = _stationary_v(v_star, math.pi)
    w = -w_norm * w_star
    return CriticalPoint("spurious_local_minimum", v, w, math.pi, population_loss(v, w, v_star, w_star))


def saddle_angle(v_star: object) -> float:
    """The angle theta_s in (0, pi) of the saddle points: 1 - 2 theta_s/pi = -s^2/((m+1)||v*||^2 - s^2).

    Derivation: df/dv = 0 gives v(theta) = (I+J)^{-1}((1 - 2 theta/pi) I + J) v*; for theta in
    (0, pi) df/dw = 0 needs v^T v* = 0, i.e. a ||v*||^2 + (1 - a) s^2/(m+1) = 0 with
    a = 1 - 2 theta/pi, s = 1^T v*. Its root lies in (0, pi) iff :func:`spurious_minimizer_exists`.
    """
    v_star = _as_vector(v_star, "v_star")
    if not spurious_minimizer_exists(v_star):
        raise QatSteError(
            "no saddle point for this v_star: it needs (1^T v*)^2 < (m+1)/2 ||v*||^2",
            "choose a v_star with a smaller |sum(v_star)| relative to its norm",
        )
    s2 = float(v_star.sum() ** 2)
    a = -s2 / ((v_star.size + 1) * float(v_star @ v_star) - s2)
    return math.pi * (1.0 - a) / 2.0


def saddle_point(
    v_star: object, w_star: object, direction: object | None = None, w_norm: float = 1.0
) -> CriticalPoint:
    """A saddle point of f: theta = :func:`saddle_angle`, v = (I+J)^{-1}((1 - 2 theta/pi) I + J) v*.

    Every w at angle theta_s from w* (any norm) is one; this returns
    ``w = w_norm (cos theta_s w* + sin theta_s e)`` with ``e`` the unit part of ``direction``
    orthogonal to w* (default: the first coordinate axis not parallel to w*). Needs n >= 2.
    """
    v_star, w_star = _teacher(v_star, w_star)
    w_norm = _check_w_norm(w_norm)
    theta = saddle_angle(v_star)
    if w_star.size < 2:
        raise QatSteError(
            "saddle points need n >= 2 (with n = 1, w can only be parallel to w*)",
            "use a w_star with at least two entries",
        )
    if direction is None:
        candidates = list(np.eye(w_star.size))
    else:
        candidates = [_as_vector(direction, "direction", length=w_star.size)]
    for d in candidates:
        e = d - (d @ w_star) * w_star
        if np.linalg.norm(e) > 1e-8 * max(1.0, float(np.linalg.norm(d))):
            e = e / np.linalg.norm(e)
            break
    else:
        raise QatSteError("direction is parallel to w_star", "pass a direction with a part orthogonal to w_star")
    v = _stationary_v(v_star, theta)
    w = w_norm * (math.cos(theta) * w_star + math.sin(theta) * e)
    return CriticalPoint("saddle", v, w, theta, population_loss(v, w, v_star, w_star))


# ---- Algorithm 1: coarse gradient descent -------------------------------------------------------


@dataclass(frozen=True)
class Algorithm1History:
    """Iterates of Algorithm 1; row k is after k steps (row 0 = the start), ``iters + 1`` rows."""

    ste: str
    gradients: str
    lr: float
    loss: np.ndarray  # population loss f(v_k, w_k), closed form
    theta: np.ndarray
    v: np.ndarray  # (iters + 1, m)
    w: np.ndarray  # (iters + 1, n)


def run_algorithm1(
    ste: str | STE,
    v0: object,
    w0: object,
    v_star: object,
    w_star: object,
    lr: float,
    iters: int,
    gradients: Literal["expected", "sampled"] = "expected",
    batch_size: int = 64,
    seed: int | None = 0,
) -> Algorithm1History:
    """Coarse gradient descent v <- v - lr E[dl/dv], w <- w - lr E[g_mu] ([P1] Algorithm 1).

    ``gradients="expected"`` uses the closed forms (identity, relu, clipped_relu only);
    ``gradients="sampled"`` uses a fresh mini-batch of ``batch_size`` draws of Z per step (any
    registered STE). The recorded loss is always the closed-form population loss f.
    """
    v, w, v_star, w_star = _checked(v0, w0, v_star, w_star)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise QatSteError(f"lr must be a positive finite number, got {lr!r}", "pass e.g. lr=0.1")
    iters = _check_count(iters, "iters", 0)
    if gradients == "expected":
        name = _ste_name_for_closed_form(ste)
        closed_form = _CLOSED_FORMS[name]
    elif gradients == "sampled":
        ste_obj = get_ste(ste)
        name = ste_obj.name
        batch_size = _check_count(batch_size, "batch_size", 1)
        rng = np.random.default_rng(seed)
    else:
        raise QatSteError(
            f"gradients must be 'expected' or 'sampled', got {gradients!r}",
            "use 'expected' for closed forms or 'sampled' for mini-batch Monte Carlo",
        )
    vs, ws = [v.copy()], [w.copy()]
    for step in range(iters):
        if gradients == "expected":
            gv = loss_grad_v(v, w, v_star, w_star)
            gw = closed_form(v, w, v_star, w_star)
        else:
            z = rng.standard_normal((batch_size, v.size, w.size))
            gv, gw = empirical_gradients(ste_obj, v, w, v_star, w_star, z)
        v = v - lr * gv
        w = w - lr * gw
        if float(np.linalg.norm(w)) == 0.0 or not np.all(np.isfinite(w)) or not np.all(np.isfinite(v)):
            raise QatSteError(
                f"Algorithm 1 with STE {name!r} reached w = 0 or a non-finite iterate at step {step + 1}",
                "use a smaller lr",
            )
        vs.append(v.copy())
        ws.append(w.copy())
    v_hist, w_hist = np.array(vs), np.array(ws)
    return Algorithm1History(
        ste=name,
        gradients=gradients,
        lr=float(lr),
        loss=np.array([population_loss(a, b, v_star, w_star) for a, b in zip(v_hist, w_hist, strict=True)]),
        theta=np.array([_angle_parts(b, w_star)[0] for b in w_hist]),
        v=v_hist,
        w=w_hist,
    )

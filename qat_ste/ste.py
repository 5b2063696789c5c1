"""Straight-through estimators: a registry of proxy derivatives mu'(u) by name.

An STE replaces the zero-almost-everywhere derivative of the quantizer in the backward pass.
Every STE here is a function ``dmu(u, lo, hi) -> Tensor`` of the quantizer's input ``u`` and its
range ``[lo, hi]`` (``lo = -zero_point * alpha``, ``hi = (L - zero_point) * alpha``; for the ReLU
family ``lo = 0`` and ``hi = L * alpha``). It returns mu'(u) >= 0, the factor applied to the
incoming gradient: ``grad_u = grad_y * dmu(u, lo, hi)``.

Boundary convention (the authors' code): ``u <= lo`` gets the lower branch, ``u > hi`` the upper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import QatSteError

DerivativeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class STE:
    """A registered straight-through estimator."""

    name: str
    derivative: DerivativeFn
    description: str = ""

    def __call__(self, u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return self.derivative(u, lo, hi)


_REGISTRY: dict[str, STE] = {}


def _check_monotone(name: str, fn: DerivativeFn) -> None:
    """Reject a proxy whose derivative is negative anywhere on a probe grid ([P2] needs mu' >= 0)."""
    u = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64)
    for lo, hi in ((0.0, 1.0), (0.0, 3.0), (-0.5, 2.0)):
        d = fn(u, torch.tensor(lo, dtype=u.dtype), torch.tensor(hi, dtype=u.dtype))
        if not isinstance(d, torch.Tensor) or d.shape != u.shape:
            raise QatSteError(
                f"STE {name!r}: its derivative returned {type(d).__name__} of shape "
                f"{getattr(d, 'shape', None)}, expected a tensor shaped like its input {tuple(u.shape)}",
                "return a tensor the same shape as u, e.g. ((u > lo) & (u <= hi)).to(u.dtype)",
            )
        if not torch.isfinite(d).all() or (d < 0).any():
            raise QatSteError(
                f"STE {name!r}: its derivative mu'(u) is negative or not finite for some u; "
                "the convergence results ([P2]) need a monotone proxy with mu' >= 0",
                "make the proxy non-decreasing, i.e. return values >= 0 everywhere",
            )


def register_ste(
    name: str,
    derivative: DerivativeFn | None = None,
    *,
    description: str = "",
    overwrite: bool = False,
):
    """Register an STE ``derivative(u, lo, hi) -> mu'(u)`` under ``name``.

    Usable as a call or as a decorator::

        @qat_ste.register_ste("soft_clipped")
        def soft_clipped(u, lo, hi):
            return torch.sigmoid(4 * (u - lo)) * torch.sigmoid(4 * (hi - u))
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise QatSteError(f"STE name {name!r} is not a valid identifier", "use a name like 'my_ste'")

    def _register(fn: DerivativeFn) -> DerivativeFn:
        if name in _REGISTRY and not overwrite:
            raise QatSteError(
                f"an STE named {name!r} is already registered",
                "choose another name, or pass overwrite=True to replace it",
            )
        _check_monotone(name, fn)
        _REGISTRY[name] = STE(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return _register(derivative) if derivative is not None else _register


def unregister_ste(name: str) -> None:
    """Remove a registered STE (the built-in ones included)."""
    get_ste(name)
    del _REGISTRY[name]


def list_stes() -> list[str]:
    """Names of the registered STEs, in registration order."""
    return list(_REGISTRY)


def get_ste(name: str | STE) -> STE:
    """The STE registered under ``name``; an unknown name fails with the list of known ones."""
    if isinstance(name, STE):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise QatSteError(
            f"unknown STE {name!r}; registered STEs: {', '.join(_REGISTRY)}",
            "pick one of those, or add yours with qat_ste.register_ste(name, derivative)",
        ) from None


# ---- the built-in STEs -------------------------------------------------------------------------


def _identity(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """mu(u) = u: passes the gradient unchanged everywhere (unstable near good minima, [P1])."""
    return torch.ones_like(u)


def _relu(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """mu = vanilla ReLU: 1 above the lower end of the range, 0 below."""
    return (u > lo).to(u.dtype)


def _clipped_relu(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """mu = clipped ReLU: 1 inside (lo, hi], 0 outside ([P1]'s best on deep nets)."""
    return ((u > lo) & (u <= hi)).to(u.dtype)


def _log_tailed_relu(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """mu = log-tailed ReLU (HWGQ): 1 inside (lo, hi], 1/(u - tau) above hi with tau = hi - 1."""
    tau = hi - 1.0
    tail = 1.0 / torch.clamp(u - tau, min=1.0)  # u > hi  =>  u - tau > 1
    inside = ((u > lo) & (u <= hi)).to(u.dtype)
    return torch.where(u > hi, tail, inside)


register_ste("identity", _identity)
register_ste("relu", _relu)
register_ste("clipped_relu", _clipped_relu)
register_ste("log_tailed_relu", _log_tailed_relu)

#: the built-in STEs' derivatives by name: the fused kernels and the lean backward implement these
BUILTIN_STES: dict[str, DerivativeFn] = {
    "identity": _identity, "relu": _relu, "clipped_relu": _clipped_relu, "log_tailed_relu": _log_tailed_relu,
}


def builtin_name(ste: STE) -> str | None:
    """The built-in STE that ``ste`` is (same name and derivative), or None for a user-registered one."""
    return ste.name if BUILTIN_STES.get(ste.name) is ste.derivative else None

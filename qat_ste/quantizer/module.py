"""QuantAct: one quantized activation call site."""

from __future__ import annotations

import contextvars
import copy
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import QatSteError
from ..rewrite.activations import ActivationKind
from ..ste import STE, get_ste
from .alpha import BCGD_RANGE, ALPHA_MIN, fixed_step, range_from_samples, step_and_zero_point
from .functional import ALPHA_MODES, ROUNDING_MODES, fake_quantize, lsq_grad_scale, quantize_codes

#: set while a QuantAct evaluates the float function it wraps, so that call-site interception
#: (census, runtime fallback) does not count the inner call as a site of its own
INSIDE_QUANT_ACT: contextvars.ContextVar[bool] = contextvars.ContextVar("qat_ste_inside", default=False)


def check_bits(bits: Any) -> int:
    """Validate a bit width (1..8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise QatSteError(f"bits={bits!r} is not supported: activations are quantized to 1..8 bits",
                          "pass an integer bit width from 1 to 8, e.g. bits=4")
    return bits


def check_alpha_init(alpha_init: Any) -> float | None:
    """Validate a given step: None (calibrate / fixed default) or a finite number > 0 (not a bool)."""
    if alpha_init is None:
        return None
    if (isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float))
            or not math.isfinite(alpha_init) or alpha_init <= 0):
        raise QatSteError(f"alpha_init={alpha_init!r}: the step alpha must be a finite number > 0",
                          "pass a positive step, or alpha_init=None to calibrate it")
    return float(alpha_init)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise QatSteError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}",
                          f"pass {name}= one of those")
    return value


def channel_axis_of(u: torch.Tensor) -> int:
    """The channel axis of a per-channel site: 1 for NCHW feature maps, the last one otherwise."""
    return 1 if u.dim() == 4 else -1


class QuantAct(nn.Module):
    """A quantized activation: exact staircase forward, STE backward, step alpha.

    ``kind.family == "relu"``: the whole activation is the quantized ReLU of its input.
    Otherwise the wrapped float function ``fn`` runs first and its output is quantized on a grid
    with a zero point where the function goes negative.
    """

    def __init__(
        self,
        kind: ActivationKind,
        fn: nn.Module | Callable | None = None,
        *,
        bits: int = 4,
        ste: str | STE = "clipped_relu",
        alpha_mode: str = "lsq",
        alpha_init: float | None = None,
        rounding: str = "nearest",
        per_channel: bool = False,
        original: str = "",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.bits = check_bits(bits)
        self.levels = 2 ** bits - 1
        self.ste = get_ste(ste)
        self.alpha_mode = check_choice("alpha mode", alpha_mode, ALPHA_MODES)
        self.rounding = check_choice("rounding", rounding, ROUNDING_MODES)
        self.per_channel = bool(per_channel)
        self.original = original
        self.site = ""  # its name in the model; set by quantize()
        if isinstance(fn, nn.Module):
            self.fn = fn
            if hasattr(fn, "inplace"):
                fn.inplace = False
        else:
            self.fn_call = fn
        alpha_init = check_alpha_init(alpha_init)
        alpha, zero_point, initialized = self._default_params(alpha_init)
        if self.alpha_mode == "fixed":
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = nn.Parameter(alpha)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("initialized", torch.tensor(initialized))
        self._initialized = initialized
        self._observer: Callable[[QuantAct, torch.Tensor], None] | None = None
        self._export_fn: Callable[[QuantAct, torch.Tensor], torch.Tensor] | None = None

    # ---- parameters ---------------------------------------------------------------------------

    @property
    def quantizes_input(self) -> bool:
        return self.kind.family == "relu"

    def _default_params(self, alpha_init: float | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Alpha and zero point known without data: a given constant, or the fixed-mode default."""
        if alpha_init is None and self.alpha_mode == "fixed":
            if self.kind.family == "relu" and self.kind.upper is not None:
                alpha_init = self.kind.upper / self.levels  # ReLU6, Hardtanh(0, c): the cap
            else:
                alpha_init = fixed_step(self.bits, self.rounding)
        if alpha_init is None:
            return torch.tensor(1.0), torch.tensor(0.0), False
        lower = 0.0 if self.quantizes_input else self.kind.lower
        if lower is None:  # unbounded below (LeakyReLU, PReLU): an eighth of the grid below zero
            zp = float(self.levels // 8)
        else:
            zp = float(min(self.levels, round(-lower / alpha_init))) if lower < 0 else 0.0
        return torch.tensor(float(alpha_init)), torch.tensor(zp), True

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set alpha and the zero point from a range (scalars, or one value per channel)."""
        alpha, zero_point = step_and_zero_point(lo.flatten().float(), hi.flatten().float(), self.levels)
        if not self.per_channel or alpha.numel() == 1:
            alpha, zero_point = alpha.reshape(()), zero_point.reshape(())
        if self.quantizes_input:
            zero_point = torch.zeros_like(zero_point)
        with torch.no_grad():
            device = self.alpha.device
            if self.alpha.shape != alpha.shape:
                self._replace_alpha(alpha.to(device))
            else:
                self.alpha.copy_(alpha)
            self.zero_point = zero_point.to(device)
            self.initialized.fill_(True)
        self._initialized = True

    def _replace_alpha(self, value: torch.Tensor) -> None:
        if isinstance(self.alpha, nn.Parameter):
            self.alpha = nn.Parameter(value.clone())
        else:
            self.alpha = value.clone()

    def alpha_range(self) -> tuple[float, float] | None:
        """The valid range of a learned alpha (None when alpha is fixed)."""
        if self.alpha_mode == "fixed":
            return None
        return BCGD_RANGE if self.alpha_mode == "bcgd" else (ALPHA_MIN, float("inf"))

    def project_(self) -> None:
        """Keep a learned alpha in its valid range (call after each optimizer step)."""
        valid = self.alpha_range()
        if valid is not None:
            with torch.no_grad():
                self.alpha.clamp_(*valid)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "alpha"
        if key in state_dict and state_dict[key].shape != self.alpha.shape:
            self._replace_alpha(torch.empty_like(state_dict[key], device=self.alpha.device))
        zp_key = prefix + "zero_point"
        if zp_key in state_dict and state_dict[zp_key].shape != self.zero_point.shape:
            # per-channel zero point into a per-tensor module (or back): resize before the copy
            self.zero_point = torch.empty_like(state_dict[zp_key], device=self.alpha.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    # ---- forward ------------------------------------------------------------------------------

    def float_function(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """What the quantizer sees: the input for the ReLU family, else the float activation's output."""
        if self.quantizes_input:
            return x
        fn = self.fn if "fn" in self._modules else self.fn_call
        if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.set(): graph break
            return fn(x, *args, **kwargs)
        token = INSIDE_QUANT_ACT.set(True)
        try:
            return fn(x, *args, **kwargs)
        finally:
            INSIDE_QUANT_ACT.reset(token)

    def _grid(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, zp = self.alpha, self.zero_point
        if alpha.dim() == 1:
            # the same rule as samples_of(): the axis is not in the state_dict, so a module that
            # loaded per-channel steps (never calibrated itself) must derive it from the input too
            axis = channel_axis_of(u) % u.dim()
            shape = [1] * u.dim()
            shape[axis] = alpha.numel()
            alpha, zp = alpha.view(shape), zp.view(shape)
        return alpha, zp

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        u = self.float_function(x, *args, **kwargs)
        if self._observer is not None:
            self._observer(self, u)  # calibration: pass the float activation through
            return torch.clamp(u, 0.0, self.kind.upper) if self.quantizes_input else u
        if self._export_fn is not None:
            return self._export_fn(self, u)
        if not self._initialized:
            self._lazy_init(u)
        alpha, zp = self._grid(u)
        scale = lsq_grad_scale(u, self.levels, self.alpha.numel()) if self.alpha_mode == "lsq" else 1.0
        return fake_quantize(u, alpha, zp, self.levels, self.ste, self.alpha_mode, self.rounding, scale)

    def codes(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The integer codes (uint8) this site produces for input ``x``."""
        self.require_initialized()
        with torch.no_grad():
            u = self.float_function(x, *args, **kwargs)
            alpha, zp = self._grid(u)
            return quantize_codes(u, alpha, zp, self.levels, self.rounding).to(torch.uint8)

    # ---- initialisation -----------------------------------------------------------------------

    def require_initialized(self) -> None:
        if not self._initialized:
            raise QatSteError(
                f"the step alpha of quantized activation {self.site or self.original or self.kind.name} "
                "was never initialised",
                "run qat_ste.calibrate(model, batches) first (or a training-mode forward pass, or "
                "quantize with alpha='fixed' / alpha_init=<step>)")

    def samples_of(self, u: torch.Tensor, max_per_channel: int = 4096) -> torch.Tensor:
        """A random subsample of ``u`` laid out ``channels x n`` (one channel unless per-channel)."""
        u = u.detach().float()
        if self.per_channel and u.dim() >= 2:
            axis = channel_axis_of(u)
            flat = u.movedim(axis, 0).reshape(u.shape[axis], -1)
        else:
            flat = u.reshape(1, -1)
        n = flat.shape[1]
        cap = max_per_channel if self.per_channel else max_per_channel * 64
        if n > cap:
            idx = torch.randint(0, n, (cap,), device=flat.device)
            flat = flat[:, idx]
        return flat.cpu()

    def range_from(self, samples: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The range ``(lo, hi)`` that initialisation ``method`` picks for these samples."""
        return range_from_samples(samples, self.levels, method, relu_family=self.quantizes_input,
                                  cap=self.kind.upper if self.quantizes_input else None, bits=self.bits)

    def _lazy_init(self, u: torch.Tensor) -> None:
        if not self.training:
            self.require_initialized()
        method = "lsq" if self.alpha_mode == "lsq" else "percentile"
        self.set_range(*self.range_from(self.samples_of(u), method))

    def extra_repr(self) -> str:
        alpha = self.alpha.detach()
        a = f"{alpha.item():.4g}" if alpha.numel() == 1 else f"per-channel[{alpha.numel()}]"
        return (f"{self.original or self.kind.name}, bits={self.bits}, ste={self.ste.name}, "
                f"alpha={self.alpha_mode}:{a if self._initialized else 'uninitialised'}, "
                f"zero_point={self.zero_point.flatten()[0].item() if self.zero_point.numel() else 0:g}")

    def __deepcopy__(self, memo):
        # nn.Module's default deepcopy; contextvars and bound callables copy fine, observers do not.
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("_observer", "_export_fn"):
                new.__dict__[k] = None
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

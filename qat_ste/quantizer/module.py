"""QuantAct: one quantized activation call site."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn as nn

from ..errors import QatSteError
from ..kinds import ActivationKind
from ..ste import STE, get_ste
from ..validation import check_alpha_init, check_bits, check_choice, check_step_init  # noqa: F401 - re-exported
from .alpha import ALPHA_MIN, BCGD_RANGE, fixed_step, range_from_samples, step_and_zero_point
from .functional import (
    ALPHA_MODES,
    ROUNDING_MODES,
    check_kernel,
    fake_quantize,
    implementation,
    lsq_grad_scale,
    quantize_codes,
)

#: set while a QuantAct evaluates the float function it wraps, so that call-site interception
#: (census, runtime fallback) does not count the inner call as a site of its own
INSIDE_QUANT_ACT: contextvars.ContextVar[bool] = contextvars.ContextVar("qat_ste_inside", default=False)


def channel_axis_of(u: torch.Tensor) -> int:
    """The channel axis of a per-channel site: 1 for NCHW feature maps, the last one otherwise."""
    return 1 if u.dim() == 4 else -1


#: what a QuantAct does in forward: quantize (the default), observe (calibration) or export
MODES = ("quantize", "observe", "export")

Observer = Callable[["QuantAct", torch.Tensor], None]
ExportFn = Callable[["QuantAct", torch.Tensor], torch.Tensor]


class QuantAct(nn.Module):
    """A quantized activation: exact staircase forward, STE backward, learnable or fixed step.

    ``kind.family == "relu"``: the whole activation is the quantized ReLU of its input.
    Otherwise the wrapped float function ``fn`` runs first and its output is quantized on a grid
    with a zero point where the function goes negative.

    The step is the tensor ``alpha`` (a parameter unless ``alpha_mode="fixed"``; the name is the
    papers' symbol and the state_dict key), the grid's zero point the buffer ``zero_point``. Both
    keep their identity for the module's lifetime: calibration, per-channel resizing and
    ``load_state_dict`` change them in place, so an optimizer built earlier keeps training them.

    Modes (see :attr:`mode`): by default forward quantizes; inside ``with q.observing(callback):``
    it hands the float value to ``callback`` and passes the float activation through
    (calibration); inside ``with q.exporting(fn):`` it returns ``fn(q, u)`` (ONNX export).
    """

    alpha: torch.Tensor
    zero_point: torch.Tensor
    initialized: torch.Tensor
    fn: nn.Module
    fn_call: Callable[..., torch.Tensor] | None

    def __init__(
        self,
        kind: ActivationKind,
        fn: nn.Module | Callable | None = None,
        *,
        bits: int = 4,
        ste: str | STE = "clipped_relu",
        alpha_mode: str = "lsq",
        step_init: float | None = None,
        rounding: str = "nearest",
        per_channel: bool = False,
        original: str = "",
        alpha_init: float | None = None,
        kernel: str = "auto",
    ) -> None:
        """``step_init``: a given step (None: calibrate, or the fixed-mode default);
        ``alpha_init`` is its deprecated former name. ``kernel``: ``auto`` (the fused Triton
        kernels on CUDA tensors, torch elsewhere), ``triton`` or ``torch`` (an execution detail:
        not in the state_dict)."""
        super().__init__()
        self.kind = kind
        self.bits = check_bits(bits)
        self.levels = 2 ** bits - 1
        self.ste = get_ste(ste)
        self.alpha_mode = check_choice("alpha mode", alpha_mode, ALPHA_MODES)
        self.rounding = check_choice("rounding", rounding, ROUNDING_MODES)
        self.per_channel = bool(per_channel)
        self.kernel = check_kernel(kernel)
        self.original = original
        self.site = ""  # its name in the model; set by quantize()
        if isinstance(fn, nn.Module):
            self.fn = fn
            if hasattr(fn, "inplace"):
                cast(Any, fn).inplace = False  # out of place: the quantizer's input is read again
        else:
            self.fn_call = fn
        if alpha_init is not None:
            if step_init is not None:
                raise QatSteError("QuantAct got both step_init and its deprecated alias alpha_init",
                                  "pass step_init= only")
            warnings.warn("QuantAct(alpha_init=...) is deprecated; use step_init=", DeprecationWarning, stacklevel=2)
            step_init = check_step_init(alpha_init, "alpha_init")
        alpha, zero_point, initialized = self._default_params(check_step_init(step_init))
        if self.alpha_mode == "fixed":
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = nn.Parameter(alpha)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("initialized", torch.tensor(initialized))
        self._initialized = initialized
        # set only through observing() / exporting()
        self._observer: Observer | None = None
        self._export_fn: ExportFn | None = None

    # ---- modes --------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"observe"`` inside :meth:`observing`, ``"export"`` inside :meth:`exporting`, else ``"quantize"``."""
        if self._observer is not None:
            return "observe"
        return "export" if self._export_fn is not None else "quantize"

    @contextlib.contextmanager
    def observing(self, callback: Observer) -> Iterator[QuantAct]:
        """Within the block, forward calls ``callback(self, u)`` with the float value ``u`` the
        quantizer would see and returns the float activation (calibration). Restored on exit."""
        previous = self._observer
        self._observer = callback
        try:
            yield self
        finally:
            self._observer = previous

    @contextlib.contextmanager
    def exporting(self, fn: ExportFn) -> Iterator[QuantAct]:
        """Within the block, forward returns ``fn(self, u)`` (e.g. an export op) instead of the
        fake quantizer. Restored on exit."""
        previous = self._export_fn
        self._export_fn = fn
        try:
            yield self
        finally:
            self._export_fn = previous

    # ---- parameters ---------------------------------------------------------------------------

    @property
    def quantizes_input(self) -> bool:
        return self.kind.family == "relu"

    @property
    def is_initialized(self) -> bool:
        """Whether the step has a value (given, calibrated, loaded or lazily initialised)."""
        return self._initialized

    def _default_params(self, step_init: float | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Step and zero point known without data: a given constant, or the fixed-mode default."""
        if step_init is None and self.alpha_mode == "fixed":
            if self.kind.family == "relu" and self.kind.upper is not None:
                step_init = self.kind.upper / self.levels  # ReLU6, Hardtanh(0, c): the cap
            else:
                step_init = fixed_step(self.bits, self.rounding)
        if step_init is None:
            return torch.tensor(1.0), torch.tensor(0.0), False
        lower = 0.0 if self.quantizes_input else self.kind.lower
        if lower is None:  # unbounded below (LeakyReLU, PReLU): an eighth of the grid below zero
            zp = float(self.levels // 8)
        else:
            zp = float(min(self.levels, round(-lower / step_init))) if lower < 0 else 0.0
        return torch.tensor(float(step_init)), torch.tensor(zp), True

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the step and the zero point from a range (scalars, or one value per channel).

        The tensors change in place (resized when the number of channels changes), so optimizers
        and projectors holding them keep working. A range that gives a non-finite step is refused.
        """
        alpha, zero_point = step_and_zero_point(lo.flatten().float(), hi.flatten().float(), self.levels)
        if not self.per_channel or alpha.numel() == 1:
            alpha, zero_point = alpha.reshape(()), zero_point.reshape(())
        if self.quantizes_input:
            zero_point = torch.zeros_like(zero_point)
        if not bool(torch.isfinite(alpha).all() & torch.isfinite(zero_point).all()):
            raise QatSteError(
                f"quantized activation {self.site or self.original or self.kind.name}: the range "
                f"[{lo.flatten()[:4].tolist()}, {hi.flatten()[:4].tolist()}] gives a non-finite step",
                "initialise the step from finite data (check the calibration batches and the model's float outputs)")
        with torch.no_grad():
            _assign_(self.alpha, alpha)
            _assign_(self.zero_point, zero_point)
            self.initialized.fill_(True)
        self._initialized = True

    def alpha_range(self) -> tuple[float, float] | None:
        """The valid range of a learned step (None when the step is fixed)."""
        if self.alpha_mode == "fixed":
            return None
        return BCGD_RANGE if self.alpha_mode == "bcgd" else (ALPHA_MIN, float("inf"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-channel values into a per-tensor module (or back): resize in place before the copy
        for name in ("alpha", "zero_point"):
            value, own = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(value, torch.Tensor) and value.shape != own.shape:
                with torch.no_grad():
                    _assign_(own, torch.zeros(value.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    # ---- forward ------------------------------------------------------------------------------

    def float_function(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """What the quantizer sees: the input for the ReLU family, else the float activation's output."""
        if self.quantizes_input:
            return x
        fn = self.fn if "fn" in self._modules else self.fn_call
        if fn is None:
            raise QatSteError(f"quantized activation {self.site or self.original or self.kind.name} of kind "
                              f"{self.kind.name!r} has no float function to run",
                              "pass the activation (module or function) as QuantAct's second argument")
        if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.set(): graph break
            return fn(x, *args, **kwargs)
        token = INSIDE_QUANT_ACT.set(True)
        try:
            return fn(x, *args, **kwargs)
        finally:
            INSIDE_QUANT_ACT.reset(token)

    def grid(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step and zero point shaped to broadcast against ``u`` (per-channel views along its
        channel axis)."""
        alpha, zp = self.alpha, self.zero_point
        if alpha.dim() == 1:
            # the same rule as samples_of(): the axis is not in the state_dict, so a module that
            # loaded per-channel steps (never calibrated itself) must derive it from the input too
            axis = channel_axis_of(u) % u.dim()
            shape = [1] * u.dim()
            shape[axis] = alpha.numel()
            alpha, zp = alpha.view(shape), zp.view(shape)
        return alpha, zp

    _grid = grid  # the former private name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The quantized activation of ``x`` (or, in observe / export mode, see :attr:`mode`)."""
        u = self.float_function(x, *args, **kwargs)
        if self._observer is not None:
            self._observer(self, u)  # calibration: pass the float activation through
            return torch.clamp(u, 0.0, self.kind.upper) if self.quantizes_input else u
        if self._export_fn is not None:
            return self._export_fn(self, u)
        if not self._initialized:
            self._lazy_init(u)
        alpha, zp = self.grid(u)
        scale = lsq_grad_scale(u, self.levels, self.alpha.numel()) if self.alpha_mode == "lsq" else 1.0
        return fake_quantize(u, alpha, zp, self.levels, self.ste, self.alpha_mode, self.rounding, scale,
                             kernel=self.kernel)

    def implementation(self, device: torch.device | str | None = None) -> str:
        """Which quantizer runs on ``device`` (default: the step's): ``"triton"``, ``"torch"`` or
        ``"torch (user STE)"``; ``"unavailable: ..."`` when ``kernel="triton"`` cannot run there."""
        where = torch.device(device) if device is not None else self.alpha.device
        try:
            return implementation(self.kernel, self.ste, where)
        except QatSteError as error:
            return f"unavailable: {error.problem}"

    def codes(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The integer codes (uint8) this site produces for input ``x``."""
        self.require_initialized()
        with torch.no_grad():
            u = self.float_function(x, *args, **kwargs)
            alpha, zp = self.grid(u)
            return quantize_codes(u, alpha, zp, self.levels, self.rounding).to(torch.uint8)

    # ---- initialisation -----------------------------------------------------------------------

    def require_initialized(self) -> None:
        """Raise if the step was never given, calibrated, loaded or lazily initialised."""
        if not self._initialized:
            raise QatSteError(
                f"the step of quantized activation {self.site or self.original or self.kind.name} "
                "was never initialised",
                "run qat_ste.calibrate(model, batches) first (or a training-mode forward pass, or "
                "quantize with alpha_mode='fixed' / step_init=<step>)")

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
                f"alpha_mode={self.alpha_mode}, step={a if self._initialized else 'uninitialised'}, "
                f"zero_point={self.zero_point.flatten()[0].item() if self.zero_point.numel() else 0:g}"
                + ("" if self.kernel == "auto" else f", kernel={self.kernel}"))

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("kernel", "auto")  # a QuantAct pickled before the option existed
        super().__setstate__(state)

    def __deepcopy__(self, memo):
        # nn.Module's default deepcopy; a copy starts in quantize mode (observers do not copy).
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("_observer", "_export_fn"):
                new.__dict__[k] = None
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def _assign_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Give ``target`` the value ``value`` in place, resizing it when the shapes differ: the tensor
    (an nn.Parameter or a buffer) stays the same object. Call under ``torch.no_grad()``."""
    value = value.to(device=target.device, dtype=target.dtype)
    if target.shape == value.shape:
        target.copy_(value)
        return
    target.data = value.clone()
    if target.grad is not None:  # a gradient of the old shape cannot be accumulated into
        target.grad = None

"""Weight quantizers (BCGD [P3] and BinaryConnect) and the layers that use them.

A :class:`WeightQuantizer` maps a float weight ``W`` to ``Q(W) = codes * scale`` with integer codes:

- ``bits=1`` (``binary``): codes ``sign(W)`` with ``sign(0) := +1``, scale ``mean|W|`` (the least-squares
  scale for fixed sign codes, so ``scale="ls"`` is the same rule);
- ``bits="ternary"``: threshold ``delta = 0.7 * mean|W|``, codes ``sign(W) * 1{|W| > delta}``, scale the
  least-squares one for those codes: the mean of ``|W|`` over the nonzero codes (0 when there are none);
- ``bits=b`` in 2..8: symmetric codes in ``-(2^(b-1)-1) .. 2^(b-1)-1``; ``scale="ls"`` (the default) starts
  from ``max|W| / (2^(b-1)-1)`` and runs :data:`LS_ITERATIONS` fixed-point steps
  ``scale = <W, c> / <c, c>`` with ``c = clamp(round(W / scale))`` (round half to even; deterministic);
  ``scale="max"`` keeps the start value.

Per tensor, or per output channel (dim 0) with ``per_channel=True``. In the forward pass the quantizer
returns ``Q(W)`` and its backward is the identity (the straight-through estimator on weights), so the
gradient w.r.t. ``W`` is the gradient taken at ``Q(W)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QatSteError

#: the fixed-point iterations of the b-bit least-squares scale
LS_ITERATIONS = 5
#: the ternary threshold as a multiple of mean|W| (Li & Liu's TWN, as in the BCGD authors' code)
TERNARY_THRESHOLD = 0.7
#: scale rules by quantizer kind; the first is what ``scale="auto"`` picks
SCALES = {"binary": ("mean", "ls"), "ternary": ("ls",), "int": ("ls", "max")}
WEIGHT_BITS_HELP = "weight bits: 1 (binary), 'ternary', or an integer 2..8 ('binary' and '1'..'8' are accepted too)"


def check_weight_bits(bits: Any) -> int | str:
    """Validate a weight bit width: 1 (binary), ``"ternary"``, or 2..8; ``"binary"`` means 1, the
    strings ``"1"``..``"8"`` their integers. Returns the canonical value (an int, or ``"ternary"``)."""
    value = bits
    if isinstance(value, str):
        text = value.strip().lower()
        value = 1 if text == "binary" else "ternary" if text == "ternary" else int(text) if text.isdigit() else text
    if value == "ternary":
        return "ternary"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise QatSteError(f"weight_bits={bits!r} is not supported",
                          f"pass {WEIGHT_BITS_HELP}; weight_bits=None keeps float weights")
    return value


def weight_spec(bits: int | str) -> str:
    """``"binary"``, ``"ternary"`` or ``"int{b}"`` for a (valid) weight bit width."""
    bits = check_weight_bits(bits)
    return "binary" if bits == 1 else "ternary" if bits == "ternary" else f"int{bits}"


def check_weight_scale(bits: int | str, scale: Any, name: str = "scale") -> str:
    """Validate a scale rule for ``bits`` (``name``: the option as the caller spells it); returns the
    rule ``"auto"`` resolves to."""
    spec = weight_spec(bits)
    kind = spec if spec in SCALES else "int"
    allowed = SCALES[kind]
    if scale == "auto":
        return allowed[0]
    if not isinstance(scale, str) or scale not in allowed:
        raise QatSteError(f"weight scale {scale!r} does not apply to {spec} weights",
                          f"pass {name}= 'auto' or one of: {', '.join(allowed)}")
    return scale


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight; backward: the incoming gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class WeightQuantizer(nn.Module):
    """Quantizes a weight tensor: ``Q(W) = codes * scale`` (see the module docstring for the rules).

    ``bits``: 1 (binary), ``"ternary"`` or 2..8; ``scale``: ``"auto"`` (the paper's: ``mean`` for binary,
    ``ls`` otherwise), ``"mean"`` (binary), ``"ls"``, ``"max"`` (b-bit); ``per_channel``: one scale per
    output channel. Holds no parameter; its only buffer (``epoch_codes``, non-persistent, so the owning
    layer's state_dict keys stay ``weight`` / ``bias``) is the codes at the last :func:`mark_epoch`.
    """

    epoch_codes: torch.Tensor
    #: how the owning layer's weight trains (set by quantize(); read by WeightBlender and the report):
    #: ``bcgd`` blends with ``rho`` before each optimizer step, ``binaryconnect`` is plain STE (rho 0)
    method: str = "bcgd"
    rho: float = 1e-5

    def __init__(self, bits: int | str = 1, *, scale: str = "auto", per_channel: bool = False) -> None:
        super().__init__()
        self.bits: int | str = check_weight_bits(bits)
        self.scale_rule: str = check_weight_scale(self.bits, scale)
        self.per_channel = bool(per_channel)
        self.spec: str = weight_spec(self.bits)
        if self.bits == 1:
            self.allowed_codes: tuple[int, ...] = (-1, 1)
        elif self.bits == "ternary":
            self.allowed_codes = (-1, 0, 1)
        else:
            top = 2 ** (cast(int, self.bits) - 1) - 1
            self.allowed_codes = tuple(range(-top, top + 1))
        self.register_buffer("epoch_codes", torch.empty(0, dtype=torch.int8), persistent=False)

    @property
    def max_code(self) -> int:
        """The largest code (1 for binary and ternary, ``2^(b-1)-1`` for b bits)."""
        return self.allowed_codes[-1]

    def extra_repr(self) -> str:
        return f"{self.spec}, scale={self.scale_rule}" + (", per_channel=True" if self.per_channel else "")

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the whole tensor (0-d) or over all dims but 0 (shaped [C, 1, 1, ...])."""
        if not self.per_channel or t.dim() < 1:
            return t.sum()
        return t.reshape(t.shape[0], -1).sum(dim=1).reshape((t.shape[0],) + (1,) * (t.dim() - 1))

    def _count(self, w: torch.Tensor) -> int:
        return w[0].numel() if self.per_channel and w.dim() >= 1 else w.numel()

    def _max_abs(self, a: torch.Tensor) -> torch.Tensor:
        if not self.per_channel or a.dim() < 1:
            return a.max()
        return a.reshape(a.shape[0], -1).amax(dim=1).reshape((a.shape[0],) + (1,) * (a.dim() - 1))

    @torch.no_grad()
    def codes_and_scale(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes, float32 scale) with ``Q(w) == codes.float() * scale`` exactly; the scale is 0-d,
        or shaped ``[out_channels, 1, 1, ...]`` (broadcasting against ``w``) when per_channel."""
        if w.numel() == 0:
            raise QatSteError("cannot quantize an empty weight tensor", "quantize layers that have weights")
        w = w.detach().float()
        a = w.abs()
        if self.bits == 1:
            codes = torch.where(w >= 0, 1.0, -1.0)
            scale = self._reduce(a) / self._count(w)
        elif self.bits == "ternary":
            delta = TERNARY_THRESHOLD * self._reduce(a) / self._count(w)
            mask = (a > delta).float()
            codes = torch.sign(w) * mask
            count = self._reduce(mask)
            scale = torch.where(count > 0, self._reduce(a * mask) / count.clamp_min(1.0), 0.0)
        else:
            codes, scale = self._symmetric(w)
        return codes.to(torch.int8), scale.float()

    def _symmetric(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = float(self.max_code)
        scale = self._max_abs(w.abs()) / top

        def codes_for(s: torch.Tensor) -> torch.Tensor:
            safe = torch.where(s > 0, s, 1.0)
            return torch.clamp(torch.round(w / safe), -top, top)

        if self.scale_rule == "ls":
            for _ in range(LS_ITERATIONS):
                c = codes_for(scale)
                cc = self._reduce(c * c)
                scale = torch.where(cc > 0, self._reduce(w * c) / cc.clamp_min(1.0), scale)
        return codes_for(scale), scale

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Q(w) without a gradient, in ``w``'s dtype."""
        codes, scale = self.codes_and_scale(w)
        return (codes.float() * scale).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Q(w) in ``w``'s dtype; the gradient passes straight through (identity STE on weights)."""
        return cast(torch.Tensor, _StraightThrough.apply(w, self.quantize(w)))

    @torch.no_grad()
    def sign_change_share(self, w: torch.Tensor) -> float | None:
        """The share of weights whose code changed since the last :meth:`mark`; None before any."""
        if self.epoch_codes.numel() != w.numel():
            return None
        codes, _ = self.codes_and_scale(w)
        return float((codes.reshape(-1) != self.epoch_codes.to(codes.device).reshape(-1)).float().mean())

    @torch.no_grad()
    def mark(self, w: torch.Tensor) -> None:
        """Remember ``w``'s current codes as the reference of :meth:`sign_change_share`."""
        codes, _ = self.codes_and_scale(w)
        self.epoch_codes = codes.reshape(-1).to(self.epoch_codes.device)


class QuantWeightModule(nn.Module):
    """The base of the quantized-weight layers: ``weight_quantizer`` and ``quantized_weight()``
    (``isinstance(m, QuantWeightModule)`` finds them all)."""

    weight: torch.Tensor
    weight_quantizer: WeightQuantizer

    def quantized_weight(self) -> torch.Tensor:
        """Q(weight) without a gradient (what the layer computes with)."""
        return self.weight_quantizer.quantize(self.weight)


class _QuantWeightConv(QuantWeightModule):
    """The forward of the quantized-weight convolutions: the conv's own ``_conv_forward`` with Q(weight)."""

    _conv_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # nn.ConvNd's
    bias: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)


class QuantWeightConv1d(_QuantWeightConv, nn.Conv1d):
    """nn.Conv1d whose forward uses ``weight_quantizer(weight)``; ``weight`` stays the float parameter."""


class QuantWeightConv2d(_QuantWeightConv, nn.Conv2d):
    """nn.Conv2d whose forward uses ``weight_quantizer(weight)``; ``weight`` stays the float parameter."""


class QuantWeightConv3d(_QuantWeightConv, nn.Conv3d):
    """nn.Conv3d whose forward uses ``weight_quantizer(weight)``; ``weight`` stays the float parameter."""


class QuantWeightLinear(QuantWeightModule, nn.Linear):
    """nn.Linear whose forward uses ``weight_quantizer(weight)``; ``weight`` stays the float parameter."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_quantizer(self.weight), self.bias)


#: float layer type -> its quantized-weight version (exact types only: a subclass may not call forward)
QUANT_WEIGHT_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantWeightConv1d, nn.Conv2d: QuantWeightConv2d, nn.Conv3d: QuantWeightConv3d,
    nn.Linear: QuantWeightLinear,
}


def to_quant_weight(module: nn.Module, quantizer: WeightQuantizer) -> nn.Module:
    """Turn a float Conv1d/2d/3d or Linear into its quantized-weight version **in place** (same object,
    same parameter objects, hooks kept; only the class changes and ``weight_quantizer`` is added)."""
    new_type = QUANT_WEIGHT_TYPES.get(type(module))
    if new_type is None:
        raise QatSteError(f"cannot quantize the weights of a {type(module).__name__}",
                          f"weight quantization applies to {', '.join(t.__name__ for t in QUANT_WEIGHT_TYPES)}")
    quantizer.to(cast(torch.Tensor, module.weight).device)
    module.__class__ = new_type
    module.weight_quantizer = quantizer
    return module


def quant_weight_layers(model: nn.Module) -> list[tuple[str, QuantWeightModule]]:
    """(name, layer) for every quantized-weight layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWeightModule)]


def mark_epoch(model: nn.Module) -> None:
    """Remember every quantized layer's current codes (call at the start of each epoch): the report's
    share of weights whose code changed is measured against them. Does nothing without such layers."""
    for _, m in quant_weight_layers(model):
        m.weight_quantizer.mark(m.weight)

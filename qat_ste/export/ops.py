"""The export-time quantizer: a torch custom op that the dynamo ONNX exporter maps to Q/DQ.

During export every :class:`~qat_ste.QuantAct` routes its float value ``u`` through
``torch.ops.qat_ste.quant_dequant`` (each module is put in export mode with
:meth:`QuantAct.exporting <qat_ste.QuantAct.exporting>` for the duration of
:func:`export_routing`). The op computes exactly what QuantAct computes, and
:func:`translate_quant_dequant` lowers it to

    QuantizeLinear(uint8) -> [Clip(uint8, qmin, qmax) when the range is narrower than uint8] -> DequantizeLinear

Each QuantizeLinear carries node metadata ``qat_ste.site_index`` so that the post-passes can find
the nodes of every site. Ceil rounding has no QuantizeLinear equivalent; it is exported exactly as
``Ceil(u / alpha)`` followed by a QuantizeLinear with scale 1 (the input is already an integer)
and a DequantizeLinear with scale alpha.

Layers with quantized weights route ``weight_quantizer(weight)`` through
``torch.ops.qat_ste.weight_dequant`` (:func:`weight_routing`): the layer's int8 codes and scale,
computed once, lowered to DequantizeLinear(codes, scale[, axis=0]) tagged ``qat_ste.weight_index``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..nn_utils import preserve_modes
from ..quantizer.functional import quantize_codes
from ..quantizer.module import QuantAct, channel_axis_of

#: node metadata key on each QuantizeLinear: the index of its site in the export's site list
SITE_INDEX_KEY = "qat_ste.site_index"


def _per_channel_view(t: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * u.dim()
    shape[axis] = t.numel()
    return t.view(shape)


@torch.library.custom_op("qat_ste::quant_dequant", mutates_args=())
def quant_dequant(
    u: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dq_scale: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int,
    site: int,
) -> torch.Tensor:
    """``(clamp(round(u / scale) + z, qmin, qmax) - z) * dq_scale``; ``site`` only tags the ONNX node."""
    s = _per_channel_view(scale, u, axis)
    z = _per_channel_view(zero_point, u, axis)
    q = torch.clamp(torch.round(u.float() / s.float()) + z, qmin, qmax)
    return ((q - z) * _per_channel_view(dq_scale, u, axis)).to(u.dtype)


@quant_dequant.register_fake
def _quant_dequant_fake(u, scale, zero_point, dq_scale, qmin, qmax, axis, site):
    return torch.empty_like(u)


def _straight_through(ctx, grad):
    return grad, None, None, None, None, None, None, None


quant_dequant.register_autograd(_straight_through)


def translate_quant_dequant(u, scale, zero_point, dq_scale, qmin: int, qmax: int, axis: int, site: int):
    """onnxscript lowering of ``qat_ste::quant_dequant`` (uint8 containers; later passes may narrow them)."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18

    op: Any = opset18  # graph building: the values are the exporter's symbolic tensors, not onnx types
    zp = op.Cast(zero_point, to=ir.DataType.UINT8)
    q = op.QuantizeLinear(u, scale, zp, axis=axis)
    q.producer().metadata_props[SITE_INDEX_KEY] = str(site)
    if qmin > 0 or qmax < 255:
        q = op.Clip(q, op.Constant(value=ir.tensor(np.uint8(qmin))), op.Constant(value=ir.tensor(np.uint8(qmax))))
    return op.DequantizeLinear(q, dq_scale, zp, axis=axis)


#: marker ops the TorchScript exporter's symbolics emit (domain "qat_ste", attribute ``index``):
#: ``Site`` after a site's QuantizeLinear, ``WeightSite`` after a quantized weight's DequantizeLinear
SITE_MARKER, WEIGHT_MARKER = "Site", "WeightSite"


def _keep_traced_type(g: Any, value: Any) -> None:
    """Give ``value`` the type (dtype and shape) the traced op's output had: ONNX shape inference
    cannot see through the marker nodes."""
    original = getattr(g, "original_node", None)
    if original is not None and original.outputsSize() == 1:
        value.setType(original.output().type())


def _legacy_quant_dequant(g: Any, u: Any, scale: Any, zero_point: Any, dq_scale: Any, qmin: int, qmax: int,
                          axis: int, site: int) -> Any:
    """TorchScript-exporter symbolic of ``qat_ste::quant_dequant``: Q(uint8) -> Site marker ->
    [Clip] -> DQ, as the dynamo lowering (the marker stands for its node metadata)."""
    zp = g.op("Cast", zero_point, to_i=2)  # 2: onnx.TensorProto.UINT8
    q = g.op("QuantizeLinear", u, scale, zp, axis_i=axis)
    q = g.op(f"qat_ste::{SITE_MARKER}", q, index_i=site)
    q.setType(u.type().with_dtype(torch.uint8))
    if qmin > 0 or qmax < 255:
        lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=torch.uint8))
        hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8))
        q = g.op("Clip", q, lo, hi)
    out = g.op("DequantizeLinear", q, dq_scale, zp, axis_i=axis)
    _keep_traced_type(g, out)
    return out


def _legacy_weight_dequant(shapes: Mapping[int, tuple[int, ...]]) -> Callable:
    """TorchScript-exporter symbolic of ``qat_ste::weight_dequant``: DQ(codes, scale) -> WeightSite marker,
    typed with the layer's weight shape from ``shapes`` (the layer's own symbolic needs the kernel
    shape, which shape inference cannot see past the marker)."""
    def symbolic(g: Any, codes: Any, scale: Any, axis: int, layer: int) -> Any:
        out = g.op("DequantizeLinear", codes, scale, axis_i=axis)
        marked = g.op(f"qat_ste::{WEIGHT_MARKER}", out, index_i=layer)
        if layer in shapes:
            marked.inferTypeFrom(torch.empty(shapes[layer]))
        return marked
    return symbolic


def register_legacy_symbolics(weight_shapes: Mapping[int, tuple[int, ...]] | None = None) -> None:
    """Register the export ops' symbolics with the TorchScript exporter (from opset 18; registering
    again replaces them). ``weight_shapes``: {layer index: weight shape} of the model about to be exported."""
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    register_custom_op_symbolic(
        "qat_ste::quant_dequant", parse_args("v", "v", "v", "v", "i", "i", "i", "i")(_legacy_quant_dequant), 18)
    register_custom_op_symbolic(
        "qat_ste::weight_dequant", parse_args("v", "v", "i", "i")(_legacy_weight_dequant(dict(weight_shapes or {}))),
        18)


def translation_table() -> dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export``."""
    return {torch.ops.qat_ste.quant_dequant.default: translate_quant_dequant,
            torch.ops.qat_ste.weight_dequant.default: translate_weight_dequant}


@dataclass(frozen=True)
class RoutedSite:
    """One QuantAct as the export sees it."""

    index: int
    name: str
    module: QuantAct


def float_activation(module: QuantAct, u: torch.Tensor) -> torch.Tensor:
    """The float activation a site replaced (the float baseline for latency comparisons)."""
    if module.quantizes_input:
        return torch.clamp(u, 0.0, module.kind.upper)
    return u


def _routing_hook(index: int) -> Callable[[QuantAct, torch.Tensor], torch.Tensor]:
    def route(module: QuantAct, u: torch.Tensor) -> torch.Tensor:
        alpha = module.alpha.detach()
        zero_point = module.zero_point.detach().to(alpha.dtype)
        axis = channel_axis_of(u) % u.dim() if alpha.dim() == 1 else 0
        if module.rounding == "ceil":
            integer = torch.ceil(u.float() / _per_channel_view(alpha, u, axis).float())
            return torch.ops.qat_ste.quant_dequant(
                integer, torch.ones_like(alpha), zero_point, alpha, 0, module.levels, axis, index).to(u.dtype)
        return torch.ops.qat_ste.quant_dequant(u, alpha, zero_point, alpha, 0, module.levels, axis, index)

    return route


def quant_sites(model: nn.Module) -> list[RoutedSite]:
    """Every QuantAct of ``model`` in module order, with the index the export gives it."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAct)]
    return [RoutedSite(i, m.site or n, m) for i, (n, m) in enumerate(found)]


@contextlib.contextmanager
def export_routing(
    model: nn.Module, sites: list[RoutedSite], hook: Callable[[RoutedSite], Callable] | None = None
) -> Iterator[None]:
    """Within the block, every site of ``sites`` runs ``hook(site)`` (default: the Q/DQ custom op)
    and the model is in eval mode; both are restored on exit."""
    with preserve_modes(model, training=False), contextlib.ExitStack() as stack:
        for s in sites:
            stack.enter_context(s.module.exporting(hook(s) if hook is not None else _routing_hook(s.index)))
        yield


def reference_codes(module: QuantAct, u: torch.Tensor) -> torch.Tensor:
    """The integer codes PyTorch gives ``u`` at this site (float32 holding integers)."""
    alpha, zero_point = module.grid(u)
    return quantize_codes(u, alpha, zero_point, module.levels, module.rounding)


# ---- quantized weights ---------------------------------------------------------------------------

#: node metadata key on each weight DequantizeLinear: the index of its layer in the export's layer list
WEIGHT_INDEX_KEY = "qat_ste.weight_index"


@torch.library.custom_op("qat_ste::weight_dequant", mutates_args=())
def weight_dequant(codes: torch.Tensor, scale: torch.Tensor, axis: int, layer: int) -> torch.Tensor:
    """``codes * scale`` in float32 (``scale`` 0-d, or 1-D along ``axis``); ``layer`` only tags the ONNX node."""
    s = _per_channel_view(scale, codes, axis)
    return codes.float() * s.float()


@weight_dequant.register_fake
def _weight_dequant_fake(codes, scale, axis, layer):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def translate_weight_dequant(codes, scale, axis: int, layer: int):
    """onnxscript lowering of ``qat_ste::weight_dequant``: DequantizeLinear(int8 codes, scale)
    (no zero point: the codes are symmetric; later passes may narrow the container)."""
    from onnxscript import opset18

    op: Any = opset18
    out = op.DequantizeLinear(codes, scale, axis=axis)
    out.producer().metadata_props[WEIGHT_INDEX_KEY] = str(layer)
    return out


@dataclass(frozen=True)
class WeightLayer:
    """One layer with quantized weights as the export sees it: its codes and scale, computed once."""

    index: int
    name: str
    module: nn.Module
    spec: str                      # "binary", "ternary", "int{b}"
    allowed_codes: tuple[int, ...]
    codes: torch.Tensor            # int8, the weight's shape
    scale: torch.Tensor            # float32, 0-d or 1-D (one per output channel)
    axis: int | None               # 0 when per-channel

    def dequantized(self) -> torch.Tensor:
        """``codes * scale`` in float32 (what DequantizeLinear computes)."""
        return weight_dequant(self.codes, self.scale, self.axis or 0, self.index)


def weight_layers(model: nn.Module) -> list[WeightLayer]:
    """Every layer of ``model`` with a weight quantizer (module order), with its codes and scale."""
    from ..quantizer.weight import quant_weight_layers

    found = []
    for i, (name, m) in enumerate(quant_weight_layers(model)):
        quantizer = m.weight_quantizer
        codes, scale = quantizer.codes_and_scale(m.weight)
        per_channel = scale.dim() > 0
        found.append(WeightLayer(
            index=i, name=name, module=m, spec=str(quantizer.spec), allowed_codes=tuple(quantizer.allowed_codes),
            codes=codes.detach().to(torch.int8), scale=(scale.reshape(-1) if per_channel else scale).detach().float(),
            axis=0 if per_channel else None))
    return found


#: names of the temporary buffers that hold a layer's codes and scale during export
_CODES_BUFFER, _SCALE_BUFFER = "_qat_export_weight_codes", "_qat_export_weight_scale"


@contextlib.contextmanager
def weight_routing(layers: list[WeightLayer], quantized: bool = True) -> Iterator[None]:
    """Within the block, each layer's weight quantizer returns its codes through the export op
    (``quantized``) or the float weight unchanged (the float baseline); restored on exit."""
    def route(layer: WeightLayer) -> Callable[[torch.Tensor], torch.Tensor]:
        module: Any = layer.module

        def forward(w: torch.Tensor) -> torch.Tensor:
            if not quantized:
                return w
            out = torch.ops.qat_ste.weight_dequant(getattr(module, _CODES_BUFFER), getattr(module, _SCALE_BUFFER),
                                                   layer.axis or 0, layer.index)
            return out if out.dtype == w.dtype else out.to(w.dtype)
        return forward

    patched: list[Any] = []
    try:
        for layer in layers:
            quantizer: Any = layer.module.weight_quantizer
            # state-dict buffers, not constants: the TorchScript tracer folds an op on constant inputs
            layer.module.register_buffer(_CODES_BUFFER, layer.codes)
            layer.module.register_buffer(_SCALE_BUFFER, layer.scale)
            quantizer.forward = route(layer)
            patched.append((quantizer, layer.module))
        yield
    finally:
        for quantizer, module in patched:
            del quantizer.forward
            del module._buffers[_CODES_BUFFER], module._buffers[_SCALE_BUFFER]

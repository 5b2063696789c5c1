"""integer_reference(): a PyTorch model that computes what integer kernels compute.

For a model quantized with ``integer_graph=True`` and exported with int8 weights, ONNX Runtime runs
each convolution / linear layer as an integer kernel: integer input codes times int8 weights, summed
exactly in int32 with an int32 bias, then rescaled to the next quantizer's grid. The fake-quantized
PyTorch model instead sums float products in some order, and BatchNorm after the conv runs in
float: at rounding boundaries its codes differ, and deep networks drift apart end to end.

The reference closes that gap: BatchNorm is folded into the conv before it (as the exporter does);
each conv / linear layer whose input is the codes of one per-tensor quantizer keeps its folded weight
as per-channel symmetric int8 codes and scale (exactly as ``export_onnx(weight_format="int8")``), its
bias as int32 at scale ``s_in * s_w``, and computes ``(codes_in - zero_point) x int8 codes`` summed in
float64, which holds every such sum exactly (below 2^53), plus the bias, times ``s_in * s_w``. What
is left between the two runtimes is the float rescale of an exact integer (a relative 1e-7) and float
elementwise ops (pooling, float activations), so end-to-end codes agree almost everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QatSteError
from ..quantizer.module import QuantAct
from ..quantizer.weight import QuantWeightModule
from ..rewrite.engine import owner_graphs
from ..rewrite.fold import fold_batchnorm
from ..rewrite.integer_points import code_flow
from .weights import int8_per_channel

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class IntegerLayer(nn.Module):
    """A conv / linear layer evaluated as its integer kernel: exact integer sums, int32 bias."""

    weight_codes: torch.Tensor
    out_scale: torch.Tensor
    bias_codes: torch.Tensor | None
    multiplier: torch.Tensor

    def __init__(self, layer: Any, input_step: float, name: str, output: QuantAct | None = None) -> None:
        """``output``: the quantizer that reads the layer's result directly (a ReLU-family site or a
        point, per-tensor): the layer then requantizes to its grid as ONNX Runtime's QLinearConv /
        QGemm do, ``round(float32(acc) * float32(s_in * s_w / s_out))``, and returns those codes
        dequantized (which that quantizer maps back to the same codes)."""
        super().__init__()
        weight = layer.weight.detach().cpu().float().numpy()
        codes, scale = int8_per_channel(weight, axis=0)
        step = np.float32(input_step)
        bias_scale = (step * scale).astype(np.float32)  # as the exporter quantizes the bias
        device = layer.weight.device
        self.register_buffer("weight_codes", torch.from_numpy(codes.astype(np.float64)).to(device))
        self.register_buffer("out_scale", torch.from_numpy(step.astype(np.float64) * scale.astype(np.float64))
                             .to(device))
        if layer.bias is not None:
            b = layer.bias.detach().cpu().double().numpy()
            info = np.iinfo(np.int32)
            qb = np.clip(np.rint(b / bias_scale.astype(np.float64)), info.min, info.max)
            self.register_buffer("bias_codes", torch.from_numpy(qb).to(device))
        else:
            self.bias_codes = None
        self.input_step = float(input_step)
        self.name = name
        self.requant: tuple[float, int, int] | None = None  # (step, zero point, levels) of ``output``
        if output is not None and output.alpha.numel() == 1 and output.kind.family in ("relu", "point"):
            out_step = np.float32(output.alpha.detach().cpu())
            multiplier = (step * scale / out_step).astype(np.float32)  # float32, in ORT's order
            self.register_buffer("multiplier", torch.from_numpy(multiplier).to(device))
            self.requant = (float(out_step), int(output.zero_point.detach().reshape(())), output.levels)
        self.linear = isinstance(layer, nn.Linear)
        self.conv_args: dict[str, Any] = {} if self.linear else {
            "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        self.conv_fn: Callable[..., torch.Tensor] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(
            weight.ndim - 2, F.conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.round(x.float() / self.input_step).double()  # the input's (codes - zero point)
        if self.linear:
            acc = F.linear(codes, self.weight_codes)
            shape: tuple[int, ...] = (-1,)
        else:
            acc = self.conv_fn(codes, self.weight_codes, None, **self.conv_args)
            shape = (-1,) + (1,) * (acc.dim() - 2)
        if self.bias_codes is not None:
            acc = acc + self.bias_codes.view(shape)
        if self.requant is not None:
            out_step, zero_point, _ = self.requant
            # int32 -> float32, times the float32 multiplier, round half to even: MLAS's requantization
            codes_out = torch.round(acc.float() * self.multiplier.view(shape))
            codes_out = torch.clamp(codes_out, -zero_point, 255 - zero_point)  # the uint8 container
            return (codes_out * out_step).to(x.dtype)
        return (acc * self.out_scale.view(shape)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}: int8 x codes of step {self.input_step:.4g}, exact sums"


def integer_reference(model: nn.Module, example_input: Any) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` (quantized, calibrated) that evaluates as the integer kernels do (see the
    module docstring), and counts: ``folded`` BatchNorms, ``integer`` layers, ``float`` layers left as
    they are (their input is not the codes of one per-tensor quantizer, or their weights are quantized)."""
    if not any(isinstance(m, QuantAct) for m in model.modules()):
        raise QatSteError("integer_reference() needs a quantized model", "pass the model from qat_ste.quantize()")
    reference = copy.deepcopy(model).eval()
    folded = fold_batchnorm(reference, owner_graphs(reference))
    flow = code_flow(reference, example_input)
    swaps: dict[int, nn.Module] = {}
    left = 0
    for name, m in reference.named_modules():
        if not isinstance(m, _LAYERS) or isinstance(m, QuantWeightModule):
            continue
        producer = flow.producer.get(id(m))
        if producer is None or producer.alpha.numel() != 1:
            left += 1
            continue
        swaps[id(m)] = IntegerLayer(m, float(producer.alpha.detach()), name, flow.consumer.get(id(m)))
    for parent in list(reference.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                parent._modules[attr] = swaps[id(child)]
    return reference, {"folded": len(folded), "integer": len(swaps), "float": left}

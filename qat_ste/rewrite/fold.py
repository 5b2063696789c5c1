"""Fold BatchNorm into the convolution or linear layer before it (evaluation statistics), in place.

A BatchNorm layer that reads the output of a Conv1d/2d/3d or Linear (and nothing else reads it) is
an affine map per output channel: ``y = (conv(x) - mean) * gamma / sqrt(var + eps) + beta``. Folding
scales the conv's weight per output channel and gives it the bias ``(b - mean) * k + beta``; the
BatchNorm becomes an ``nn.Identity``. This is what an integer runtime executes (one integer conv with
an int32 bias), and what the ONNX exporter's optimizer does to the exported graph.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..quantizer.weight import QuantWeightModule

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_plain_norm(m: nn.Module) -> bool:
    """A torch BatchNorm with running statistics (a subclass may do more in forward: not folded)."""
    return type(m) in _NORMS and bool(m.track_running_stats) and m.running_mean is not None


def _is_plain_layer(m: nn.Module) -> bool:
    plain = type(m) in _LAYERS and getattr(m, "padding_mode", "zeros") == "zeros"
    return plain and not isinstance(m, QuantWeightModule)


def fold_into(conv: Any, norm: Any) -> None:
    """Fold ``norm`` (evaluation statistics) into ``conv`` in place (the conv gains a bias if it had none).

    The arithmetic is float32 in the order the ONNX exporter's optimizer uses (``k = gamma /
    sqrt(var + eps)``, ``w * k``, ``(b - mean) * k + beta``), so the folded weights equal the exported
    file's bit for bit.
    """
    with torch.no_grad():
        var, mean = norm.running_var.float(), norm.running_mean.float()
        gamma = norm.weight.detach().float() if norm.affine else torch.ones_like(var)
        beta = norm.bias.detach().float() if norm.affine else torch.zeros_like(var)
        k = gamma / torch.sqrt(var + torch.tensor(norm.eps, dtype=torch.float32))
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(var)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_((conv.weight.float() * k.view(shape)).to(conv.weight.dtype))
        new_bias = ((bias - mean) * k + beta).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module, graphs: dict[str, fx.Graph]) -> list[str]:
    """Fold every BatchNorm that only reads a conv's (or linear layer's) output into that layer, in place;
    the names of the folded BatchNorm modules. ``graphs``: the shallow FX trace of each owner, by module path (owners
    missing from it are left as they are). Each conv and norm must be called exactly once."""
    modules = dict(model.named_modules())
    calls: Counter = Counter()
    for path, graph in graphs.items():
        owner = modules[path]
        for node in graph.nodes:
            if node.op == "call_module":
                calls[id(owner.get_submodule(str(node.target)))] += 1
    folded = []
    for path, graph in graphs.items():
        owner = modules[path]
        for node in graph.nodes:
            pair = _conv_norm_pair(node, owner)
            if pair is None or calls[id(pair[0])] != 1 or calls[id(pair[1])] != 1:
                continue
            fold_into(*pair)
            parent_name, _, attr = str(node.target).rpartition(".")
            parent = owner.get_submodule(parent_name) if parent_name else owner
            parent._modules[attr] = nn.Identity()
            folded.append(f"{path}.{node.target}" if path else str(node.target))
    return folded


def _conv_norm_pair(node: fx.Node, owner: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(conv or linear layer, norm) when ``node`` calls a plain BatchNorm on the output of a plain conv or
    linear layer read by nothing else."""
    if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    norm = owner.get_submodule(str(node.target))
    source = node.args[0]
    if not _is_plain_norm(norm) or source.op != "call_module" or len(source.users) != 1:
        return None
    layer = owner.get_submodule(str(source.target))
    outputs = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    if not _is_plain_layer(layer) or outputs != norm.num_features:
        return None
    return layer, norm

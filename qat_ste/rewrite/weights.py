"""Weight quantization: which Conv/Linear layers get a WeightQuantizer, and the swap itself.

A layer is a candidate when its type is exactly nn.Conv1d/2d/3d or nn.Linear (a subclass may use its
weight elsewhere than in ``forward``, e.g. MultiheadAttention's ``out_proj``: it is reported and left
float). Candidates are named by their module path; the config's include / exclude patterns select them
and its overrides may change ``weight_bits`` (None: float), ``weight_scale`` and ``weight_per_channel``
per layer. The model's first and last candidate layers (module registration order: the stem and the
classifier of the usual models) stay float with ``keep_first_weights`` / ``keep_last_weights``, whatever
the patterns select. The swap changes each layer's class in place, so the
model keeps the same module and parameter objects and the same state_dict keys.
"""

from __future__ import annotations

import torch.nn as nn

from ..config import QuantConfig
from ..quantizer.weight import QUANT_WEIGHT_TYPES, QuantWeightModule, WeightQuantizer, to_quant_weight
from .report import WeightLayer

_FAMILIES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def wants_weights(cfg: QuantConfig) -> bool:
    """Whether ``cfg`` quantizes the weights of some layer (globally or through an override)."""
    return cfg.weight_bits is not None or any(o.get("weight_bits") is not None for o in cfg.overrides.values())


def quantize_weights(model: nn.Module, cfg: QuantConfig) -> list[WeightLayer]:
    """Give the selected Conv/Linear layers of ``model`` a WeightQuantizer (in place); one report row
    per candidate layer, quantized or left float (and why). Nothing happens (``[]``) unless ``cfg``
    asks for quantized weights."""
    if not wants_weights(cfg):
        return []
    rows: list[WeightLayer] = []
    candidates: list[tuple[WeightLayer, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightModule) or not isinstance(module, _FAMILIES):
            continue
        kind = type(module).__name__
        if type(module) not in QUANT_WEIGHT_TYPES:
            rows.append(WeightLayer(name, kind, cfg.weight_method, None,
                                    "a subclass of a torch layer (its weight may be used outside forward)"))
            continue
        row = WeightLayer(name, kind, cfg.weight_method, None)
        if not cfg.name_selected(name):
            row.reason = "not selected by include/exclude"
        elif cfg.for_site(name).weight_bits is None:
            row.reason = "weight_bits=None" + (" (override)" if cfg.weight_bits is not None else "")
        rows.append(row)
        candidates.append((row, module))
    if cfg.keep_first_weights and candidates and not candidates[0][0].reason:
        candidates[0][0].reason = "keep_first_weights: first weight layer left float"
    if cfg.keep_last_weights and candidates and not candidates[-1][0].reason:
        candidates[-1][0].reason = "keep_last_weights: last weight layer left float"
    for row, module in candidates:
        if row.reason:
            continue
        site = cfg.for_site(row.name)
        assert site.weight_bits is not None
        quantizer = WeightQuantizer(site.weight_bits, scale=site.weight_scale, per_channel=site.weight_per_channel)
        quantizer.method = cfg.weight_method
        quantizer.rho = cfg.bcgd_rho if cfg.weight_method == "bcgd" else 0.0
        layer = to_quant_weight(module, quantizer)
        assert isinstance(layer, QuantWeightModule)
        row.module = layer
    return rows

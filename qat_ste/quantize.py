"""The public entry points: quantize(), calibrate(), report() and friends."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import QuantConfig
from .errors import QatSteError
from .quantizer.alpha import INIT_METHODS
from .quantizer.module import QuantAct
from .rewrite.engine import analyse_and_rewrite
from .rewrite.report import QuantReport

REPORT_ATTR = "qat_ste_report"


def quantize(
    model: nn.Module,
    bits: int | None = None,
    ste: str | None = None,
    *,
    inplace: bool = False,
    example_input: Any = None,
    config: QuantConfig | None = None,
    **options: Any,
) -> nn.Module:
    """Return a copy of ``model`` (or ``model`` itself with ``inplace=True``) in which every
    activation call site is a quantized activation with the chosen STE (default 4 bits,
    ``clipped_relu``).

    ``options`` are the fields of :class:`QuantConfig` (``alpha``, ``alpha_init``, ``rounding``,
    ``per_channel``, ``include``, ``exclude``, ``overrides``, ``keep_first``, ``keep_last``,
    ``kinds``, ``quantize_gates``), or pass a ready ``config``. ``example_input`` (a tensor or a
    tuple of them) is used for one census forward pass when the rewrite needs it (modules FX
    cannot trace, keep_first/keep_last); without it a timm/zoo input size or 224x224 is tried.
    The report is ``qat_ste.report(result)``.
    """
    if not isinstance(model, nn.Module):
        raise QatSteError(f"quantize() takes a torch.nn.Module, got {type(model).__name__}",
                          "pass the model object, e.g. torchvision.models.resnet18()")
    if config is None:
        config = QuantConfig.from_kwargs(bits=4 if bits is None else bits,
                                         ste="clipped_relu" if ste is None else ste, **options)
    elif options or bits is not None or ste is not None:
        raise QatSteError("pass either config= or keyword options to quantize(), not both",
                          "put the options into the QuantConfig")
    if any(isinstance(m, QuantAct) for m in model.modules()):
        raise QatSteError("this model is already quantized (it contains QuantAct modules)",
                          "quantize the float model once; to change settings, quantize the float original again")
    target = model if inplace else copy.deepcopy(model)
    report = analyse_and_rewrite(target, config, example_input)
    object.__setattr__(target, REPORT_ATTR, report)
    return target


def report(model: nn.Module) -> QuantReport:
    """The report of a model returned by quantize(): per site name, original op, bits, STE, alpha."""
    rep = getattr(model, REPORT_ATTR, None)
    if rep is None:
        raise QatSteError("this model has no qat_ste report: it was not returned by qat_ste.quantize()",
                          "call qat_ste.quantize(model) first")
    return rep


def quant_modules(model: nn.Module) -> list[tuple[str, QuantAct]]:
    """(name, QuantAct) for every quantized activation site of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAct)]


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable steps alpha (to put into their own optimizer group, without weight decay)."""
    return [m.alpha for _, m in quant_modules(model) if isinstance(m.alpha, nn.Parameter)]


class AlphaProjector:
    """Clamps a model's learned steps into their valid ranges, one fused call per range.

    Build it once the steps exist (after calibration or loading, when the optimizer is built) and
    call it after every optimizer step: unlike project_alphas() it walks the model only once.
    """

    def __init__(self, model: nn.Module) -> None:
        self.groups: dict[tuple[float, float], list[torch.Tensor]] = {}
        for _, m in quant_modules(model):
            valid = m.alpha_range()
            if valid is not None:
                self.groups.setdefault(valid, []).append(m.alpha)

    @torch.no_grad()
    def __call__(self) -> None:
        for (lo, hi), alphas in self.groups.items():
            torch._foreach_clamp_min_(alphas, lo)
            if hi != float("inf"):
                torch._foreach_clamp_max_(alphas, hi)


def project_alphas(model: nn.Module) -> None:
    """Clamp learned steps to their valid range; call after each optimizer step."""
    AlphaProjector(model)()


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "mse",
    *,
    num_batches: int | None = None,
    include_fixed: bool = False,
) -> nn.Module:
    """Initialise every site's step alpha (and zero point) from calibration ``batches``.

    ``method``: ``mse`` (grid search of the step minimising the quantization error), ``percentile``
    (99.99th), ``gaussian`` (the half-Gaussian step times the std), ``lsq`` (2 mean|x| / sqrt(L)),
    ``max``. Each batch is a tensor, a tuple whose first item is the input, or a dict for
    ``model(**batch)``. Under torch.distributed the per-rank ranges are averaged, so all ranks
    start identical. Fixed-mode sites keep their constant unless ``include_fixed``.
    """
    if method not in INIT_METHODS:
        raise QatSteError(f"unknown calibration method {method!r}; known: {', '.join(INIT_METHODS)}",
                          "pass method= one of those")
    sites = [(n, m) for n, m in quant_modules(model) if include_fixed or m.alpha_mode != "fixed"]
    if not sites:
        return model
    samples: dict[int, list[torch.Tensor]] = {id(m): [] for _, m in sites}

    def observe(module: QuantAct, u: torch.Tensor) -> None:
        if id(module) in samples:
            samples[id(module)].append(module.samples_of(u))

    modes = {m: m.training for m in model.modules()}
    model.eval()
    for _, m in quant_modules(model):
        m._observer = observe
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            if isinstance(batch, dict):
                model(**batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
    finally:
        for _, m in quant_modules(model):
            m._observer = None
        for m, training in modes.items():
            m.training = training
    if seen == 0:
        raise QatSteError("calibrate() got no batches", "pass an iterable of input batches (e.g. a DataLoader)")
    missing = [n for n, m in sites if not samples[id(m)]]
    if len(missing) == len(sites):
        raise QatSteError(f"none of the {len(sites)} quantized sites saw data during calibration",
                          "calibrate with input batches that the model runs on")
    if missing:  # e.g. auxiliary heads that run in training mode only
        warnings.warn(f"{len(missing)} quantized site(s) saw no data in eval-mode calibration and keep "
                      f"their current step (a training-mode pass initialises them): {', '.join(missing[:5])}",
                      stacklevel=2)
    distributed = dist.is_available() and dist.is_initialized()
    for _, m in sites:
        if not samples[id(m)]:
            continue
        lo, hi = m.range_from(torch.cat(samples[id(m)], dim=1), method)
        if distributed:
            device = m.alpha.device if m.alpha.device.type != "cpu" or dist.get_backend() == "gloo" else torch.device("cuda")
            both = torch.stack([lo, hi]).to(device)
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            both = (both / dist.get_world_size()).cpu()
            lo, hi = both[0], both[1]
        m.set_range(lo, hi)
    return model

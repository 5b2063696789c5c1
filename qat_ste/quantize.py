"""The public entry points: quantize(), calibrate(), check_steps(), report() and friends."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import QuantConfig
from .errors import QatSteError
from .nn_utils import preserve_modes
from .quantizer.alpha import INIT_METHODS
from .quantizer.module import QuantAct
from .quantizer.weight import QuantWeightModule
from .rewrite.engine import add_integer_points, analyse_and_rewrite
from .rewrite.report import QuantReport
from .rewrite.weights import quantize_weights

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

    ``options`` are the fields of :class:`QuantConfig` (``alpha_mode``, ``step_init``,
    ``rounding``, ``per_channel``, ``include``, ``exclude``, ``overrides``, ``keep_first``,
    ``keep_last``, ``kinds``, ``quantize_gates``, ``kernel``; ``alpha`` and ``alpha_init`` are deprecated
    aliases of the first two; ``weight_bits``, ``weight_method``, ``bcgd_rho``, ``weight_scale``,
    ``weight_per_channel``, ``keep_first_weights``, ``keep_last_weights`` quantize the Conv/Linear
    weights too; ``integer_graph`` adds the quantization points of a fully integer graph; see
    :class:`QuantConfig`), or pass a ready ``config``. ``example_input`` (a tensor or a tuple
    of them) is used for one census forward pass when the rewrite needs it (modules FX cannot
    trace, keep_first/keep_last); without it a timm/zoo input size or 224x224 is tried.
    The report is ``qat_ste.report(result)``.
    """
    if not isinstance(model, nn.Module):
        raise QatSteError(f"quantize() takes a torch.nn.Module, got {type(model).__name__}",
                          "pass the model object, e.g. torchvision.models.resnet18()")
    _require_python_module(model, "quantize()")
    _require_materialised(model, "quantize()")
    if config is None:
        config = QuantConfig.from_kwargs(bits=4 if bits is None else bits,
                                         ste="clipped_relu" if ste is None else ste, **options)
    elif options or bits is not None or ste is not None:
        raise QatSteError("pass either config= or keyword options to quantize(), not both",
                          "put the options into the QuantConfig")
    if any(isinstance(m, (QuantAct, QuantWeightModule)) for m in model.modules()):
        raise QatSteError("this model is already quantized (it contains QuantAct or quantized-weight modules)",
                          "quantize the float model once; to change settings, quantize the float original again")
    target = model if inplace else copy.deepcopy(model)
    report = analyse_and_rewrite(target, config, example_input)
    if config.integer_graph:
        add_integer_points(target, config, example_input, report)
    report.weights = quantize_weights(target, config)
    for name, m in quant_modules(target):  # the implementation per site (overrides applied)
        m.kernel = config.for_site(m.site or name).kernel
    object.__setattr__(target, REPORT_ATTR, report)
    _check_steps(target)  # the model was checked for meta tensors above
    return target


def _require_python_module(model: nn.Module, where: str) -> None:
    """Refuse a TorchScript module: its forward is compiled code that the rewrite cannot see."""
    if isinstance(model, torch.jit.ScriptModule):
        raise QatSteError(
            f"{where} got a TorchScript module ({type(model).__name__}, made by torch.jit.script/trace); "
            "quantize() rewrites Python nn.Modules, and a TorchScript module's calls are not visible to it",
            "pass the original nn.Module, before torch.jit.script/trace")


def _require_materialised(model: nn.Module, where: str) -> None:
    """Refuse a model with tensors on the meta device (shapes without data)."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise QatSteError(
            f"{where}: {len(meta)} parameter(s)/buffer(s) of the model are on the meta device (no data): "
            f"{', '.join(meta[:5])}{' ...' if len(meta) > 5 else ''}",
            "materialise the model first: model.to_empty(device='cpu') (or your device), then load its "
            "weights with model.load_state_dict(...), and quantize / calibrate that model")


def report(model: nn.Module) -> QuantReport:
    """The report of a model returned by quantize(): per site name, original op, bits, STE, step."""
    rep = getattr(model, REPORT_ATTR, None)
    if rep is None:
        raise QatSteError("this model has no qat_ste report: it was not returned by qat_ste.quantize()",
                          "call qat_ste.quantize(model) first")
    return rep


def quant_modules(model: nn.Module) -> list[tuple[str, QuantAct]]:
    """(name, QuantAct) for every quantized activation site of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAct)]


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable steps (to put into their own optimizer group, without weight decay)."""
    return [m.alpha for _, m in quant_modules(model) if isinstance(m.alpha, nn.Parameter)]


class AlphaProjector:
    """Clamps a model's learned steps into their valid ranges, one fused call per range.

    Build it once (the steps keep their identity through calibration and loading) and call it
    after every optimizer step: unlike project_alphas() it walks the model only once.
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


def check_steps(model: nn.Module) -> None:
    """Raise :class:`QatSteError` naming every quantized site whose step is not a finite number
    > 0 (or whose zero point is not finite). quantize() and calibrate() call it; call it before
    training or exporting a model whose steps came from elsewhere."""
    _require_materialised(model, "check_steps()")
    _check_steps(model)


def _check_steps(model: nn.Module) -> None:
    """check_steps() for a model already known to be materialised (quantize() and calibrate() check that first)."""
    sites = quant_modules(model)
    if not sites:
        return
    with torch.no_grad():
        flags = [(~torch.isfinite(m.alpha) | (m.alpha <= 0)).any() | (~torch.isfinite(m.zero_point)).any()
                 for _, m in sites]
        if len({f.device for f in flags}) == 1:
            bad_flags = torch.stack(flags).tolist()
        else:
            bad_flags = [bool(f) for f in flags]
    bad = [_describe_step(name, m) for (name, m), is_bad in zip(sites, bad_flags, strict=True) if is_bad]
    if bad:
        raise QatSteError(
            f"{len(bad)} of {len(sites)} quantized site(s) have a step that is not a finite number > 0: "
            + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""),
            "initialise the steps again: qat_ste.calibrate(model, batches) on finite data, or load a "
            "checkpoint saved before they went bad (a too high learning rate for the steps can do this)")


def _describe_step(name: str, module: QuantAct) -> str:
    alpha = module.alpha.detach().float().cpu().flatten()
    zero_point = module.zero_point.detach().float().cpu().flatten()
    wrong = ~torch.isfinite(alpha) | (alpha <= 0)
    site = module.site or name
    if alpha.numel() == 1:
        text = f"{site} (step {alpha.item():g}"
    else:
        values = ", ".join(f"{v:g}" for v in alpha[wrong][:3].tolist())
        text = f"{site} ({int(wrong.sum())} of {alpha.numel()} channel steps wrong: {values}"
    if not torch.isfinite(zero_point).all():
        text += ", zero point not finite"
    return text + ")"


# ---- calibration ------------------------------------------------------------------------------


@dataclass
class _NonFinite:
    """The first calibration batch in which some quantized site saw non-finite values."""

    batch: int
    site: str
    counts: tuple[int, int, int]            # NaN, +Inf, -Inf at the first site in execution order
    numel: int
    later_sites: list[str] = field(default_factory=list)
    input_counts: tuple[int, int, int] | None = None  # in the batch's own tensors; None: not a tensor

    def error(self) -> QatSteError:
        nan, pos, neg = self.counts
        problem = (f"calibration batch {self.batch} (counting from 0) gives non-finite values at quantized site "
                   f"{self.site!r}: {nan} NaN, {pos} +Inf, {neg} -Inf of {self.numel} values")
        if self.later_sites:
            problem += (f", and at {len(self.later_sites)} later site(s) ({', '.join(self.later_sites[:3])}"
                        f"{' ...' if len(self.later_sites) > 3 else ''})")
        problem += "; calibration refuses non-finite data (the steps would become NaN/Inf)"
        if self.input_counts is not None and any(self.input_counts):
            i_nan, i_pos, i_neg = self.input_counts
            problem += f". The batch itself holds {i_nan} NaN, {i_pos} +Inf, {i_neg} -Inf"
            fix = ("clean the calibration data: check its preprocessing (a division by a zero std, a log of 0, "
                   "corrupt files) and repair or drop those samples; torch.isfinite(batch).all() finds them")
        else:
            problem += (". The batch itself is finite" if self.input_counts is not None else "")
            fix = (f"check the model's float outputs before site {self.site!r} on this batch (weights loaded "
                   "correctly? an overflow, e.g. in float16?); if the batch holds non-tensor data, check its "
                   "preprocessing too")
        return QatSteError(problem, fix)


def _nonfinite_counts(t: torch.Tensor) -> torch.Tensor:
    """(NaN, +Inf, -Inf) counts of ``t`` as a tensor on its device (no synchronisation)."""
    return torch.stack([torch.isnan(t).sum(), torch.isposinf(t).sum(), torch.isneginf(t).sum()])


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, dict):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return [first] if isinstance(first, torch.Tensor) else []


def _input_counts(batch: Any) -> tuple[int, int, int] | None:
    found = _batch_tensors(batch)
    if not found:
        return None
    tensors = [t for t in found if t.is_floating_point()]
    total = [0, 0, 0]
    for t in tensors:
        for i, c in enumerate(_nonfinite_counts(t).tolist()):
            total[i] += int(c)
    return total[0], total[1], total[2]


def _run_model(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    else:
        model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _observe(
    model: nn.Module, sites: list[tuple[str, QuantAct]], batches: Iterable[Any], num_batches: int | None,
    keep_going: bool,
) -> tuple[dict[int, list[torch.Tensor]], int, _NonFinite | None]:
    """Run the batches in eval mode with every site observing: its samples, the number of batches
    run, and the first batch that gave a site non-finite values (the loop stops there unless
    ``keep_going``, which data-parallel ranks need to reach the common collective)."""
    samples: dict[int, list[torch.Tensor]] = {id(m): [] for _, m in sites}
    names = {id(m): m.site or n for n, m in sites}
    counts: dict[int, torch.Tensor] = {}  # this batch's (NaN, +Inf, -Inf) per site, in call order
    numels: dict[int, int] = {}  # this batch's number of values per site

    def observe(module: QuantAct, u: torch.Tensor) -> None:
        key = id(module)
        if key in samples:
            samples[key].append(module.samples_of(u))
            c = _nonfinite_counts(u)
            counts[key] = counts[key] + c if key in counts else c
            numels[key] = numels.get(key, 0) + u.numel()

    fault: _NonFinite | None = None
    seen = 0
    with preserve_modes(model, training=False), contextlib.ExitStack() as stack:
        for _, m in quant_modules(model):
            stack.enter_context(m.observing(observe))
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            counts.clear()
            numels.clear()
            _run_model(model, batch)
            seen += 1
            if fault is None and counts:
                fault = _first_fault(seen - 1, batch, counts, numels, names)
                if fault is not None and not keep_going:
                    break
    return samples, seen, fault


def _first_fault(index: int, batch: Any, counts: dict[int, torch.Tensor], numels: dict[int, int],
                 names: dict[int, str]) -> _NonFinite | None:
    """A _NonFinite for this batch if some site saw non-finite values (one synchronisation)."""
    keys = list(counts)
    one_device = len({counts[k].device for k in keys}) == 1
    table = torch.stack([counts[k] if one_device else counts[k].cpu() for k in keys]).tolist()
    bad = [(k, row) for k, row in zip(keys, table, strict=True) if any(row)]
    if not bad:
        return None
    first, row = bad[0]
    return _NonFinite(index, names[first], (int(row[0]), int(row[1]), int(row[2])), numels[first],
                      [names[k] for k, _ in bad[1:]], _input_counts(batch))


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "mse",
    *,
    num_batches: int | None = None,
    include_fixed: bool = False,
) -> nn.Module:
    """Initialise every site's step (and zero point) from calibration ``batches``.

    ``method``: ``mse`` (grid search of the step minimising the quantization error), ``percentile``
    (99.99th), ``gaussian`` (the half-Gaussian step times the std), ``lsq`` (2 mean|x| / sqrt(L)),
    ``max``. Each batch is a tensor, a tuple whose first item is the input, or a dict for
    ``model(**batch)``. Non-finite values reaching a quantizer are refused (QatSteError naming the
    batch, the site and the counts); no step is changed then. Under torch.distributed the per-rank
    ranges are averaged in one collective, so all ranks start identical. Fixed-mode sites keep
    their constant unless ``include_fixed``. Ends with :func:`check_steps`.
    """
    if method not in INIT_METHODS:
        raise QatSteError(f"unknown calibration method {method!r}; known: {', '.join(INIT_METHODS)}",
                          "pass method= one of those")
    _require_python_module(model, "calibrate()")
    _require_materialised(model, "calibrate()")
    sites = [(n, m) for n, m in quant_modules(model) if include_fixed or m.alpha_mode != "fixed"]
    if not sites:
        _check_steps(model)
        return model
    distributed = dist.is_available() and dist.is_initialized()
    samples, seen, fault = _observe(model, sites, batches, num_batches, keep_going=distributed)
    if seen == 0:
        raise QatSteError("calibrate() got no batches", "pass an iterable of input batches (e.g. a DataLoader)")
    if fault is None:
        _warn_missing(sites, samples)
    ranges = _site_ranges(sites, samples, method, compute=fault is None)
    faults_elsewhere = 0
    if distributed:
        ranges, faults_elsewhere = _average_across_ranks(ranges, int(fault is not None))
    if fault is not None:
        raise fault.error()
    if faults_elsewhere:
        raise QatSteError(
            f"{faults_elsewhere} other rank(s) saw non-finite values in their calibration data; no step was set",
            "see the error of those ranks, which names the batch and the site, and clean their data")
    _set_ranges(ranges)
    _check_steps(model)
    return model


def _warn_missing(sites: list[tuple[str, QuantAct]], samples: dict[int, list[torch.Tensor]]) -> None:
    missing = [n for n, m in sites if not samples[id(m)]]
    if len(missing) == len(sites):
        raise QatSteError(f"none of the {len(sites)} quantized sites saw data during calibration",
                          "calibrate with input batches that the model runs on")
    if missing:  # e.g. auxiliary heads that run in training mode only
        warnings.warn(f"{len(missing)} quantized site(s) saw no data in eval-mode calibration and keep "
                      f"their current step (a training-mode pass initialises them): {', '.join(missing[:5])}",
                      stacklevel=3)


_Range = tuple[QuantAct, torch.Tensor, torch.Tensor]


def _site_ranges(sites: list[tuple[str, QuantAct]], samples: dict[int, list[torch.Tensor]], method: str,
                 compute: bool) -> list[_Range]:
    """(module, lo, hi) for every site that saw data; zeros of the right size when not ``compute``."""
    out: list[_Range] = []
    for _, m in sites:
        if not samples[id(m)]:
            continue
        if compute:
            lo, hi = m.range_from(torch.cat(samples[id(m)], dim=1), method)
        else:
            lo = hi = torch.zeros(samples[id(m)][0].shape[0])
        out.append((m, lo.float(), hi.float()))
    return out


def _average_across_ranks(ranges: list[_Range], faults: int) -> tuple[list[_Range], int]:
    """The ranges averaged over all ranks with ONE all-reduce (all sites' lo and hi and this rank's
    fault flag in one flat tensor), and the number of other ranks that saw non-finite data."""
    world = dist.get_world_size()
    sizes = [lo.numel() for _, lo, _ in ranges]
    flat = torch.cat([torch.tensor([float(faults)])] + [t.flatten() for _, lo, hi in ranges for t in (lo, hi)])
    device = ranges[0][0].alpha.device if ranges else torch.device("cpu")
    if device.type == "cpu" and "gloo" not in str(dist.get_backend()):
        device = torch.device("cuda")
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    faults_elsewhere = int(round(flat[0].item())) - faults
    values = flat[1:] / world
    out: list[_Range] = []
    offset = 0
    for (m, lo, hi), n in zip(ranges, sizes, strict=True):
        lo_avg, hi_avg = values[offset:offset + n], values[offset + n:offset + 2 * n]
        out.append((m, lo_avg.reshape(lo.shape), hi_avg.reshape(hi.shape)))
        offset += 2 * n
    return out, faults_elsewhere


def _set_ranges(ranges: list[_Range]) -> None:
    """Set every site's step from its range, after checking that all of them are finite."""
    if not ranges:
        return
    finite = torch.stack([torch.isfinite(lo).all() & torch.isfinite(hi).all() for _, lo, hi in ranges]).tolist()
    bad = [m.site or m.original for (m, _, _), ok in zip(ranges, finite, strict=True) if not ok]
    if bad:
        raise QatSteError(f"calibration gave non-finite ranges at {len(bad)} site(s): {', '.join(bad[:5])}; "
                          "no step was set", "calibrate with finite data (check the batches and the model's outputs)")
    for m, lo, hi in ranges:
        m.set_range(lo, hi)

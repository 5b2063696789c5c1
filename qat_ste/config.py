"""QuantConfig: every option of quantize() in one dataclass.

Vocabulary: ``alpha_mode`` is how the step is trained (``fixed``/``lsq``/``pact``/``bcgd``),
``step_init`` a given initial step. The former names ``alpha`` and ``alpha_init`` are accepted
for one release (constructor, :meth:`QuantConfig.from_kwargs`, :meth:`QuantConfig.from_dict`,
``overrides``, ``quantize(..., alpha=...)``) with a DeprecationWarning.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import QatSteError
from .kinds import GATE_KINDS, KIND_NAMES
from .quantizer.functional import ALPHA_MODES, ROUNDING_MODES, check_kernel
from .quantizer.weight import check_weight_bits, check_weight_scale
from .ste import STE, get_ste
from .validation import check_bits, check_choice, check_step_init

#: the per-site settings an override may change
SITE_OPTIONS = ("bits", "ste", "alpha_mode", "step_init", "rounding", "per_channel", "kernel",
                "weight_bits", "weight_scale", "weight_per_channel")
#: how quantized weights are trained: BCGD's blended update, or BinaryConnect (plain STE, rho = 0)
WEIGHT_METHODS = ("bcgd", "binaryconnect")
#: the weight-quantization fields and their defaults: to_dict() leaves them out at these values, so the
#: metadata of configs without quantized weights is what releases before them stored
WEIGHT_DEFAULTS: dict[str, Any] = {"weight_bits": None, "weight_method": "bcgd", "bcgd_rho": 1e-5,
                                   "weight_scale": "auto", "weight_per_channel": False,
                                   "keep_first_weights": True, "keep_last_weights": True}
#: fields added later that to_dict() also leaves out at their defaults (older metadata stays as it was)
LATER_DEFAULTS: dict[str, Any] = {"integer_graph": False}
#: deprecated option names -> current names (accepted for one release)
RENAMED_OPTIONS = {"alpha": "alpha_mode", "alpha_init": "step_init"}


def renamed_options(options: dict[str, Any], where: str, stacklevel: int = 3) -> dict[str, Any]:
    """``options`` with deprecated names replaced by the current ones (a DeprecationWarning for each).

    ``where`` names the caller in the messages (``QuantConfig``, ``override 'layer4.*'``...).
    """
    out = dict(options)
    for old, new in RENAMED_OPTIONS.items():
        if old not in out:
            continue
        if new in out:
            raise QatSteError(f"{where}: both {new!r} and its deprecated alias {old!r} are given",
                              f"pass {new}= only")
        warnings.warn(f"{where}: option {old!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=stacklevel)
        out[new] = out.pop(old)
    return out


@dataclass(frozen=True)
class _QuantFields:
    """The fields of QuantConfig and their validation (QuantConfig adds the deprecated aliases)."""

    bits: int = 4
    ste: str = "clipped_relu"
    alpha_mode: str = "lsq"
    step_init: float | None = None
    rounding: str = "nearest"
    per_channel: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_first: bool = False
    keep_last: bool = False
    kinds: tuple[str, ...] | None = None
    quantize_gates: bool = False
    kernel: str = "auto"
    weight_bits: int | str | None = None
    weight_method: str = "bcgd"
    bcgd_rho: float = 1e-5
    weight_scale: str = "auto"
    weight_per_channel: bool = False
    keep_first_weights: bool = True
    keep_last_weights: bool = True
    integer_graph: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        self._check_weight_fields()
        check_kernel(self.kernel)
        get_ste(self.ste)
        check_choice("alpha mode", self.alpha_mode, ALPHA_MODES)
        check_choice("rounding", self.rounding, ROUNDING_MODES)
        check_step_init(self.step_init)
        for name in ("include", "exclude", "kinds"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
        for k in self.kinds or ():
            if k not in KIND_NAMES:
                raise QatSteError(f"unknown activation kind {k!r}; known kinds: {', '.join(KIND_NAMES)}",
                                  "pass kinds= a list of those names")
        object.__setattr__(self, "overrides", self._checked_overrides())

    def _check_weight_fields(self) -> None:
        if self.weight_bits is not None:
            object.__setattr__(self, "weight_bits", check_weight_bits(self.weight_bits))
            check_weight_scale(self.weight_bits, self.weight_scale, "weight_scale")
        elif self.weight_scale not in ("auto", "mean", "ls", "max"):
            raise QatSteError(f"weight_scale={self.weight_scale!r} is not a scale rule",
                              "pass weight_scale= 'auto', 'mean', 'ls' or 'max'")
        check_choice("weight method", self.weight_method, WEIGHT_METHODS)
        rho = self.bcgd_rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
            raise QatSteError(f"bcgd_rho={rho!r}: BCGD's blending factor must be a number in [0, 1]",
                              "pass e.g. bcgd_rho=1e-5 (the paper's value); 0 is BinaryConnect")
        object.__setattr__(self, "bcgd_rho", float(rho))
        for name in ("weight_per_channel", "keep_first_weights", "keep_last_weights", "integer_graph"):
            if not isinstance(getattr(self, name), bool):
                raise QatSteError(f"{name}={getattr(self, name)!r} must be True or False", f"pass {name}=True/False")

    def _checked_overrides(self) -> dict[str, dict[str, Any]]:
        if not isinstance(self.overrides, dict):
            raise QatSteError("overrides must be a dict {site pattern: {option: value}}",
                              f"e.g. overrides={{'layer4.*': {{'bits': 8}}}}; options: {', '.join(SITE_OPTIONS)}")
        checked: dict[str, dict[str, Any]] = {}
        for pattern, opts in self.overrides.items():
            if not isinstance(opts, dict):
                raise QatSteError(f"override {pattern!r} is {type(opts).__name__}, not a dict of options",
                                  f"e.g. overrides={{{pattern!r}: {{'bits': 8}}}}")
            opts = renamed_options(opts, f"override {pattern!r}", stacklevel=6)
            bad = [k for k in opts if k not in SITE_OPTIONS]
            if bad:
                raise QatSteError(f"override {pattern!r} sets unknown option(s) {bad}",
                                  f"per-site options are: {', '.join(SITE_OPTIONS)}")
            replace(self, overrides={}, **opts)  # validates the values
            checked[pattern] = opts
        return checked


class QuantConfig(_QuantFields):
    """How quantize() rewrites a model.

    - ``bits``, ``ste``, ``alpha_mode`` (``fixed``/``lsq``/``pact``/``bcgd``), ``step_init`` (a
      step, or None to calibrate / use the fixed-mode default), ``rounding`` (``nearest``/``ceil``),
      ``per_channel``: the quantizer at every site.
    - ``include`` / ``exclude``: glob patterns on site names (``layer1.*``); a site is quantized if it
      matches some include pattern (all, when None) and no exclude pattern.
    - ``overrides``: ``{pattern: {option: value}}`` per-site changes of the options above; later
      patterns win.
    - ``keep_first`` / ``keep_last``: leave the first / last activation (in execution order) float.
    - ``kinds``: which activation kinds to touch (default: all but the gates); ``quantize_gates``
      adds Sigmoid/Hardsigmoid/Softmax.
    - ``weight_bits``: quantize the weights of Conv1d/2d/3d and Linear layers too: 1 (binary), ``"ternary"``
      or 2..8 bits (None, the default: float weights); ``weight_scale`` (``auto``/``mean``/``ls``/``max``,
      see :class:`~qat_ste.quantizer.weight.WeightQuantizer`), ``weight_per_channel`` (one scale per
      output channel); ``weight_method`` how they train: ``bcgd`` (blend ``w <- (1-rho) w + rho Q(w)``
      before each optimizer step, ``bcgd_rho`` = 1e-5 as the paper's code) or ``binaryconnect`` (plain
      STE on the weights). The include/exclude patterns and the overrides' ``weight_bits`` /
      ``weight_scale`` / ``weight_per_channel`` apply to the layers' module paths;
      ``keep_first_weights`` / ``keep_last_weights`` (default True) leave the model's first / last
      Conv/Linear layer (module registration order) float.
    - ``integer_graph``: add the quantization points a fully integer runtime needs (8 bits, kind
      ``point``: the graph input, the non-activation inputs of residual adds / muls / concats, the
      inputs of matmuls and of convolutions / linear layers that are not codes yet, e.g. after average
      pooling), so that every Conv / Gemm / MatMul can run as an integer kernel and QAT trains what is
      deployed. Export such a model with ``export_onnx(..., weight_format="int8")``. The points are
      sites like the others: named ``..._point``, in the report, subject to include / exclude /
      overrides (``bits``: their bits instead of 8).
    - ``kernel``: which implementation runs the quantizers: ``auto`` (the fused Triton kernels on
      CUDA tensors, torch elsewhere), ``triton`` or ``torch``. An execution detail, not part of the
      model: the state_dict is the same, and a checkpoint saved with one loads with the other.

    ``alpha`` and ``alpha_init`` are deprecated aliases of ``alpha_mode`` and ``step_init``
    (keywords and read-only properties). :meth:`to_dict` / :meth:`from_dict` store the whole
    config as plain JSON values.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **renamed_options(kwargs, "QuantConfig"))

    @property
    def alpha(self) -> str:
        """Deprecated: the former name of :attr:`alpha_mode`."""
        warnings.warn("QuantConfig.alpha is deprecated, use .alpha_mode", DeprecationWarning, stacklevel=2)
        return self.alpha_mode

    @property
    def alpha_init(self) -> float | None:
        """Deprecated: the former name of :attr:`step_init`."""
        warnings.warn("QuantConfig.alpha_init is deprecated, use .step_init", DeprecationWarning, stacklevel=2)
        return self.step_init

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> QuantConfig:
        """A config from quantize()'s keyword options; unknown names are refused with the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known - set(RENAMED_OPTIONS))
        if unknown:
            raise QatSteError(f"unknown quantize() option(s): {', '.join(unknown)}",
                              f"known options: {', '.join(sorted(known))}")
        return cls(**renamed_options(kwargs, "quantize()", stacklevel=4))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values (lists for tuples, the STE's name); ``kernel`` only when
        it is not the default ``auto`` (an execution detail: what a checkpoint stored before the
        option existed, and readable by releases without it), the weight fields only where they
        differ from their defaults (:data:`WEIGHT_DEFAULTS`), ``integer_graph`` only when True."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name == "kernel" and value == "auto") or (
                    f.name in WEIGHT_DEFAULTS and value == WEIGHT_DEFAULTS[f.name]
                    and type(value) is type(WEIGHT_DEFAULTS[f.name])) or (
                    f.name in LATER_DEFAULTS and value is LATER_DEFAULTS[f.name]):
                continue
            if isinstance(value, STE):
                value = value.name
            elif isinstance(value, tuple):
                value = list(value)
            elif f.name == "overrides":
                value = {p: {k: (v.name if isinstance(v, STE) else v) for k, v in o.items()} for p, o in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """The config stored by :meth:`to_dict` (missing fields take their defaults; the deprecated
        names ``alpha`` / ``alpha_init`` are accepted, e.g. from older checkpoints)."""
        if not isinstance(data, dict):
            raise QatSteError(f"a stored quantization config must be a dict, got {type(data).__name__}",
                              "pass the dict written by QuantConfig.to_dict()")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - set(RENAMED_OPTIONS))
        if unknown:
            raise QatSteError(f"the stored quantization config has unknown field(s): {', '.join(unknown)}",
                              f"known fields: {', '.join(sorted(known))} (was it written by a newer qat_ste?)")
        values = renamed_options(data, "stored QuantConfig", stacklevel=4)
        if isinstance(values.get("overrides"), dict):
            values["overrides"] = {p: dict(o) if isinstance(o, dict) else o for p, o in values["overrides"].items()}
        return cls(**values)

    def kind_enabled(self, kind_name: str, family: str) -> bool:
        """Whether activations of this kind (and family) are quantized."""
        if self.kinds is not None:
            return kind_name in self.kinds
        return family != "gate" or self.quantize_gates or kind_name not in GATE_KINDS

    def name_selected(self, site: str) -> bool:
        """Whether the include / exclude patterns select the site named ``site``."""
        if self.include is not None and not any(fnmatch.fnmatchcase(site, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(site, p) for p in self.exclude)

    def with_kernel(self, kernel: str) -> QuantConfig:
        """This config with ``kernel`` at every site (per-site kernel overrides dropped): e.g. to run
        a checkpoint trained with ``kernel="triton"`` on a machine without a GPU."""
        check_kernel(kernel)
        overrides = {p: {k: v for k, v in o.items() if k != "kernel"} for p, o in self.overrides.items()}
        return replace(self, kernel=kernel, overrides={p: o for p, o in overrides.items() if o})

    def for_site(self, site: str) -> QuantConfig:
        """This config with the overrides whose pattern matches ``site`` applied."""
        cfg = self
        for pattern, opts in self.overrides.items():
            if fnmatch.fnmatchcase(site, pattern):
                cfg = replace(cfg, overrides={}, **opts)
        return cfg


def _signature() -> inspect.Signature:
    """QuantConfig's call signature for help() and editors: the fields, then the deprecated aliases."""
    fields_sig = inspect.signature(_QuantFields)
    aliases = [inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=None) for old in RENAMED_OPTIONS]
    return fields_sig.replace(parameters=[*fields_sig.parameters.values(), *aliases])


QuantConfig.__signature__ = _signature()  # type: ignore[attr-defined]

"""QuantConfig: every option of quantize() in one dataclass."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import QatSteError
from .quantizer.functional import ALPHA_MODES, ROUNDING_MODES
from .quantizer.module import check_alpha_init, check_bits, check_choice
from .rewrite.activations import GATE_KINDS, KIND_NAMES
from .ste import get_ste

#: the per-site settings an override may change
SITE_OPTIONS = ("bits", "ste", "alpha", "alpha_init", "rounding", "per_channel")


@dataclass(frozen=True)
class QuantConfig:
    """How quantize() rewrites a model.

    - ``bits``, ``ste``, ``alpha`` (``fixed``/``lsq``/``pact``/``bcgd``), ``alpha_init`` (a step,
      or None to calibrate / use the fixed-mode default), ``rounding`` (``nearest``/``ceil``),
      ``per_channel``: the quantizer at every site.
    - ``include`` / ``exclude``: glob patterns on site names (``layer1.*``); a site is quantized if it
      matches some include pattern (all, when None) and no exclude pattern.
    - ``overrides``: ``{pattern: {option: value}}`` per-site changes of the options above; later
      patterns win.
    - ``keep_first`` / ``keep_last``: leave the first / last activation (in execution order) float.
    - ``kinds``: which activation kinds to touch (default: all but the gates); ``quantize_gates``
      adds Sigmoid/Hardsigmoid/Softmax.
    """

    bits: int = 4
    ste: str = "clipped_relu"
    alpha: str = "lsq"
    alpha_init: float | None = None
    rounding: str = "nearest"
    per_channel: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_first: bool = False
    keep_last: bool = False
    kinds: tuple[str, ...] | None = None
    quantize_gates: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        get_ste(self.ste)
        check_choice("alpha mode", self.alpha, ALPHA_MODES)
        check_choice("rounding", self.rounding, ROUNDING_MODES)
        check_alpha_init(self.alpha_init)
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
        if not isinstance(self.overrides, dict):
            raise QatSteError("overrides must be a dict {site pattern: {option: value}}",
                              f"e.g. overrides={{'layer4.*': {{'bits': 8}}}}; options: {', '.join(SITE_OPTIONS)}")
        for pattern, opts in self.overrides.items():
            bad = [k for k in opts if k not in SITE_OPTIONS]
            if bad:
                raise QatSteError(f"override {pattern!r} sets unknown option(s) {bad}",
                                  f"per-site options are: {', '.join(SITE_OPTIONS)}")
            replace(self, overrides={}, **opts)  # validates the values

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise QatSteError(f"unknown quantize() option(s): {', '.join(unknown)}",
                              f"known options: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def kind_enabled(self, kind_name: str, family: str) -> bool:
        if self.kinds is not None:
            return kind_name in self.kinds
        return family != "gate" or self.quantize_gates or kind_name not in GATE_KINDS

    def name_selected(self, site: str) -> bool:
        if self.include is not None and not any(fnmatch.fnmatchcase(site, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(site, p) for p in self.exclude)

    def for_site(self, site: str) -> "QuantConfig":
        """This config with the overrides whose pattern matches ``site`` applied."""
        cfg = self
        for pattern, opts in self.overrides.items():
            if fnmatch.fnmatchcase(site, pattern):
                cfg = replace(cfg, overrides={}, **opts)
        return cfg

"""The rewrite's report: one row per activation call site, quantized or left float (and why), and
when weights are quantized one row per Conv/Linear layer (:class:`WeightLayer`).

Each row gives the site's ``alpha_mode`` (how its step is trained) and its ``step`` (the value:
a number, one per channel, or None while uninitialised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..quantizer.module import QuantAct
from ..quantizer.weight import QuantWeightModule


@dataclass
class Site:
    """One activation call site of a quantized model."""

    name: str                   # where its QuantAct lives in the model (dotted path)
    owner: str                  # the module whose forward makes the call
    original: str               # the float op it replaces: nn.ReLU, F.relu, Tensor.relu_, timm.GELU...
    kind: str                   # activation kind (relu, gelu, sigmoid...)
    method: str                 # module swap / fx rewrite / runtime fallback
    module: QuantAct | None     # None when left float
    reason: str = ""            # why it was left float
    order: int | None = None    # position in execution order (census run), if known

    @property
    def quantized(self) -> bool:
        return self.module is not None

    def row(self) -> dict[str, Any]:
        """The site as plain values (``step``: the step value, None when float or uninitialised)."""
        q = self.module
        step = None
        if q is not None and q.is_initialized:
            a = q.alpha.detach().float().cpu()
            step = round(a.item(), 6) if a.numel() == 1 else [round(v, 6) for v in a.tolist()]
        return {
            "site": self.name, "original": self.original, "kind": self.kind, "method": self.method,
            "quantized": self.quantized,
            "bits": q.bits if q else None, "ste": q.ste.name if q else None,
            "alpha_mode": q.alpha_mode if q else None, "step": step,
            "zero_point": (int(q.zero_point.flatten()[0]) if q is not None and q.zero_point.numel() else None),
            "reason": self.reason,
        }


@dataclass
class WeightLayer:
    """One Conv/Linear layer considered for weight quantization."""

    name: str                           # module path
    type: str                           # Conv2d, Linear...
    method: str                         # bcgd / binaryconnect (how quantized weights train)
    module: QuantWeightModule | None    # None when left float
    reason: str = ""                    # why it was left float

    @property
    def quantized(self) -> bool:
        return self.module is not None

    def row(self) -> dict[str, Any]:
        """The layer as plain values, measured now: ``scale`` (a number, or one per output channel) and
        ``sign_change`` (the share of weights whose code changed since the last ``mark_epoch``; None
        before one)."""
        m = self.module
        out: dict[str, Any] = {"layer": self.name, "type": self.type, "quantized": m is not None,
                               "weight_bits": None, "spec": None, "scale": None, "per_channel": None,
                               "sign_change": None, "method": None, "rho": None, "reason": self.reason}
        if m is None:
            return out
        q = m.weight_quantizer
        _, scale = q.codes_and_scale(m.weight)
        values = scale.cpu().flatten()
        share = q.sign_change_share(m.weight)
        out.update(weight_bits=q.bits, spec=q.spec, per_channel=q.per_channel, method=q.method, rho=q.rho,
                   scale=round(values.item(), 6) if scale.dim() == 0 else [round(v, 6) for v in values.tolist()],
                   sign_change=None if share is None else round(share, 6))
        return out


def _weight_table(layers: list[WeightLayer]) -> list[str]:
    """The fixed-width table of the weight layers (with its summary line)."""
    head = ("weight layer", "type", "weights", "scale", "changed", "method / reason")
    rows = []
    for layer in layers:
        r = layer.row()
        if layer.quantized:
            scale = r["scale"]
            scale_text = f"{scale:.4g}" if isinstance(scale, float) else f"[{len(scale)} ch]"
            changed = "n/a" if r["sign_change"] is None else f"{100 * r['sign_change']:.2f}%"
            method = r["method"] + (f" rho={r['rho']:g}" if r["method"] == "bcgd" else "")
            rows.append((layer.name, layer.type, r["spec"], scale_text, changed, method))
        else:
            rows.append((layer.name, layer.type, "float", "-", "-", layer.reason))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    quantized = sum(1 for layer in layers if layer.quantized)
    return ([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
            + [f"{quantized} weight layer(s) quantized, {len(layers) - quantized} left float"])


@dataclass
class QuantReport:
    """What quantize() did: every site, the modules it could not trace, and the census count."""

    sites: list[Site] = field(default_factory=list)
    untraced: dict[str, str] = field(default_factory=dict)
    census_calls: int | None = None
    weights: list[WeightLayer] = field(default_factory=list)  # empty unless weights are quantized
    #: integer_graph: the owners that got no quantization points although they may need some, and why
    points_skipped: dict[str, str] = field(default_factory=dict)

    @property
    def quantized(self) -> list[Site]:
        return [s for s in self.sites if s.quantized]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if not s.quantized]

    def methods(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.quantized:
            out[s.method] = out.get(s.method, 0) + 1
        return out

    def implementations(self, device: Any = None) -> dict[str, str]:
        """Per quantized site, which quantizer runs on ``device`` (default: where its step lives):
        ``triton``, ``torch``, ``torch (user STE)`` (a user-registered STE always runs in torch), or
        ``unavailable: ...`` where ``kernel="triton"`` cannot run."""
        return {s.name: s.module.implementation(device) for s in self.sites if s.module is not None}

    def kernel_counts(self, device: Any = None) -> dict[str, int]:
        """How many quantized sites run each implementation (see :meth:`implementations`)."""
        counts: dict[str, int] = {}
        for kernel in self.implementations(device).values():
            counts[kernel] = counts.get(kernel, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The report as plain values; ``weights`` (one row per Conv/Linear layer) only when the
        model's weights are quantized."""
        out = {"sites": [s.row() for s in self.sites], "untraced": dict(self.untraced),
               "census_calls": self.census_calls, "quantized": len(self.quantized),
               "left_float": len(self.skipped), "methods": self.methods()}
        if self.weights:
            out["weights"] = [w.row() for w in self.weights]
        if self.points_skipped:
            out["points_skipped"] = dict(self.points_skipped)
        return out

    @property
    def points(self) -> list[Site]:
        """The quantization points of an integer graph (kind ``point``)."""
        return [s for s in self.sites if s.kind == "point"]

    def table(self, max_rows: int | None = None) -> str:
        """The report as a fixed-width text table."""
        head = ("site", "original", "bits", "ste", "step", "method / reason")
        rows = []
        for s in self.sites[:max_rows]:
            r = s.row()
            if s.quantized:
                a = r["step"]
                a_text = "uninit" if a is None else (f"{a:.4g}" if isinstance(a, float) else f"[{len(a)} ch]")
                rows.append((s.name, s.original, str(r["bits"]), r["ste"], f"{r['alpha_mode']}:{a_text}", s.method))
            else:
                rows.append((s.name, s.original, "-", "-", "float", s.reason))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        out = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
        if max_rows is not None and len(self.sites) > max_rows:
            out.append(f"... {len(self.sites) - max_rows} more")
        summary = f"{len(self.quantized)} quantized, {len(self.skipped)} left float"
        methods = ", ".join(f"{k}: {v}" for k, v in self.methods().items())
        out.append(f"{summary} ({methods})" if methods else summary)
        kernels = self.kernel_counts()
        if len(kernels) > 1 or any(k not in ("triton", "torch") for k in kernels):  # a fallback: say so
            out.append("quantizer kernel: " + ", ".join(f"{k} at {n} site(s)" for k, n in kernels.items()))
        if self.untraced:
            out.append(f"{len(self.untraced)} module(s) not FX-traceable, handled at run time if they call activations")
        points = self.points
        if points:
            out.append(f"integer graph: {sum(s.quantized for s in points)} quantization point(s) (kind 'point') "
                       "where integer ops read tensors that are not codes")
        for path, why in self.points_skipped.items():
            out.append(f"integer graph: no points inside {path or '<root>'}: {why}")
        if self.weights:
            out += [""] + _weight_table(self.weights)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

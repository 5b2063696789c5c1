"""Figures *given the file's codes* (check_onnx()'s chained figures).

Through a whole network PyTorch and a runtime do not compute bit-identical codes: float
convolutions accumulate in another order, a value within an ulp of a rounding boundary rounds the
other way, and in a deep network with random (or badly conditioned) weights that one code moves the
next layers' values across other boundaries. The end-to-end figures then measure the model's
sensitivity to float rounding as much as the export.

The chained run separates the two. PyTorch runs the model with every quantized site's output
replaced by the codes the file computed at that site (exposed as extra graph outputs), so each
segment between two sites starts from the same integers in both runtimes:

- chained code agreement: the share of PyTorch's codes, computed from the file's upstream codes,
  equal to the file's or one apart at a rounding tie: PyTorch's u/step within ``TIE_STEPS`` +
  ``TIE_RELATIVE`` x |u/step| of a rounding boundary, where one segment's float rounding, or a
  runtime's approximate exp/erf (ORT's softmax differs from PyTorch's by up to ~5e-5 relative), rounds
  it the other way. A correct export differs nowhere else; a wrong weight, bias, padding, scale or op
  makes whole layers differ.
- the task's figure and the output drift of that run against the file's outputs.

A site whose file codes are missing or shaped otherwise (a selection that kept other proposals)
keeps PyTorch's own codes there (counted as not forced).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..quantizer.functional import quantize_codes
from .ops import RoutedSite

#: a code one apart from the file's is a rounding tie where PyTorch's u/step lies within
#: TIE_STEPS + TIE_RELATIVE * |u/step| of a rounding boundary
TIE_STEPS = 1e-3
TIE_RELATIVE = 2e-4


@dataclass
class ChainedCounts:
    """One site's codes in the chained run, over the batches."""

    values: int = 0     # codes compared (the file had codes of the same shape)
    equal: int = 0      # of those, PyTorch's codes (from the file's upstream codes) equal to the file's
    ties: int = 0       # one apart at a rounding tie (see TIE_STEPS)
    unforced: int = 0   # values where the file had no codes of that shape: PyTorch kept its own

    @property
    def agreement(self) -> float:
        """The share of codes equal, or one apart at a rounding tie."""
        return (self.equal + self.ties) / self.values if self.values else 1.0


def pooled_agreement(counts: Mapping[str, ChainedCounts]) -> float:
    """The chained code agreement of all sites pooled (1.0 when nothing was compared)."""
    values = sum(c.values for c in counts.values())
    return sum(c.equal + c.ties for c in counts.values()) / values if values else 1.0


def chained_notes(counts: Mapping[str, ChainedCounts]) -> list[str]:
    """Report notes on the codes counted as rounding ties and on sites that kept PyTorch's own codes."""
    notes = []
    ties = sum(c.ties for c in counts.values())
    if ties:
        notes.append(f"{ties} code(s) given the file's upstream codes are one apart at a rounding tie (PyTorch's "
                     f"u/step within {TIE_STEPS:g} + {TIE_RELATIVE:g} x |u/step| of a rounding boundary): counted "
                     "as agreeing")
    unforced = {name: c.unforced for name, c in counts.items() if c.unforced}
    if unforced:
        notes.append(f"{sum(unforced.values())} value(s) at site(s) {', '.join(list(unforced)[:5])} kept PyTorch's "
                     "own codes in the run given the file's codes (the file had none of that shape there)")
    return notes


def step_ratio(u: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """u / step in float64."""
    return u.double() / step.detach().to(u.device).double()


def boundary_distance(rounding: str, ratio: torch.Tensor) -> torch.Tensor:
    """|u/step - the nearest rounding boundary| for ``ratio`` = u/step (:func:`step_ratio`): the
    boundaries are half-way points for nearest rounding, integers for ceil."""
    boundary = ratio.floor() + 0.5 if rounding == "nearest" else ratio.round()
    return (ratio - boundary).abs()


def file_codes(values: Mapping[str, np.ndarray], occurrences: Sequence[Any], codes_as: Mapping[str, str]
               ) -> list[np.ndarray | None]:
    """The file's codes of each occurrence of one site (None where the run did not expose them)."""
    return [values.get(codes_as.get(t.codes, ""), None) for t in occurrences]


def forcing_hook(codes_by_site: Mapping[str, list[np.ndarray | None]], counts: dict[str, ChainedCounts]
                 ) -> Callable[[RoutedSite], Callable]:
    """An export_routing() hook: the k-th call of a site outputs the file's codes of that site's
    k-th occurrence, dequantized with the model's own step and zero point, after counting how many of
    PyTorch's codes for the same call agree with them."""
    calls: dict[str, int] = {}

    def for_site(site: RoutedSite) -> Callable:
        def run(module: Any, u: torch.Tensor) -> torch.Tensor:
            k = calls.get(site.name, 0)
            calls[site.name] = k + 1
            count = counts.setdefault(site.name, ChainedCounts())
            step, zero_point = module.grid(u)  # one grid() for the codes and the output (reference_codes' math)
            own = quantize_codes(u, step, zero_point, module.levels, module.rounding)
            given = codes_by_site.get(site.name, [])
            theirs = given[k] if k < len(given) else None
            if theirs is None or tuple(theirs.shape) != tuple(u.shape):
                count.unforced += own.numel()
                return ((own - zero_point) * step).to(u.dtype)
            codes = torch.from_numpy(np.asarray(theirs).astype(np.float32)).to(u.device)
            count.values += own.numel()
            equal = own == codes
            count.equal += int(equal.sum())
            if not bool(equal.all()):
                ratio = step_ratio(u, step)
                near = boundary_distance(module.rounding, ratio) <= TIE_STEPS + TIE_RELATIVE * ratio.abs()
                count.ties += int((~equal & near & ((own - codes).abs() == 1)).sum())
            return ((codes - zero_point) * step).to(u.dtype)
        return run
    return for_site

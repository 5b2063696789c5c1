"""Small helpers on nn.Modules that several layers need (base layer: imports only torch and errors).

- :func:`preserve_modes`: put a model in train or eval mode for a block and restore every module's
  own ``training`` flag afterwards (a mixed state, e.g. frozen BatchNorm, comes back as it was).
- :func:`logits_of`: the class scores in a model's output (a tensor, a dict/object with ``logits``,
  or a tuple/list whose first item holds them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from .errors import QatSteError

__all__ = ["logits_of", "preserve_modes"]


@contextlib.contextmanager
def preserve_modes(model: nn.Module, training: bool | None = False) -> Iterator[nn.Module]:
    """Within the block ``model.train(training)`` (``None``: leave the mode as it is); on exit every
    submodule gets back the ``training`` flag it had before, whatever happened inside."""
    modes = {module: module.training for module in model.modules()}
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for module, was_training in modes.items():
            module.training = was_training


def logits_of(output: Any) -> torch.Tensor:
    """The class scores of a model's output: a tensor; a dict or object with ``logits``; or the first
    tensor of a tuple/list/dict (e.g. GoogLeNet's training-mode namedtuple, Inception's aux pair)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if "logits" in output:
            return logits_of(output["logits"])
        values = list(output.values())
        if values:
            return logits_of(values[0])
    elif hasattr(output, "logits"):
        return logits_of(output.logits)
    elif isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise QatSteError(f"the model returned {type(output).__name__}, not class scores",
                      "use a classifier whose forward returns a tensor of logits (N x classes)")

"""BatchNorm policy for fine-tuning: freeze the running statistics after a number of steps.

From optimizer step ``freeze_bn_after_steps`` on, every BatchNorm layer (SyncBatchNorm and timm's
BatchNorm+activation layers included) runs in eval mode during training: it normalises with its
running mean and variance and no longer updates them, while its affine weight and bias are still
trained. The switch depends only on the step count, so a resumed run freezes at the same step.
Small fine-tuning batches give noisy batch statistics; a pretrained network's running statistics are
a better estimate, and freezing them makes training and evaluation normalise alike.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import QatSteError

__all__ = ["BatchNormFreeze", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` (BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BatchNormFreeze:
    """Puts the BatchNorm layers of ``model`` in eval mode once ``after_steps`` steps are done
    (None: never)."""

    def __init__(self, model: nn.Module, after_steps: int | None) -> None:
        if after_steps is not None and (isinstance(after_steps, bool) or not isinstance(after_steps, int)
                                        or after_steps < 0):
            raise QatSteError(f"freeze_bn_after_steps={after_steps!r} must be an integer >= 0 or None",
                              "pass e.g. freeze_bn_after_steps=100 (--freeze-bn-after 100)")
        self.after_steps = after_steps
        self.layers = batchnorm_layers(model) if after_steps is not None else []

    def frozen(self, step: int) -> bool:
        """Whether the statistics are frozen at optimizer step ``step`` (0-based: the step about to run)."""
        return self.after_steps is not None and step >= self.after_steps

    def before_step(self, step: int) -> None:
        """Call before the forward pass of step ``step`` (after the model was put in training mode)."""
        if self.frozen(step):
            for layer in self.layers:
                if layer.training:
                    layer.eval()

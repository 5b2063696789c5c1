"""Test helpers shared by several test modules (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import signal

import torch


class SignalAt(torch.nn.Module):
    """Wraps ``inner`` and sends ``signum`` to this process at training-mode forward call ``at``
    (never when ``at`` is -1): a real signal, handled by the training loop's stop request."""

    def __init__(self, inner: torch.nn.Module, at: int, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.inner, self.at, self.signum, self.calls = inner, at, signum, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(self.signum)
        return self.inner(x)

"""The learning rate a training run logs for an epoch is the one that epoch trained at (it was the
next step's, so one epoch late at a milestone and 0 after the last epoch of a cosine schedule)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from qat_ste.data import load_dataset
from qat_ste.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def _run(capsys, **settings) -> tuple[list[dict], str]:
    data = load_dataset("synthetic", "train", size=8, n=64)
    config = TrainConfig(batch_size=16, progress=False, print_summary=False, plot=False, device="cpu", **settings)
    result = train(_tiny(), data, None, config)
    return result.history, capsys.readouterr().out


def test_multistep_epoch_logs_the_lr_it_trained_at(capsys):
    history, printed = _run(capsys, epochs=3, lr=0.1, schedule="multistep", milestones=(1, 2), gamma=0.5)
    assert [row["lr"] for row in history] == [pytest.approx(0.1, rel=1e-12), pytest.approx(0.05, rel=1e-12),
                                              pytest.approx(0.025, rel=1e-12)]
    assert "epoch 1/3  lr 0.1  " in printed and "epoch 3/3  lr 0.025  " in printed


def test_last_cosine_epoch_logs_its_mean_lr_not_zero(capsys):
    history, printed = _run(capsys, epochs=1, lr=0.1, schedule="cosine")
    steps = 4  # 64 images / batch 16
    expected = 0.1 * sum(0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)) / steps
    assert history[0]["lr"] == pytest.approx(expected, rel=1e-12)  # 0.0625, not the 0 after the last step
    assert "epoch 1/1  lr 0.0625  " in printed


def test_logged_lr_matches_the_optimizer_lr_of_each_step(capsys):
    """The mean of the LRs the optimizer really used during each epoch (warmup, then multistep)."""
    seen: list[float] = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = spy  # type: ignore[method-assign]
    try:
        history, _ = _run(capsys, epochs=2, lr=0.2, schedule="multistep", milestones=(1,), gamma=0.1,
                          warmup_epochs=0.5)
    finally:
        torch.optim.SGD.step = original  # type: ignore[method-assign]
    assert len(seen) == 8
    for epoch, row in enumerate(history):
        assert row["lr"] == pytest.approx(sum(seen[4 * epoch:4 * epoch + 4]) / 4, rel=1e-12), epoch

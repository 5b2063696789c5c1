"""Exact resume: a run stopped mid-epoch (stop_after_steps, a crash, Ctrl-C) and resumed from
last.pt ends with weights equal (torch.equal) to an uninterrupted run; checkpoints are written
atomically, and a missing, corrupt or foreign checkpoint is a clear error."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qat_ste
from qat_ste.errors import QatSteError
from qat_ste.train import TrainConfig, load_checkpoint, train
from qat_ste.train import checkpoint as checkpoint_module
from qat_ste.train.data import load_dataset

EPOCHS, BATCH = 3, 32  # 256 images -> 8 steps per epoch, 24 in all


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread is fastest


def make_model(seed: int = 0) -> nn.Module:
    """A quantized CNN with BatchNorm (buffers), dropout (global RNG) and learned steps (LSQ)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 10),
    )
    return qat_ste.quantize(net, bits=3, alpha="lsq", example_input=torch.randn(1, 3, 16, 16))


class Crash(nn.Module):
    """Raises ``error`` at training-mode forward call ``at`` (the step number)."""

    def __init__(self, inner: nn.Module, at: int, error: BaseException) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.error = error
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                if isinstance(self.error, KeyboardInterrupt):
                    signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, handled by the engine
                else:
                    raise self.error
        return self.inner(x)


@pytest.fixture(scope="module")
def data():
    train_set = load_dataset("synthetic", "train", size=16, n=256, augment=True)
    val_set = load_dataset("synthetic", "val", size=16, n=128)
    return train_set, val_set


def config(out_dir: Path, **overrides) -> TrainConfig:
    values = dict(epochs=EPOCHS, batch_size=BATCH, lr=0.05, warmup_epochs=0.5, schedule="cosine",
                  out_dir=str(out_dir), progress=False, print_summary=False, plot=False,
                  calibrate_batches=2, calibrate_method="percentile")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: (final state dict, history)."""
    model = make_model()
    result = train(model, *data, config(tmp_path_factory.mktemp("reference")))
    assert result.steps == EPOCHS * 8 and not result.stopped_early
    return {k: v.clone() for k, v in model.state_dict().items()}, result.history


def assert_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), f"{key} differs after resume"


def history_without_timing(history):
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "epoch_time_s")} for row in history]


@pytest.mark.parametrize("stop_at", [11, 8])  # mid-epoch 2, and exactly at the end of epoch 1
def test_stop_after_steps_then_resume_is_exact(data, reference, tmp_path, stop_at):
    first = train(make_model(), *data, config(tmp_path, stop_after_steps=stop_at))
    assert first.stopped_early and first.steps == stop_at and "stop_after_steps" in first.stop_reason
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == stop_at
    model = make_model(seed=123)  # a different initialisation: everything must come from last.pt
    second = train(model, *data, config(tmp_path, resume=True))
    assert second.steps == EPOCHS * 8 and not second.stopped_early
    assert_same_weights(model.state_dict(), reference[0])
    assert history_without_timing(second.history) == history_without_timing(reference[1])
    csv_rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + EPOCHS  # no row lost or repeated across the restart


def test_crash_then_resume_from_periodic_checkpoint_is_exact(data, reference, tmp_path):
    crashing = Crash(make_model(), at=14, error=RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing, *data, config(tmp_path, checkpoint_every_steps=3))
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 12  # steps 3, 6, 9, 12 were saved
    model = make_model(seed=5)
    resumed = Crash(model, at=-1, error=RuntimeError("never"))  # same module tree as the crashed run
    train(resumed, *data, config(tmp_path, resume=str(tmp_path / "last.pt"), checkpoint_every_steps=3))
    assert_same_weights(model.state_dict(), reference[0])


def test_ctrl_c_stops_after_the_step_and_resume_is_exact(data, reference, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    stopped = train(Crash(make_model(), at=19, error=KeyboardInterrupt()), *data, config(tmp_path))
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert stopped.stopped_early and "Ctrl-C" in stopped.stop_reason and stopped.steps == 19
    model = make_model(seed=9)
    train(Crash(model, at=-1, error=KeyboardInterrupt()), *data, config(tmp_path, resume=True))
    assert_same_weights(model.state_dict(), reference[0])


def test_resuming_a_finished_run_changes_nothing(data, tmp_path):
    model = make_model()
    done = train(model, *data, config(tmp_path, epochs=1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again_model = make_model(seed=3)
    again = train(again_model, *data, config(tmp_path, epochs=1, resume=True))
    assert again.steps == done.steps and again.history == done.history
    assert_same_weights(again_model.state_dict(), weights)


# ---- atomic writes and unreadable checkpoints ---------------------------------------------------


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    checkpoint_module.atomic_save({"format": checkpoint_module.CHECKPOINT_FORMAT, "model": {}, "v": 1}, target)
    original = target.read_bytes()

    def failing_save(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 partial data")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.atomic_save({"v": 2}, target)
    assert target.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


@pytest.mark.filterwarnings("ignore:resuming with settings that differ")
def test_interrupted_training_write_keeps_previous_last_pt(data, tmp_path, monkeypatch):
    train(make_model(), *data, config(tmp_path, epochs=1))
    good = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def killed_midway(obj, stream, *args, **kwargs):
        real_save(obj, stream, *args, **kwargs)
        stream.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), *data, config(tmp_path, epochs=2, resume=True))
    assert (tmp_path / "last.pt").read_bytes() == good
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.filterwarnings("ignore:resuming with settings that differ")
def test_missing_corrupt_and_foreign_checkpoints_are_clear_errors(data, tmp_path):
    train(make_model(), *data, config(tmp_path, epochs=1))
    good = tmp_path / "last.pt"
    with pytest.raises(QatSteError, match="does not exist") as missing:
        load_checkpoint(tmp_path / "nope.pt")
    assert missing.value.fix
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(QatSteError, match="cannot read checkpoint") as corrupt:
        train(make_model(), *data, config(tmp_path, resume=str(truncated)))
    assert "start afresh" in str(corrupt.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(QatSteError, match="cannot read checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(QatSteError, match="not a qat_ste training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(QatSteError, match="resume=True needs out_dir"):
        train(make_model(), *data, TrainConfig(resume=True, progress=False, print_summary=False))
    with pytest.raises(QatSteError, match="does not fit this model: .*unexpected"):
        other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
        train(other, *data, config(tmp_path, resume=str(good)))


def test_resume_with_a_different_batch_size_is_refused(data, tmp_path):
    train(make_model(), *data, config(tmp_path, stop_after_steps=3))
    with pytest.raises(QatSteError, match="batch_size"), pytest.warns(UserWarning, match="differ"):
        train(make_model(), *data, config(tmp_path, resume=True, batch_size=16))

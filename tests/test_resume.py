"""Exact resume: a run stopped mid-epoch (stop_after_steps, a crash, Ctrl-C) and resumed from
last.pt ends with weights equal (torch.equal) to an uninterrupted run; checkpoints are written
atomically, and a missing, corrupt or foreign checkpoint is a clear error."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import SignalAt

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
    return qat_ste.quantize(net, bits=3, alpha_mode="lsq", example_input=torch.randn(1, 3, 16, 16))


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
    values = {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.05, "warmup_epochs": 0.5, "schedule": "cosine",
              "out_dir": str(out_dir), "progress": False, "print_summary": False, "plot": False,
              "calibrate_batches": 2, "calibrate_method": "percentile"}
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


# ---- integrity: damaged and hostile checkpoints ---------------------------------------------------


def flip(data: bytes, offset: int, count: int = 64) -> bytes:
    """``data`` with ``count`` bytes from ``offset`` inverted."""
    out = bytearray(data)
    for index in range(offset, min(offset + count, len(out))):
        out[index] ^= 0xFF
    return bytes(out)


def header_offsets(path: Path) -> list[int]:
    """Where a zip's headers are: the first local header, a data member's local header, the central
    directory, the end record and the last bytes (the stored digest)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        directory = archive.start_dir
    data_member = next(i for i in infos if "/data/" in i.filename)
    size = path.stat().st_size
    return [0, data_member.header_offset, data_member.header_offset + 30, directory, directory + 46,
            size - 120, size - 64, size - 22, size - 1]


def largest_member_data(path: Path) -> int:
    """The offset of the first byte of the largest tensor member's data."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length


@pytest.mark.filterwarnings("ignore:resuming with settings that differ")
def test_flipped_bytes_anywhere_are_refused_naming_the_intact_alternative(data, tmp_path):
    import random

    train(make_model(), *data, config(tmp_path, epochs=1))
    good = (tmp_path / "last.pt").read_bytes()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8  # intact: loads
    rng = random.Random(8)
    offsets = sorted(rng.sample(range(len(good) - 64), 12)) + header_offsets(tmp_path / "last.pt")
    damaged = tmp_path / "last.pt"
    for offset in offsets:
        damaged.write_bytes(flip(good, offset))
        with pytest.raises(QatSteError) as refused:
            load_checkpoint(damaged)
        text = str(refused.value)
        assert f"cannot read checkpoint {damaged}: the file is damaged" in text, (offset, text)
        assert f"intact checkpoint beside it, {tmp_path / 'best.pt'}" in text, (offset, text)
    damaged.write_bytes(flip(good, largest_member_data(tmp_path / "best.pt") + 16))
    with pytest.raises(QatSteError, match="CRC mismatch in member archive/data/"):
        load_checkpoint(damaged)
    with pytest.raises(QatSteError, match="the file is damaged"):  # resuming from it is refused too
        train(make_model(), *data, config(tmp_path, resume=True))


def test_a_damaged_checkpoint_alone_says_to_start_afresh(data, tmp_path):
    train(make_model(), *data, config(tmp_path / "run", epochs=1))
    lone = tmp_path / "lone" / "last.pt"
    lone.parent.mkdir()
    source = tmp_path / "run" / "last.pt"
    lone.write_bytes(flip(source.read_bytes(), largest_member_data(source)))
    with pytest.raises(QatSteError, match="CRC mismatch") as refused:
        load_checkpoint(lone)
    assert "no intact checkpoint is beside it: start afresh" in str(refused.value)


class Hostile:
    """Pickles to a call of ``function(*arguments)`` when unpickled without weights_only."""

    def __init__(self, function, *arguments) -> None:
        self.call = (function, arguments)

    def __reduce__(self):
        return self.call


class Plain:
    pass


@pytest.mark.parametrize("payload, name", [
    (lambda marker: Hostile(__import__("os").system, f"touch {marker}"), r"global (posix|nt|os)\.system"),
    (lambda marker: Hostile(exec, f"open({str(marker)!r}, 'w')"), r"global exec"),
    (lambda marker: Plain(), r"global tests\.test_resume\.Plain|global test_resume\.Plain"),
], ids=["os.system", "exec", "a class"])
def test_hostile_checkpoint_is_refused_as_unsafe_not_damaged(tmp_path, payload, name):
    marker = tmp_path / "code_ran"
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoint_module.CHECKPOINT_FORMAT, "model": {"w": payload(marker)}}, path)
    with pytest.raises(QatSteError) as refused:
        load_checkpoint(path)
    text = str(refused.value)
    assert f"refused: checkpoint {path} contains code/objects that are not plain tensors (" in text
    import re

    assert re.search(name, text), text
    assert "weights_only" not in text and "damaged" not in text and "truncated" not in text
    assert not marker.exists()


# ---- full disk, stale temporary files ---------------------------------------------------------------


class FullDisk:
    """A file object that takes ``room`` bytes, then fails as a full device does."""

    def __init__(self, stream, room: int) -> None:
        self.stream, self.room = stream, room

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self.room:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


@pytest.mark.parametrize("room", [0, 300, 4000])
def test_full_disk_while_saving_is_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch, room):
    import os

    from qat_ste import atomic

    target = tmp_path / "last.pt"
    atomic.atomic_save({"format": checkpoint_module.CHECKPOINT_FORMAT, "model": {}, "v": 1}, target)
    original = target.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k), room))
    with pytest.raises(QatSteError) as full:
        atomic.atomic_save({"model": {"w": torch.zeros(5000)}}, target)
    text = str(full.value)
    assert f"no space left on device while writing {target} (" in text and " bytes free); the previous last.pt " \
           "is intact" in text, text
    assert "inline_container" not in text and "--out" in full.value.fix
    assert target.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temporary file is removed
    with pytest.raises(QatSteError, match=f"writing {tmp_path / 'new.json'} .*no new.json was written"):
        atomic.atomic_write_json(tmp_path / "new.json", {"a": "b" * 5000})


def test_stale_temporary_files_are_removed_and_live_ones_kept(data, tmp_path):
    import os
    import subprocess
    import sys

    from qat_ste.atomic import remove_stale_temp_files

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid is free
    names = {
        "dead": f".last.pt.{gone.pid}.0123abcd.tmp", "own": f".model.onnx.{os.getpid()}.89abcdef.tmp",
        "live": f".best.pt.{os.getppid()}.fedcba98.tmp", "other": ".notes.tmp", "kept": "last.pt",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    staging = tmp_path / f".big.onnx.{gone.pid}.0123abcd.tmpdir"  # export_onnx's model + data file, killed
    staging.mkdir()
    (staging / "big.onnx.data").write_bytes(b"partial")
    (tmp_path / f".x.onnx.{gone.pid}.0123abcd.tmp.d").mkdir()  # not a staging folder's name: kept
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["own"], staging.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["live"], names["other"], names["kept"], f".x.onnx.{gone.pid}.0123abcd.tmp.d"])
    (tmp_path / f".x.onnx.{gone.pid}.0123abcd.tmp.d").rmdir()
    (tmp_path / names["dead"]).write_bytes(b"partial")  # left by a killed run: the next run removes it
    (tmp_path / "last.pt").unlink()
    train(make_model(), *data, config(tmp_path, epochs=1))
    assert not (tmp_path / names["dead"]).exists() and (tmp_path / names["live"]).exists()
    assert remove_stale_temp_files(tmp_path / "missing") == []


# ---- SIGTERM ----------------------------------------------------------------------------------------


def test_sigterm_stops_after_the_step_saves_and_resume_is_exact(data, reference, tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stopped = train(SignalAt(make_model(), 13, signal.SIGTERM), *data, config(tmp_path))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert stopped.stopped_early and stopped.stop_reason == "SIGTERM" and stopped.steps == 13
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 13
    printed = capsys.readouterr().out
    assert f"stopped (SIGTERM) at step 13; saved {tmp_path / 'last.pt'}: to continue, run again with " \
           "resume=True (qat-ste convert --resume)" in printed
    model = make_model(seed=4)
    train(SignalAt(model, -1, signal.SIGTERM), *data, config(tmp_path, resume=True))
    assert_same_weights(model.state_dict(), reference[0])


def test_a_signal_after_the_last_step_is_delivered_once_the_handlers_are_back():
    from qat_ste.train.engine import _StopRequest

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with _StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.signal == "SIGTERM" and received == []  # held until the run can stop
        assert received == [signal.SIGTERM]  # never swallowed
        with _StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)
            stop.handled = True  # the run stopped for it: not raised again
        assert received == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt), _StopRequest():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # a second signal interrupts at once
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- resume with another model, data or quantization ----------------------------------------------


def test_resume_with_changed_quantization_or_model_is_refused_unless_forced(data, tmp_path):
    meta = {"model": "zoo:x", "data": "synthetic", "quant": {"bits": 3, "ste": "clipped_relu", "alpha": "lsq"},
            "num_classes": 10, "in_channels": 3, "image_size": (16, 16), "stage": "qat", "title": "t"}
    train(make_model(), *data, config(tmp_path, stop_after_steps=3), metadata=meta)
    changed = {**meta, "quant": {**meta["quant"], "bits": 2}, "model": "zoo:y", "title": "other"}
    with pytest.raises(QatSteError) as refused:
        train(make_model(), *data, config(tmp_path, resume=True), metadata=changed)
    text = str(refused.value)
    assert f"checkpoint {tmp_path / 'last.pt'} was written for a different run: model: 'zoo:x' -> 'zoo:y'; " \
           "quant.bits: 3 -> 2" in text, text
    assert "pass --force-resume (TrainConfig.force_resume=True) to resume anyway, or use another --out" in text
    assert "title" not in text  # only what defines the model, data and quantization counts
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3  # nothing was written
    train(make_model(), *data, config(tmp_path / "same", stop_after_steps=3), metadata=meta)
    same = train(make_model(), *data, config(tmp_path / "same", resume=True), metadata={**meta, "title": "x"})
    assert same.steps == EPOCHS * 8  # the same run resumes without a word
    with pytest.warns(UserWarning, match="quant.bits: 3 -> 2; resuming anyway"):
        forced = train(make_model(), *data, config(tmp_path, resume=True, force_resume=True), metadata=changed)
    assert forced.steps == EPOCHS * 8


def test_resume_with_another_quantizer_kernel_is_allowed(tmp_path):
    from qat_ste.train.run_state import check_resume_metadata

    saved = {"model": "zoo:x", "quant": {"bits": 4, "kernel": "triton"}}
    check_resume_metadata(saved, {"model": "zoo:x", "quant": {"bits": 4, "kernel": "torch"}}, TrainConfig(),
                          tmp_path / "last.pt")  # the kernel changes how it runs, not what it trains
    check_resume_metadata(saved, {"model": "zoo:x", "quant": {"bits": 4}}, TrainConfig(), tmp_path / "last.pt")
    with pytest.raises(QatSteError, match="quant.bits: 4 -> 3"):
        check_resume_metadata(saved, {"model": "zoo:x", "quant": {"bits": 3, "kernel": "torch"}}, TrainConfig(),
                              tmp_path / "last.pt")


def test_resume_with_changed_calibration_is_refused(data, tmp_path):
    meta = {"model": "zoo:x", "stage": "qat", "calibration": {"method": "percentile", "batches": 2}}
    train(make_model(), *data, config(tmp_path, stop_after_steps=3), metadata=meta)
    changed = {**meta, "calibration": {"method": "mse", "batches": 2}}
    with pytest.raises(QatSteError) as refused:
        train(make_model(), *data, config(tmp_path, resume=True), metadata=changed)
    assert f"checkpoint {tmp_path / 'last.pt'} was written for a different run: calibration.method: " \
           "'percentile' -> 'mse'" in str(refused.value)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3  # nothing was written
    resumed = train(make_model(), *data, config(tmp_path, resume=True), metadata=meta)
    assert resumed.steps == EPOCHS * 8


# ---- the LR schedule on resume ----------------------------------------------------------------------


def test_resume_from_a_checkpoint_with_a_lambdalr_schedule_is_exact(data, reference, tmp_path):
    """Checkpoints written before the schedule used torch's schedulers hold a LambdaLR state: the
    schedule is stepped to the saved step instead, and the run still ends as an uninterrupted one."""
    from qat_ste.train.optim import lr_factor

    train(make_model(), *data, config(tmp_path, stop_after_steps=11))
    state = load_checkpoint(tmp_path / "last.pt")
    groups = len(state["optimizer"]["param_groups"])
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=0.05)
    old = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config(tmp_path), 8))
    for _ in range(11):
        optimizer.step()
        old.step()
    state["scheduler"] = old.state_dict()
    assert "lr_lambdas" in state["scheduler"]
    checkpoint_module.atomic_save(state, tmp_path / "last.pt")
    model = make_model(seed=1)
    resumed = train(model, *data, config(tmp_path, resume=True))
    assert resumed.steps == EPOCHS * 8
    assert_same_weights(model.state_dict(), reference[0])
    assert history_without_timing(resumed.history) == history_without_timing(reference[1])


def test_resume_with_more_epochs_follows_the_new_schedule(data, tmp_path):
    from qat_ste.train.optim import lr_factor

    train(make_model(), *data, config(tmp_path, stop_after_steps=11))
    with pytest.warns(UserWarning, match="epochs: 3 -> 5"):
        longer = train(make_model(), *data, config(tmp_path, resume=True, epochs=5))
    assert longer.steps == 5 * 8
    new = config(tmp_path, epochs=5)
    for row in longer.history[1:]:  # the mean LR the epoch's 8 steps trained at, under the 5-epoch cosine
        trained = [0.05 * lr_factor(s, new, 8) for s in range(row["step"] - 8, row["step"])]
        assert row["lr"] == pytest.approx(sum(trained) / 8, rel=1e-9, abs=1e-15), row

"""Fault injection: `qat-ste convert` killed (-9) while training, while writing a checkpoint and while
exporting; a full disk; bit-flipped and hostile checkpoints; SIGTERM; a resume that would change the
quantization. After each: no earlier good file changed, no partial file at a final path, and the
run resumes to the same result (torch.equal on every tensor of the final checkpoint) or stops with
a clear one-line error.

The killed runs are child processes that patch one function of qat_ste (see CHILD) to kill
themselves at a seeded point: the kill is real (SIGKILL), only its moment is chosen. The runs that
follow (resumes, refusals) run in this process through ``qat_ste.cli.main``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import SignalAt

from qat_ste.atomic import check_integrity, remove_stale_temp_files
from qat_ste.cli import main
from qat_ste.errors import QatSteError
from qat_ste.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
# digits: 1438 training images / 128 = 12 steps per epoch; last.pt every 3 steps
TINY = ["--float-epochs", "1", "--epochs", "1", "--batch-size", "128", "--calib-batches", "1",
        "--calib-method", "percentile", "--check-samples", "64", "--no-latency", "--no-progress",
        "--threads", "1", "--checkpoint-every", "3"]
STEPS_PER_EPOCH = 12
SEED = 20261122  # every "random" fault point below comes from this seed

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")

# The child: `python -c CHILD FAULT_JSON convert ARGS...`. FAULT_JSON says where to strike:
#   {"kind": "kill-step", "stage": "float"|"qat", "at": N}  SIGKILL before the stage's N-th step
#   {"kind": "sigterm-step", "stage": ..., "at": N}         print FAULT-READY before step N and wait
#                                                           for the parent's SIGTERM
#   {"kind": "kill-write", "name": "last.pt", "at": N,      SIGKILL after writing this fraction of the
#    "fraction": F}                                         N-th file of that name (a partial .tmp stays)
# Before a SIGKILL it writes the sha256 of every final file in --out to FAULT_JSON["manifest"].
CHILD = r"""
import hashlib, io, json, os, signal, sys, time
from pathlib import Path

import qat_ste.atomic as atomic
import qat_ste.train.loop as engine
from qat_ste.cli import main

fault, argv = json.loads(sys.argv[1]), sys.argv[2:]
out = Path(argv[argv.index("--out") + 1])
count = [0]


def die():
    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.rglob("*")) if p.is_file() and not p.name.endswith(".tmp")}
    Path(fault["manifest"]).write_text(json.dumps(files))
    os.kill(os.getpid(), signal.SIGKILL)


real_step, real_write = engine._train_step, atomic.atomic_write


def step(run, *args):
    if run.out_dir is not None and run.out_dir.name == fault.get("stage"):
        count[0] += 1
        if count[0] == fault["at"] and fault["kind"] == "kill-step":
            die()
        if count[0] == fault["at"] and fault["kind"] == "sigterm-step":
            print("FAULT-READY", flush=True)
            stop = signal.getsignal(signal.SIGTERM).__self__  # the engine's stop request
            for _ in range(12000):
                if stop.signal:
                    break
                time.sleep(0.01)
    return real_step(run, *args)


def write(path, callback):
    if Path(path).name == fault.get("name"):
        count[0] += 1
        if count[0] == fault["at"]:
            def partial(stream):
                buffer = io.BytesIO()
                callback(buffer)
                stream.write(buffer.getvalue()[: int(len(buffer.getvalue()) * fault["fraction"])])
                stream.flush()
                die()
            return real_write(path, partial)
    return real_write(path, callback)


engine._train_step, atomic.atomic_write = step, write
sys.exit(main(argv))
"""


def child(fault: dict[str, Any], out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(fault), "convert", "--out", str(out), *TINY,
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_child(fault: dict[str, Any], out: Path, *extra: str) -> tuple[int, str]:
    process = child(fault, out, *extra)
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) checkpoint, by path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    out: dict[str, torch.Tensor] = {}
    for key, item in items:
        out.update(tensors(item, f"{prefix}/{key}"))
    return out


def assert_same_final_checkpoint(folder: Path, reference: Path) -> None:
    got = tensors(load_checkpoint(folder / "qat" / "last.pt"))
    expected = tensors(load_checkpoint(reference / "qat" / "last.pt"))
    assert got.keys() == expected.keys() and len(got) > 20
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def assert_no_partial_final_files(folder: Path) -> None:
    """Every file at a final path is complete: checkpoints pass their integrity check, JSON parses."""
    for path in folder.rglob("*"):
        if path.suffix == ".pt":
            assert check_integrity(path) is None, path
            load_checkpoint(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def assert_manifest_unchanged(folder: Path, manifest: Path) -> None:
    """The files the killed process had written before its kill are exactly as they were."""
    before = json.loads(manifest.read_text())
    assert before, "the child wrote no manifest"
    for name, digest in before.items():
        assert sha256(folder / name) == digest, f"{name} changed after the kill"


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run; its files must never change while the faults below run elsewhere."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["convert", "--out", str(out), *TINY]) == 0
    before = hashes(out)
    assert {"qat/best.pt", "qat/last.pt", "float/last.pt", "report.json", "model.onnx"} <= before.keys()
    yield out
    assert hashes(out) == before, "a fault in another folder changed the finished reference run"


def rng_for(test: str) -> random.Random:
    """The seeded generator of one test (the same points whatever tests run before it)."""
    return random.Random(f"{SEED}:{test}")


@pytest.mark.parametrize("stage", ["float", "qat"])
def test_kill_during_training_then_resume_is_exact(reference, tmp_path, stage):
    at = rng_for(f"kill-step-{stage}").randint(4, STEPS_PER_EPOCH)  # after the first periodic checkpoint (step 3)
    out = tmp_path / "run"
    code, output = run_child({"kind": "kill-step", "stage": stage, "at": at, "manifest": str(tmp_path / "m.json")},
                             out, "--no-export")
    assert code == -signal.SIGKILL, output[-2000:]
    assert_manifest_unchanged(out, tmp_path / "m.json")
    assert_no_partial_final_files(out)
    assert load_checkpoint(out / stage / "last.pt")["step"] == (at - 1) // 3 * 3
    assert main(["convert", "--out", str(out), *TINY, "--resume", "--no-export"]) == 0
    assert_same_final_checkpoint(out, reference)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    rng = rng_for("kill-write")
    at = rng.randint(2, 4)  # the 2nd..4th write of float/last.pt: steps 6, 9, 12 (the last one at epoch end)
    out = tmp_path / "run"
    code, output = run_child({"kind": "kill-write", "name": "last.pt", "at": at, "fraction": rng.random(),
                              "manifest": str(tmp_path / "m.json")}, out, "--no-export")
    assert code == -signal.SIGKILL, output[-2000:]
    assert_manifest_unchanged(out, tmp_path / "m.json")  # float/last.pt is the previous one, intact
    assert_no_partial_final_files(out)
    assert load_checkpoint(out / "float" / "last.pt")["step"] == 3 * (at - 1)
    [orphan] = temp_files(out)
    assert orphan.name.startswith(".last.pt.") and orphan.parent == out / "float"
    assert main(["convert", "--out", str(out), *TINY, "--resume", "--no-export"]) == 0
    assert temp_files(out) == []  # the next run removed it
    assert_same_final_checkpoint(out, reference)


def test_kill_while_exporting_keeps_the_previous_model(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = hashes(out)
    code, output = run_child({"kind": "kill-write", "name": "model.onnx", "at": 1,
                              "fraction": rng_for("kill-export").random(), "manifest": str(tmp_path / "m.json")},
                             out, "--resume")
    assert code == -signal.SIGKILL, output[-2000:]
    assert_manifest_unchanged(out, tmp_path / "m.json")
    for name in ("model.onnx", "report.json", "qat/last.pt", "qat/best.pt"):
        assert sha256(out / name) == before[name], name
    assert_no_partial_final_files(out)
    [orphan] = temp_files(out)
    assert orphan.name.startswith(".model.onnx.") and orphan.parent == out
    assert remove_stale_temp_files(out) == [orphan]  # what the next convert/export into --out does


def test_next_convert_removes_the_stale_export_temp_file(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = out / f".model.onnx.{gone.pid}.0123abcd.tmp"  # as a process killed while exporting leaves it
    orphan.write_bytes(b"partial onnx")
    assert main(["convert", "--out", str(out), *TINY, "--resume", "--no-export"]) == 0
    assert not orphan.exists()


def test_full_disk_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path):
    from qat_ste.train import TrainConfig, train
    from qat_ste.train.data import load_dataset

    mount = tmp_path / "small"
    mount.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here ({error})")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {mounted.stderr.strip()[:200]}")
    try:
        data = load_dataset("digits", "train", resize=28), load_dataset("digits", "val", resize=28)
        config = {"epochs": 1, "batch_size": 128, "out_dir": str(mount / "run"), "progress": False,
                  "print_summary": False, "plot": False, "checkpoint_every_steps": 1, "calibrate_batches": 1}
        first = train(FillDisk(lenet(), None), *data, TrainConfig(**config, stop_after_steps=2))
        assert first.steps == 2
        good = (mount / "run" / "last.pt").read_bytes()
        model = FillDisk(lenet(), mount / "filler")
        with pytest.raises(QatSteError) as full:
            train(model, *data, TrainConfig(**config, resume=True))
        text = str(full.value)
        assert f"no space left on device while writing {mount / 'run' / 'last.pt'} (" in text, text
        assert "bytes free); the previous last.pt is intact" in text and "--out" in full.value.fix
        assert (mount / "run" / "last.pt").read_bytes() == good and load_checkpoint(mount / "run" / "last.pt")
        assert temp_files(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


def lenet() -> torch.nn.Module:
    import qat_ste
    from qat_ste.zoo import create_zoo_model

    torch.manual_seed(0)
    return qat_ste.quantize(create_zoo_model("lenet5", num_classes=10), bits=4, example_input=torch.randn(1, 1, 28, 28))


class FillDisk(torch.nn.Module):
    """Fills the device of ``filler`` at the first training-mode forward call (the disk fills up
    while the run trains, so its next checkpoint does not fit)."""

    def __init__(self, inner: torch.nn.Module, filler: Path | None) -> None:
        super().__init__()
        self.inner, self.filler, self.done = inner, filler, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.filler is not None and not self.done:
            self.done = True
            with open(self.filler, "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
                except OSError:
                    pass
        return self.inner(x)


def flip(data: bytes, offset: int, count: int = 64) -> bytes:
    out = bytearray(data)
    for index in range(offset, min(offset + count, len(out))):
        out[index] ^= 0xFF
    return bytes(out)


def test_bit_flipped_checkpoint_is_refused_by_load_and_by_export(reference, tmp_path, capsys):
    rng = rng_for("bit-flip")
    folder = tmp_path / "qat"
    shutil.copytree(reference / "qat", folder)
    good = (folder / "last.pt").read_bytes()
    damaged = folder / "last.pt"
    for offset in sorted(rng.sample(range(len(good) - 64), 8)) + [0, len(good) - 64]:
        damaged.write_bytes(flip(good, offset))
        with pytest.raises(QatSteError, match="the file is damaged") as refused:
            load_checkpoint(damaged)
        assert f"intact checkpoint beside it, {folder / 'best.pt'}" in str(refused.value), offset
        code = main(["export", "--checkpoint", str(damaged), "--out", str(tmp_path / "x.onnx")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("qat-ste: error: cannot read checkpoint") and err.count("\n") == 1, err
        assert f"{damaged}: the file is damaged" in err and str(folder / "best.pt") in err
    assert not (tmp_path / "x.onnx").exists()


class Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_checkpoint_is_refused_by_load_and_by_export(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = tmp_path / "last.pt"
    torch.save({"format": "qat_ste.train/1", "model": {"w": Hostile(marker)}, "metadata": {}}, path)
    with pytest.raises(QatSteError, match=r"refused: checkpoint .* contains code/objects that are not plain "
                                          r"tensors \(global (posix|nt|os)\.system\)"):
        load_checkpoint(path)
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qat-ste: error: refused: checkpoint {path} contains code/objects") and err.count("\n") == 1
    assert "weights_only" not in err and "damaged" not in err and not marker.exists()


@pytest.fixture(scope="module")
def sigterm_run(reference, tmp_path_factory) -> dict[str, Any]:
    """A convert stopped by SIGTERM (sent by this process once fine-tuning is under way), and a
    copy of its folder as the signal left it."""
    work = tmp_path_factory.mktemp("sigterm")
    at = rng_for("sigterm").randint(2, STEPS_PER_EPOCH - 1)
    out = work / "run"
    process = child({"kind": "sigterm-step", "stage": "qat", "at": at}, out, "--no-export")
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "FAULT-READY" in line:
            process.send_signal(signal.SIGTERM)
            break
    rest, _ = process.communicate(timeout=300)
    shutil.copytree(out, work / "as_stopped")
    return {"out": out, "copy": work / "as_stopped", "at": at, "code": process.returncode,
            "output": "".join(lines) + rest}


def test_sigterm_saves_exits_143_and_resumes_exactly(reference, sigterm_run):
    out, at, output = sigterm_run["out"], sigterm_run["at"], sigterm_run["output"]
    assert f"stopped (SIGTERM) at step {at}; saved {out / 'qat' / 'last.pt'}" in output, output[-3000:]
    assert load_checkpoint(out / "qat" / "last.pt")["step"] == at
    assert temp_files(out) == []
    assert_no_partial_final_files(out)
    assert main(["convert", "--out", str(out), *TINY, "--resume", "--no-export"]) == 0
    assert_same_final_checkpoint(out, reference)
    assert sigterm_run["code"] == 128 + signal.SIGTERM, output[-2000:]


def test_resume_with_other_bits_is_refused_unless_forced(sigterm_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sigterm_run["copy"], out)  # a 4-bit run stopped during fine-tuning
    before = hashes(out)
    assert main(["convert", "--out", str(out), *TINY, "--resume", "--bits", "2", "--no-export"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qat-ste: error: checkpoint") and "quant.bits: 4 -> 2" in err and err.count("\n") == 1, err
    assert "--force-resume" in err
    assert hashes(out) == before  # nothing written
    # with more float epochs too: refused before the float stage trains on (float/last.pt untouched)
    assert main(["convert", "--out", str(out), *TINY, "--float-epochs", "2", "--resume", "--bits", "2",
                 "--no-export"]) == 2
    assert "quant.bits: 4 -> 2" in capsys.readouterr().err
    assert hashes(out) == before
    with pytest.warns(UserWarning, match="quant.bits: 4 -> 2; resuming anyway"):
        code = main(["convert", "--out", str(out), *TINY, "--resume", "--bits", "2", "--force-resume",
                     "--no-export"])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out / "qat" / "last.pt")["metadata"]["quant"]["bits"] == 2


def _sigterm_one_rank(rank: int, world: int, port: int, work: str) -> None:
    """A torchrun-like rank; only rank 1 receives SIGTERM (during its 3rd step)."""
    import qat_ste
    from qat_ste.train import TrainConfig, train
    from qat_ste.train.data import load_dataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    model = SignalAt(qat_ste.quantize(net, bits=4, example_input=torch.randn(1, 3, 16, 16)), 3 if rank == 1 else -1)
    result = train(model, load_dataset("synthetic", "train", size=16, n=256), None,
                   TrainConfig(epochs=2, batch_size=16, device="cpu", out_dir=str(Path(work) / "run"), progress=False,
                               print_summary=False, plot=False, calibrate_batches=1))
    torch.save({"steps": result.steps, "stop_reason": result.stop_reason}, Path(work) / f"rank{rank}.pt")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sigterm_one_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert results == [{"steps": 3, "stop_reason": "SIGTERM"}] * 2
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3


def test_hostile_and_damaged_weights_files_are_refused_like_checkpoints(tmp_path, capsys):
    """--weights goes through the same integrity and unsafe-pickle checks as a checkpoint."""
    from qat_ste.train.build import load_weights_file
    from qat_ste.zoo import lenet5

    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"conv1.weight": Hostile(marker)}, hostile)
    with pytest.raises(QatSteError, match=r"refused: weights file .* contains code/objects that are not plain "
                                          r"tensors \(global (posix|nt|os)\.system\)"):
        load_weights_file(lenet5(), hostile)
    assert not marker.exists()
    damaged = tmp_path / "damaged.pt"
    torch.save(lenet5().state_dict(), damaged)
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    damaged.write_bytes(bytes(data))
    assert main(["convert", "--weights", str(damaged), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qat-ste: error: cannot read weights file {damaged}") and "weights_only" not in err
    assert not (tmp_path / "o").exists()

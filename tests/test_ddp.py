"""Data-parallel training on CPU: two gloo processes with batch B each match one process with
batch 2B, all ranks end identical, only rank 0 writes files, and a DDP run resumes exactly.

The processes are started with torch.multiprocessing (spawn) and the torchrun environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so ``train()`` takes the same
path as under ``torchrun --nproc_per_node 2``.

Why DDP and one process agree: each rank's loss is the mean over its B images and DDP averages
the gradients over the 2 ranks, which is the gradient of the mean over the 2B images of the global
batch (the TensorLoader shards each global batch between the ranks). The model has no BatchNorm
(per-rank batch statistics would differ; SyncBatchNorm is CUDA-only) and no dropout, and the data
no augmentation (its random draws are seeded per rank). What remains is summation order: the
gradient is summed over 16 + 16 images and then averaged rather than over 32 at once. The model
runs in float64 (the engine feeds it float64 inputs), where that reordering costs ~1e-16 relative
per operation and ~1e-14 after 16 steps; the tolerance rtol=1e-9, atol=1e-11 leaves a wide margin
for it while any real difference (a wrong global batch, gradient scale, shard or LR schedule)
moves the weights by 1e-3 or more. In float32 the same comparison holds to ~1e-7 for most
weights, but the quantizer's rounding is discontinuous: an activation within ~1e-7 of a rounding
boundary can round the other way in one of the two runs and change a few weights by ~1e-5, which
would force a loose tolerance; float64 makes such a flip practically impossible.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import qat_ste
from qat_ste.train import TrainConfig, load_checkpoint, train
from qat_ste.train.data import load_dataset

PER_RANK_BATCH = 16
WORLD = 2
EPOCHS = 2  # 256 images / 32 per global batch = 8 steps per epoch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    )
    qmodel = qat_ste.quantize(net, bits=4, alpha_mode="lsq", step_init=0.25, example_input=torch.randn(1, 3, 16, 16))
    return qmodel.double()


def datasets():
    return (load_dataset("synthetic", "train", size=16, n=256),
            load_dataset("synthetic", "val", size=16, n=100))


def make_config(batch_size: int, out_dir: str | None, **overrides) -> TrainConfig:
    values = {"epochs": EPOCHS, "batch_size": batch_size, "lr": 0.05, "warmup_epochs": 0.5, "device": "cpu",
              "out_dir": out_dir, "progress": False, "print_summary": False, "plot": False}
    values.update(overrides)
    return TrainConfig(**values)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, work_dir: str) -> None:
    """One torchrun-like process: a full DDP run, then a run stopped after 5 steps and resumed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    work = Path(work_dir)
    train_set, val_set = datasets()

    model = make_model()
    result = train(model, train_set, val_set, make_config(PER_RANK_BATCH, str(work / "full")))
    torch.save({"state": model.state_dict(), "history": result.history, "steps": result.steps,
                "world_size": result.world_size}, work / f"full_rank{rank}.pt")

    stopped = make_model()
    train(stopped, train_set, val_set, make_config(PER_RANK_BATCH, str(work / "resumed"), stop_after_steps=5))
    resumed = make_model()
    train(resumed, train_set, val_set, make_config(PER_RANK_BATCH, str(work / "resumed"), resume=True))
    torch.save({"state": resumed.state_dict()}, work / f"resumed_rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert name not in os.environ, "run the test suite outside torchrun"
    mp.spawn(_worker, args=(WORLD, _free_port(), str(work)), nprocs=WORLD, join=True)
    return work


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_set, val_set = datasets()
        model = make_model()
        result = train(model, train_set, val_set,
                       make_config(PER_RANK_BATCH * WORLD, str(tmp_path_factory.mktemp("single"))))
    finally:
        torch.set_num_threads(previous)
    return model.state_dict(), result


@pytest.mark.slow
def test_ddp_matches_single_process_on_the_same_global_batch(ddp_run, single_run):
    single_state, single_result = single_run
    rank0 = torch.load(ddp_run / "full_rank0.pt", weights_only=True)
    assert rank0["world_size"] == WORLD and rank0["steps"] == single_result.steps == EPOCHS * 8
    assert rank0["state"].keys() == single_state.keys()
    changed = 0
    for key, value in single_state.items():
        torch.testing.assert_close(rank0["state"][key], value, rtol=1e-9, atol=1e-11,
                                   msg=lambda m, key=key: f"{key}: {m}")
        changed += int(not torch.equal(value, make_model().state_dict()[key]))
    assert changed >= 8  # the weights really trained
    for ddp_row, row in zip(rank0["history"], single_result.history, strict=True):
        assert ddp_row["train_loss"] == pytest.approx(row["train_loss"], rel=1e-9)
        assert ddp_row["val_accuracy"] == row["val_accuracy"]
        assert ddp_row["val_loss"] == pytest.approx(row["val_loss"], rel=1e-9)
        assert ddp_row["lr"] == pytest.approx(row["lr"])


@pytest.mark.slow
def test_all_ranks_end_identical_and_only_rank0_writes(ddp_run):
    states = [torch.load(ddp_run / f"full_rank{r}.pt", weights_only=True)["state"] for r in range(WORLD)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    files = sorted(p.name for p in (ddp_run / "full").iterdir())
    assert files == ["best.pt", "last.pt", "metrics.csv"]
    saved = load_checkpoint(ddp_run / "full" / "last.pt")
    assert saved["world_size"] == WORLD and len(saved["rng"]) == WORLD  # every rank's RNG state


@pytest.mark.slow
def test_ddp_run_resumes_exactly(ddp_run):
    full = torch.load(ddp_run / "full_rank0.pt", weights_only=True)["state"]
    for rank in range(WORLD):
        resumed = torch.load(ddp_run / f"resumed_rank{rank}.pt", weights_only=True)["state"]
        for key, value in full.items():
            assert torch.equal(resumed[key], value), f"rank {rank}: {key}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.gpu
def test_torchrun_nccl_two_gpus(tmp_path):
    import subprocess

    script = tmp_path / "run.py"
    script.write_text(
        "import torch, qat_ste\n"
        "from qat_ste.train import TrainConfig, train\n"
        "from qat_ste.train.data import load_dataset\n"
        "from qat_ste.zoo import create_zoo_model\n"
        "m = qat_ste.quantize(create_zoo_model('resnet20'), 4, example_input=torch.randn(1, 3, 32, 32))\n"
        "r = train(m, load_dataset('synthetic', 'train'), load_dataset('synthetic', 'val'),\n"
        f"          TrainConfig(epochs=1, batch_size=64, out_dir={str(tmp_path / 'out')!r}, progress=False))\n"
        "assert r.world_size == 2 and r.device.startswith('cuda')\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(script)]
    subprocess.run(command, check=True, timeout=600)
    assert (tmp_path / "out" / "last.pt").is_file()

"""Same command, same numbers: ``qat-ste convert`` and the reproduction tools seed everything (model
construction, data order, augmentation, calibration) from ``--seed`` before anything random happens,
so two runs of the same command give bit-identical checkpoints on CPU, whatever state the process's
random generators were in before."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qat_ste.cli import main
from qat_ste.train import load_checkpoint

TINY = ["--float-epochs", "1", "--epochs", "1", "--batch-size", "128", "--calib-batches", "1",
        "--calib-method", "percentile", "--no-progress", "--no-export", "--bits", "2", "--seed", "3"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _scramble_generators(salt: int) -> None:
    """Put torch's, numpy's and Python's global generators in some other state (another process would)."""
    torch.manual_seed(1000 + salt)
    torch.rand(17 + salt)
    np.random.seed(2000 + salt)
    random.seed(3000 + salt)


def assert_identical_states(a: dict, b: dict, where: str) -> None:
    """Every tensor equal bit for bit (torch.equal), the same keys."""
    assert a.keys() == b.keys(), where
    for key in a:
        assert torch.equal(a[key], b[key]), f"{where}: {key} differs"


def _convert(out: Path, salt: int, *extra: str) -> dict:
    _scramble_generators(salt)
    assert main(["convert", "--out", str(out), *TINY, *extra]) == 0
    return {stage: load_checkpoint(out / stage / "last.pt") for stage in ("float", "qat")}


@pytest.mark.slow
def test_convert_twice_gives_bit_identical_checkpoints(tmp_path):
    first = _convert(tmp_path / "a", 0)
    second = _convert(tmp_path / "b", 1)
    for stage in ("float", "qat"):
        assert_identical_states(first[stage]["model"], second[stage]["model"], stage)
        assert first[stage]["history"][0]["train_loss"] == second[stage]["history"][0]["train_loss"]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["seed"] == 3 and len(report["commit"] or "0" * 40) == 40
    assert set(report["versions"]) >= {"qat_ste", "torch", "numpy", "python"}


def test_reproduce_paper_grid_twice_gives_bit_identical_weights(tmp_path):
    """The [P1] runner builds each model after seeding (it used to build it before train() seeded, so
    the float initialization depended on the process's generator state)."""
    import tools.reproduce_paper as tool
    from qat_ste.train.data import make_synthetic
    from qat_ste.zoo.recipes import load_recipes

    recipes = load_recipes()
    train = make_synthetic("train", num_classes=10, size=28, channels=1, n=96, seed=0)
    val = make_synthetic("val", num_classes=10, size=28, channels=1, n=32, seed=0)
    data = tool.NetData("synthetic 28x28 (test)", train, val, len(train), len(val), substitute=False)
    plan = tool.plan_runs(recipes, ["lenet5"], [2], ["clipped_relu"], epochs_scale=0.02, instability=False)
    weights = []
    for salt, name in ((0, "a"), (1, "b")):
        _scramble_generators(salt)
        options = tool.GridOptions(runs_dir=tmp_path / name, device="cpu", seed=5, progress=False,
                                   epochs_scale=0.02, log=lambda message: None)
        store = tool.ResultsStore(tmp_path / name / "results.json")
        records = tool.run_grid(plan, recipes, store, lambda net: data, options)
        assert [r["status"] for r in records] == ["done", "done"]
        assert records[1]["provenance"]["seed"] == 5 and records[1]["provenance"]["versions"]["torch"]
        weights.append({r["run_id"]: torch.load(tool.weights_path(options.runs_dir, r["run_id"], r["fingerprint"]),
                                                weights_only=True) for r in records})
    for run_id in weights[0]:
        assert_identical_states(weights[0][run_id], weights[1][run_id], run_id)

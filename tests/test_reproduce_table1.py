"""tools/paper_table1: [P1] Table 1's MNIST row at the paper's scale, several seeds. Here on tiny synthetic
data: results per run (with provenance), skipping what is done, resuming a killed run from its
checkpoint to the same weights, and the report block's verdicts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import tools.paper_table1 as t1
import tools.reproduce_paper as rp
from qat_ste.train.data import make_synthetic
from qat_ste.zoo.recipes import load_recipes

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def recipes():
    return load_recipes()


@pytest.fixture(scope="module")
def data():
    train = make_synthetic("train", num_classes=10, size=28, channels=1, n=96, seed=0)
    val = make_synthetic("val", num_classes=10, size=28, channels=1, n=32, seed=0)
    return rp.NetData("synthetic 28x28 (test)", train, val, len(train), len(val), substitute=False)


def _options(tmp_path: Path, messages: list[str], **kw) -> t1.T1Options:
    values = {"results_dir": tmp_path / "results", "runs_dir": tmp_path / "runs", "seeds": (0,), "bits": (2,),
              "stes": ("relu",), "epochs_scale": 0.04, "eval_every": 1, "log": messages.append, "command": "test"}
    return t1.T1Options(**{**values, **kw})


def test_plan_is_seed_by_seed_float_first(recipes):
    runs = t1.plan(recipes, t1.T1Options(seeds=(0, 1)))
    assert len(runs) == 14
    assert [r.run_id for r in runs[:3]] == ["table1/lenet5/float/seed0", "table1/lenet5/2bit-identity/seed0",
                                            "table1/lenet5/2bit-relu/seed0"]
    assert runs[7].run_id == "table1/lenet5/float/seed1" and runs[8].depends_on == "table1/lenet5/float/seed1"
    q = runs[1].schedule  # the paper's recipe
    assert (q.epochs, q.batch_size, q.lr, q.milestones, q.gamma, q.momentum) == (50, 64, 0.1, (20, 40), 0.1, 0.9)


def test_runs_are_written_skipped_and_traceable(recipes, data, tmp_path):
    messages: list[str] = []
    options = _options(tmp_path, messages)
    records = t1.run_all(t1.plan(recipes, options), recipes, data, options)
    assert [r["run_id"] for r in records] == ["table1/lenet5/float/seed0", "table1/lenet5/2bit-relu/seed0"]
    files = sorted(p.name for p in (tmp_path / "results").glob("*.json"))
    assert files == ["lenet5__2bit-relu__seed0.json", "lenet5__float__seed0.json"]
    saved = json.loads((tmp_path / "results" / "lenet5__2bit-relu__seed0.json").read_text())
    assert saved["provenance"]["seed"] == 0 and saved["provenance"]["command"] == "test"
    assert set(saved["provenance"]["versions"]) >= {"torch", "numpy", "python", "qat_ste"}
    assert saved["epochs"] == 2 and [h["lr"] for h in saved["history"]] == [0.1, pytest.approx(0.01)]
    messages.clear()
    again = t1.run_all(t1.plan(recipes, options), recipes, data, options)
    assert [m.split(":")[0] for m in messages] == ["skip table1/lenet5/float/seed0",
                                                  "skip table1/lenet5/2bit-relu/seed0"]
    assert again[1]["final_val_accuracy_pct"] == saved["final_val_accuracy_pct"]


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(recipes, data, tmp_path, monkeypatch):
    whole = _options(tmp_path / "whole", [])
    t1.run_all(t1.plan(recipes, whole), recipes, data, whole)
    real_train = t1.train
    calls = []

    def killed_after_one_epoch(model, train_data, val_data, config, **kw):
        calls.append(config.resume)
        return real_train(model, train_data, val_data, dataclasses.replace(config, stop_after_steps=2), **kw)

    cut = _options(tmp_path / "cut", [])
    monkeypatch.setattr(t1, "train", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt, match="float/seed0 stopped"):
        t1.run_all(t1.plan(recipes, cut), recipes, data, cut)
    monkeypatch.setattr(t1, "train", real_train)
    records = t1.run_all(t1.plan(recipes, cut), recipes, data, cut)
    assert calls == [None] and records[0]["resumed_from_checkpoint"] is True
    for run in ("float", "2bit-relu"):
        a = json.loads((tmp_path / "whole" / "results" / f"lenet5__{run}__seed0.json").read_text())
        b = json.loads((tmp_path / "cut" / "results" / f"lenet5__{run}__seed0.json").read_text())
        assert a["fingerprint"] == b["fingerprint"]
        assert a["final_train_loss"] == b["final_train_loss"] and a["final_val_accuracy_pct"] == b[
            "final_val_accuracy_pct"], run
    weights = [torch.load(next((tmp_path / d / "runs" / "weights").glob("*.pt")), weights_only=True)
               for d in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _stats(accs: tuple[float, ...]) -> t1.CellStats:
    return t1.CellStats(tuple(range(len(accs))), t1._mean_std(accs), (0.01, 0.0), accs)


def test_verdicts_respect_the_spread():
    assert t1.verdict(None, 99.0) == "not run yet"
    assert t1.verdict(_stats((99.0, 99.2)), 99.24) == "only 2 seed(s): no verdict yet (-0.14 vs the paper)"
    # mean 99.1, std 0.1: the paper's 99.24 is within 2 std
    assert t1.verdict(_stats((99.0, 99.1, 99.2)), 99.24) == "within noise (-0.14, 2 std = 0.20)"
    assert t1.verdict(_stats((98.0, 98.1, 98.2)), 99.24) == "below the paper by 1.14 points (beyond 2 std = 0.20)"
    assert t1.verdict(_stats((99.5, 99.6, 99.7)), 99.24).startswith("above the paper by 0.36")


def test_report_block_lists_cells_and_is_kept_by_the_p1_report(recipes, tmp_path):
    def record(seed, bits, ste, acc):
        return {"run_id": f"table1/lenet5/{bits}bit-{ste}/seed{seed}", "status": "done", "bits": bits, "ste": ste,
                "seed": seed, "final_val_accuracy_pct": acc, "final_train_loss": 0.01, "epochs": 50,
                "paper_epochs": 50, "train_images": 60000, "train_images_full": 60000, "val_images": 10000,
                "val_images_full": 10000, "wall_time_s": 600.0, "machine": {"cpu": "test"}}
    records = {r["run_id"]: r for r in [record(s, 2, "relu", 99.0 + 0.1 * s) for s in range(3)]
               + [record(0, 2, "identity", 98.5)]}
    records["x"] = {**record(1, 4, "identity", None), "status": "diverged"}
    block = t1.section(records, recipes, tmp_path)
    assert "| 2 | relu | 0, 1, 2 | 99.10 ± 0.10 | 99.24 | 1.0e-02 ± 0.0e+00 | 5.1e-03 | within noise" in block
    assert "| 2 | identity | 0 | 98.50 ± 0.00 | 98.49 |" in block and "only 1 seed(s)" in block
    assert "| 4 | identity | - | diverged | 98.98 | - | 6.0e-03 | diverged; diverged with seed(s) 1 |" in block
    assert "2-bit relu − identity: +0.50 ± 0.00 points over 1 seed(s) (ahead in every seed; only 1 seed(s)" in block
    report = tmp_path / "RESULTS.md"
    report.write_text("# title\n\nintro\n\n## Float baselines\n\nold\n")
    t1.write_section(report, records, recipes, tmp_path)
    text = report.read_text()
    assert text.index(t1.BEGIN) < text.index("## Float baselines")
    rp.write_report(rp.ResultsStore(tmp_path / "results.json"), recipes, report, tmp_path / "figures")
    assert t1.kept_block(report.read_text()) == t1.kept_block(text)

"""The [P1] reproduction: recipes against the paper's section 5, the grid runner (results JSON,
resume, RESULTS.md, instability plot) on tiny synthetic data, and a tiny MNIST run when MNIST is
present."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import tools.reproduce_paper as tool
from qat_ste.errors import QatSteError
from qat_ste.train.data import make_synthetic
from qat_ste.zoo.recipes import InstabilityRun, Phase, Schedule, load_recipes, parse_recipes

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def recipes():
    return load_recipes()


@pytest.fixture(scope="module")
def synthetic_data():
    """LeNet-5-shaped (1 x 28 x 28) synthetic images, tiny."""
    train = make_synthetic("train", num_classes=10, size=28, channels=1, n=128, seed=0)
    val = make_synthetic("val", num_classes=10, size=28, channels=1, n=64, seed=0)
    return tool.NetData("synthetic 28x28 (test)", train, val, len(train), len(val), substitute=False)


def _options(tmp_path: Path, messages: list[str], scale: float = 0.02):
    return tool.GridOptions(runs_dir=tmp_path / "runs", device="cpu", seed=0, progress=False,
                            epochs_scale=scale, log=messages.append)


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def test_recipes_match_the_papers_section_5(recipes):
    lenet = recipes.nets["lenet5"].quant
    assert (lenet.epochs, lenet.batch_size, lenet.lr, lenet.milestones, lenet.gamma) == (50, 64, 0.1, (20, 40), 0.1)
    for net in ("vgg11", "resnet20"):
        q = recipes.nets[net].quant
        assert (q.epochs, q.batch_size, q.lr, q.milestones, q.gamma) == (200, 128, 0.01, (80, 140), 0.1)
        assert recipes.nets[net].dataset == "cifar10" and recipes.nets[net].augment
    for net in recipes.nets.values():
        for schedule in (net.pretrain, net.quant):
            assert (schedule.optimizer, schedule.momentum, schedule.weight_decay) == ("sgd", 0.9, 1e-4)
            assert schedule.schedule == "multistep"
    assert recipes.nets["lenet5"].dataset == "mnist" and not recipes.nets["lenet5"].augment
    assert (recipes.alpha_mode, recipes.bn_affine) == ("fixed", False)
    assert recipes.grid_nets == ("lenet5", "vgg11", "resnet20")
    assert recipes.grid_bits == (2, 4)
    assert recipes.grid_stes == ("identity", "relu", "clipped_relu")
    assert len(recipes.grid_cells()) == 18 and len(recipes.paper_table1) == 18
    assert dataclasses.astuple(recipes.paper_result("lenet5", 2, "identity")) == (2.6e-2, 98.49)
    assert dataclasses.astuple(recipes.paper_result("vgg11", 4, "clipped_relu")) == (1.3e-3, 92.08)
    assert dataclasses.astuple(recipes.paper_result("resnet20", 2, "clipped_relu")) == (0.24, 88.39)
    assert dataclasses.astuple(recipes.paper_result("resnet20", 4, "identity")) == (1.38, 54.16)
    assert "weight_decay" in recipes.open_choices and "float_pretraining" in recipes.open_choices


def test_instability_recipes(recipes):
    runs = {r.name: r for r in recipes.instability}
    for start in ("relu", "clipped_relu"):
        run = runs[f"resnet20_4bit_identity_from_{start}"]
        assert (run.net, run.bits, run.from_ste, run.ste, run.role) == ("resnet20", 4, start, "identity", "restart")
        slow, normal = run.phases
        assert (slow.schedule.epochs, slow.schedule.lr, slow.schedule.schedule) == (20, 1e-5, "constant")
        assert normal.is_normal_schedule and normal.schedule == recipes.nets["resnet20"].quant
    two_bit = runs["resnet20_2bit_relu_from_clipped_relu"]
    assert (two_bit.bits, two_bit.from_ste, two_bit.ste) == (2, "clipped_relu", "relu")
    assert runs["resnet20_4bit_clipped_relu_continued"].role == "control"


def test_schedule_scaling(recipes):
    assert recipes.nets["lenet5"].quant.scaled(0.1).epochs == 5
    assert recipes.nets["lenet5"].quant.scaled(0.1).milestones == (2, 4)
    small = recipes.nets["resnet20"].quant.scaled(0.015)
    assert (small.epochs, small.milestones, small.lr) == (3, (1, 2), 0.01)
    tiny = recipes.nets["resnet20"].quant.scaled(0.001)
    assert (tiny.epochs, tiny.milestones) == (1, ())
    kwargs = recipes.nets["vgg11"].quant.to_train_kwargs()
    assert kwargs["milestones"] == (80, 140) and kwargs["batch_size"] == 128
    with pytest.raises(QatSteError):
        Schedule(epochs=10, batch_size=8, lr=0.1, milestones=(12,))


def test_bad_recipes_file_is_reported(tmp_path):
    with pytest.raises(QatSteError, match="cannot read the recipes file"):
        load_recipes(tmp_path / "absent.json")
    data = json.loads((REPO / "qat_ste" / "zoo" / "recipes.json").read_text())
    data["nets"]["lenet5"]["quant"]["epochs"] = 0
    with pytest.raises(QatSteError, match="epochs"):
        parse_recipes(data)


def test_recipes_alpha_mode_and_the_old_name(recipes):
    data = json.loads((REPO / "qat_ste" / "zoo" / "recipes.json").read_text())
    assert data["quantization"]["alpha_mode"] == "fixed" and "alpha" not in data["quantization"]
    with pytest.warns(DeprecationWarning, match="Recipes.alpha is deprecated; use Recipes.alpha_mode"):
        assert recipes.alpha == "fixed"
    data["quantization"]["alpha"] = data["quantization"].pop("alpha_mode")  # a file written before the rename
    assert parse_recipes(data).alpha_mode == "fixed"
    del data["quantization"]["alpha"]
    with pytest.raises(QatSteError, match="quantization lacks 'alpha_mode'"):
        parse_recipes(data)


# ---------------------------------------------------------------------------------------------
# Plan and grid runner
# ---------------------------------------------------------------------------------------------


def test_plan_adds_the_runs_instability_starts_from(recipes):
    plan = tool.plan_runs(recipes, ["resnet20"], [4], ["identity"], epochs_scale=0.01)
    ids = [s.run_id for s in plan]
    assert ids[0] == "float/resnet20"
    for needed in ("grid/resnet20/4bit/identity", "grid/resnet20/4bit/relu", "grid/resnet20/4bit/clipped_relu",
                   "grid/resnet20/2bit/clipped_relu"):
        assert needed in ids
    inst = [i for i in ids if i.startswith("instability/")]
    assert len(inst) == 4 and ids[-4:] == inst
    first_inst = ids.index(inst[0])
    assert all(ids.index(f"grid/resnet20/{b}bit/{s}") < first_inst for b, s in ((4, "relu"), (2, "clipped_relu")))
    assert tool.plan_runs(recipes, ["lenet5"], [2, 4], ["relu"], instability=True)[-1].run_id == "grid/lenet5/4bit/relu"
    with pytest.raises(QatSteError, match="unknown STE"):
        tool.plan_runs(recipes, ["lenet5"], [2], ["nope"])


def test_grid_writes_json_and_report_and_resumes(tmp_path, recipes, synthetic_data):
    plan = tool.plan_runs(recipes, ["lenet5"], [2, 4], ["relu", "clipped_relu"], epochs_scale=0.02)
    results = tmp_path / "results.json"
    store = tool.ResultsStore(results)
    messages: list[str] = []
    records = tool.run_grid(plan, recipes, store, lambda net: synthetic_data, _options(tmp_path, messages))
    assert [r["run_id"] for r in records] == [s.run_id for s in plan]
    on_disk = json.loads(results.read_text())
    assert on_disk["format"] == tool.RESULTS_FORMAT
    cell = on_disk["runs"]["grid/lenet5/2bit/relu"]
    assert cell["status"] == "done" and cell["epochs"] == 1 and cell["paper_epochs"] == 50
    assert isinstance(cell["final_train_loss"], float) and 0 <= cell["final_val_accuracy_pct"] <= 100
    assert (cell["paper_train_loss"], cell["paper_val_accuracy_pct"]) == (5.1e-3, 99.24)
    assert cell["wall_time_s"] > 0 and cell["machine"]["torch"]
    assert len(cell["history"]) == 1 and on_disk["runs"]["float/lenet5"]["kind"] == "float"

    report = tmp_path / "RESULTS.md"
    text = tool.write_report(store, recipes, report, tmp_path / "figures")
    assert report.read_text() == text
    assert "99.24" in text and "5.10e-03" in text  # the paper's numbers
    assert f"{cell['final_val_accuracy_pct']:.2f}" in text  # the measured ones
    assert "REDUCED-SCALE" in text and "1/50 ep" in text
    assert "`grid/vgg11/2bit/identity`" in text and "`grid/lenet5/2bit/identity`" in text  # missing runs named
    assert "no row has all three STEs finished" in text

    messages.clear()  # same settings again: everything is skipped
    again = tool.run_grid(plan, recipes, tool.ResultsStore(results), lambda net: synthetic_data,
                          _options(tmp_path, messages))
    assert all(m.startswith("skip ") for m in messages) and len(messages) == len(plan)
    assert again[1]["finished_at"] == records[1]["finished_at"]

    messages.clear()  # another scale: the runs are redone (and the dependants with them)
    plan2 = tool.plan_runs(recipes, ["lenet5"], [2], ["relu"], epochs_scale=0.04)
    tool.run_grid(plan2, recipes, tool.ResultsStore(results), lambda net: synthetic_data,
                  _options(tmp_path, messages, scale=0.04))
    assert [m.split(":")[0] for m in messages if not m.startswith("  ")] == ["run float/lenet5",
                                                                             "run grid/lenet5/2bit/relu"]
    assert json.loads(results.read_text())["runs"]["grid/lenet5/2bit/relu"]["epochs"] == 2


def test_ranking_and_instability_on_synthetic(tmp_path, recipes, synthetic_data):
    slow = Schedule(epochs=1, batch_size=64, lr=1e-5, schedule="constant")
    custom = InstabilityRun(
        name="lenet5_2bit_identity_from_clipped_relu", net="lenet5", bits=2, from_ste="clipped_relu",
        ste="identity", role="restart",
        phases=(Phase("identity STE, lr 1e-5", slow), Phase("normal schedule", recipes.nets["lenet5"].quant, True)),
    )
    small = dataclasses.replace(recipes, instability=(custom,))
    plan = tool.plan_runs(small, ["lenet5"], [2], ["identity", "relu", "clipped_relu"], epochs_scale=0.02)
    assert plan[-1].run_id == "instability/lenet5_2bit_identity_from_clipped_relu"
    store = tool.ResultsStore(tmp_path / "results.json")
    tool.run_grid(plan, small, store, lambda net: synthetic_data, _options(tmp_path, []))
    record = store.runs[plan[-1].run_id]
    assert record["status"] == "done" and record["epochs"] == 2
    assert record["start"]["epoch"] == 0 and record["start"]["train_loss"] is not None
    assert [h["phase"] for h in record["history"]] == [0, 1] and [h["epoch"] for h in record["history"]] == [1, 2]
    text = tool.write_report(store, small, tmp_path / "RESULTS.md", tmp_path / "figures")
    assert (tmp_path / "figures" / tool.INSTABILITY_FIGURE).stat().st_size > 1000
    assert "LeNet-5 | 2 | " in text and ("holds by val accuracy" in text or "does not hold by val accuracy" in text)
    assert "lenet5_2bit_identity_from_clipped_relu" in text


def test_results_store_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(QatSteError, match="not a results file"):
        tool.ResultsStore(path)


# ---------------------------------------------------------------------------------------------
# Command line and MNIST
# ---------------------------------------------------------------------------------------------


def test_missing_mnist_folder_gives_a_clear_error(tmp_path, capsys, recipes):
    absent = tmp_path / "no-mnist-here"
    rc = tool.main(["--nets", "lenet5", "--mnist", str(absent), "--runs-dir", str(tmp_path / "runs"),
                    "--report", str(tmp_path / "RESULTS.md"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(absent) in err and "does not exist" in err and "--mnist FOLDER" in err
    assert not (tmp_path / "runs" / "results.json").exists()
    with pytest.raises(QatSteError, match="MNIST folder"):
        tool.load_net_data("resnet20", recipes, absent, None)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST not present at {MNIST_DIR}")
def test_tiny_mnist_run_from_the_command_line(tmp_path):
    args = ["--nets", "lenet5", "--bits", "2", "--stes", "clipped_relu", "--epochs-scale", "0.02",
            "--train-subset", "256", "--val-subset", "256", "--no-instability", "--no-progress", "--threads", "1",
            "--mnist", str(MNIST_DIR), "--runs-dir", str(tmp_path / "runs"),
            "--report", str(tmp_path / "RESULTS.md"), "--figures", str(tmp_path / "figures")]
    assert tool.main(args) == 0
    data = json.loads((tmp_path / "runs" / "results.json").read_text())
    cell = data["runs"]["grid/lenet5/2bit/clipped_relu"]
    assert cell["data"] == "MNIST 28x28" and (cell["train_images"], cell["train_images_full"]) == (256, 60000)
    assert data["invocations"][0]["wall_time_s"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "256/60000 train img" in text and "99.23" in text and "python -m tools.reproduce_paper --nets lenet5" in text


# ---------------------------------------------------------------------------------------------
# [P3]: BCGD against BinaryConnect (quantized weights + 4-bit activations)
# ---------------------------------------------------------------------------------------------


def test_p3_plan_and_bad_options(recipes):
    plan = tool.plan_p3(recipes, tool.P3Options(seeds=(0, 1)))
    assert len(plan) == 12 and plan[0].run_id == "p3/lenet5/float/seed0"
    assert [r.run_id for r in plan[2:6]] == ["p3/lenet5/binary-bcgd/seed0", "p3/lenet5/binary-binaryconnect/seed0",
                                             "p3/lenet5/ternary-bcgd/seed0", "p3/lenet5/ternary-binaryconnect/seed0"]
    assert all(r.depends_on == "p3/lenet5/float/seed1" for r in plan[7:])
    assert plan[1].cell == "4-bit activations only" and plan[2].cell == "binary + 4-bit act, bcgd"
    with pytest.raises(QatSteError, match="not binary/ternary"):
        tool.plan_p3(recipes, tool.P3Options(weights=("int4",)))
    with pytest.raises(QatSteError, match="methods"):
        tool.plan_p3(recipes, tool.P3Options(methods=("sgd",)))


def test_p3_table_mean_and_spread_over_seeds():
    records = {f"p3/lenet5/binary-bcgd/seed{k}": {
        "run_id": f"p3/lenet5/binary-bcgd/seed{k}", "status": "done", "net": "lenet5", "seed": k,
        "cell": "binary + 4-bit act, bcgd", "weights": "binary", "method": "bcgd", "final_val_accuracy_pct": acc,
        "final_train_loss": 0.1, "wall_time_s": 2.0, "epochs": 3, "train_images": 100, "val_images": 50}
        for k, acc in enumerate((97.0, 98.0, 99.0))}
    records.update({r.replace("bcgd", "binaryconnect"): dict(v, run_id=r.replace("bcgd", "binaryconnect"),
                                                             method="binaryconnect", final_val_accuracy_pct=97.5,
                                                             cell="binary + 4-bit act, binaryconnect")
                    for r, v in records.items()})
    rows = tool.p3_table(records)
    assert "| LeNet-5 | binary + 4-bit act, bcgd | 0, 1, 2 | 98.00 ± 1.00 | 97.00 - 99.00 | 0.100 | 3 | 100 / 50 |" \
        in rows[2]
    assert tool._p3_paired(records) == ["- LeNet-5, binary: BCGD − BinaryConnect = +0.50 ± 1.00 points over 3 "
                                        "seed(s) (min -0.50, max +1.50; no consistent sign: within seed noise)"]


@pytest.mark.slow
def test_p3_grid_writes_one_json_per_run_the_report_section_and_resumes(tmp_path, recipes, synthetic_data):
    messages: list[str] = []
    options = tool.P3Options(results_dir=tmp_path / "p3", runs_dir=tmp_path / "runs", seeds=(0,),
                             epochs_scale=0.02, log=messages.append, command="python -m tools.reproduce_paper --p3")
    plan = tool.plan_p3(recipes, options)
    records = tool.run_p3(plan, recipes, lambda net: synthetic_data, options)
    assert [r["run_id"] for r in records] == [r.run_id for r in plan]
    files = sorted(p.name for p in (tmp_path / "p3").glob("*.json"))
    assert len(files) == 6 and "lenet5__ternary-bcgd__seed0.json" in files
    binary = json.loads((tmp_path / "p3" / "lenet5__binary-bcgd__seed0.json").read_text())
    assert binary["status"] == "done" and binary["settings"]["bcgd_rho"] == 1e-5 and binary["epochs"] == 1
    assert set(binary["weight_codes"]) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert all(set(c) <= {-1, 1} for c in binary["weight_codes"].values())
    ternary = json.loads((tmp_path / "p3" / "lenet5__ternary-binaryconnect__seed0.json").read_text())
    assert ternary["settings"]["bcgd_rho"] is None and all(set(c) <= {-1, 0, 1}
                                                             for c in ternary["weight_codes"].values())

    report = tmp_path / "RESULTS.md"
    report.write_text("# Reproducing [P1]\n\nthe [P1] part\n")
    section = tool.write_p3_report(report, tmp_path / "p3")
    text = report.read_text()
    assert text.startswith("# Reproducing [P1]\n\nthe [P1] part\n") and section in text
    for row in ("| float |", "| 4-bit activations only |", "| binary + 4-bit act, bcgd |",
                "| ternary + 4-bit act, binaryconnect |"):
        assert row in text
    assert "| 0 |" in text and " ± 0.00 |" in text and "64.36" in text and "62.98" in text
    assert "BCGD − BinaryConnect" in text and "`python -m tools.reproduce_paper --p3`" in text
    tool.write_p3_report(report, tmp_path / "p3")
    assert report.read_text().count(tool.P3_BEGIN) == 1
    tool.write_report(tool.ResultsStore(tmp_path / "p1.json"), recipes, report, tmp_path / "figures")
    rewritten = report.read_text()  # [P1]'s writer replaces its part and keeps the [P3] section
    assert "the [P1] part" not in rewritten and rewritten.count(tool.P3_BEGIN) == 1 and section in rewritten

    messages.clear()  # same settings: every run is skipped
    tool.run_p3(plan, recipes, lambda net: synthetic_data, options)
    assert len(messages) == 6 and all(m.startswith("skip ") for m in messages)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST not present at {MNIST_DIR}")
def test_p3_tiny_mnist_run_from_the_command_line(tmp_path, capsys):
    args = ["--p3", "--nets", "lenet5,resnet20", "--seeds", "0", "--p3-weights", "binary", "--p3-methods", "bcgd",
            "--epochs-scale", "0.02", "--train-subset", "256", "--val-subset", "256", "--no-progress",
            "--threads", "1", "--mnist", str(MNIST_DIR), "--runs-dir", str(tmp_path / "runs"),
            "--p3-results", str(tmp_path / "p3"), "--report", str(tmp_path / "RESULTS.md")]
    assert tool.main(args) == 0
    assert "ResNet-20 rows need --cifar10 FOLDER: skipped" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "p3").glob("*.json")) == [
        "lenet5__act4__seed0.json", "lenet5__binary-bcgd__seed0.json", "lenet5__float__seed0.json"]
    record = json.loads((tmp_path / "p3" / "lenet5__binary-bcgd__seed0.json").read_text())
    assert record["data"] == "MNIST 28x28" and (record["train_images"], record["train_images_full"]) == (256, 60000)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| LeNet-5 | binary + 4-bit act, bcgd | 0 |" in text and "python -m tools.reproduce_paper --p3" in text

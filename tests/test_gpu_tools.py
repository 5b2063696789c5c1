"""The GPU tools (tools/bench_gpu.py, bench_finetune_gpu.py, gpu_check.py) on a CPU: their smoke
modes, plans, tables and JSON, so that the one run they get on a lent GPU works the first time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import bench_finetune_gpu, bench_gpu, gpu_check

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- bench_gpu -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_writes_rows_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = bench_gpu.main(["--device", "cpu", "--smoke", "--models", "mobilenet_v3_small", "--variants", "float",
                           "torch", "--modes", "eager", "--steps", "1", "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    assert document["setup"]["batch"] == 2 and document["setup"]["image_size"] == 32
    assert document["targets"] == {"eager": 1.15, "compiled": 1.05, "memory": 1.05}
    rows = {r["variant"]: r for r in document["rows"]}
    assert list(rows) == ["float", "torch"]
    for row in rows.values():
        assert row["status"] == "ok" and row["model"] == "mobilenet_v3_small" and row["mode"] == "eager"
        assert len(row["ms_all"]) == 1 and row["ms_per_step"] > 0 and row["peak_gib"] is None
    assert rows["float"]["sites"] == 0 and rows["torch"]["sites"] > 0
    assert rows["float"]["ratio"] == 1.0
    assert rows["torch"]["ratio"] == pytest.approx(rows["torch"]["ms_per_step"] / rows["float"]["ms_per_step"])
    assert rows["torch"]["meets_time"] == (rows["torch"]["ratio"] <= 1.15) and rows["float"]["meets_time"] is None
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("targets for the qat_ste rows") for line in lines)
    table = [line.split() for line in lines if line.startswith("mobilenet_v3_small ")]
    assert [cells[:3] for cells in table] == [["mobilenet_v3_small", "float", "eager"],
                                              ["mobilenet_v3_small", "torch", "eager"]]


def test_bench_gpu_plan_puts_eager_rows_first_then_the_priority_models_compiled() -> None:
    plan = bench_gpu.plan_rows(["resnet18", "resnet50", "vit_small"], ["float", "torch", "ao_fq"],
                               ["eager", "compiled"])
    assert plan[:9] == [(m, v, "eager") for m in ("resnet18", "resnet50", "vit_small")
                        for v in ("float", "torch", "ao_fq")]
    assert plan[9:] == [("resnet50", "float", "compiled"), ("resnet50", "torch", "compiled"),
                        ("vit_small", "float", "compiled"), ("vit_small", "torch", "compiled"),
                        ("resnet50", "ao_fq", "compiled"), ("vit_small", "ao_fq", "compiled"),
                        ("resnet18", "float", "compiled"), ("resnet18", "torch", "compiled"),
                        ("resnet18", "ao_fq", "compiled")]
    assert bench_gpu.plan_rows(["resnet18"], ["float"], ["compiled"]) == [("resnet18", "float", "compiled")]


def test_bench_gpu_budget_skips_rows_and_marks_triton_on_cpu(tmp_path: Path) -> None:
    setup = bench_gpu.Setup(device=torch.device("cpu"), batch=2, image_size=32, steps=1, warmup=0, amp=False,
                            channels_last=True)
    plan = [("resnet18", "triton", "eager"), ("resnet18", "float", "eager")]
    rows = bench_gpu.run_plan(plan, setup, budget_s=0.0, json_path=str(tmp_path / "b.json"), env={})
    assert rows[0]["status"].startswith("n/a") and rows[1]["status"] == "skipped (budget)"
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == rows


def test_bench_gpu_ratios_and_targets() -> None:
    rows = [{"model": "m", "variant": v, "mode": "compiled", "status": "ok", "ms_per_step": ms, "peak_gib": gib}
            for v, ms, gib in (("float", 10.0, 2.0), ("torch", 10.4, 2.2), ("ao_fq", 20.0, 2.0))]
    rows.append({"model": "m", "variant": "triton", "mode": "compiled", "status": "error: boom"})
    bench_gpu.add_ratios(rows)
    assert rows[1]["ratio"] == pytest.approx(1.04) and rows[1]["meets_time"] is True
    assert rows[1]["mem_ratio"] == pytest.approx(1.1) and rows[1]["meets_mem"] is False
    assert rows[2]["ratio"] == 2.0 and rows[2]["meets_time"] is None  # targets are for the qat_ste rows
    assert rows[3]["ratio"] is None and rows[3]["meets_time"] is None
    table = bench_gpu.format_table(rows, "title")
    assert "1.04x ok" in table and "1.10x MISS" in table and "error: boom" in table


def test_ao_fake_quant_is_inserted_after_each_activation_call() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.Hardswish(), torch.nn.Flatten(), torch.nn.LazyLinear(3), torch.nn.Sigmoid())
    bench_gpu.insert_ao(model, "ao_lsq", cast=False)
    wrapped = [m for m in model.modules() if isinstance(m, bench_gpu.ActThenFakeQuant)]
    assert len(wrapped) == 2 and isinstance(model[6], torch.nn.Sigmoid)  # gates stay float
    assert bench_gpu.count_calls(model, torch.randn(2, 3, 8, 8)) == 2
    quant = wrapped[0].fake_quant
    assert (quant.quant_min, quant.quant_max, quant.dtype) == (0, 15, torch.quint8)


def test_bench_gpu_time_limit_stops_a_row() -> None:
    import time

    with pytest.raises(bench_gpu.RowStopped), bench_gpu.time_limit(0.05):
        time.sleep(5)
    with bench_gpu.time_limit(5):  # the timer is cancelled when the block ends in time
        pass
    time.sleep(0.01)


# ---- bench_finetune_gpu --------------------------------------------------------------------------


def test_finetune_imagefolder_layout_and_classes_differ(tmp_path: Path) -> None:
    count = bench_finetune_gpu.make_imagefolder(tmp_path, classes=2, train_per_class=2, val_per_class=1, size=24)
    assert count == 6
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg")) == [
        "train/class00/00000.jpg", "train/class00/00001.jpg", "train/class01/00000.jpg", "train/class01/00001.jpg",
        "val/class00/00000.jpg", "val/class01/00000.jpg"]
    a, b = (bench_finetune_gpu.draw_image(c, 2, 24, np.random.default_rng(0)) for c in (0, 1))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8 and np.abs(a.astype(int) - b).mean() > 10


def test_finetune_reads_the_last_epoch_rates_from_report(tmp_path: Path) -> None:
    report = {"data": {"train_images": 10, "image_size": [224, 224]},
              "quantization": {"sites_quantized": 17, "kernel": "auto"},
              "float": {"accuracy": 0.5, "history": [{"images_per_s": 50.0}, {"images_per_s": 200.0}]},
              "quantized": {"accuracy": 0.4, "history": [{"images_per_s": 40.0}, {"images_per_s": 180.0}]}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    row = bench_finetune_gpu.read_report(tmp_path / "report.json")
    assert (row["float_images_per_s"], row["quantized_images_per_s"], row["ratio"]) == (200.0, 180.0, 0.9)
    assert row["float_first_epoch_images_per_s"] == 50.0 and row["sites"] == 17
    table = bench_finetune_gpu.format_table([{"model": "torchvision:resnet18", "status": "ok", **row}], "t")
    assert table.splitlines()[-1].split() == ["torchvision:resnet18", "224", "200", "180", "0.90x", "ok"]


def test_finetune_reads_the_finished_epochs_of_a_stopped_run(tmp_path: Path) -> None:
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "metrics.csv").write_text("epoch,step,images_per_s\n1,5,20.0\n2,10,80.5\n")
    found = bench_finetune_gpu.read_metrics(tmp_path)
    assert (found["float_images_per_s"], found["float_first_epoch_images_per_s"]) == (80.5, 20.0)
    assert "quantized_images_per_s" not in found and found["ratio"] is None


def test_finetune_flags_a_compile_that_fell_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run-torchvision-resnet18"
    run.mkdir()
    report = {"data": {}, "quantization": {}, "float": {"history": [{"images_per_s": 10.0}]},
              "quantized": {"history": [{"images_per_s": 8.0}]}}
    (run / "report.json").write_text(json.dumps(report))
    output = "UserWarning: torch.compile failed on this model (BackendCompilerFailed: x); training continues"
    monkeypatch.setattr(bench_finetune_gpu, "run_command", lambda command, timeout: (0, output, 1.0))
    args = bench_finetune_gpu.parse_args(["--device", "cpu", "--smoke"])
    row = bench_finetune_gpu.bench_model("torchvision:resnet18", tmp_path / "d", tmp_path, args, 10.0)
    assert row["status"] == "ok (compile fell back to eager)" and row["compile_fallback"] is True
    assert row["ratio"] == pytest.approx(0.8)


def test_finetune_smoke_defaults_and_command() -> None:
    args = bench_finetune_gpu.parse_args(["--device", "cpu", "--smoke"])
    assert (args.amp, args.compile, args.image_size, args.batch_size, args.workers) == ("off", "off", 64, 4, 1)
    command = bench_finetune_gpu.convert_command("timm:vit_small_patch16_224", Path("/d"), Path("/o"), args)
    assert command[1:4] == ["-m", "qat_ste.cli", "convert"]
    joined = " ".join(command)
    assert "--data imagefolder:/d" in joined and "--no-export" in joined and "--workers 1" in joined
    gpu = bench_finetune_gpu.parse_args([])
    assert (gpu.amp, gpu.compile, gpu.workers, gpu.device, gpu.image_size) == ("bf16", "on", 12, "cuda", None)
    assert "--image-size" not in bench_finetune_gpu.convert_command("m", Path("/d"), Path("/o"), gpu)


# ---- gpu_check -----------------------------------------------------------------------------------


def test_gpu_check_without_cuda_says_so_and_exits_0(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA
    assert not (tmp_path / "o").exists()


def test_gpu_check_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(["--device", "cpu"])
    assert stop.value.code == 2 and "--device cpu runs only the smoke check" in capsys.readouterr().err
    monkeypatch.setenv("OUT", "/somewhere/out")
    args = gpu_check.parse_args([])
    assert (args.out, args.budget_s, args.device, args.skip) == ("/somewhere/out", 450.0, "cuda", [])
    assert args.mnist.endswith(".data/mnist")
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args(["--skip", "mnist"]).out.endswith("out/gpu_check")


def test_gpu_check_shares_the_budget_and_goes_on_after_a_failing_step(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budgets: dict[str, float] = {}

    def fake(name: str, fail: bool = False):
        def step(args, out, budget):
            budgets[name] = budget
            if fail:
                raise RuntimeError("broken step")
            return gpu_check.StepResult(name, "ok", 1.0, f"{name} figure")
        return step

    monkeypatch.setattr(gpu_check, "step_env", lambda args, out: gpu_check.StepResult("env", "ok", figure="cpu"))
    monkeypatch.setattr(gpu_check, "step_tests", fake("tests", fail=True))
    monkeypatch.setattr(gpu_check, "step_bench_gpu", fake("bench_gpu"))
    monkeypatch.setattr(gpu_check, "step_finetune", fake("finetune"))
    code = gpu_check.main(["--device", "cpu", "--smoke", "--budget-s", "100", "--skip", "mnist",
                           "--out", str(tmp_path)])
    assert code == 1
    shares = gpu_check.SMOKE_SHARES  # a CPU smoke run
    assert budgets["tests"] == pytest.approx(100 * shares["tests"] / (1 - shares["mnist"]), rel=0.05)
    # the fakes take no time, so what a step leaves goes on: bench_gpu its share of nearly all, finetune the rest
    share = shares["bench_gpu"] / (shares["bench_gpu"] + shares["finetune"])
    assert budgets["bench_gpu"] == pytest.approx(100 * share, rel=0.05)
    assert budgets["finetune"] == pytest.approx(100, rel=0.05)
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["step"], s["status"][:16]) for s in document["steps"]] == [
        ("env", "ok"), ("tests", "error: RuntimeEr"), ("mnist", "skipped (--skip)"), ("bench_gpu", "ok"),
        ("finetune", "ok")]
    out = capsys.readouterr().out
    assert "gpu_check (" in out and "bench_gpu figure" in out and "error: RuntimeError: broken step" in out


def test_gpu_check_kills_a_step_at_its_timeout(tmp_path: Path) -> None:
    code, seconds = gpu_check.run_logged([sys.executable, "-c", "import time; print('started', flush=True); "
                                          "time.sleep(60)"], tmp_path / "x.log", 1.5)
    assert code is None and seconds < 30
    log = (tmp_path / "x.log").read_text()
    assert "started" in log and "killed after the step's timeout of 2 s" in log
    assert gpu_check.status_of(None, 1.5) == "timeout (2 s)" and gpu_check.status_of(3, 1) == "failed (exit 3)"


def test_gpu_check_stop_group_kills_a_child_that_ignores_sigterm() -> None:
    import signal
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    gpu_check.stop_group(child, grace_s=0.5)
    assert child.returncode == -signal.SIGKILL
    child.stdout.close()


def test_gpu_check_reprints_the_benchmark_tables(tmp_path: Path) -> None:
    rows = [{"model": "resnet50", "variant": v, "mode": "eager", "status": "ok", "ms_per_step": ms, "peak_gib": 2.0,
             "sites": 0, "note": ""} for v, ms in (("float", 100.0), ("triton", 110.0))]
    (tmp_path / "bench_gpu.json").write_text(json.dumps({"rows": rows}))
    finetune = [{"model": "timm:vit_small_patch16_224", "status": "skipped (budget)", "seconds": 0.0}]
    (tmp_path / "finetune.json").write_text(json.dumps({"rows": finetune}))
    text = gpu_check.benchmark_tables(tmp_path)
    assert "bench_gpu.json (2 rows)" in text and "1.10x ok" in text
    assert "finetune.json (1 rows)" in text and "skipped (budget)" in text
    assert gpu_check.benchmark_tables(tmp_path / "nothing") == ""

"""The qat-ste command line: convert end to end (report.json with real figures), export and check
from its checkpoint, the lists, and bad input -> one-paragraph error, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat_ste.cli import main
from qat_ste.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--float-epochs", "1", "--epochs", "1", "--batch-size", "128", "--calib-batches", "1",
        "--calib-method", "percentile", "--check-samples", "64", "--no-progress"]

pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread is fastest


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert")
    assert main(["convert", "--out", str(out), *TINY]) == 0
    return out


def test_convert_writes_a_report_with_real_figures(converted, capsys):
    report = json.loads((converted / "report.json").read_text())
    summary = report["summary"]
    for key in ("float_accuracy", "calibrated_accuracy", "quantized_accuracy", "onnx_accuracy", "code_agreement",
                "top1_agreement"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["code_parity"] == 1.0  # per-site codes are exact by construction
    assert summary["check_ok"] is True
    assert summary["float_accuracy"] > 0.3 and summary["quantized_accuracy"] > 0.3  # 10 classes: chance 0.1
    assert summary["onnx_accuracy"] == pytest.approx(summary["torch_accuracy_on_check_samples"], abs=0.02)
    assert summary["check_samples"] == 64
    assert summary["onnx_file_size_bytes"] == (converted / "model.onnx").stat().st_size > 1000
    assert summary["latency_ms"]["quantized"] > 0
    assert report["model"]["spec"] == "zoo:lenet5" and report["data"]["spec"] == "digits"
    assert report["data"]["image_size"] == [28, 28]
    assert report["quantization"] == {**report["quantization"], "bits": 4, "ste": "clipped_relu", "alpha": "lsq",
                                      "sites_quantized": 4}
    assert len(report["float"]["history"]) == 1 and len(report["quantized"]["history"]) == 1
    assert report["check"]["ok"] and report["onnx"]["form"] == "deploy"
    assert set(report["timings_s"]) >= {"float_s", "calibrate_s", "finetune_s", "export_s", "check_s", "total_s"}
    quantization = json.loads((converted / "quantization.json").read_text())
    assert quantization["quantized"] == 4
    assert "relu1" in (converted / "quantization.txt").read_text()
    state = load_checkpoint(converted / "qat" / "last.pt")
    assert state["metadata"]["quant"] == {"bits": 4, "ste": "clipped_relu", "alpha": "lsq"}
    assert (converted / "float" / "last.pt").is_file() and (converted / "qat" / "metrics.csv").is_file()


def test_convert_resume_of_a_finished_run_reproduces_it(converted, tmp_path):
    before = json.loads((converted / "report.json").read_text())["summary"]
    assert main(["convert", "--out", str(converted), *TINY, "--resume", "--no-export"]) == 0
    after = json.loads((converted / "report.json").read_text())["summary"]
    assert after["quantized_accuracy"] == before["quantized_accuracy"]
    assert after["float_accuracy"] == before["float_accuracy"]
    assert after["calibrated_accuracy"] is None  # not re-calibrated: the weights come from qat/last.pt


def test_export_and_check_from_the_checkpoint(converted, tmp_path, capsys):
    target = tmp_path / "int8.onnx"
    assert main(["export", "--checkpoint", str(converted / "qat" / "last.pt"), "--out", str(target),
                 "--weights", "int8"]) == 0
    assert target.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    code = main(["check", "--onnx", str(target), "--checkpoint", str(converted / "qat" / "best.pt"), "--json",
                 "--check-samples", "32", "--no-latency"])
    printed = capsys.readouterr().out
    report = json.loads(printed)
    assert report["weights"] == "int8" and report["samples"] == 32
    assert code == (0 if report["ok"] else 1)
    assert report["site_parity"] == 1.0


def test_check_exits_1_when_parity_fails(converted, capsys):
    # a freshly initialised LeNet-5 (calibrated on digits) is not the model the file came from
    code = main(["check", "--onnx", str(converted / "model.onnx"), "--model", "zoo:lenet5", "--calib-batches", "1",
                 "--check-samples", "32", "--no-latency"])
    captured = capsys.readouterr()
    assert code == 1
    assert "fails the parity thresholds" in captured.err and "FAILED" in captured.out


def test_lists(capsys):
    assert main(["list-stes"]) == 0
    out = capsys.readouterr().out
    assert "clipped_relu" in out and "log_tailed_relu" in out
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "resnet20" in out and "torchvision" in out and "timm" in out


@pytest.mark.parametrize("argv, expected", [
    (["convert", "--ste", "nope"], "unknown STE 'nope'"),
    (["convert", "--bits", "9"], "bits=9 is not supported"),
    (["convert", "--bits", "four"], "invalid int value"),
    (["convert", "--alpha", "magic"], "unknown alpha mode"),
    (["convert", "--data", "mnist:/nonexistent/mnist"], "does not exist"),
    (["convert", "--data", "cifar10:/nonexistent/cifar"], "does not exist"),
    (["convert", "--data", "imagenet"], "unknown data set"),
    (["convert", "--model", "zoo:nope"], "unknown zoo model 'nope'"),
    (["convert", "--model", "torchvision:resnet1234"], "unknown torchvision model"),
    (["convert", "--model", "keras:resnet"], "unknown model source"),
    (["convert", "--model", "timm:resnet18@pretrained"], "downloaded weights"),
    (["convert", "--model", "hf-hub:timm/resnet18.a1_in1k"], "hub"),
    (["convert", "--weights", "hub"], "never downloads"),
    (["convert", "--weights", "IMAGENET1K_V1"], "never downloads"),
    (["convert", "--weights", "/nonexistent/r18.pt"], "does not exist"),
    (["convert", "--image-size", "8"], "at least 12x12"),
    (["convert", "--epochs", "-1"], "must be >= 0"),
    (["convert", "--resume", "--out", "/nonexistent/run"], "nothing to resume"),
    (["convert", "--check-samples", "0"], "must be > 0"),
    (["convert", "--min-code-agreement", "1.5"], "between 0 and 1"),
    (["check", "--onnx", "/nonexistent/model.onnx", "--checkpoint", "x.pt"], "does not exist"),
    (["export", "--out", "x.onnx", "--checkpoint", "/nonexistent/last.pt"], "does not exist"),
    (["explode"], "invalid choice"),
    ([], "required"),
])
def test_bad_input_is_one_paragraph_and_exit_2(argv, expected, capsys, tmp_path):
    argv = [a if a != "x.onnx" else str(tmp_path / "x.onnx") for a in argv]
    if argv[:1] == ["convert"] and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.startswith("qat-ste: error:") and "Fix:" in err
    assert "Traceback" not in err and err.count("\n") == 1  # one paragraph


def test_corrupt_and_foreign_checkpoints_exit_2(converted, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((converted / "qat" / "last.pt").read_bytes()[:5000])
    assert main(["export", "--checkpoint", str(corrupt), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(converted / "float" / "last.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "float pre-training checkpoint" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    assert main(["convert", "--weights", str(plain), "--out", str(tmp_path / "o")]) == 2
    assert "no tensor of" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "qat_ste.cli", "convert", "--bits", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "bits=0" in bad.stderr and "Traceback" not in bad.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_convert_under_torchrun_with_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "qat_ste.cli", "convert", "--out", str(out), "--device", "cpu",
               "--float-epochs", "1", "--epochs", "1", "--batch-size", "64", "--calib-batches", "1",
               "--calib-method", "percentile", "--check-samples", "32", "--no-latency", "--no-progress"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["summary"]["check_ok"] is True
    assert run.stdout.count("qat-ste convert summary") == 1  # printed by rank 0 only
    assert load_checkpoint(out / "qat" / "last.pt")["world_size"] == 2


def test_weights_file_loads_the_tensors_that_fit(tmp_path):
    from qat_ste.train.build import load_weights_file
    from qat_ste.zoo import create_zoo_model

    source = create_zoo_model("lenet5", num_classes=5)
    path = tmp_path / "lenet5_5cls.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # a DDP save
    target = create_zoo_model("lenet5", num_classes=10)
    skipped = load_weights_file(target, path)
    assert skipped == ["fc3.bias", "fc3.weight"]  # the classifier for another number of classes
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_torchvision_and_timm_models_are_built_for_the_data():
    from qat_ste.train.build import build_model, parse_model_spec

    resnet = build_model(parse_model_spec("torchvision:resnet18"), num_classes=7, in_channels=1, image_size=32)
    assert resnet.conv1.in_channels == 1 and resnet.fc.out_features == 7
    assert resnet(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    pytest.importorskip("timm")
    net = build_model(parse_model_spec("timm:resnet10t"), num_classes=3, in_channels=1, image_size=32)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 3)

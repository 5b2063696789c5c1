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

from qat_ste.cli import COMMANDS, main
from qat_ste.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--float-epochs", "1", "--epochs", "1", "--batch-size", "128", "--calib-batches", "1",
        "--calib-method", "percentile", "--check-samples", "64", "--no-progress"]

pytest.importorskip("onnxruntime")

#: the checkpoint metadata of QuantConfig() under the agreed names (issue 13)
DEFAULT_QUANT = {"bits": 4, "ste": "clipped_relu", "alpha_mode": "lsq", "step_init": None, "rounding": "nearest",
                 "per_channel": False, "include": None, "exclude": [], "overrides": {}, "keep_first": False,
                 "keep_last": False, "kinds": None, "quantize_gates": False}


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
    assert state["metadata"]["quant"] == DEFAULT_QUANT  # the whole QuantConfig, under the agreed names
    assert state["metadata"]["calibration"] == {"method": "percentile", "batches": 1}
    assert report["quantization"]["alpha_mode"] == "lsq" and report["quantization"]["per_channel"] is False
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
                 "--weight-format", "int8"]) == 0
    assert target.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    code = main(["check", "--onnx", str(target), "--checkpoint", str(converted / "qat" / "best.pt"), "--json",
                 "--check-samples", "32", "--no-latency"])
    printed = capsys.readouterr().out
    report = json.loads(printed)
    assert report["weight_format"] == "int8" and report["samples"] == 32
    assert code == (0 if report["ok"] else 1)
    assert report["site_parity"] == 1.0
    assert report["thresholds"]["min_default_agreement"] == 0.9
    main(["check", "--onnx", str(target), "--checkpoint", str(converted / "qat" / "best.pt"), "--json",
          "--check-samples", "8", "--no-latency", "--min-default-agreement", "none"])
    report = json.loads(capsys.readouterr().out)
    assert report["thresholds"]["min_default_agreement"] is None  # reported, not required
    assert report["default_task_agreement"] is not None
    assert not any("default options" in f for f in report["failures"])


def test_a_checkpoint_trained_with_the_triton_kernel_runs_on_cpu(converted, tmp_path, monkeypatch):
    import qat_ste
    from qat_ste.atomic import atomic_save
    from qat_ste.cli.parser import build_parser
    from qat_ste.cli.sources import _model_from_checkpoint

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    state = load_checkpoint(converted / "qat" / "last.pt")
    state["metadata"]["quant"] = {**state["metadata"]["quant"], "kernel": "triton"}  # as a GPU run saves it
    atomic_save(state, tmp_path / "gpu.pt")
    args = build_parser().parse_args(["export", "--checkpoint", str(tmp_path / "gpu.pt"), "--out", "x.onnx"])
    qmodel, meta, _, val_set = _model_from_checkpoint(str(tmp_path / "gpu.pt"), args)
    assert meta["quant"]["kernel"] == "triton"
    assert set(qat_ste.report(qmodel).implementations().values()) == {"torch"}  # rebuilt with kernel="auto"
    images, _ = val_set.get_batch(torch.arange(4))
    assert qmodel(images).shape == (4, 10)


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
    (["convert", "--alpha-mode", "magic"], "unknown alpha mode"),
    (["convert", "--override", "layer4.*"], "is not PATTERN:KEY=VALUE"),
    (["convert", "--override", "layer4.*:bits=9"], "bits=9 is not supported"),
    (["convert", "--override", "layer4.*:colour=red"], "unknown option"),
    (["convert", "--kinds", "relu,nope"], "unknown activation kind 'nope'"),
    (["convert", "--quant-config", "/nonexistent/q.json"], "--quant-config /nonexistent/q.json does not exist"),
    (["convert", "--resume", "--overwrite"], "contradict"),
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
    (["convert", "--min-default-agreement", "1.5"], "between 0 and 1"),
    (["check", "--onnx", "m.onnx", "--min-default-agreement", "most"], "or 'none'"),
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
    float_checkpoint = str(converted / "float" / "last.pt")
    assert main(["export", "--checkpoint", float_checkpoint, "--out", str(tmp_path / "x.onnx")]) == 2
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
    skipped = load_weights_file(target, path, allow_partial=True, on_partial=lambda message: None)
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


# ---- nothing lost: finished runs, export targets (issue 8) -------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_convert_refuses_to_overwrite_a_finished_run(converted, capsys):
    before = _snapshot(converted)
    accuracy = json.loads((converted / "report.json").read_text())["summary"]["quantized_accuracy"]
    assert main(["convert", "--out", str(converted), *TINY]) == 2
    err = capsys.readouterr().err
    assert (f"--out {converted} already holds a finished run (report.json: zoo:lenet5 on digits, quantized "
            f"accuracy {100 * accuracy:.2f} %;") in err
    assert "Fix: pass --resume to continue that run, --overwrite to replace its files, or another --out" in err
    assert _snapshot(converted) == before  # not a byte changed


def test_convert_refuses_a_non_empty_folder_and_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "mine" / name).write_text("keep me")
    assert main(["convert", "--out", str(tmp_path / "mine"), *TINY]) == 2
    assert f"--out {tmp_path / 'mine'} already holds 2 file(s) (a.txt, b.txt)" in capsys.readouterr().err
    (tmp_path / "run" / "qat").mkdir(parents=True)
    (tmp_path / "run" / "qat" / "last.pt").write_bytes(b"checkpoint")
    assert main(["convert", "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "already holds an interrupted run (qat/last.pt; 1 file(s) in all)" in capsys.readouterr().err
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["convert", "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {tmp_path / 'file'} is a file, not a folder" in err and "image-size" not in err
    assert (tmp_path / "mine" / "a.txt").read_text() == "keep me"


def test_convert_overwrite_replaces_files_as_it_writes_them(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "qat").mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"summary": {"quantized_accuracy": 0.5}}))
    (out / "notes.txt").write_text("keep me")
    stale = out / "qat" / f".last.pt.{2 ** 22 + 12345}.0123abcd.tmp"  # a pid above pid_max: a dead writer
    stale.write_bytes(b"partial")
    argv = ["convert", "--out", str(out), "--float-epochs", "0", "--epochs", "1", "--batch-size", "128",
            "--calib-batches", "1", "--calib-method", "percentile", "--no-export", "--no-progress"]
    assert main(argv) == 2  # not without --overwrite
    assert "already holds a finished run (report.json: None on None, quantized accuracy 50.00 %" in \
        capsys.readouterr().err
    assert stale.exists()  # a refused run touches nothing
    assert main([*argv, "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "qat_ste.convert/1" and report["quantized"]["epochs"] == 1
    assert (out / "notes.txt").read_text() == "keep me"  # the folder was not emptied up front
    assert not stale.exists()  # stale temporary files of a killed run are removed at the start


def test_overwrite_drops_the_old_runs_resume_points_but_keeps_its_results(tmp_path, capsys):
    """An --overwrite run stopped early must not leave the old run's last.pt for a later --resume to
    continue; the old results stay until the new run replaces them."""
    out = tmp_path / "run"
    for stage in ("float", "qat"):
        (out / stage).mkdir(parents=True)
        (out / stage / "last.pt").write_bytes(b"the old run's checkpoint")
    (out / "qat" / "best.pt").write_bytes(b"the old run's best model")
    argv = ["convert", "--out", str(out), "--overwrite", "--float-epochs", "0", "--epochs", "0",
            "--calib-batches", "1", "--no-export", "--no-progress", "--data", "nonexistent-spec"]
    assert main(argv) == 2  # bad input: refused before anything is removed
    assert (out / "qat" / "last.pt").exists()
    argv[-1] = "digits"
    assert main(argv) == 0
    assert not (out / "float" / "last.pt").exists() and not (out / "qat" / "last.pt").exists()
    assert (out / "qat" / "best.pt").read_bytes() == b"the old run's best model"  # no new best.pt with 0 epochs
    capsys.readouterr()


def test_export_refuses_its_own_input_and_existing_files(converted, tmp_path, capsys):
    checkpoint = converted / "qat" / "last.pt"
    before = checkpoint.read_bytes()
    for spelling in (checkpoint, converted / "float" / ".." / "qat" / "last.pt"):
        for extra in ([], ["--overwrite"]):
            assert main(["export", "--checkpoint", str(checkpoint), "--out", str(spelling), *extra]) == 2
            assert f"--out {spelling} is the --checkpoint file it would be exported from" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    target = tmp_path / "model.onnx"
    target.write_bytes(b"an older export")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--out {target} already exists (15 B)" in err and "Fix: pass --overwrite to replace it" in err
    assert target.read_bytes() == b"an older export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err
    stale = tmp_path / f".model.onnx.{2 ** 22 + 12345}.0123abcd.tmp"
    stale.write_bytes(b"partial")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(target), "--overwrite"]) == 0
    assert target.read_bytes()[:2] != b"an" and target.stat().st_size > 1000
    assert not stale.exists()


def test_resume_refuses_changed_quantization(converted, capsys):
    before = _snapshot(converted)
    assert main(["convert", "--out", str(converted), *TINY, "--resume", "--no-export", "--bits", "2"]) == 2
    err = capsys.readouterr().err
    assert "bits" in err and "--force-resume" in err
    assert _snapshot(converted) == before  # refused before anything was written


# ---- signals, --force-resume, the QuantConfig options: train() replaced by a recorder ------------


@pytest.fixture
def fake_train(monkeypatch):
    """qat_ste.train.train replaced: records (config, metadata) and returns ``result`` (fields)."""
    from qat_ste.train import TrainResult

    calls: list[tuple] = []
    result: dict = {}

    def record(model, train_set, val_set, config, *, metadata=None, teacher=None):
        calls.append((config, metadata))
        return TrainResult(**result, last_checkpoint=str(Path(config.out_dir) / "last.pt"))

    monkeypatch.setattr("qat_ste.train.train", record)
    return calls, result


FAST = ["--float-epochs", "1", "--epochs", "1", "--calib-batches", "1", "--calib-method", "max", "--no-export",
        "--no-progress"]


@pytest.mark.parametrize("reason, code", [("SIGTERM", 143), ("interrupted (Ctrl-C)", 130),
                                          ("stop_after_steps=3", 1)])
def test_a_stopped_run_exits_with_the_signal_code_and_says_how_to_resume(fake_train, tmp_path, capsys, reason, code):
    calls, result = fake_train
    result.update(stopped_early=True, stop_reason=reason)
    out = tmp_path / "run"
    assert main(["convert", "--out", str(out), *FAST]) == code
    printed = capsys.readouterr().out
    assert f"stopped ({reason}); {out / 'float' / 'last.pt'} is saved. Resume with the same options plus: " \
           f"--out {out} --resume" in printed
    assert len(calls) == 1 and not (out / "report.json").exists()


def test_force_resume_and_the_whole_quant_config_reach_train(fake_train, tmp_path, capsys):
    calls, _ = fake_train
    out = tmp_path / "run"
    (out / "float").mkdir(parents=True)
    (out / "float" / "last.pt").write_bytes(b"read by the real train() only")
    config_file = tmp_path / "quant.json"
    config_file.write_text(json.dumps({"bits": 3, "alpha": "pact", "exclude": ["fc*"], "keep_last": True,
                                       "overrides": {"conv*": {"bits": 5}}}))
    argv = ["convert", "--out", str(out), *FAST, "--force-resume", "--quant-config", str(config_file),
            "--bits", "6", "--step-init", "0.5", "--rounding", "ceil", "--per-channel", "--include", "relu*",
            "--include", "conv*", "--override", "relu1:bits=8,alpha_init=0.25", "--override", "relu2:per_channel=true",
            "--kinds", "relu,tanh", "--quantize-gates", "--no-keep-last"]
    assert main(argv) == 0
    (float_config, float_meta), (qat_config, qat_meta) = calls
    assert float_config.force_resume and qat_config.force_resume
    assert float_config.resume == str(out / "float" / "last.pt") and qat_config.resume is None
    assert float_meta["quant"] is None and float_meta["calibration"] is None
    assert qat_meta["calibration"] == {"method": "max", "batches": 1}
    expected = {**DEFAULT_QUANT, "bits": 6, "alpha_mode": "pact", "step_init": 0.5, "rounding": "ceil",
                "per_channel": True, "include": ["relu*", "conv*"], "exclude": ["fc*"],
                "overrides": {"relu1": {"bits": 8, "step_init": 0.25}, "relu2": {"per_channel": True}},
                "keep_last": False, "kinds": ["relu", "tanh"], "quantize_gates": True}
    assert qat_meta["quant"] == expected  # flags override the file; --override replaces its overrides
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"] == {**expected, "alpha": "pact", "calibration": {"method": "max", "batches": 1},
                                      "sites_quantized": report["quantization"]["sites_quantized"],
                                      "sites_left_float": report["quantization"]["sites_left_float"]}


def test_deprecated_spellings_still_work_with_a_note(capsys):
    from qat_ste.cli import build_parser
    from qat_ste.train import TrainConfig

    args = build_parser().parse_args(["convert", "--alpha", "fixed", "--export-weights", "int8"])
    assert args.alpha_mode == "fixed" and args.weight_format == "int8"
    err = capsys.readouterr().err
    assert "qat-ste: note: --alpha is deprecated; use --alpha-mode" in err
    assert "qat-ste: note: --export-weights is deprecated; use --weight-format" in err
    args = build_parser().parse_args(["export", "--out", "m.onnx", "--weights", "int8"])
    assert args.weight_format == "int8" and args.model_weights is None
    assert "--weights is deprecated; use --weight-format" in capsys.readouterr().err
    args = build_parser().parse_args(["convert", "--weights", "r18.pt"])  # convert's --weights: the input file
    assert args.model_weights == "r18.pt" and args.weight_format is None and capsys.readouterr().err == ""
    defaults = TrainConfig()
    assert (args.calib_batches, args.calib_method) == (defaults.calibrate_batches, defaults.calibrate_method)


# ---- --weights that do not fit ---------------------------------------------------------------------


def test_weights_file_that_does_not_fit_is_refused_listing_the_keys(tmp_path):
    from qat_ste.errors import QatSteError
    from qat_ste.train.build import load_weights_file
    from qat_ste.zoo import create_zoo_model

    state = create_zoo_model("lenet5", num_classes=5).state_dict()
    del state["bn1.bias"]
    del state["bn2.num_batches_tracked"]  # a counter, not a weight: may be missing, as for load_state_dict
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    target = create_zoo_model("lenet5", num_classes=10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(QatSteError) as info:
        load_weights_file(target, path)
    message = str(info.value)
    assert (f"weights file {path} does not fit this model: 1 tensor(s) missing from the file: bn1.bias; "
            "1 tensor(s) unexpected: extra.weight; 2 tensor(s) of the wrong shape: fc3.weight (5, 84) in the file "
            "vs (10, 84) in the model, fc3.bias (5,) in the file vs (10,) in the model") in message
    assert "--allow-partial" in message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing loaded
    with pytest.warns(UserWarning, match="fits this model only in part .*1 tensor.s. missing from the file"):
        skipped = load_weights_file(target, path, allow_partial=True)
    assert skipped == ["bn1.bias", "fc3.bias", "fc3.weight"]
    assert torch.equal(target.conv1.weight, state["conv1.weight"])


def test_convert_allow_partial_warns_and_records_the_keys(tmp_path, capsys):
    from qat_ste.zoo import create_zoo_model

    path = tmp_path / "lenet5_5cls.pt"
    torch.save(create_zoo_model("lenet5", num_classes=5).state_dict(), path)
    argv = ["convert", "--weights", str(path), "--epochs", "0", "--calib-batches", "1", "--calib-method", "max",
            "--no-export", "--no-progress"]
    # only the classifier differs (5 -> 10 classes): loaded with a new head, said (issue 9)
    assert main([*argv, "--out", str(tmp_path / "new_head")]) == 0
    assert "new head: fc3 (5 → 10 classes), randomly initialised" in capsys.readouterr().out
    report = json.loads((tmp_path / "new_head" / "report.json").read_text())
    assert report["model"]["tensors_left_random"] == ["fc3.bias", "fc3.weight"]
    assert main([*argv, "--out", str(tmp_path / "partial"), "--allow-partial"]) == 0
    assert "warning: weights file" in capsys.readouterr().out
    report = json.loads((tmp_path / "partial" / "report.json").read_text())
    assert report["model"]["tensors_left_random"] == ["fc3.bias", "fc3.weight"]


@pytest.mark.slow
def test_sigterm_stops_convert_with_a_checkpoint_and_exit_143(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "qat_ste.cli", "convert", "--out", str(out), "--float-epochs", "200",
               "--batch-size", "32", "--checkpoint-every", "1", "--no-progress", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "float" / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert f"stopped (SIGTERM); {out / 'float' / 'last.pt'} is saved. Resume with the same options plus: " \
           f"--out {out} --resume" in stdout
    state = load_checkpoint(out / "float" / "last.pt")
    assert state["step"] >= 1 and not (out / "report.json").exists()


def test_an_os_error_is_not_blamed_on_the_image_size(monkeypatch, capsys):
    def full_disk(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(COMMANDS, "convert", full_disk)
    assert main(["convert"]) == 2
    err = capsys.readouterr().err
    assert "OSError: [Errno 28] No space left on device" in err and "free disk space" in err
    assert "image-size" not in err


def test_an_internal_error_exits_1_and_says_it_is_a_bug(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("shape '[-1, 400]' is invalid for input of size 123\n  with more detail")

    monkeypatch.setitem(COMMANDS, "convert", broken)
    assert main(["convert"]) == 1
    err = capsys.readouterr().err
    assert "qat-ste: internal error: RuntimeError: shape '[-1, 400]' is invalid for input of size 123" in err
    assert "This is a bug in qat_ste" in err and "QAT_STE_DEBUG=1" in err and "more detail" not in err
    monkeypatch.setenv("QAT_STE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="shape"):
        main(["convert"])


def test_a_failed_import_of_qat_ste_itself_is_an_internal_error_not_a_missing_package(monkeypatch, capsys):
    def broken(args):
        raise ImportError("cannot import name 'X' from 'qat_ste.export.ops'", name="qat_ste.export.ops")

    monkeypatch.setitem(COMMANDS, "convert", broken)
    assert main(["convert"]) == 1
    err = capsys.readouterr().err
    assert "internal error: ImportError" in err and "required package is missing" not in err

    def missing(args):
        raise ImportError("No module named 'onnxscript'", name="onnxscript")

    monkeypatch.setitem(COMMANDS, "convert", missing)
    assert main(["convert"]) == 2
    assert "a required package is missing" in capsys.readouterr().err


def test_out_of_memory_exits_1_with_the_batch_size_fix(monkeypatch, capsys):
    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(COMMANDS, "convert", oom)
    assert main(["convert"]) == 1
    err = capsys.readouterr().err
    assert "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB" in err and "lower --batch-size" in err


# ---- --config FILE, OUT/config.yaml, the fine-tuning options (issue 9) -------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_sets_options_and_the_command_line_wins(tmp_path):
    from qat_ste.cli import build_parser

    config = _write(tmp_path / "run.yaml", "epochs: 5\nbatch-size: 32\ninclude: ['layer1.*']\ncompile: off\n"
                                            "no_export: true\nweights: w.pt\nema: 0.99\nfreeze-bn-after: 50\n"
                                            "distill: true\nlr: 1\n")
    args = build_parser().parse_args(["convert", "--config", str(config)])
    assert (args.epochs, args.batch_size, args.include, args.compile, args.no_export) == (5, 32, ["layer1.*"], "off",
                                                                                           True)
    assert (args.model_weights, args.ema, args.freeze_bn_after, args.distill, args.lr) == ("w.pt", 0.99, 50, True, 1.0)
    assert args.optimizer == "sgd"  # not in the file: the parser's default
    args = build_parser().parse_args(["convert", "--epochs", "2", "--config", str(config), "--include", "fc*",
                                      "--no-distill", "--freeze-bn-after", "never"])
    assert (args.epochs, args.batch_size, args.include, args.distill, args.freeze_bn_after) == (2, 32, ["fc*"], False,
                                                                                                 "never")
    as_json = _write(tmp_path / "run.json", json.dumps({"epochs": 4, "label_smoothing": 0.1}))
    args = build_parser().parse_args(["convert", "--config", str(as_json)])
    assert (args.epochs, args.label_smoothing) == (4, 0.1)


@pytest.mark.parametrize(("text", "expected"), [
    ("epochs: 2\nbatchsize: 3\nfoo: 1\n", "unknown option(s) batchsize, foo"),
    ("epochs: two\n", "epochs is 'two': not a valid int"),
    ("freeze_bn_after: -2\n", "freeze_bn_after is -2: -2 must be >= 0 (or 'never')"),
    ("no_export: 3\n", "no_export is 3; this switch takes true or false"),
    ("compile: maybe\n", "compile is 'maybe'; choose from auto, on, off"),
    ("- epochs\n", "holds a list, not a mapping of options"),
    ("epochs: [1\n", "cannot read --config"),
])
def test_bad_config_files_are_refused_clearly(tmp_path, capsys, text, expected):
    config = _write(tmp_path / "bad.yaml", text)
    assert main(["convert", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    if "unknown" in expected:
        assert "batch_size" in err and "float_epochs" in err  # the valid names are listed
    assert not (tmp_path / "o").exists()


def test_resolved_config_is_written_and_reruns_the_same(tmp_path, capsys):
    from qat_ste.cli import build_parser

    quant = _write(tmp_path / "quant.json", json.dumps({"bits": 3, "overrides": {"relu1": {"bits": 8}}}))
    config = _write(tmp_path / "run.yaml", f"float-epochs: 1\nepochs: 1\nbatch_size: 128\nquant_config: {quant}\n"
                                            "calib-batches: 1\ncalib_method: percentile\nno-export: true\n")
    first = tmp_path / "first"
    assert main(["convert", "--config", str(config), "--out", str(first), "--no-progress", "--seed", "3"]) == 0
    written = first / "config.yaml"
    text = written.read_text()
    assert text.startswith("# qat-ste convert: every option of this run, resolved")
    args = build_parser().parse_args(["convert", "--config", str(written)])
    assert (args.bits, args.override, args.quant_config) == (3, ["relu1:bits=8"], None)  # the resolved quantization
    assert (args.seed, args.float_epochs, args.lr, args.warmup_epochs, args.distill) == (3, 1, 0.01, 0.0, False)
    assert (args.out, args.no_progress, args.freeze_bn_after) == (str(first), True, "never")
    assert (args.model, args.data, args.image_size) == ("zoo:lenet5", "digits", 28)  # the defaults convert picked
    import yaml

    assert not {"resume", "force_resume", "overwrite", "config"} & set(yaml.safe_load(text))
    second = tmp_path / "second"
    assert main(["convert", "--config", str(written), "--out", str(second)]) == 0
    reports = [json.loads((folder / "report.json").read_text()) for folder in (first, second)]
    assert reports[0]["summary"] == reports[1]["summary"]
    assert reports[0]["quantization"] == reports[1]["quantization"]
    assert (second / "config.yaml").read_text() == text.replace(str(first), str(second))


def test_pretrained_start_takes_the_fine_tuning_defaults(tmp_path, capsys):
    import yaml

    from qat_ste.zoo import create_zoo_model

    weights = tmp_path / "lenet5.pt"
    torch.save(create_zoo_model("lenet5", num_classes=10).state_dict(), weights)
    argv = ["convert", "--weights", str(weights), "--epochs", "0", "--calib-batches", "1", "--no-export",
            "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "pre")]) == 0
    assert ("pretrained start (--weights, --float-epochs 0): fine-tuning defaults warmup 0.1 epoch(s), "
            "distillation from the float model (weight 0.5, temperature 2), BatchNorm statistics frozen after 200 "
            "step(s)") in capsys.readouterr().out
    resolved = yaml.safe_load((tmp_path / "pre" / "config.yaml").read_text())
    assert {k: resolved[k] for k in ("lr", "warmup_epochs", "distill", "freeze_bn_after", "float_epochs")} == {
        "lr": 0.01, "warmup_epochs": 0.1, "distill": True, "freeze_bn_after": 200, "float_epochs": 0}
    assert main([*argv, "--out", str(tmp_path / "mine"), "--lr", "0.03", "--no-distill"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning defaults warmup 0.1 epoch(s), BatchNorm statistics frozen after 200 step(s)" in out
    resolved = yaml.safe_load((tmp_path / "mine" / "config.yaml").read_text())
    assert (resolved["lr"], resolved["distill"]) == (0.03, False)
    assert main([*argv[:3], "--float-epochs", "1", *argv[3:], "--out", str(tmp_path / "float")]) == 0
    assert "pretrained start" not in capsys.readouterr().out
    resolved = yaml.safe_load((tmp_path / "float" / "config.yaml").read_text())
    assert (resolved["warmup_epochs"], resolved["distill"], resolved["freeze_bn_after"]) == (0.0, False, "never")
    # a new head (5 -> 10 classes) is untrained: the float model cannot teach, so no distillation
    torch.save(create_zoo_model("lenet5", num_classes=5).state_dict(), weights)
    assert main([*argv, "--out", str(tmp_path / "new_head")]) == 0
    out = capsys.readouterr().out
    assert "new head: fc3 (5 → 10 classes)" in out and "distillation off: the float model has untrained" in out
    assert yaml.safe_load((tmp_path / "new_head" / "config.yaml").read_text())["distill"] is False


def test_fine_tuning_options_become_train_config_settings(capsys):
    from qat_ste.cli import build_parser
    from qat_ste.cli.train_options import _finetune_settings, _teacher, _train_settings, resolve_finetune_defaults

    args = build_parser().parse_args(["convert", "--distill", "--distill-weight", "0.3", "--distill-temperature", "2",
                                      "--ema", "0.995", "--label-smoothing", "0.1", "--freeze-bn-after", "7"])
    assert resolve_finetune_defaults(args) == []  # not a pretrained start
    assert _finetune_settings(args) == {"distill_weight": 0.3, "distill_temperature": 2.0, "ema_decay": 0.995,
                                        "freeze_bn_after_steps": 7}
    assert _train_settings(args)["label_smoothing"] == 0.1
    model = torch.nn.Linear(2, 2)
    teacher = _teacher(model, args)
    assert teacher is not model and torch.equal(teacher.weight, model.weight)
    args = build_parser().parse_args(["convert"])
    resolve_finetune_defaults(args)
    assert _finetune_settings(args) == {"distill_weight": 0.0, "distill_temperature": 2.0, "ema_decay": None,
                                        "freeze_bn_after_steps": None}
    assert _teacher(model, args) is None
    for bad, expected in ((["--ema", "1.5"], "ema_decay=1.5 must be a number between 0 and 1"),
                          (["--label-smoothing", "1"], "label_smoothing=1.0 must be < 1"),
                          (["--freeze-bn-after", "-3"], "-3 must be >= 0 (or 'never')"),
                          (["--lr", "0"], "--lr 0.0 must be > 0")):
        assert main(["convert", *bad, "--out", "/nonexistent/never"]) == 2
        assert expected in capsys.readouterr().err


def test_export_names_the_data_file_of_a_model_over_the_one_file_limit(converted, tmp_path, capsys, monkeypatch):
    from qat_ste.export import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)  # lenet5's weights take more: external data
    target = tmp_path / "big.onnx"
    assert main(["export", "--checkpoint", str(converted / "qat" / "last.pt"), "--out", str(target)]) == 0
    assert "its weights are in big.onnx.data beside it: keep the two together" in capsys.readouterr().out
    assert (tmp_path / "big.onnx.data").stat().st_size > 1000
    code = main(["check", "--onnx", str(target), "--checkpoint", str(converted / "qat" / "last.pt"), "--json",
                 "--check-samples", "16", "--no-latency"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["site_parity"] == 1.0

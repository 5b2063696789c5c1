"""The training engine: it learns, groups parameters for weight decay, schedules the LR, logs,
plots, stops on a non-finite loss keeping the last good checkpoint, and validates its settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qat_ste
from qat_ste.errors import QatSteError
from qat_ste.train import (
    TrainConfig,
    TrainingDiverged,
    build_optimizer,
    evaluate,
    load_checkpoint,
    parameter_groups,
    train,
)
from qat_ste.train.data import TensorImageDataset, load_dataset
from qat_ste.train.engine import lr_factor

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread is fastest


def small_cnn(in_channels: int = 3, num_classes: int = 10, width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def quick(**overrides) -> TrainConfig:
    values = {"epochs": 2, "batch_size": 32, "lr": 0.05, "progress": False, "print_summary": False, "plot": False}
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def synthetic() -> tuple[TensorImageDataset, TensorImageDataset]:
    return (load_dataset("synthetic", "train", size=16, n=512),
            load_dataset("synthetic", "val", size=16, n=256))


@pytest.fixture(scope="module")
def digits() -> tuple[TensorImageDataset, TensorImageDataset]:
    return load_dataset("digits", "train"), load_dataset("digits", "val")


# ---- learning ---------------------------------------------------------------------------------


def test_float_model_learns_synthetic(synthetic):
    torch.manual_seed(0)
    model = small_cnn()
    result = train(model, *synthetic, quick(epochs=3))
    assert result.epochs_completed == 3 and result.steps == 3 * 16
    assert len(result.history) == 3
    assert result.final_val_accuracy > 0.5  # 10 classes: chance is 0.1
    assert result.final_train_loss < result.history[0]["train_loss"]
    assert result.images_per_s > 0
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in result.history)


def test_quantized_model_learns_digits(digits):
    torch.manual_seed(0)
    qmodel = qat_ste.quantize(small_cnn(in_channels=1), bits=2, ste="clipped_relu", alpha_mode="lsq",
                              example_input=torch.randn(1, 1, 8, 8))
    assert all(not m.is_initialized for _, m in qat_ste.quant_modules(qmodel))
    result = train(qmodel, *digits, quick(epochs=3, calibrate_batches=1, calibrate_method="percentile"))
    assert all(m.is_initialized for _, m in qat_ste.quant_modules(qmodel))  # calibrated by train()
    assert result.final_val_accuracy > 0.5
    check = evaluate(qmodel, digits[1], batch_size=100)
    assert check["n"] == len(digits[1])
    assert check["accuracy"] == pytest.approx(result.final_val_accuracy)


def test_learned_alphas_stay_projected(digits):
    torch.manual_seed(0)
    qmodel = qat_ste.quantize(small_cnn(in_channels=1), bits=2, alpha_mode="bcgd", step_init=4.9,
                              example_input=torch.randn(1, 1, 8, 8))
    train(qmodel, *digits, quick(epochs=1, lr=0.5, alpha_lr=50.0))
    for _, module in qat_ste.quant_modules(qmodel):
        assert 1e-3 <= float(module.alpha.detach()) <= 5.0  # BCGD_RANGE, enforced by project_alphas each step


# ---- evaluate ---------------------------------------------------------------------------------


def test_evaluate_restores_mode_and_counts(synthetic):
    model = small_cnn()
    model.train()
    out = evaluate(model, synthetic[1], batch_size=100)
    assert model.training
    assert out["n"] == 256 and 0.0 <= out["accuracy"] <= 1.0 and math.isfinite(out["loss"])
    batches = [(x, y) for x, y in torch.utils.data.DataLoader(synthetic[1], batch_size=64)]
    again = evaluate(model, batches)
    assert again["n"] == 256 and again["accuracy"] == pytest.approx(out["accuracy"])
    assert again["loss"] == pytest.approx(out["loss"], rel=1e-5)
    augmented = evaluate(model, synthetic[1].with_augment(True), batch_size=100)
    assert augmented == out  # evaluation never augments


# ---- parameter groups and weight decay ----------------------------------------------------------


def test_no_weight_decay_on_alpha_and_norm_parameters():
    qmodel = qat_ste.quantize(small_cnn(), bits=4, alpha_mode="lsq", step_init=0.2,
                              example_input=torch.randn(1, 3, 16, 16))
    config = TrainConfig(weight_decay=1e-3)
    groups = {g["name"]: g for g in parameter_groups(qmodel, config)}
    assert set(groups) == {"weights", "norm", "alpha"}
    alphas = {id(p) for p in qat_ste.alpha_parameters(qmodel)}
    norms = {id(p) for m in qmodel.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in groups["alpha"]["params"]} == alphas and len(alphas) == 2
    assert {id(p) for p in groups["norm"]["params"]} == norms and len(norms) == 4
    assert groups["alpha"]["weight_decay"] == 0.0 and groups["norm"]["weight_decay"] == 0.0
    assert groups["weights"]["weight_decay"] == 1e-3
    weights = {id(p) for p in groups["weights"]["params"]}
    assert not weights & (alphas | norms)
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(qmodel.parameters()))
    optimizer = build_optimizer(qmodel, TrainConfig(optimizer="adamw", alpha_lr=0.003, lr=0.01))
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["alpha"]["lr"] == 0.003 and by_name["weights"]["lr"] == 0.01


def test_decay_does_not_shrink_alpha_or_bn_with_zero_gradients(synthetic, tmp_path):
    """With lr 0 for the data gradient... use a huge decay: only the 'weights' group may move."""
    qmodel = qat_ste.quantize(small_cnn(), bits=4, alpha_mode="lsq", step_init=0.3,
                              example_input=torch.randn(1, 3, 16, 16))
    for p in qmodel.parameters():
        p.register_hook(lambda g: torch.zeros_like(g))  # no data gradient: decay alone moves weights
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    train(qmodel, *synthetic, quick(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.5, schedule="constant",
                                    out_dir=str(tmp_path)))
    after = qmodel.state_dict()
    for key in ("0.weight", "4.weight", "9.weight"):
        assert after[key].abs().sum() < before[key].abs().sum()  # decayed
    for key in ("1.weight", "1.bias", "5.weight", "2.alpha", "6.alpha"):
        assert torch.equal(after[key], before[key]), key
    saved = load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]
    assert {g["name"]: g["weight_decay"] for g in saved} == {"weights": 0.5, "norm": 0.0, "alpha": 0.0}


# ---- schedule -----------------------------------------------------------------------------------


def test_lr_factor_warmup_multistep_cosine_constant():
    multi = TrainConfig(epochs=10, schedule="multistep", milestones=(3, 6), gamma=0.1, warmup_epochs=1,
                        warmup_start_factor=0.1)
    assert lr_factor(0, multi, 10) == pytest.approx(0.1)
    assert lr_factor(5, multi, 10) == pytest.approx(0.55)
    assert lr_factor(10, multi, 10) == 1.0
    assert lr_factor(29, multi, 10) == 1.0
    assert lr_factor(30, multi, 10) == pytest.approx(0.1)
    assert lr_factor(60, multi, 10) == pytest.approx(0.01)
    cosine = TrainConfig(epochs=4, schedule="cosine")
    assert lr_factor(0, cosine, 10) == 1.0
    assert lr_factor(20, cosine, 10) == pytest.approx(0.5)
    assert lr_factor(40, cosine, 10) == pytest.approx(0.0)
    assert lr_factor(17, TrainConfig(schedule="constant"), 10) == 1.0
    default_milestones = TrainConfig(epochs=8, schedule="multistep")
    assert lr_factor(3 * 5, default_milestones, 5) == 1.0
    assert lr_factor(4 * 5, default_milestones, 5) == pytest.approx(0.1)
    assert lr_factor(6 * 5, default_milestones, 5) == pytest.approx(0.01)


@pytest.mark.parametrize("schedule", ["cosine", "multistep", "constant"])
@pytest.mark.parametrize("warmup_epochs", [0, 0.3, 1, 2.5])
def test_torch_schedulers_give_the_closed_form_lr_at_every_step(schedule, warmup_epochs):
    """build_scheduler (torch's LinearLR, CosineAnnealingLR / MultiStepLR / ConstantLR, SequentialLR)
    gives lr_factor(step) x each group's base LR at every step: no warmup, a fractional warmup,
    and a warmup longer than the first milestone (2.5 epochs; milestone 2)."""
    from torch.optim.lr_scheduler import LambdaLR, LinearLR, SequentialLR

    from qat_ste.train.engine import build_scheduler

    steps_per_epoch = 7
    config = TrainConfig(epochs=6, schedule=schedule, milestones=(2, 4) if schedule == "multistep" else None,
                         gamma=0.3, warmup_epochs=warmup_epochs, warmup_start_factor=0.05, lr=0.1)
    weights, steps = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [weights]}, {"params": [steps], "lr": 0.003}], lr=0.1)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    assert not isinstance(scheduler, LambdaLR)
    assert isinstance(scheduler, SequentialLR) == (warmup_epochs > 0)  # no warmup stage of 0 steps
    if warmup_epochs:
        assert isinstance(scheduler._schedulers[0], LinearLR)
    for step in range(config.epochs * steps_per_epoch):
        for group, base in zip(optimizer.param_groups, (0.1, 0.003), strict=True):
            assert group["lr"] == pytest.approx(base * lr_factor(step, config, steps_per_epoch), rel=1e-9), step
        optimizer.step()
        scheduler.step()


def test_scheduler_is_stepped_per_iteration(synthetic):
    model = small_cnn()
    result = train(model, *synthetic, quick(epochs=2, lr=0.1, schedule="multistep", milestones=(1,), gamma=0.5))
    # each epoch logs the lr its steps trained at: 0.1 in the first (the milestone is its end), 0.05 after
    assert [r["lr"] for r in result.history] == [pytest.approx(0.1), pytest.approx(0.05)]


# ---- logs, plot, files ------------------------------------------------------------------------


def test_files_metrics_plot_and_summary(synthetic, tmp_path, capsys):
    model = small_cnn()
    result = train(model, *synthetic, TrainConfig(epochs=2, batch_size=64, lr=0.05, out_dir=str(tmp_path),
                                                  log_format="jsonl", progress=False, plot=True))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["val_accuracy"] == pytest.approx(result.final_val_accuracy)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.last_checkpoint == str(tmp_path / "last.pt") and result.best_checkpoint == str(tmp_path / "best.pt")
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["epoch"] == result.best_epoch
    assert not list(tmp_path.glob("*.tmp"))
    printed = capsys.readouterr()
    assert "training summary" in printed.out + printed.err
    assert "final val accuracy" in result.table()


def test_csv_log_and_eval_every(synthetic, tmp_path):
    result = train(small_cnn(), *synthetic, quick(epochs=3, eval_every=2, out_dir=str(tmp_path)))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,lr,train_loss")
    assert len(lines) == 4
    assert [r["val_accuracy"] is None for r in result.history] == [True, False, False]


# ---- non-finite loss ----------------------------------------------------------------------------


class PoisonAfter(nn.Module):
    """Wraps a model; from forward call ``at`` on (in training mode) it returns NaN logits."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                out = out * float("nan")
        return out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(synthetic, tmp_path):
    torch.manual_seed(0)
    model = PoisonAfter(small_cnn(), at=12)
    with pytest.raises(TrainingDiverged) as caught:
        train(model, *synthetic, quick(epochs=3, out_dir=str(tmp_path), checkpoint_every_steps=5))
    error = caught.value
    assert isinstance(error, QatSteError)
    assert "nan" in str(error).lower() and "last good checkpoint" in str(error) and "lr" in str(error)
    assert error.step == 11 and error.last_checkpoint == str(tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 10  # the periodic save before the bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the weights in memory were not updated by the bad step either
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_loss_without_out_dir(synthetic):
    with pytest.raises(TrainingDiverged, match="no out_dir"):
        train(PoisonAfter(small_cnn(), at=1), *synthetic, quick(epochs=1))


def test_a_non_finite_step_is_refused_before_the_first_step(synthetic, tmp_path):
    qmodel = qat_ste.quantize(small_cnn(), bits=4, alpha_mode="lsq", step_init=0.3,
                              example_input=torch.randn(1, 3, 16, 16))
    sites = qat_ste.quant_modules(qmodel)
    name, module = sites[1]
    with torch.no_grad():
        module.alpha.fill_(float("nan"))
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(QatSteError) as refused:
        train(qmodel, *synthetic, quick(epochs=1, out_dir=str(tmp_path)))
    assert not isinstance(refused.value, TrainingDiverged)  # refused before any step, not diverged
    text = str(refused.value)
    assert f"1 of 2 quantized site(s) have a step that is not a finite number > 0: {module.site or name} (step nan)" \
        in text, text
    assert "calibrate" in refused.value.fix
    after = qmodel.state_dict()
    assert all(torch.equal(after[k], v) or (v.isnan().all() and after[k].isnan().all()) for k, v in before.items())
    assert not (tmp_path / "last.pt").exists()


# ---- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"batch_size": -1}, {"optimizer": "lamb"}, {"schedule": "poly"}, {"amp": "fp8"},
    {"lr": 0.0}, {"lr": float("nan")}, {"compile": "yes"}, {"log_format": "xml"}, {"grad_clip": 0},
    {"milestones": (0,)}, {"stop_after_steps": 0}, {"warmup_start_factor": 0.0},
])
def test_bad_settings_raise_clear_errors(bad):
    with pytest.raises(QatSteError) as caught:
        TrainConfig(**bad)
    assert caught.value.fix


def test_bad_inputs_raise_clear_errors(synthetic):
    with pytest.raises(QatSteError, match="TensorImageDataset"):
        train(small_cnn(), [(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))], None, quick())
    with pytest.raises(QatSteError, match="CUDA"):
        train(small_cnn(), synthetic[0], None, quick(device="cuda:0" if not torch.cuda.is_available() else "cpu",
                                                    amp="fp16"))
    with pytest.raises(QatSteError, match="does not exist"):
        train(small_cnn(), synthetic[0], None, quick(resume="/nonexistent/last.pt"))


def test_config_round_trips_through_dict():
    config = TrainConfig(epochs=3, milestones=(1, 2), resume=True, out_dir=Path("/tmp/x"))
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_grad_clip_and_adamw_and_label_smoothing(synthetic):
    torch.manual_seed(0)
    result = train(small_cnn(), *synthetic, quick(epochs=2, optimizer="adamw", lr=3e-3, weight_decay=0.05,
                                                  grad_clip=1.0, label_smoothing=0.1, warmup_epochs=0.5))
    assert result.final_val_accuracy > 0.3


# ---- real data --------------------------------------------------------------------------------


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="MNIST not present at ../shared/data/mnist")
def test_lenet5_on_an_mnist_subset():
    from qat_ste.zoo import create_zoo_model

    full = load_dataset(f"mnist:{MNIST_DIR}", "train")
    test = load_dataset(f"mnist:{MNIST_DIR}", "test")
    train_set = TensorImageDataset(full.images[:2048], full.labels[:2048], full.info)
    val_set = TensorImageDataset(test.images[:1000], test.labels[:1000], test.info)
    torch.manual_seed(0)
    qmodel = qat_ste.quantize(create_zoo_model("lenet5"), bits=4, example_input=torch.randn(1, 1, 28, 28))
    result = train(qmodel, train_set, val_set, quick(epochs=1, batch_size=64, calibrate_batches=1,
                                                    calibrate_method="percentile"))
    assert result.final_val_accuracy > 0.7


# ---- GPU paths (cannot run on a CPU-only machine) ------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.gpu
def test_cuda_bf16_autocast_channels_last_compile(synthetic, tmp_path):
    torch.manual_seed(0)
    qmodel = qat_ste.quantize(small_cnn(), bits=4, example_input=torch.randn(1, 3, 16, 16))
    result = train(qmodel, *synthetic, quick(epochs=2, out_dir=str(tmp_path)))
    assert result.device.startswith("cuda") and result.amp == "bf16"
    assert result.final_val_accuracy > 0.3
    state = load_checkpoint(tmp_path / "last.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])


@cuda_only
@pytest.mark.gpu
def test_cuda_fp16_with_grad_scaler_without_compile(synthetic):
    result = train(small_cnn(), *synthetic, quick(epochs=1, amp="fp16", compile=False))
    assert result.amp == "fp16" and result.compiled is False


def test_cpu_path_never_enables_gpu_features(synthetic):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU defaults")
    result = train(small_cnn(), synthetic[0], None, quick(epochs=1))
    assert (result.device, result.amp, result.compiled) == ("cpu", "off", False)
    assert not torch.cuda.is_initialized()

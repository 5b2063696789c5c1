"""The fine-tuning recipe for pretrained models: distillation from a frozen float teacher (the loss
formula, gradients only in the student, the teacher never in a checkpoint), the weight EMA (its
formula, exact resume), BatchNorm statistics frozen after N steps."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qat_ste
from qat_ste.errors import QatSteError
from qat_ste.train import TrainConfig, load_checkpoint, train
from qat_ste.train.data import load_dataset
from qat_ste.train.distill import distillation_loss
from qat_ste.train.ema import STATE_KEY, WeightEma, checkpoint_weights

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS_PER_EPOCH = 4  # 128 images, batch 32


def float_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def student(seed: int = 0) -> nn.Module:
    return qat_ste.quantize(float_net(seed), bits=4, alpha_mode="lsq", example_input=torch.randn(1, 3, 16, 16))


@pytest.fixture(scope="module")
def data():
    return (load_dataset("synthetic", "train", size=16, n=128, augment=True),
            load_dataset("synthetic", "val", size=16, n=64))


def config(out_dir: Path | None = None, **overrides) -> TrainConfig:
    values = {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0.5, "progress": False,
              "print_summary": False, "plot": False, "verbose": False, "calibrate_batches": 1,
              "calibrate_method": "percentile", "out_dir": str(out_dir) if out_dir is not None else None}
    values.update(overrides)
    return TrainConfig(**values)


# ---- distillation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("weight", "temperature"), [(0.5, 1.0), (0.7, 2.0), (1.0, 4.0), (0.0, 3.0)])
def test_distillation_loss_equals_its_formula(weight, temperature):
    torch.manual_seed(1)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    labels = torch.tensor([0, 3, 6, 2, 2])
    hard = F.cross_entropy(s, labels)
    p_t = torch.softmax(t.double() / temperature, 1)
    p_s = torch.softmax(s.double() / temperature, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    expected = (1 - weight) * hard.double() + weight * temperature ** 2 * kl
    got = distillation_loss(s, t, hard, weight, temperature)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5, abs_tol=1e-6)
    if weight == 1.0:  # a student equal to its teacher has no soft loss
        assert distillation_loss(t, t, hard, 1.0, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_only_the_student_and_the_teacher_is_never_saved(data, tmp_path):
    teacher = float_net(seed=3)
    teacher.train()
    for p in teacher.parameters():
        assert p.requires_grad
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}  # running stats included
    model = student()
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data[0], None, config(tmp_path, distill_weight=0.5, stop_after_steps=1), teacher=teacher)
    assert result.steps == 1
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, model_before[k])]
    assert "0.weight" in changed and "9.weight" in changed  # the student's conv and classifier moved
    saved = load_checkpoint(tmp_path / "last.pt")
    assert set(saved["model"]) == set(model.state_dict())  # the student only
    n_params = sum(len(g["params"]) for g in saved["optimizer"]["param_groups"])
    assert n_params == len(list(model.parameters()))  # the teacher's parameters are nowhere


def test_distillation_changes_the_training_and_weight_zero_is_plain_cross_entropy(data):
    def final_weights(**overrides):
        model, teacher = student(), float_net(seed=3)
        distill = overrides.get("distill_weight", 0) > 0
        train(model, data[0], None, config(stop_after_steps=3, **overrides), teacher=teacher if distill else None)
        return model.state_dict()

    plain, kd = final_weights(), final_weights(distill_weight=0.5, distill_temperature=2.0)
    assert not torch.equal(plain["9.weight"], kd["9.weight"])
    assert torch.equal(plain["9.weight"], final_weights()["9.weight"])  # deterministic


def test_teacher_and_distill_weight_go_together(data):
    with pytest.raises(QatSteError, match="distill_weight=0.5 needs a teacher"):
        train(student(), data[0], None, config(distill_weight=0.5))
    with pytest.raises(QatSteError, match="a teacher was passed but distill_weight is 0"):
        train(student(), data[0], None, config(), teacher=float_net())
    with pytest.raises(QatSteError, match="distill_weight=1.5 must be a number in"):
        config(distill_weight=1.5)
    with pytest.raises(QatSteError, match="distill_temperature=0 must be a number > 0"):
        config(distill_temperature=0)


# ---- EMA --------------------------------------------------------------------------------------------


def test_ema_update_equals_its_formula():
    model = float_net()
    ema = WeightEma(model, 0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    ema.update()
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema.tensors[key], 0.9 * start[key] + 0.1 * value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(ema.tensors[key], value)  # counters are copied
    assert ema.updates == 1
    with ema.applied() as averaged:
        assert torch.equal(averaged[0].weight, ema.tensors["0.weight"])
    assert torch.equal(model[0].weight, start["0.weight"] + 1.0)  # own weights back after the block
    with pytest.raises(QatSteError, match="ema_decay=1 must be a number between 0 and 1"):
        config(ema_decay=1)


def test_ema_is_evaluated_checkpointed_and_left_in_the_model(data, tmp_path):
    model = student()
    result = train(model, *data, config(tmp_path, ema_decay=0.8))
    saved = load_checkpoint(tmp_path / "last.pt")
    ema_state = saved["optimizer"][STATE_KEY]
    assert ema_state["updates"] == 2 * STEPS_PER_EPOCH and ema_state["decay"] == 0.8
    for key, value in model.state_dict().items():  # the finished run leaves the EMA in the model
        assert torch.equal(value, ema_state["tensors"][key])
    assert not torch.equal(saved["model"]["0.weight"], ema_state["tensors"]["0.weight"])  # raw weights kept too
    evaluated = qat_ste.train.evaluate(model, data[1], 64)
    assert result.final_val_accuracy == pytest.approx(evaluated["accuracy"])
    assert checkpoint_weights(saved) is ema_state["tensors"]  # what export/check should load
    plain_run = {"model": saved["model"], "optimizer": {"state": {}}}  # a run without EMA
    assert checkpoint_weights(plain_run) is saved["model"]


@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch 1 and exactly at its end
def test_resume_with_ema_is_bit_identical(data, tmp_path, stop_at):
    settings = {"ema_decay": 0.7, "freeze_bn_after_steps": 5, "distill_weight": 0.5, "label_smoothing": 0.1}
    reference = student()
    ref_result = train(reference, *data, config(tmp_path / "ref", **settings), teacher=float_net(seed=3))
    first = train(student(), *data, config(tmp_path / "run", stop_after_steps=stop_at, **settings),
                  teacher=float_net(seed=3))
    assert first.stopped_early and first.steps == stop_at
    resumed = student(seed=11)  # everything must come from last.pt
    result = train(resumed, *data, config(tmp_path / "run", resume=True, **settings), teacher=float_net(seed=3))
    assert result.steps == 2 * STEPS_PER_EPOCH
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert [r["val_accuracy"] for r in result.history] == [r["val_accuracy"] for r in ref_result.history]
    ref_ema = load_checkpoint(tmp_path / "ref" / "last.pt")["optimizer"][STATE_KEY]
    run_ema = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"][STATE_KEY]
    assert ref_ema["updates"] == run_ema["updates"]
    assert all(torch.equal(run_ema["tensors"][k], v) for k, v in ref_ema["tensors"].items())


def test_resume_without_a_saved_ema_warns_and_starts_it_there(data, tmp_path):
    train(student(), data[0], None, config(tmp_path, stop_after_steps=2))
    with pytest.warns(UserWarning, match="holds no EMA weights"):
        train(student(), data[0], None, config(tmp_path, resume=True, ema_decay=0.9))


# ---- BatchNorm freeze -------------------------------------------------------------------------------


def test_batchnorm_statistics_freeze_after_n_steps_and_stay_frozen_on_resume(data, tmp_path):
    model = student()
    bn = model[1]
    start_mean = bn.running_mean.clone()
    train(model, data[0], None, config(tmp_path, freeze_bn_after_steps=3, stop_after_steps=3))
    mean_at_3, weight_at_3 = bn.running_mean.clone(), bn.weight.detach().clone()
    assert not torch.equal(mean_at_3, start_mean)  # updated by the first three steps
    assert int(bn.num_batches_tracked) == 3
    resumed = student(seed=5)
    train(resumed, data[0], None, config(tmp_path, freeze_bn_after_steps=3, resume=True))
    assert torch.equal(resumed[1].running_mean, mean_at_3)  # steps 4..8 left the statistics alone
    assert int(resumed[1].num_batches_tracked) == 3
    assert not torch.equal(resumed[1].weight.detach(), weight_at_3)  # the affine parameters still train
    with pytest.raises(QatSteError, match="freeze_bn_after_steps=-1 must be an integer >= 0"):
        config(freeze_bn_after_steps=-1)


def test_freeze_at_step_zero_never_updates_the_statistics(data):
    model = student()
    before = copy.deepcopy(model[5].running_var)
    train(model, data[0], None, config(freeze_bn_after_steps=0, stop_after_steps=2))
    assert torch.equal(model[5].running_var, before)


# ---- qat-ste convert with the recipe ----------------------------------------------------------------


def _stages_wired() -> bool:
    """Whether cli/stages.py's fine-tuning stage passes the recipe settings and the teacher to train()."""
    import inspect

    from qat_ste.cli import stages

    return "_finetune_settings" in inspect.getsource(stages._qat_stage)


@pytest.mark.skipif(not _stages_wired(), reason="cli/stages.py::_qat_stage does not pass the recipe yet")
def test_convert_fine_tunes_a_pretrained_model_with_the_recipe(tmp_path, capsys):
    from qat_ste.cli import main
    from qat_ste.zoo import create_zoo_model

    weights = tmp_path / "lenet5.pt"
    torch.save(create_zoo_model("lenet5", num_classes=10).state_dict(), weights)
    out = tmp_path / "run"
    assert main(["convert", "--weights", str(weights), "--epochs", "1", "--batch-size", "512", "--calib-batches", "1",
                 "--no-export", "--no-progress", "--ema", "0.9", "--freeze-bn-after", "2", "--label-smoothing", "0.1",
                 "--out", str(out)]) == 0
    saved = load_checkpoint(out / "qat" / "last.pt")
    settings = {k: saved["config"][k] for k in ("lr", "warmup_epochs", "distill_weight", "distill_temperature",
                                                 "ema_decay", "freeze_bn_after_steps", "label_smoothing")}
    assert settings == {"lr": 0.01, "warmup_epochs": 0.1, "distill_weight": 0.5, "distill_temperature": 2.0,
                        "ema_decay": 0.9, "freeze_bn_after_steps": 2, "label_smoothing": 0.1}
    assert saved["optimizer"][STATE_KEY]["updates"] == saved["step"] == 3  # 1437 digits / 512
    assert int(saved["model"]["bn1.num_batches_tracked"]) == 2  # frozen after 2 steps
    assert not any(k.startswith("teacher") for k in saved["model"])
    assert "the model now holds the EMA weights" in capsys.readouterr().out


# ---- under DDP (two gloo processes on CPU) -----------------------------------------------------------


def _ddp_model() -> nn.Module:
    """float64 (so DDP's summation order cannot flip a rounding); BatchNorm frozen from step 0, so the
    ranks' batch statistics do not enter and DDP must match one process on the global batch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    return qat_ste.quantize(net, bits=4, alpha_mode="lsq", step_init=0.25,
                            example_input=torch.randn(1, 3, 16, 16)).double()


def _ddp_teacher() -> nn.Module:
    return float_net(seed=3).double()


def _ddp_config(batch_size: int, out_dir: str) -> TrainConfig:
    return config(Path(out_dir), batch_size=batch_size, device="cpu", distill_weight=0.5, distill_temperature=2.0,
                  ema_decay=0.8, freeze_bn_after_steps=0, label_smoothing=0.1)


def _ddp_worker(rank: int, world: int, port: int, work_dir: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model = _ddp_model()
    train_set = load_dataset("synthetic", "train", size=16, n=128)
    result = train(model, train_set, None, _ddp_config(16, str(Path(work_dir) / "ddp")), teacher=_ddp_teacher())
    torch.save({"state": model.state_dict(), "world_size": result.world_size}, Path(work_dir) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_recipe_under_ddp_matches_one_process_on_the_global_batch(tmp_path):
    import os
    import socket

    import torch.multiprocessing as mp

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert name not in os.environ, "run the test suite outside torchrun"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = _ddp_model()
    train(single, load_dataset("synthetic", "train", size=16, n=128), None, _ddp_config(32, str(tmp_path / "one")),
          teacher=_ddp_teacher())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    for key, value in single.state_dict().items():  # the EMA weights, left in the model
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-9, atol=1e-11)
    assert torch.equal(ranks[0]["state"]["1.running_mean"], torch.zeros(8))  # frozen from step 0
    saved = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert saved["optimizer"][STATE_KEY]["updates"] == 8

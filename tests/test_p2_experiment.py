"""Tests for tools.p2_experiment: coarse gradient descent on a quantized two-layer net ([P2])."""

from __future__ import annotations

import pytest
import torch

import tools.p2_experiment as P2
from qat_ste import QatSteError, get_ste

# A tiny configuration: 300 samples, 5-d input, teacher width 8, student width 32, 3 classes.
TINY = {"input_dim": 5, "teacher_hidden": 8, "student_hidden": 32, "classes": 3, "samples": 300, "margin": 0.5}
TINY_ITERS = 300


@pytest.fixture(scope="module")
def tiny_runs() -> dict[str, dict]:
    return {name: P2.run_p2(name, bits=2, iters=TINY_ITERS, seed=0, **TINY) for name in ("relu", "clipped_relu")}


def test_result_has_per_iteration_accuracy(tiny_runs: dict[str, dict]) -> None:
    r = tiny_runs["clipped_relu"]
    assert r["ste"] == "clipped_relu" and r["bits"] == 2 and r["alpha"] == pytest.approx(0.6509)
    assert len(r["accuracy"]) == TINY_ITERS + 1 and len(r["loss"]) == TINY_ITERS
    assert all(0.0 <= a <= 1.0 for a in r["accuracy"])
    assert r["final_accuracy"] == r["accuracy"][-1] and r["max_accuracy"] == max(r["accuracy"])
    assert r["reached_100"] == (r["first_iter_100"] is not None)
    if r["reached_100"]:
        assert r["accuracy"][r["first_iter_100"]] == 1.0
    if r["stable_100_from"] is not None:
        assert all(a == 1.0 for a in r["accuracy"][r["stable_100_from"]:])
        assert r["stable_100_from"] == 0 or r["accuracy"][r["stable_100_from"] - 1] < 1.0
    assert 1 / 3 <= r["majority_rate"] < 1.0


def test_monotone_stes_learn_well_above_chance(tiny_runs: dict[str, dict]) -> None:
    for name, r in tiny_runs.items():
        start, final = r["accuracy"][0], r["final_accuracy"]
        assert final >= 0.9, (name, final)
        assert final >= r["majority_rate"] + 0.3, (name, final, r["majority_rate"])
        assert final > start + 0.2, (name, start, final)
        assert r["loss"][-1] < 0.5 * r["loss"][0]


def test_same_seed_same_data_and_start_across_stes(tiny_runs: dict[str, dict]) -> None:
    relu, crelu = tiny_runs["relu"], tiny_runs["clipped_relu"]
    assert relu["accuracy"][0] == crelu["accuracy"][0]  # same init and data, no step taken yet
    assert relu["loss"][0] == crelu["loss"][0]
    assert relu["majority_rate"] == crelu["majority_rate"]


def test_staircase_forward_and_ste_backward() -> None:
    alpha, levels = 0.5, 3
    x = torch.tensor([-1.0, 0.1, 0.3, 0.74, 1.2, 1.6, 5.0], dtype=torch.float64, requires_grad=True)
    y = P2.quantized_relu(x, alpha, levels, get_ste("clipped_relu"))
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 1.5], dtype=torch.float64))
    y.sum().backward()
    # clipped_relu: 1 on (0, L alpha] = (0, 1.5]
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0, 0], dtype=torch.float64))
    x.grad = None
    P2.quantized_relu(x, alpha, levels, get_ste("relu")).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 1], dtype=torch.float64))


def test_teacher_labels_are_perfectly_realizable() -> None:
    gen = torch.Generator().manual_seed(3)
    x, labels = P2.make_teacher_data(input_dim=4, teacher_hidden=6, classes=3, samples=200, alpha=0.65,
                                     levels=3, margin=0.5, generator=gen)
    assert x.shape == (200, 4) and labels.shape == (200,)
    assert set(labels.tolist()) <= {0, 1, 2}


def test_unhappy_paths() -> None:
    with pytest.raises(QatSteError, match="unknown STE"):
        P2.run_p2("no_such_ste", iters=1, **TINY)
    with pytest.raises(QatSteError, match="alpha"):
        P2.run_p2("relu", bits=6, iters=1, **TINY)
    with pytest.raises(QatSteError, match="bits"):
        P2.run_p2("relu", bits=0, iters=1, **TINY)
    with pytest.raises(QatSteError, match="lr"):
        P2.run_p2("relu", iters=1, lr=0.0, **TINY)
    with pytest.raises(QatSteError, match="margin"):
        P2.run_p2("relu", iters=1, **{**TINY, "margin": 1e6})


def test_thread_setting_is_restored() -> None:
    before = torch.get_num_threads()
    P2.run_p2("identity", iters=2, **TINY)
    assert torch.get_num_threads() == before

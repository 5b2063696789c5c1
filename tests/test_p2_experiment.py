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


# ---- [P2] on MNIST (the two-linear-layer net, 10 classes) -----------------------------------------


def _fake_mnist(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784, generator=g)
    y = (x[:, :10] @ torch.randn(10, 10, generator=g)).argmax(1)
    return x, y, x[:64], y[:64]


def test_mnist_runs_share_the_start_and_repeat_exactly() -> None:
    data = _fake_mnist()
    runs = {ste: P2.run_p2_mnist(ste, data, 2, seed=3, hidden=32, epochs=2, batch_size=64) for ste in P2.MNIST_STES}
    starts = {r["history"][0]["train_loss"] for r in runs.values()}
    assert len(starts) == 1  # the same initialization whatever the STE
    assert [h["epoch"] for h in runs["relu"]["history"]] == [0, 1, 2]
    assert runs["relu"]["config"] == {"hidden": 32, "epochs": 2, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                                      "train_images": 256, "test_images": 64}
    again = P2.run_p2_mnist("relu", data, 2, seed=3, hidden=32, epochs=2, batch_size=64)
    assert again["history"] == runs["relu"]["history"]  # same seed, same numbers
    other = P2.run_p2_mnist("relu", data, 2, seed=4, hidden=32, epochs=2, batch_size=64)
    assert other["history"][0]["train_loss"] != runs["relu"]["history"][0]["train_loss"]
    for r in runs.values():
        assert r["final_train_loss"] < r["history"][0]["train_loss"]


def test_mnist_block_reports_mean_std_and_noise(tmp_path) -> None:
    def fake(ste, seed, acc):
        history = [{"epoch": e, "batch_loss": None, "train_loss": 2.0 / (e + 1), "train_accuracy": acc,
                    "test_accuracy": acc} for e in range(3)]
        return {"ste": ste, "seed": seed, "bits": 2, "alpha": 0.6509, "history": history, "final_train_accuracy": acc,
                "final_test_accuracy": acc, "final_train_loss": history[-1]["train_loss"],
                "config": {"hidden": 256, "epochs": 2, "batch_size": 128, "lr": 0.05, "momentum": 0.9,
                           "train_images": 60000, "test_images": 10000}}
    results = [fake("identity", s, a) for s, a in ((0, 0.90), (1, 0.91), (2, 0.92))] + \
              [fake("clipped_relu", s, a) for s, a in ((0, 0.970), (1, 0.971), (2, 0.972))]
    block = P2.mnist_block(results, "figures/p2_mnist.png", "cmd", "model_zoo/results/p2_mnist")
    assert "| identity | 3 | 2.000 -> 0.6667 | 0 of 3 | 91.00 ± 1.00 | 91.00 ± 1.00 |" in block
    assert "identity 6.10 points behind (beyond 2 std = 2.00)" in block
    assert "MNIST (60000 training / 10000 test images), 784-256-10 net" in block
    P2.plot_mnist(results, tmp_path / "p2.png")
    assert (tmp_path / "p2.png").stat().st_size > 10_000


def test_load_mnist_vectors_when_present() -> None:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if not folder.is_dir():
        pytest.skip("no MNIST here")
    x, y, x_test, y_test = P2.load_mnist_vectors(folder, 1000, seed=0)
    assert x.shape == (1000, 784) and x_test.shape == (10000, 784) and y.dtype == torch.long
    assert abs(float(x_test.mean())) < 0.05 and float(x_test.std()) == pytest.approx(1.0, abs=0.05)

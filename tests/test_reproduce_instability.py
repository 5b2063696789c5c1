"""tools.instability_mnist32: [P1]'s instability phase 1 against controls, verdicts over seeds (fake
records here; a tiny real run checks the whole pipeline)."""

from __future__ import annotations

import pytest

import tools.instability_mnist32 as inst


def _run(start_acc, accs, losses):
    return {"start_val_accuracy": start_acc, "status": "done",
            "history": [{"epoch": k + 1, "val_accuracy": a, "train_loss": loss}
                        for k, (a, loss) in enumerate(zip(accs, losses, strict=True))]}


def _record(seed, identity_drop):
    runs = {"quant_relu": {"history": [{"val_accuracy": 0.90}, {"val_accuracy": 0.97}]},  # still rising
            "quant_clipped_relu": {"history": [{"val_accuracy": 0.98}, {"val_accuracy": 0.98}]},
            "float": {"history": [{"val_accuracy": 0.985}]}}
    for name, _, ste in inst.PHASE1:
        if ste == "identity":
            runs[name] = _run(0.97, [0.97 - identity_drop / 2, 0.97 - identity_drop], [0.10, 0.10 + identity_drop])
        else:
            runs[name] = _run(0.97, [0.97, 0.969], [0.10, 0.099])
    return {"seed": seed, "runs": runs, "train_images": 1000, "val_images": 500,
            "settings": {"bits": 4, "float": {"epochs": 8}, "quant": {"epochs": 6}, "phase1": {"epochs": 8}}}


def test_changes_and_verdicts():
    record = _record(0, 0.02)
    assert inst.changes(record, "identity_from_relu") == (pytest.approx(0.02), pytest.approx(-2.0))
    rose = [_record(s, 0.02) for s in range(3)]
    assert inst.verdict(rose, "identity_from_relu", "relu_continued").endswith("**reproduced**")
    flat = [_record(s, 0.0) for s in range(3)]
    assert "**not reproduced** (no rise beyond the control's" in inst.verdict(flat, "identity_from_relu",
                                                                              "relu_continued")
    mixed = [_record(0, 0.05), _record(1, -0.02), _record(2, 0.0)]
    assert "**inconclusive**" in inst.verdict(mixed, "identity_from_relu", "relu_continued")
    assert inst.verdict(rose[:1], "identity_from_relu", "relu_continued").endswith("only one seed, no verdict")


def test_block_names_data_and_scale():
    text = inst.block([_record(s, 0.02) for s in range(3)], "figures/x.png", "cmd")
    assert "ResNet-20 4-bit on MNIST-32 (MNIST padded to 32x32, 1 channel, a substitute for CIFAR-10): 1000 of " \
           "60000 training / 500 validation images" in text
    assert "| identity_from_relu | 97.00 ± 0.00 | -2.00 ± 0.00 | +0.0200 ± 0.0000 |" in text
    assert text.count("**reproduced**") == 2
    assert text.count("Not converged: seed") == 3 and "- caveat: none of the relu starts had converged" in text
    assert "caveat: none of the clipped_relu" not in text

"""tools.reproduce_paper: verdicts on [P1]'s instability claims computed from the measured numbers, and
a report rewrite that would erase measured tables is refused."""

from __future__ import annotations

import pytest

import tools.reproduce_paper as rp
from qat_ste.errors import QatSteError
from qat_ste.zoo.recipes import load_recipes


def _record(role, phases, loss, acc):
    return {"role": role, "start": {"train_loss": loss[0], "val_accuracy": acc[0] / 100},
            "history": [{"phase": 0, "epoch": 20, "train_loss": loss[1], "val_accuracy": acc[1] / 100}],
            "final_val_accuracy_pct": acc[2], "final_train_loss": loss[2], "settings": {"phases": [{}] * phases}}


def test_instability_verdicts_follow_the_numbers():
    rise = rp.instability_verdict(_record("restart", 2, (0.30, 0.45, 0.9), (92.0, 88.0, 70.0)))
    assert rise.startswith("rise during the lr 1e-5 phase: reproduced [phase 1 (20 ep at lr 1e-5): loss 0.300 -> "
                           "0.450, val acc 92.00 -> 88.00 %]; end: ends much worse (92.00 -> 70.00 %): reproduced")
    fell = rp.instability_verdict(_record("restart", 2, (0.363, 0.340, 0.956), (86.4, 86.8, 10.6)))
    assert "rise during the lr 1e-5 phase: not reproduced (loss fell, accuracy held or rose)" in fell
    assert "collapse to near chance" in fell and fell.endswith("inconclusive")
    noise = rp.instability_verdict(_record("restart", 2, (0.286, 0.290, 0.25), (92.0, 91.2, 91.0)))
    assert "inconclusive (within one-seed noise)" in noise and "does not end much worse" in noise
    slow = rp.instability_verdict(_record("restart", 1, (0.674, 0.665, 0.665), (74.8, 80.2, 80.2)))
    assert slow.startswith("slow degradation: not reproduced (74.80 -> 80.20 %)")
    control = rp.instability_verdict(_record("control", 2, (0.286, 0.288, 0.201), (92.0, 90.8, 92.4)))
    assert control.startswith("control: stays near its start (92.00 -> 92.40 %)")


def test_report_rewrite_from_an_empty_results_file_is_refused(tmp_path):
    report = tmp_path / "RESULTS.md"
    report.write_text("# t\n\n| LeNet-5 | 2 | relu | 0.026 |\n")
    with pytest.raises(QatSteError, match="holds no run, and rewriting .* would erase the measured tables"):
        rp.write_report(rp.ResultsStore(tmp_path / "results.json"), load_recipes(), report, tmp_path / "figures")
    assert report.read_text() == "# t\n\n| LeNet-5 | 2 | relu | 0.026 |\n"


def test_put_block_replaces_its_block_and_write_report_keeps_it(tmp_path):
    report = tmp_path / "RESULTS.md"
    report.write_text("# t\n\nintro\n\n## A\n\ntext\n")
    rp.put_block(report, "my block", "first")
    rp.put_block(report, "my block", "second")
    text = report.read_text()
    assert text.count("<!-- my block: begin -->") == 1 and "second" in text and "first" not in text
    store = rp.ResultsStore(tmp_path / "results.json")
    store.put({"run_id": "x", "status": "failed"})
    rp.write_report(store, load_recipes(), report, tmp_path / "figures")
    assert "<!-- my block: begin -->\nsecond\n<!-- my block: end -->" in report.read_text()

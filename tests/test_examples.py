"""The scripts in examples/ run end to end (smallest settings) and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Run examples/NAME as a user would (a fresh interpreter, another working directory)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_quantize_train_export(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sklearn")
    out = run_example("quantize_train_export.py", "--image-size", "16", "--batch-size", "4", "--calib-batches", "1",
                      "--steps", "2", "--check-samples", "8", "--threads", "1", "--out", str(tmp_path / "run"),
                      cwd=tmp_path)
    assert "quantized 17 activation call sites of resnet18 to 4 bits, STE clipped_relu" in out
    assert re.search(r"^step 2/2: loss \d+\.\d{4}$", out, re.M)
    assert "17 quantized, 0 left float" in out
    assert f"exported {tmp_path / 'run' / 'model.onnx'}" in out and (tmp_path / "run" / "model.onnx").is_file()
    assert "(form=deploy, weights=int8, 8 samples): OK" in out
    parity = re.search(r"^ORT parity: per-site codes (\S+), end-to-end codes (\S+)%, .*; check (\w+)$", out, re.M)
    assert parity, out[-2000:]
    assert parity.group(1) == "100.00%" and float(parity.group(2)) >= 90.0 and parity.group(3) == "OK"


def test_custom_ste(tmp_path: Path) -> None:
    out = run_example("custom_ste.py", cwd=tmp_path)
    assert "registered STEs: identity, relu, clipped_relu, log_tailed_relu, soft_clipped" in out
    step = re.search(r"one training step with the soft_clipped STE: loss (\d+\.\d+) -> (\d+\.\d+)", out)
    assert step and float(step.group(2)) < float(step.group(1))
    rows = re.findall(r"^ *(-?\d+\.\d{4}) +(-?\d+\.\d{4}) +(\d+\.\d{4}) +(\d+\.\d{4})$", out, re.M)
    assert len(rows) == 9
    u, ours, clipped = ([float(r[i]) for r in rows] for i in (0, 2, 3))
    # the clipped-ReLU STE is 1 inside (0, hi] and 0 outside; the smooth one is below 1 everywhere,
    # largest mid-range and positive (fading) outside the range
    assert clipped == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert all(0.0 < g < 1.0 for g in ours) and max(ours) == ours[4]
    assert ours[0] < 0.05 and ours[-1] < 0.05 and u[0] == -0.5

"""Everything to check on a lent CUDA machine, in one command that ends within ``--budget-s``.

    PYTHONPATH=$PWD python3 -m tools.gpu_check                     # on the GPU machine (writes to $OUT)
    python3 -m tools.gpu_check --device cpu --smoke --out /tmp/gc   # every step, tiny, on a CPU

Steps, in order, each a child process with its own timeout (a failing step does not stop the rest):

1. ``env``: torch / triton / timm / torchvision / onnx versions, the GPU's name and free memory.
2. ``tests``: the GPU tests, ``pytest -m gpu`` plus the CUDA-only ones (``-k "gpu or cuda"`` over tests/).
3. ``mnist``: ``qat_ste.cli convert`` of zoo:lenet5 on MNIST (``--mnist DIR``, default .data/mnist)
   with bf16 autocast, torch.compile and channels_last, one float and one quantized epoch, the ONNX
   export and its ONNX Runtime check; skipped, with a line saying so, when the folder is absent.
4. ``bench_gpu``: ``tools.bench_gpu`` (training step time and peak memory, float / qat_ste / torch.ao).
5. ``finetune``: ``tools.bench_finetune_gpu`` (images/s of an image-folder fine-tune, float / quantized).

The budget is shared out among the steps (time a step leaves goes to the next ones); the benchmarks
get their part as their own ``--budget-s``. Ends with a table (step, status, seconds, key figure) and
writes, flat under ``--out`` (default ``$OUT``, else out/gpu_check): gpu_check.json, one log per step
and the two benchmarks' JSON (7 files). Exit code 0 when no step failed. Without a CUDA device it
prints "no CUDA device: nothing to check" and exits 0, unless ``--device cpu --smoke`` asks for the
CPU smoke run of every step.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "tests", "mnist", "bench_gpu", "finetune")
#: each step's share of the budget (env takes what it takes, a few seconds)
SHARES = {"tests": 0.18, "mnist": 0.13, "bench_gpu": 0.41, "finetune": 0.28}
#: on a CPU (smoke) the MNIST epochs are what takes time
SMOKE_SHARES = {"tests": 0.15, "mnist": 0.40, "bench_gpu": 0.20, "finetune": 0.25}
#: seconds kept back from a benchmark's own budget for its start (imports) and end (table, JSON)
BENCH_MARGIN_S = 20.0
PYTEST_SELECTION = ["-k", "(gpu or cuda) and not gpu_tools"]
NO_CUDA = "no CUDA device: nothing to check"
#: what the training engine warns when torch.compile fails and it trains on eagerly
COMPILE_FALLBACK = "torch.compile failed on this model"


@dataclass
class StepResult:
    """One row of the final table."""

    step: str
    status: str = "not run"
    seconds: float = 0.0
    figure: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# ---- running a child process ---------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The children's environment: the repository importable (it need not be installed), unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(command: list[str], log_path: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run ``command`` in its own process group (its output to our stdout and to ``log_path``); (exit
    code, or None after the timeout, when its whole process group is stopped; seconds)."""
    tick = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", env=child_env(), cwd=str(REPO), start_new_session=True)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                sys.stdout.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: int | None = process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            stop_group(process)
            code = None
        except BaseException:  # SIGTERM (as SystemExit) or Ctrl-C: the child's processes go too
            stop_group(process)
            raise
        reader.join(timeout=10)
        if code is None:
            log.write(f"\n[gpu_check: killed after the step's timeout of {timeout_s:.0f} s]\n")
    return code, time.perf_counter() - tick


def stop_group(process: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM to the child's process group (a benchmark then stops its own children), SIGKILL to
    what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            if sig == signal.SIGTERM:
                os.killpg(process.pid, signal.SIGKILL)  # the group's stragglers
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _exit_on_sigterm(*_: Any) -> None:
    """SIGTERM as SystemExit(143), so that the running step's processes are stopped too."""
    raise SystemExit(143)


def status_of(code: int | None, timeout_s: float) -> str:
    if code is None:
        return f"timeout ({timeout_s:.0f} s)"
    return "ok" if code == 0 else f"failed (exit {code})"


# ---- the steps -----------------------------------------------------------------------------------


def version_of(name: str) -> str | None:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception:  # noqa: BLE001 - a package that fails to import is reported as absent
        return None


def step_env(args: argparse.Namespace, out: Path) -> StepResult:
    """Versions, the device, and which of the in-flight options (kernel, streaming) the tree has."""
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "device": args.device}
    for name in ("torch", "triton", "torchvision", "timm", "onnx", "onnxruntime", "torchdata", "numpy", "qat_ste"):
        info[name] = version_of(name)
    if args.device.startswith("cuda"):
        device = torch.device(args.device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    gpu_free_gib=round(free / 2**30, 1), gpu_total_gib=round(total / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    from tools.bench_gpu import kernel_option_available

    info["quantize_kernel_option"] = kernel_option_available()
    (out / "env.log").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2), flush=True)
    figure = (f"{info.get('gpu', 'cpu')}, torch {info['torch']}, triton {info['triton']}, timm {info['timm']}"
              + (f", {info['gpu_free_gib']} GiB free" if "gpu_free_gib" in info else ""))
    return StepResult("env", "ok", figure=figure, details=info)


def step_tests(args: argparse.Namespace, out: Path, budget_s: float) -> StepResult:
    """The GPU-marked and CUDA-only tests (a test that needs a missing package skips itself)."""
    command = [sys.executable, "-m", "pytest", "-v", "-rs", "--durations=5", "-p", "no:cacheprovider",
               *PYTEST_SELECTION, *args.test_paths]
    code, seconds = run_logged(command, out / "tests.log", budget_s)
    lines = (out / "tests.log").read_text(encoding="utf-8", errors="replace").splitlines()
    summary = next((line.strip("= ") for line in reversed(lines)
                    if any(word in line for word in ("passed", "failed", "error", "skipped", "deselected"))), "")
    status = "ok" if code == 5 else status_of(code, budget_s)  # 5: nothing selected
    return StepResult("tests", status, seconds, summary[:100])


def mnist_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    smoke = ["--batch-size", "256", "--check-samples", "256"] if args.smoke else ["--batch-size", "256"]
    cuda = args.device.startswith("cuda")
    return [sys.executable, "-m", "qat_ste.cli", "convert", "--model", "zoo:lenet5", "--data", f"mnist:{args.mnist}",
            "--float-epochs", "1", "--epochs", "1", "--device", args.device, "--amp", "bf16" if cuda else "off",
            "--compile", "on" if cuda else "off", "--calib-batches", "2", "--no-progress", "--no-latency",
            "--out", str(run_dir), *smoke]


def step_mnist(args: argparse.Namespace, out: Path, budget_s: float) -> StepResult:
    """A short convert on MNIST (bf16 + compile + channels_last on CUDA), export and ORT check included."""
    folder = Path(args.mnist)
    if not folder.is_dir() or not any(folder.iterdir()):
        print(f"mnist: {folder} is absent or empty: step skipped (put the four MNIST files there)", flush=True)
        return StepResult("mnist", "skipped (no MNIST)", figure=f"{folder} absent")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_check_mnist_") as tmp:
        run_dir = Path(tmp) / "run"
        code, seconds = run_logged(mnist_command(args, run_dir), out / "mnist.log", budget_s)
        report_path = run_dir / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
    result = StepResult("mnist", status_of(code, budget_s), seconds)
    if report is not None:
        summary = report.get("summary", {})
        rate = report.get("quantized", {}).get("images_per_s")
        result.details = {"summary": summary, "quantized_images_per_s": rate, "timings_s": report.get("timings_s")}
        parts = [f"float {_pct(summary.get('float_accuracy'))}", f"quant {_pct(summary.get('quantized_accuracy'))}",
                 f"ORT {_pct(summary.get('onnx_accuracy'))}", f"codes {_pct(summary.get('code_agreement'))}"]
        result.figure = ", ".join(parts) + (f", {rate:.0f} img/s" if rate else "")
    if COMPILE_FALLBACK in (out / "mnist.log").read_text(encoding="utf-8", errors="replace"):
        result.status += " (compile fell back to eager)"
    return result


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def bench_gpu_command(args: argparse.Namespace, json_path: Path, budget_s: float) -> list[str]:
    command = [sys.executable, "-m", "tools.bench_gpu", "--device", args.device, "--json", str(json_path),
               "--budget-s", f"{max(budget_s - BENCH_MARGIN_S, 1.0):.0f}"]
    if args.smoke:
        command += ["--smoke", "--models", "resnet18", "--modes", "eager"]
    return command


def step_bench_gpu(args: argparse.Namespace, out: Path, budget_s: float) -> StepResult:
    json_path = out / "bench_gpu.json"
    code, seconds = run_logged(bench_gpu_command(args, json_path, budget_s), out / "bench_gpu.log", budget_s)
    result = StepResult("bench_gpu", status_of(code, budget_s), seconds)
    if json_path.is_file():
        rows = json.loads(json_path.read_text())["rows"]
        ok = [r for r in rows if r["status"] == "ok"]
        qat = [r for r in ok if r["variant"] in ("triton", "torch") and r.get("meets_time") is not None]
        met = [r for r in qat if r["meets_time"] and r.get("meets_mem") is not False]
        best = {}
        for r in qat:
            best.setdefault((r["model"], r["mode"]), r)
        shown = ", ".join(f"{m} {mode} {r['variant']} {r['ratio']:.2f}x" for (m, mode), r in list(best.items())[:3])
        result.figure = f"{len(ok)}/{len(rows)} rows ok, qat targets met {len(met)}/{len(qat)}" + (
            f"; {shown}" if shown else "")
        result.details = {"rows_ok": len(ok), "rows": len(rows), "qat_rows_meeting_targets": len(met),
                          "qat_rows": len(qat)}
    return result


def _finetune_figure(row: dict[str, Any]) -> str:
    """'resnet18 float 900 -> quantized 850 img/s' (and the status when not ok)."""
    rates = [f"{name} {row[key]:.0f}" for name, key in (("float", "float_images_per_s"),
                                                         ("quantized", "quantized_images_per_s"))
             if isinstance(row.get(key), (int, float))]
    text = row["model"].split(":")[-1] + (" " + " -> ".join(rates) + " img/s" if rates else "")
    return text if row["status"] == "ok" else f"{text} ({row['status'][:40]})"


def step_finetune(args: argparse.Namespace, out: Path, budget_s: float) -> StepResult:
    json_path = out / "finetune.json"
    command = [sys.executable, "-m", "tools.bench_finetune_gpu", "--device", args.device, "--json", str(json_path),
               "--budget-s", f"{max(budget_s - BENCH_MARGIN_S, 1.0):.0f}"]
    if args.smoke:
        command += ["--smoke", "--models", "torchvision:resnet18", "--epochs", "1"]
    code, seconds = run_logged(command, out / "finetune.log", budget_s)
    result = StepResult("finetune", status_of(code, budget_s), seconds)
    if json_path.is_file():
        rows = json.loads(json_path.read_text())["rows"]
        result.figure = "; ".join(_finetune_figure(r) for r in rows)
    return result


# ---- main ----------------------------------------------------------------------------------------


def format_table(results: list[StepResult], total_s: float) -> str:
    head = ("step", "status", "seconds", "key figure")
    cells = [(r.step, r.status, f"{r.seconds:.0f}", r.figure) for r in results]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if i == 2 else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([f"gpu_check ({total_s:.0f} s)", line(head), line(tuple("-" * w for w in widths)),
                      *(line(c) for c in cells)])


def benchmark_tables(out: Path) -> str:
    """The two benchmarks' tables again, from their JSON (so that the end of the output holds them)."""
    from tools import bench_finetune_gpu, bench_gpu

    parts = []
    for name, tool in (("bench_gpu.json", bench_gpu), ("finetune.json", bench_finetune_gpu)):
        path = out / name
        if path.is_file():
            rows = json.loads(path.read_text()).get("rows") or []
            if name == "bench_gpu.json":
                bench_gpu.add_ratios(rows)
            parts.append(tool.format_table(rows, f"{name} ({len(rows)} rows)"))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (with --device cpu: the CPU smoke run)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="for all steps together (default 450)")
    parser.add_argument("--mnist", default=str(REPO / ".data" / "mnist"), help="MNIST folder (default .data/mnist)")
    parser.add_argument("--out", default=None, help="where the JSON and logs go (default $OUT, else out/gpu_check)")
    parser.add_argument("--skip", action="append", choices=STEPS[1:], default=[], help="leave a step out")
    parser.add_argument("--test-paths", nargs="+", default=["tests/"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs only the smoke check: add --smoke")
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    args.out = args.out or os.environ.get("OUT") or str(REPO / "out" / "gpu_check")
    return args


def run_steps(args: argparse.Namespace, out: Path, started: float) -> list[StepResult]:
    """Each step in order, with its share of what is left of the budget."""
    try:
        results = [step_env(args, out)]
    except Exception as error:  # noqa: BLE001 - reported; the steps below say more
        results = [StepResult("env", f"error: {type(error).__name__}: {str(error)[:80]}")]
    runners = {"tests": step_tests, "mnist": step_mnist, "bench_gpu": step_bench_gpu, "finetune": step_finetune}
    pending = [s for s in STEPS[1:] if s not in args.skip]
    for step in STEPS[1:]:
        if step in args.skip:
            results.append(StepResult(step, "skipped (--skip)"))
            continue
        left = args.budget_s - (time.perf_counter() - started)
        shares = SMOKE_SHARES if args.smoke and args.device == "cpu" else SHARES
        share = shares[step] / sum(shares[s] for s in pending)
        pending.remove(step)
        budget = left * share
        print(f"\n== {step}: budget {budget:.0f} s ({left:.0f} s left) ==", flush=True)
        if budget < 5:
            results.append(StepResult(step, "skipped (budget)"))
            continue
        try:
            results.append(runners[step](args, out, budget))
        except Exception as error:  # noqa: BLE001 - a broken step is reported and the check goes on
            results.append(StepResult(step, f"error: {type(error).__name__}: {str(error)[:80]}"))
        (out / "gpu_check.json").write_text(json.dumps(_document(results, started), indent=2) + "\n")
    return results


def _document(results: list[StepResult], started: float) -> dict[str, Any]:
    return {"total_s": round(time.perf_counter() - started, 1),
            "steps": [{"step": r.step, "status": r.status, "seconds": round(r.seconds, 1), "figure": r.figure,
                       "details": r.details} for r in results]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not (args.device == "cpu" and args.smoke) and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        results = run_steps(args, out, started)
    finally:
        signal.signal(signal.SIGTERM, previous)
    total = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(_document(results, started), indent=2) + "\n")
    tables = benchmark_tables(out)
    if tables:
        print("\n" + tables)
    print()
    print(format_table(results, total))
    print(f"wrote {out / 'gpu_check.json'} and the steps' logs")
    failed = [r for r in results if not r.status.startswith(("ok", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

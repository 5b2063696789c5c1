"""Fine-tuning throughput on an image folder: float against 4-bit quantized, through ``qat-ste convert``.

    python3 -m tools.bench_finetune_gpu --json finetune.json            # CUDA: bf16, channels_last, compile
    python3 -m tools.bench_finetune_gpu --device cpu --smoke            # CPU: tiny folder, 64 px

Writes an ImageFolder of JPEGs (``--classes`` x (``--train-per-class`` + ``--val-per-class``) images
of ``--source-px`` px: per class its own colour, shape and stripe direction, at random positions and
scales, with noise) into a temporary folder, then runs for each model, streamed at the model's own
size (224 px for both defaults),
``python3 -m qat_ste.cli convert --model M --data imagefolder:DIR --float-epochs E --epochs E
--amp bf16 --compile on --device cuda --no-export --workers 12 ...``. The float stage trains the
float model, the qat stage its 4-bit quantized copy (quantizer kernel ``auto``). The images/s of each
stage's last epoch (from the run's report.json: ``float.history`` and ``quantized.history``; the
first epoch includes torch.compile) are printed side by side with their ratio.

Models run in order (resnet18, then vit_small) while ``--budget-s`` lasts; each run's timeout is
what is left of it, and a model that does not fit is listed as "skipped (budget)".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("torchvision:resnet18", "timm:vit_small_patch16_224")
#: what the training engine warns when torch.compile fails and it trains on eagerly
COMPILE_FALLBACK = "torch.compile failed on this model"
#: seconds the first run is assumed to need before one has been measured (CUDA)
FIRST_RUN_ESTIMATE_S = 60.0


# ---- the image folder ----------------------------------------------------------------------------


def draw_image(label: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image of class ``label``: the class's hue and stripe direction, a bright square
    or disc (by class parity) at a random place and scale, and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hue = 2 * np.pi * label / classes
    base = 0.5 + 0.35 * np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)], dtype=np.float32)
    angle = np.pi * label / classes
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (4 + label % 3) * (xx * np.cos(angle) + yy * np.sin(angle)))
    image = base[:, None, None] * (0.6 + 0.4 * stripes)[None]
    cx, cy = rng.uniform(0.25, 0.75, size=2)
    radius = rng.uniform(0.1, 0.25)
    if label % 2:
        shape = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
    else:
        shape = (np.abs(xx - cx) < radius) & (np.abs(yy - cy) < radius)
    image = np.where(shape[None], 1.0 - image, image)
    image = image + rng.normal(0.0, 0.06, size=image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)


def write_image(path: Path, label: int, classes: int, size: int, seed: int) -> None:
    from PIL import Image

    pixels = draw_image(label, classes, size, np.random.default_rng(seed))
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def make_imagefolder(root: Path, classes: int, train_per_class: int, val_per_class: int, size: int) -> int:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; returns the number of images."""
    jobs = []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            offset = 0 if split == "train" else 1_000_000
            jobs += [(folder / f"{i:05d}.jpg", label, offset + label * 100_000 + i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: write_image(job[0], job[1], classes, size, job[2]), jobs))
    return len(jobs)


# ---- one convert run -----------------------------------------------------------------------------


def convert_command(model: str, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """The ``python3 -m qat_ste.cli convert`` command line of one model."""
    command = [sys.executable, "-m", "qat_ste.cli", "convert", "--model", model, "--data", f"imagefolder:{data}",
               "--float-epochs", str(args.epochs), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--float-lr", "0.01", "--lr", "0.01", "--amp", args.amp, "--compile", args.compile,
               "--device", args.device, "--workers", str(args.workers), "--calib-batches", "1",
               "--calib-method", "percentile", "--no-export", "--no-progress", "--out", str(out)]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    return command


def child_env() -> dict[str, str]:
    """The environment of the convert process: the repository importable (it need not be installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_command(command: list[str], timeout_s: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds); on timeout the whole process group is killed."""
    tick = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=child_env(), cwd=str(REPO), start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(timeout_s, 1.0))
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        output, _ = process.communicate()
        code = None
    except BaseException:  # SIGTERM (as SystemExit, see main) or Ctrl-C: the run's processes go too
        _kill_group(process.pid)
        raise
    return code, output or "", time.perf_counter() - tick


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def epoch_rates(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(images/s of the first epoch, of the last epoch) of a stage's history."""
    rates = [row.get("images_per_s") for row in history]
    return (rates[0] if rates else None), (rates[-1] if rates else None)


def read_report(path: Path) -> dict[str, Any]:
    """The figures of one run from its report.json."""
    report = json.loads(path.read_text())
    float_first, float_last = epoch_rates(report["float"].get("history") or [])
    quant_first, quant_last = epoch_rates(report["quantized"].get("history") or [])
    quant = report.get("quantization", {})
    return {"float_images_per_s": float_last, "quantized_images_per_s": quant_last,
            "float_first_epoch_images_per_s": float_first, "quantized_first_epoch_images_per_s": quant_first,
            "ratio": quant_last / float_last if quant_last and float_last else None,
            "train_images": report["data"].get("train_images"), "image_size": report["data"].get("image_size"),
            "sites": quant.get("sites_quantized"), "kernel": quant.get("kernel", "auto"),
            "float_accuracy": report["float"].get("accuracy"),
            "quantized_accuracy": report["quantized"].get("accuracy"),
            "timings_s": report.get("timings_s")}


def read_metrics(out: Path) -> dict[str, Any]:
    """What a run stopped early left: the images/s of the epochs its stages finished (metrics.csv)."""
    import csv

    found: dict[str, Any] = {}
    for stage, key in (("float", "float"), ("qat", "quantized")):
        path = out / stage / "metrics.csv"
        if path.is_file():
            with open(path, newline="") as handle:
                history = [{"images_per_s": float(row["images_per_s"])} for row in csv.DictReader(handle)
                           if row.get("images_per_s")]
            first, last = epoch_rates(history)
            found.update({f"{key}_images_per_s": last, f"{key}_first_epoch_images_per_s": first})
    rates = found.get("float_images_per_s"), found.get("quantized_images_per_s")
    found["ratio"] = rates[1] / rates[0] if rates[0] and rates[1] else None
    return found


def bench_model(model: str, data: Path, work: Path, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    """One convert run; the row (status "ok", "error (exit N): ..." or "timeout after N s")."""
    out = work / ("run-" + model.replace(":", "-").replace("/", "-"))
    command = convert_command(model, data, out, args)
    print(f"$ {' '.join(command[1:])}", flush=True)
    code, output, seconds = run_command(command, timeout_s)
    row: dict[str, Any] = {"model": model, "seconds": round(seconds, 1), "command": command[1:]}
    tail = [line for line in output.strip().splitlines() if line.strip()][-12:]
    if code is None:
        row.update(status=f"timeout after {seconds:.0f} s", tail=tail, **read_metrics(out))
    elif code != 0 or not (out / "report.json").is_file():
        row.update(status=f"error (exit {code}): {tail[-1][:160] if tail else ''}", tail=tail, **read_metrics(out))
    else:
        row.update(status="ok", **read_report(out / "report.json"))
    if COMPILE_FALLBACK in output:  # the engine trained on eagerly: the rates are not compiled ones
        row["status"] += " (compile fell back to eager)"
        row["compile_fallback"] = True
    return row


# ---- table and main ------------------------------------------------------------------------------


def _rate(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "-"


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    head = ("model", "px", "float img/s", "quantized img/s", "quant/float", "status")
    cells = [(r["model"], str((r.get("image_size") or ["-"])[-1]), _rate(r.get("float_images_per_s")),
              _rate(r.get("quantized_images_per_s")), f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-",
              r["status"]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i in (0, 5) else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([title, line(head), line(tuple("-" * w for w in widths)), *(line(c) for c in cells)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--data", default=None, help="an existing image folder (default: generate one)")
    parser.add_argument("--classes", type=int, default=None, help="default 10 (smoke: 3)")
    parser.add_argument("--train-per-class", type=int, default=None, help="default 250 (smoke: 6)")
    parser.add_argument("--val-per-class", type=int, default=None, help="default 20 (smoke: 2)")
    parser.add_argument("--source-px", type=int, default=None, help="side of the JPEGs (default 256; smoke: 80)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="convert's --image-size (default: none, the model's own, 224 for both; smoke: 64)")
    parser.add_argument("--epochs", type=int, default=2, help="float and quantized epochs; the last is measured")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (smoke: 4)")
    parser.add_argument("--workers", type=int, default=None, help="default 12 (smoke: 1)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", default=None, help="default bf16 on CUDA, off elsewhere")
    parser.add_argument("--compile", default=None, choices=("auto", "on", "off"), help="default on on CUDA")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--smoke", action="store_true", help="tiny folder and sizes: test every path on a CPU")
    parser.add_argument("--keep", default=None, help="keep the folder and the runs here (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    smoke = args.smoke
    for name, normal, tiny in (("classes", 10, 3), ("train_per_class", 250, 6), ("val_per_class", 20, 2),
                               ("source_px", 256, 80), ("batch_size", 128, 4), ("workers", 12, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else normal)
    if args.image_size is None and smoke:
        args.image_size = 64
    args.amp = args.amp or ("bf16" if cuda else "off")
    args.compile = args.compile or ("on" if cuda else "off")
    return args


def run_models(args: argparse.Namespace, data: Path, work: Path, started: float,
               setup: dict[str, Any]) -> list[dict[str, Any]]:
    """Each model's convert run while the budget lasts (the JSON rewritten after each)."""
    rows: list[dict[str, Any]] = []
    estimate = FIRST_RUN_ESTIMATE_S if args.device.startswith("cuda") else 0.0
    for model in args.models:
        left = args.budget_s - (time.perf_counter() - started)
        if left <= 0 or left < estimate:
            rows.append({"model": model, "status": "skipped (budget)", "seconds": 0.0})
        else:
            rows.append(bench_model(model, data, work, args, left))
            estimate = rows[-1]["seconds"]
        if args.json:
            Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    return rows


def _exit_on_sigterm(*_: Any) -> None:
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """main() without the signal handling: stopped from outside, the convert run in flight stops too."""
    started = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = Path(args.data) if args.data else work / "images"
        if not args.data:
            count = make_imagefolder(data, args.classes, args.train_per_class, args.val_per_class, args.source_px)
            print(f"wrote {count} JPEGs ({args.source_px} px, {args.classes} classes) to {data} "
                  f"in {time.perf_counter() - started:.1f} s", flush=True)
        setup = {key: getattr(args, key) for key in ("device", "amp", "compile", "epochs", "batch_size", "workers",
                                                     "image_size", "classes", "train_per_class", "val_per_class",
                                                     "source_px", "budget_s")}
        rows = run_models(args, data, work, started, setup)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    title = (f"fine-tuning throughput, last of {args.epochs} epoch(s) per stage, batch {args.batch_size}, "
             f"{args.device}, amp {args.amp}, compile {args.compile}, {args.workers} workers "
             f"({time.perf_counter() - started:.0f} s)")
    print()
    print(format_table(rows, title))
    for row in rows:
        if row["status"] != "ok" and row.get("tail"):
            print(f"\n{row['model']}: last lines of its output:\n  " + "\n  ".join(row["tail"]))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

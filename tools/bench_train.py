"""Training throughput of float vs quantized models through the qat_ste training engine.

For each model, the float network and its quantized copy (``qat_ste.quantize``, 4 bits, LSQ steps)
run the same training steps with ``qat_ste.train.train`` on synthetic images (no download);
the images/s of the measured steps are printed side by side with their ratio. Each measurement
starts with warm-up steps (allocator, cuDNN autotuning, torch.compile) run through the same
engine call and discarded.

    python -m tools.bench_train                               # CPU: small sizes, a few steps
    python -m tools.bench_train --models torchvision:resnet18 zoo:resnet20 --steps 50 --json out.json

Defaults on CPU: resnet18 at 64x64, batch 16; zoo resnet20 at 32x32, batch 64; 5 steps after 1
warm-up step (on a busy machine try ``--threads 1``). On CUDA: resnet18 at 224x224, batch 128;
resnet20 at 32x32, batch 256; 50 steps after 10 warm-up steps, bf16 autocast and torch.compile
(the engine's CUDA defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import qat_ste
from qat_ste.train import TrainConfig, train
from qat_ste.train.build import build_model, parse_model_spec
from qat_ste.train.data import make_synthetic
from qat_ste.train.distributed import resolve_device

DEFAULT_MODELS = ("torchvision:resnet18", "zoo:resnet20")


@dataclass(frozen=True)
class Setting:
    """Input side and batch size of one model's benchmark."""

    image_size: int
    batch_size: int


def default_setting(model: str, cuda: bool) -> Setting:
    """Small sizes on CPU, ImageNet/CIFAR sizes on CUDA."""
    imagenet_style = not model.startswith("zoo:")
    if cuda:
        return Setting(224, 128) if imagenet_style else Setting(32, 256)
    return Setting(64, 16) if imagenet_style else Setting(32, 64)


def images_per_second(model: nn.Module, data: Any, setting: Setting, steps: int, warmup: int,
                      base: TrainConfig) -> float:
    """Warm up, then time ``steps`` training steps through train(); returns images/s."""
    def config(total_steps: int) -> TrainConfig:
        per_epoch = math.ceil(len(data) / setting.batch_size)
        return TrainConfig(**{**base.to_dict(), "epochs": math.ceil(total_steps / per_epoch) + 1,
                              "batch_size": setting.batch_size, "stop_after_steps": total_steps,
                              "schedule": "constant"})

    if warmup > 0:
        train(model, data, None, config(warmup))
    result = train(model, data, None, config(steps))
    return result.images_per_s


def bench(model_name: str, setting: Setting, steps: int, warmup: int, base: TrainConfig, bits: int) -> dict[str, Any]:
    """Float and quantized images/s of one model."""
    spec = parse_model_spec(model_name)
    data = make_synthetic("train", num_classes=10, size=setting.image_size, channels=3,
                          n=setting.batch_size * min(steps + warmup, 8))
    torch.manual_seed(0)
    float_model = build_model(spec, 10, 3, setting.image_size)
    example = torch.randn(1, 3, setting.image_size, setting.image_size)
    quantized = qat_ste.quantize(float_model, bits=bits, alpha_mode="lsq", example_input=example)
    float_rate = images_per_second(float_model, data, setting, steps, warmup, base)
    quant_rate = images_per_second(quantized, data, setting, steps, warmup, base)
    return {
        "model": model_name, "image_size": setting.image_size, "batch_size": setting.batch_size,
        "sites": len(qat_ste.quant_modules(quantized)), "bits": bits,
        "float_images_per_s": float_rate, "quantized_images_per_s": quant_rate,
        "ratio": quant_rate / float_rate if float_rate > 0 else float("nan"),
    }


def format_rows(rows: list[dict[str, Any]], device: str, amp: str, compiled: str) -> str:
    head = ("model", "input", "batch", "sites", "float img/s", "quant img/s", "quant/float")
    cells = [(r["model"], f"{r['image_size']}x{r['image_size']}", str(r["batch_size"]), str(r["sites"]),
              f"{r['float_images_per_s']:.1f}", f"{r['quantized_images_per_s']:.1f}", f"{r['ratio']:.2f}x")
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True)))

    out = [f"training throughput on {device} (amp {amp}, compile {compiled})", line(head),
           line(tuple("-" * w for w in widths))]
    return "\n".join(out + [line(c) for c in cells])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 5 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--image-size", type=int, default=None, help="override every model's input side")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (50 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    compile_mode: bool | str = {"auto": "auto", "on": True, "off": False}[args.compile]
    base = TrainConfig(device=str(device), amp=args.amp, compile=compile_mode,
                       lr=0.01, progress=False, verbose=False, print_summary=False, plot=False, log_format="none",
                       calibrate_batches=1, calibrate_method="percentile")
    rows = []
    started = time.perf_counter()
    for name in args.models:
        setting = default_setting(name, cuda)
        setting = Setting(args.image_size or setting.image_size, args.batch_size or setting.batch_size)
        print(f"{name}: {setting.image_size}x{setting.image_size}, batch {setting.batch_size}, "
              f"{warmup} warm-up + {steps} measured steps each for float and quantized ...", flush=True)
        rows.append(bench(name, setting, steps, warmup, base, args.bits))
    amp = args.amp if args.amp != "auto" else ("bf16" if cuda else "off")
    compiled = args.compile if args.compile != "auto" else ("on" if cuda else "off")
    print()
    print(format_rows(rows, str(device) + (f" ({torch.get_num_threads()} threads)" if not cuda else ""), amp, compiled))
    print(f"(total {time.perf_counter() - started:.0f} s; ratio < 1: the quantized model trains slower)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "amp": amp, "compile": compiled,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

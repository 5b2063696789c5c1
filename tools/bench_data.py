"""Can the streaming loader feed the model? Images/s the StreamLoader delivers at 224 px against the
images/s quantized models consume in a training step, on this machine.

1. A folder of generated JPEGs (``--images`` files of ``--source-size``, two classes) is streamed
   with the ImageNet training preprocessing at 224 px (RandomResizedCrop + flip, normalised float)
   by a StreamLoader with 1, 2, ... and all available cores as worker processes; the first batch
   (worker start-up) is not timed.
2. Each model (torchvision resnet18 and timm vit_small_patch16_224 by default, random weights,
   1000 classes, ``qat_ste.quantize(bits=4)``) takes SGD training steps (forward, backward,
   optimizer step) on random 224 px batches; warm-up steps are not timed.
3. The table gives both rates and the ratio loader / model (> 1: the loader keeps up). Loader and
   model are measured one after the other: in a real run on a CPU they share the cores.

    python -m tools.bench_data                        # about 2-3 minutes on 2 cores
    python -m tools.bench_data --batch-size 32 --model-steps 3 --json bench_data.json
    python -m tools.bench_data --images 64 --models torchvision:resnet18   # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qat_ste
from qat_ste.data import StreamLoader, resolve_preprocess, stream_imagefolder
from qat_ste.data.loaders import available_cpus
from qat_ste.train.build import build_model, parse_model_spec

DEFAULT_MODELS = ("torchvision:resnet18", "timm:vit_small_patch16_224")
SIDE = 224


def write_jpegs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """``count`` JPEGs of ``size`` (width, height) in two class folders: smooth random colour fields
    with noise, so they compress like photographs rather than like flat colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        folder = root / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)


def loader_rate(folder: Path, workers: int, batch_size: int) -> float:
    """Images/s of one epoch of the streaming loader after its first batch."""
    steps = resolve_preprocess(None, SIDE, kind="torchvision")
    dataset = stream_imagefolder(folder, "train", steps, val_fraction=0.0, augment=True)
    loader = StreamLoader(dataset, batch_size, workers=workers, drop_last=True)
    batches = iter(loader)
    next(batches)  # workers start and fill their queues
    tick, count = time.perf_counter(), 0
    for images, _ in batches:
        count += images.shape[0]
    return count / (time.perf_counter() - tick)


def model_rate(model_text: str, batch_size: int, steps: int, warmup: int) -> float:
    """Images/s of SGD training steps of the 4-bit quantized model on random 224 px batches."""
    torch.manual_seed(0)
    model = build_model(parse_model_spec(model_text), 1000, 3, SIDE)
    qmodel = qat_ste.quantize(model, bits=4, example_input=torch.randn(1, 3, SIDE, SIDE))
    qmodel.train()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch_size, 3, SIDE, SIDE), torch.randint(0, 1000, (batch_size,))
    elapsed = 0.0
    for step in range(warmup + steps):
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = qmodel(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        qat_ste.project_alphas(qmodel)
        if step >= warmup:
            elapsed += time.perf_counter() - tick
    return steps * batch_size / elapsed


def table(result: dict[str, Any]) -> str:
    """The printed table: loader rates, model rates, and their ratios."""
    s = result["settings"]
    models = [m["model"] for m in result["models"]]
    lines = [f"streaming loader: {s['images']} JPEGs {s['source_size'][0]}x{s['source_size'][1]}, {SIDE} px "
             f"train preprocessing, batch {s['batch_size']}; models: 4-bit quantized, SGD step, batch "
             f"{s['batch_size']}, {s['threads']} thread(s)",
             f"{'':28}{'images/s':>10}  " + "  ".join(f"{'ratio vs ' + m.split(':')[-1]:>26}" for m in models)]
    for row in result["loader"]:
        ratios = "  ".join(f"{row['images_per_s'] / m['images_per_s']:>26.2f}" for m in result["models"])
        lines.append(f"{'loader, ' + str(row['workers']) + ' worker(s)':28}{row['images_per_s']:>10.1f}  {ratios}")
    for m in result["models"]:
        lines.append(f"{m['model']:28}{m['images_per_s']:>10.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_data", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="generated JPEGs (default 256)")
    parser.add_argument("--source-size", type=int, nargs=2, default=(400, 300), metavar=("W", "H"),
                        help="JPEG size (default 400 300, about an ImageNet photo)")
    parser.add_argument("--batch-size", type=int, default=16, help="loader and model batch (default 16)")
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="worker counts (default: 1, 2 and all available cores)")
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--model-steps", type=int, default=1, help="timed training steps per model (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the models (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    cores = available_cpus()
    counts = sorted(set(args.workers if args.workers else [1, 2, cores]))
    threads = args.threads or cores
    torch.set_num_threads(threads)
    result: dict[str, Any] = {"settings": {"images": args.images, "source_size": list(args.source_size),
                                           "batch_size": args.batch_size, "threads": threads, "cores": cores,
                                           "side": SIDE, "torch": torch.__version__},
                              "loader": [], "models": []}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as folder:
        write_jpegs(Path(folder), args.images, tuple(args.source_size))
        for workers in counts:
            rate = loader_rate(Path(folder), workers, args.batch_size)
            result["loader"].append({"workers": workers, "images_per_s": rate})
            print(f"loader, {workers} worker(s): {rate:.1f} images/s", file=sys.stderr)
    for model in args.models:
        rate = model_rate(model, args.batch_size, args.model_steps, args.warmup)
        result["models"].append({"model": model, "images_per_s": rate})
        print(f"{model}: {rate:.1f} images/s", file=sys.stderr)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantize a torchvision model, fine-tune it a few steps, export it to ONNX and check it.

    python examples/quantize_train_export.py                       # resnet18, 32x32, a few steps (CPU)
    python examples/quantize_train_export.py --model mobilenet_v3_small --steps 20 --latency

The model starts from random weights (nothing is downloaded). The data are scikit-learn's bundled
8x8 digits, upsampled to ``--image-size`` and repeated over 3 channels; the last 297 are held out
for the ONNX check. The steps:

1. ``qat_ste.quantize``: every activation call site becomes a 4-bit quantized activation whose
   backward pass uses the clipped-ReLU straight-through estimator;
2. ``qat_ste.calibrate``: the steps alpha start from the activations of a few batches;
3. a plain training loop (SGD, then ``qat_ste.project_alphas`` after each step);
4. ``qat_ste.export_onnx`` (integer activation codes, int8 weights) and ``qat_ste.check_onnx``,
   which compares ONNX Runtime's codes with PyTorch's site by site.

Needs the ``onnx`` and ``data`` extras (``pip install 'qat_ste[onnx,data]'``).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import qat_ste


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options; the defaults run in well under a minute on two CPU cores."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="a torchvision classification model (random init)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--ste", default="clipped_relu", help=f"one of {', '.join(qat_ste.list_stes())}")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calib-batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="training steps")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--check-samples", type=int, default=32, help="images compared in ONNX Runtime")
    p.add_argument("--latency", action="store_true", help="also time the ONNX file against the float model's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="folder for model.onnx (default: a temporary one)")
    return p.parse_args(argv)


def digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as normalised 3 x size x size images and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).repeat(1, 3, 1, 1)
    return images, torch.tensor(data.target, dtype=torch.long)


def batches(images: torch.Tensor, labels: torch.Tensor, size: int,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - size + 1, size):
            index = order[start:start + size]
            yield images[index], labels[index]


def fine_tune(qmodel: nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float) -> None:
    """A plain quantization-aware training loop: the steps alpha train with the weights."""
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9)
    qmodel.train()
    for step in range(1, steps + 1):
        images, labels = next(data)
        loss = F.cross_entropy(qmodel(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        qat_ste.project_alphas(qmodel)  # keep each learned step in its valid range
        print(f"step {step}/{steps}: loss {loss.item():.4f}")
    qmodel.eval()


def main(argv: list[str] | None = None) -> int:
    """Quantize, calibrate, fine-tune, export, check; prints the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = digits(args.image_size)
    held_out = slice(len(images) - 297, None)  # the last 297 digits are only used by the ONNX check
    train_images, train_labels = images[:held_out.start], labels[:held_out.start]
    model = getattr(torchvision.models, args.model)(num_classes=10)  # random weights, no download
    example = images[:1]
    qmodel = qat_ste.quantize(model, bits=args.bits, ste=args.ste, example_input=example)
    print(f"quantized {len(qat_ste.quant_modules(qmodel))} activation call sites of {args.model} "
          f"to {args.bits} bits, STE {args.ste}")
    data = batches(train_images, train_labels, args.batch_size)
    qat_ste.calibrate(qmodel, (next(data) for _ in range(args.calib_batches)))
    fine_tune(qmodel, data, args.steps, args.lr)
    print(qat_ste.report(qmodel))
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = out / "model.onnx"
        qat_ste.export_onnx(qmodel, onnx_path, example, weight_format="int8")
        print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB)")
        check_images = images[held_out][:args.check_samples]
        check_labels = labels[held_out][:args.check_samples]
        check = qat_ste.check_onnx(qmodel, onnx_path, check_images, check_labels, latency=args.latency)
        print(check.table())
    print(f"ORT parity: per-site codes {check.site_parity:.2%}, end-to-end codes {check.code_agreement:.2%}, "
          f"top-1 agreement {check.top1_agreement:.2%}; check {'OK' if check.ok else 'FAILED'}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of quantized activations: a training step of the quantized model against the float one.

    python -m tools.bench_quant                         # CPU: batch 8, 224x224
    python -m tools.bench_quant --device cuda --batch 256 --compile   # GPU (bf16, channels_last)

Prints, per model, the median time of a full training step (forward, backward, SGD step) for the
float model, the 4-bit quantized model (eager), and optionally both under torch.compile, with the
ratios quantized / float. Float and quantized alternate inside one run so that load drifts hit both.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn as nn
from tqdm import tqdm

import qat_ste


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["resnet18", "resnet50"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 256 on CUDA")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torchvision

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 8)
    iters = args.iters or (20 if cuda else 5)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    rows = []
    variants = [("eager", False)] + ([("compiled", True)] if args.compile else [])
    for name in tqdm(args.models, desc="models"):
        float_model = torchvision.models.get_model(name).to(device)
        if cuda:
            float_model = float_model.to(memory_format=torch.channels_last)
        qmodel = qat_ste.quantize(float_model, bits=args.bits, ste="clipped_relu", alpha_mode="lsq")
        qat_ste.calibrate(qmodel, [x[: min(batch, 16)]])
        for label, compiled in variants:
            f = torch.compile(float_model) if compiled else float_model
            q = torch.compile(qmodel) if compiled else qmodel
            f_step, q_step = make_step(f, x, y, cuda), make_step(q, x, y, cuda)
            warm = 3 if compiled else 2
            tf, tq = [], []
            for _ in range(2):  # alternate so drifts in machine load hit both
                tf.append(time_steps(f_step, device, warm, iters))
                tq.append(time_steps(q_step, device, warm, iters))
            rows.append((name, label, min(tf), min(tq)))
    dev = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ntraining step, batch {batch} x 3 x {args.size}^2, {args.bits}-bit activations, "
          f"{'bf16 autocast + channels_last' if cuda else 'fp32'}, torch {torch.__version__}, {dev}")
    print(f"{'model':10s} {'mode':9s} {'float ms':>10s} {'quant ms':>10s} {'ratio':>7s}")
    for name, label, tf, tq in rows:
        print(f"{name:10s} {label:9s} {tf * 1e3:10.1f} {tq * 1e3:10.1f} {tq / tf:7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

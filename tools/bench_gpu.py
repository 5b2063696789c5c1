"""Cost of a quantized training step on a GPU: qat_ste against float and torch.ao's fake quantizers.

    python3 -m tools.bench_gpu --json bench_gpu.json                    # CUDA: the full table
    python3 -m tools.bench_gpu --device cpu --smoke                     # CPU: every code path, tiny

For each model (torchvision resnet18, resnet50, mobilenet_v3_large, timm vit_small_patch16_224;
random init, 1000 classes, 224 px), each variant and each mode (eager, torch.compile), one row: a
full training step (forward under bf16 autocast, cross-entropy, backward, SGD step; channels_last
inputs and weights) timed with CUDA events, median over ``--steps`` steps after warm-up, and the
peak memory of those steps (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``).

Variants: ``float``; ``triton`` / ``torch`` (``qat_ste.quantize(bits=4, ste="clipped_relu",
alpha_mode="lsq", kernel=...)``, "n/a" while quantize has no ``kernel`` option; ``torch`` is then
the plain quantizer); ``ao_fq`` / ``ao_lsq``: torch.ao ``FakeQuantize`` (moving-average min/max
observer) and ``_LearnableFakeQuantize`` (learned scale and zero point, LSQ gradient scaling) after
each activation, quint8 with the 4-bit range 0..15, the peer baselines.

Rows run in priority order (the eager rows of every model, then the compiled rows of resnet50 and
vit_small, then the other compiled rows); once ``--budget-s`` is spent the remaining rows are
listed as "skipped (budget)" (a row still running then is stopped: "stopped (budget)"). A failing
row prints its error's first line and the run goes on.
``--json`` is rewritten after every row, so a run killed half way keeps its finished rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import inspect
import json
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import qat_ste

#: model key -> (source, name); the order is the priority of the eager rows
MODELS: dict[str, tuple[str, str]] = {
    "resnet50": ("torchvision", "resnet50"),
    "vit_small": ("timm", "vit_small_patch16_224"),
    "resnet18": ("torchvision", "resnet18"),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large"),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small"),  # not in the defaults: a quick test model
}
DEFAULT_MODELS = ("resnet50", "vit_small", "resnet18", "mobilenet_v3_large")
VARIANTS = ("float", "triton", "torch", "ao_fq", "ao_lsq")
MODES = ("eager", "compiled")
#: compiled rows of these models come right after the eager rows
COMPILED_FIRST = ("resnet50", "vit_small")
TARGETS = {"eager": 1.15, "compiled": 1.05, "memory": 1.05}
QAT_VARIANTS = ("triton", "torch")
#: activation modules that get a torch.ao fake quantizer after them (the gates stay float, as in qat_ste)
AO_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.GELU, nn.SiLU, nn.Hardtanh, nn.LeakyReLU, nn.Mish, nn.ELU,
)
#: seconds a row of each mode is assumed to need before one has been measured (CUDA only); later,
#: the last row of the mode times ESTIMATE_MARGIN (a row is started only when that much budget is left)
FIRST_ROW_ESTIMATE_S = {"eager": 5.0, "compiled": 45.0}
ESTIMATE_MARGIN = 1.2


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every row shares."""

    device: torch.device
    batch: int
    image_size: int
    steps: int
    warmup: int
    amp: bool
    channels_last: bool
    num_classes: int = 1000


# ---- models and variants -------------------------------------------------------------------------


def build_float(key: str, setup: Setup) -> nn.Module:
    """A randomly initialised model (seeded, so every variant starts from the same weights)."""
    source, name = MODELS[key]
    torch.manual_seed(0)
    if source == "timm":
        import timm

        extra = {} if setup.image_size == 224 else {"img_size": setup.image_size}
        return timm.create_model(name, pretrained=False, num_classes=setup.num_classes, **extra)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=setup.num_classes)


def kernel_option_available() -> bool:
    """Whether qat_ste.quantize takes ``kernel=`` (as a parameter or a QuantConfig field)."""
    if "kernel" in inspect.signature(qat_ste.quantize).parameters:
        return True
    return "kernel" in {f.name for f in dataclasses.fields(qat_ste.QuantConfig)}


def quantize_qat(model: nn.Module, variant: str, setup: Setup, calib: torch.Tensor) -> tuple[nn.Module, int]:
    """qat_ste's 4-bit quantized copy (kernel ``variant`` when quantize supports it), calibrated."""
    options: dict[str, Any] = {"kernel": variant} if kernel_option_available() else {}
    example = torch.randn(1, 3, setup.image_size, setup.image_size)
    quantized = qat_ste.quantize(model, bits=4, ste="clipped_relu", alpha_mode="lsq", example_input=example,
                                 **options)
    quantized.to(setup.device)
    qat_ste.calibrate(quantized, [calib], method="percentile")
    return quantized, len(qat_ste.quant_modules(quantized))


class ActThenFakeQuant(nn.Module):
    """An activation module followed by a torch.ao fake quantizer (``cast``: through float32, for a
    fake quantizer that does not take the autocast dtype on this device)."""

    def __init__(self, act: nn.Module, fake_quant: nn.Module, cast: bool) -> None:
        super().__init__()
        self.act, self.fake_quant, self.cast = act, fake_quant, cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(x)
        if self.cast:
            return self.fake_quant(y.float()).to(y.dtype)
        return self.fake_quant(y)


def make_ao_fake_quant(variant: str) -> nn.Module:
    """torch.ao's FakeQuantize or _LearnableFakeQuantize, quint8 restricted to 0..15 (4 bits)."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    common: dict[str, Any] = {"quant_min": 0, "quant_max": 15, "dtype": torch.quint8,
                              "qscheme": torch.per_tensor_affine}
    if variant == "ao_fq":
        return FakeQuantize(observer=MovingAverageMinMaxObserver, **common)
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    return _LearnableFakeQuantize(observer=MovingAverageMinMaxObserver, use_grad_scaling=True, **common)


def ao_needs_cast(variant: str, setup: Setup) -> bool:
    """Whether the fake quantizer fails on the activations' dtype here (then it runs in float32)."""
    if not setup.amp:
        return False
    probe = make_ao_fake_quant(variant).to(setup.device)
    x = torch.randn(256, device=setup.device, dtype=torch.bfloat16, requires_grad=True)
    try:
        probe(x).float().sum().backward()
        if variant == "ao_lsq":
            probe.enable_param_learning()
            probe(x).float().sum().backward()
        return False
    except (RuntimeError, NotImplementedError):
        return True


def insert_ao(model: nn.Module, variant: str, cast: bool) -> int:
    """Wrap every activation module in ActThenFakeQuant; returns how many were wrapped."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, AO_ACTIVATIONS)]
    for parent, name, child in targets:
        setattr(parent, name, ActThenFakeQuant(child, make_ao_fake_quant(variant), cast))
    return len(targets)


def count_calls(model: nn.Module, x: torch.Tensor) -> int:
    """Calls of the fake quantizers in one forward pass without gradients (call sites, as qat_ste counts)."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ActThenFakeQuant)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls[0]


def build_variant(base: nn.Module, variant: str, setup: Setup, calib: torch.Tensor) -> tuple[nn.Module, int, str]:
    """(model on the device, quantized sites, note) of one variant of the float model ``base`` (left
    as it is); raises on failure."""
    note = ""
    if variant in QAT_VARIANTS:
        model, sites = quantize_qat(base, variant, setup, calib)  # quantize() works on a copy
        if not kernel_option_available():
            note = "quantize() has no kernel option: plain quantizer"
    elif variant in ("ao_fq", "ao_lsq"):
        model = copy.deepcopy(base)
        cast = ao_needs_cast(variant, setup)
        insert_ao(model, variant, cast)
        note = "fake quant in float32 (no bf16 kernel)" if cast else ""
        model.to(setup.device)
        sites = count_calls(model, calib)  # also the observers' first ranges
        if variant == "ao_lsq":
            for module in model.modules():
                if hasattr(module, "enable_param_learning"):
                    module.enable_param_learning()
    else:
        model = copy.deepcopy(base).to(setup.device)
        sites = 0
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.train(), sites, note


# ---- one row -------------------------------------------------------------------------------------


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              setup: Setup, after_step: Callable[[], None] | None) -> Callable[[], None]:
    """A full training step: forward (autocast), cross-entropy, backward, SGD step (and the steps'
    projection into their valid range, qat_ste's rows)."""
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()

    return step


def time_step(step: Callable[[], None], setup: Setup) -> list[float]:
    """Milliseconds of each of ``setup.steps`` steps after ``setup.warmup`` warm-up steps."""
    cuda = setup.device.type == "cuda"
    for _ in range(setup.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(setup.steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(setup.device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(setup.steps):
        tick = time.perf_counter()
        step()
        times.append((time.perf_counter() - tick) * 1e3)
    return times


@dataclasses.dataclass
class ModelInputs:
    """The float model (on the CPU) and the batch that every row of one model starts from."""

    key: str
    base: nn.Module
    x: torch.Tensor
    y: torch.Tensor


def run_row(inputs: ModelInputs, variant: str, mode: str, setup: Setup) -> dict[str, Any]:
    """Build, (compile,) warm up and time one row; the row's figures."""
    x, y = inputs.x, inputs.y
    model, sites, note = build_variant(inputs.base, variant, setup, x[: min(16, len(x))])
    step_model = torch.compile(model) if mode == "compiled" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    after = qat_ste.AlphaProjector(model) if variant in QAT_VARIANTS else None  # as the training engine does
    step = make_step(step_model, optimizer, x, y, setup, after)
    times = time_step(step, setup)
    peak = torch.cuda.max_memory_allocated(setup.device) / 2**30 if setup.device.type == "cuda" else None
    return {"status": "ok", "ms_per_step": statistics.median(times), "ms_all": [round(t, 3) for t in times],
            "peak_gib": peak, "sites": sites, "note": note}


def free_memory(compiled: bool, cuda: bool) -> None:
    """Drop what the last row left: garbage, cached CUDA blocks, dynamo's compiled code."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160] if text else ''}"


# ---- the plan and the table ----------------------------------------------------------------------


def plan_rows(models: list[str], variants: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    """(model, variant, mode) in priority order: every eager row; then the compiled float and qat_ste
    rows of COMPILED_FIRST's models, model by model; their torch.ao rows; then the other compiled rows."""
    rows = [(m, v, "eager") for m in models for v in variants] if "eager" in modes else []
    if "compiled" in modes:
        first = [m for m in COMPILED_FIRST if m in models]
        own = [v for v in variants if v == "float" or v in QAT_VARIANTS]
        rows += [(m, v, "compiled") for m in first for v in own]
        rows += [(m, v, "compiled") for m in first for v in variants if v not in own]
        rows += [(m, v, "compiled") for m in models if m not in first for v in variants]
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to the float row of the same model and mode, and whether the qat_ste rows meet the targets."""
    floats = {(r["model"], r["mode"]): r for r in rows if r["variant"] == "float" and r["status"] == "ok"}
    for row in rows:
        base = floats.get((row["model"], row["mode"]))
        ok = row["status"] == "ok" and base is not None
        row["ratio"] = row["ms_per_step"] / base["ms_per_step"] if ok else None
        peaks = ok and row["peak_gib"] is not None and base["peak_gib"]
        row["mem_ratio"] = row["peak_gib"] / base["peak_gib"] if peaks else None
        row["target_ratio"] = TARGETS[row["mode"]]
        row["target_mem_ratio"] = TARGETS["memory"]
        qat = row["variant"] in QAT_VARIANTS
        row["meets_time"] = row["ratio"] <= TARGETS[row["mode"]] if qat and row["ratio"] is not None else None
        row["meets_mem"] = row["mem_ratio"] <= TARGETS["memory"] if qat and row["mem_ratio"] is not None else None


def _mark(value: bool | None) -> str:
    return "" if value is None else (" ok" if value else " MISS")


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    """The printed table: one line per row, sorted by model, mode and variant."""
    head = ("model", "variant", "mode", "ms/step", "x float", "peak GiB", "mem x float", "sites", "status / note")
    order = {v: i for i, v in enumerate(VARIANTS)}
    cells = []
    for r in sorted(rows, key=lambda r: (r["model"], MODES.index(r["mode"]), order.get(r["variant"], 99))):
        ok = r["status"] == "ok"
        ratio = f"{r['ratio']:.2f}x{_mark(r['meets_time'])}" if r.get("ratio") is not None else "-"
        mem = f"{r['mem_ratio']:.2f}x{_mark(r['meets_mem'])}" if r.get("mem_ratio") is not None else "-"
        cells.append((r["model"], r["variant"], r["mode"], f"{r['ms_per_step']:.1f}" if ok else "-", ratio,
                      f"{r['peak_gib']:.2f}" if ok and r["peak_gib"] is not None else "-", mem,
                      str(r.get("sites", "-")) if ok else "-",
                      r["status"][:100] if not ok else (r.get("note") or "ok")))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) if i in (0, 1, 2, 8) else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    targets = (f"targets for the qat_ste rows (triton, torch): eager <= {TARGETS['eager']:.2f}x, "
               f"compiled <= {TARGETS['compiled']:.2f}x, memory <= {TARGETS['memory']:.2f}x float")
    return "\n".join([title, targets, line(head), line(tuple("-" * w for w in widths)),
                      *(line(c) for c in cells)])


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                        help="default: all four (smoke: resnet18 vit_small)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=None, help="default 256 (smoke: 2)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (smoke: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 15; smoke: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; smoke: 1)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="rows not started by then are skipped")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="auto: bf16 on CUDA")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: test every code path on a CPU")
    parser.add_argument("--json", default=None, help="write the rows (and the setup) to this JSON file")
    return parser.parse_args(argv)


def make_setup(args: argparse.Namespace) -> Setup:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    return Setup(device=device, batch=args.batch or (2 if args.smoke else 256),
                 image_size=args.image_size or (32 if args.smoke else 224),
                 steps=args.steps or (2 if args.smoke else 15),
                 warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 3),
                 amp=args.amp == "bf16" or (args.amp == "auto" and cuda), channels_last=True)


def environment(setup: Setup) -> dict[str, Any]:
    cuda = setup.device.type == "cuda"
    return {"device": torch.cuda.get_device_name(setup.device) if cuda else "cpu", "torch": torch.__version__,
            "qat_ste": qat_ste.__version__, "kernel_option": kernel_option_available(),
            **{k: v for k, v in dataclasses.asdict(setup).items() if k != "device"}}


def write_json(path: str | None, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if path:
        Path(path).write_text(json.dumps({"setup": env, "targets": TARGETS, "rows": rows}, indent=2) + "\n")


class RowStopped(Exception):
    """Raised (by SIGALRM) in a row still running when the budget ends."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RowStopped in the block once ``seconds`` have passed (POSIX main thread; else no limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_: Any) -> None:
        raise RowStopped("the budget ended during this row")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make_inputs(key: str, setup: Setup) -> ModelInputs:
    """The float model and one random batch (inputs channels_last) for every row of model ``key``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(setup.batch, 3, setup.image_size, setup.image_size, generator=generator)
    y = torch.randint(0, setup.num_classes, (setup.batch,), generator=generator)
    x = x.to(setup.device)
    if setup.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return ModelInputs(key, build_float(key, setup), x, y.to(setup.device))


def skip_reason(variant: str, mode: str, setup: Setup, left: float, estimate: float) -> str:
    """Why a row is not run ('' when it runs)."""
    if variant == "triton" and not kernel_option_available():
        return "n/a (quantize() has no kernel option)"
    if variant == "triton" and setup.device.type != "cuda":
        return "n/a (the Triton kernels run on CUDA)"
    if left <= 0 or left < estimate:
        return "skipped (budget)"
    return ""


def run_plan(plan: list[tuple[str, str, str]], setup: Setup, budget_s: float, json_path: str | None,
             env: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the rows in order within the budget (a row still running when it ends is stopped); every
    row ends in the list, run or not."""
    cuda = setup.device.type == "cuda"
    started = time.perf_counter()
    estimate = dict(FIRST_ROW_ESTIMATE_S) if cuda else {"eager": 0.0, "compiled": 0.0}
    rows: list[dict[str, Any]] = []
    inputs: ModelInputs | None = None
    for key, variant, mode in plan:
        row: dict[str, Any] = {"model": key, "variant": variant, "mode": mode, "seconds": 0.0}
        left = budget_s - (time.perf_counter() - started)
        row["status"] = skip_reason(variant, mode, setup, left, estimate[mode])
        if not row["status"]:
            tick = time.perf_counter()
            print(f"[{tick - started:6.1f} s] {key} {variant} {mode} ...", flush=True)
            try:
                with time_limit(left):
                    if inputs is None or inputs.key != key:
                        inputs = None
                        free_memory(False, cuda)
                        inputs = make_inputs(key, setup)
                    row.update(run_row(inputs, variant, mode, setup))
            except Exception as error:  # noqa: BLE001 - a failing row is reported and the run goes on
                stopped = isinstance(error, RowStopped) or time.perf_counter() - started >= budget_s
                row.update(status="stopped (budget)" if stopped else f"error: {first_line(error)}")
            free_memory(mode == "compiled", cuda)
            row["seconds"] = round(time.perf_counter() - tick, 2)
            estimate[mode] = row["seconds"] * ESTIMATE_MARGIN
        rows.append(row)
        add_ratios(rows)
        write_json(json_path, env, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = make_setup(args)
    if setup.device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu (with --smoke for tiny sizes)")
        return 2
    if setup.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    warnings.filterwarnings("ignore")
    models = args.models or (["resnet18", "vit_small"] if args.smoke else list(DEFAULT_MODELS))
    plan = plan_rows(models, args.variants, args.modes)
    env = environment(setup)
    print(f"{len(plan)} rows, budget {args.budget_s:.0f} s: batch {setup.batch}, {setup.image_size} px, "
          f"{setup.warmup} warm-up + {setup.steps} timed steps, amp {'bf16' if setup.amp else 'off'}, "
          f"channels_last, on {env['device']}", flush=True)
    started = time.perf_counter()
    rows = run_plan(plan, setup, args.budget_s, args.json, env)
    title = (f"training step, batch {setup.batch} x 3 x {setup.image_size}^2, 4-bit activations, "
             f"{'bf16 autocast' if setup.amp else 'fp32'} + channels_last, torch {torch.__version__}, "
             f"{env['device']} ({time.perf_counter() - started:.0f} s)")
    print()
    print(format_table(rows, title))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Coverage of the rewrite on torchvision and timm models: quantize, run, and count the sites.

For each model: quantize -> calibrate -> compare the quantized sites with an independent census of
the float model's activation calls (qat_ste.rewrite.verify.check_coverage) -> a training-mode
forward and backward whose gradients must all be finite.
"""

from __future__ import annotations

import gc
import re
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

#: at least 40 timm models from different families (small variants, random weights)
TIMM_MODELS = (
    "resnet18", "resnet26d", "resnext26ts", "seresnext26d_32x4d", "efficientnet_b0", "efficientnet_lite0",
    "tf_efficientnetv2_b0", "mobilenetv3_small_050", "mobilenetv3_large_100", "mobilenetv2_050",
    "convnext_atto", "convnextv2_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "regnetx_002", "regnety_002",
    "mixer_s16_224", "resmlp_12_224", "levit_128s", "ghostnet_050", "ghostnetv2_100", "repvgg_a0",
    "coatnet_nano_rw_224", "maxvit_nano_rw_256", "edgenext_xx_small", "fastvit_t8", "dla34",
    "mobilevitv2_050", "mobilevit_xxs", "efficientvit_b0", "hrnet_w18_small", "densenet121",
    "dpn48b", "cspresnet50", "cspdarknet53", "darknet17", "rexnet_100", "mnasnet_small",
    "lcnet_050", "tinynet_e", "poolformer_s12", "pvt_v2_b0", "crossvit_tiny_240", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "nfnet_l0", "dm_nfnet_f0", "inception_v3", "xception41", "vgg11_bn",
    "tresnet_m", "selecsls42b", "hgnetv2_b0", "efficientformer_l1", "mobileone_s0", "repghostnet_050",
)

#: a small, fast subset for CI
CI_MODELS = (
    "torchvision:resnet18", "torchvision:googlenet", "torchvision:mobilenet_v3_small",
    "torchvision:squeezenet1_1", "torchvision:shufflenet_v2_x0_5", "timm:resnet18",
    "timm:mobilenetv3_small_050", "timm:vit_tiny_patch16_224", "timm:levit_128s", "timm:ghostnet_050",
)


@dataclass
class CoverageRow:
    model: str
    sites_found: int = 0       # quantized sites the rewrite made
    sites_counted: int = 0     # activation calls counted at run time on the float model
    quantized_calls: int = 0   # QuantAct invocations in one quantized forward pass
    methods: str = ""
    exported: str = ""         # ONNX export + ORT check: "" (not asked), "ok", or why not
    site_parity: float | None = None  # fraction of quantized sites with 100 % code parity in ORT
    passed: bool = False
    reason: str = ""
    seconds: float = 0.0


def torchvision_models() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def all_models() -> list[str]:
    return torchvision_models() + [f"timm:{n}" for n in TIMM_MODELS]


def build_model(spec: str, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    """A randomly initialised model and a small input batch (2 images) it accepts."""
    source, _, name = spec.partition(":")
    if source == "torchvision":
        import torchvision

        kwargs: dict[str, Any] = {"num_classes": num_classes}
        size = 64
        if name.startswith("vit_"):  # the image size must be a multiple of the patch size
            size = kwargs["image_size"] = 64 if "_14" not in name else 56
        elif name == "inception_v3":  # its auxiliary head needs the full 299x299 input
            size, kwargs["init_weights"] = 299, False
        elif name.startswith("maxvit"):  # partitions of 7 need 224x224
            kwargs["input_size"], size = (224, 224), 224
        elif name.startswith("swin"):
            size = 64
        model = torchvision.models.get_model(name, **kwargs)
    elif source == "timm":
        import timm

        model = timm.create_model(name, num_classes=num_classes)
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-1]
    else:
        raise ValueError(f"unknown model source in {spec!r}")
    x = torch.randn(2, 3, size, size)
    _vary_norm_layers(model)
    _match_norm_statistics(model, x)
    return model, x


@torch.no_grad()
def _vary_norm_layers(model: nn.Module, seed: int = 0) -> None:
    """Give every norm layer its own (seeded) affine parameters and running statistics.

    Freshly built models have identical norm layers (weight 1, bias 0, mean 0, var 1); two branches
    fed the same input are then the same function, and the ONNX exporter merges them, which says
    nothing about a real, trained model.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, torch.Tensor) and p.is_floating_point():
                    p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


@torch.no_grad()
def _match_norm_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running statistics to the batch statistics of ``x``, as training would.

    With random weights, eval-mode (running stats 0/1) and training-mode activations differ by
    orders of magnitude; steps calibrated on the one are then useless for the other, and the
    training step of the check degenerates (constant features, exploding BatchNorm gradients).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    saved = {m: m.momentum for m in norms}
    modes = {m: m.training for m in model.modules()}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    model.train()
    try:
        for _ in range(2):
            model(x)
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training


def check_model(spec: str, bits: int = 4, ste: str = "clipped_relu", export: bool = False) -> CoverageRow:
    """Quantize one model and verify it (see the module docstring)."""
    import qat_ste
    from qat_ste.rewrite.verify import check_coverage

    row = CoverageRow(spec)
    start = time.perf_counter()
    try:
        model, x = build_model(spec)
        model.eval()
        q = qat_ste.quantize(model, bits=bits, ste=ste, example_input=x[:1])
        qat_ste.calibrate(q, [x])
        rep = qat_ste.report(q)
        q.train()  # a training step first: it initialises sites only training mode reaches (aux heads)
        labels = torch.arange(x.shape[0]) % 10
        torch.nn.functional.cross_entropy(_logits(q(x)).float(), labels).backward()
        grads = [p.grad for p in q.parameters() if p.grad is not None]
        finite = all(torch.isfinite(g).all() for g in grads)
        problems = []
        for training in (False, True):
            cov = check_coverage(model, q, x, training=training)
            if not cov.ok:
                problems.append(f"{'train' if training else 'eval'}-mode census mismatch (counted {cov.counted}, "
                                f"quantized calls {cov.quantized_calls}, distinct {cov.distinct_sites}, "
                                f"still float {cov.left_float})")
        row.sites_found = len(rep.quantized)
        row.sites_counted = cov.counted  # training mode: every branch, auxiliary heads included
        row.quantized_calls = cov.quantized_calls
        row.methods = ", ".join(f"{k}: {v}" for k, v in sorted(rep.methods().items()))
        if not grads:
            problems.append("no gradients")
        elif not finite:
            problems.append("non-finite gradients")
        if export and not problems:
            q.eval()
            _export_and_check(q, x, row, problems, float_model=model)
        row.passed = not problems
        row.reason = "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - the table records every failure
        row.reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row.reason += " @ " + traceback.extract_tb(e.__traceback__)[-1].name
    finally:
        row.seconds = round(time.perf_counter() - start, 1)
        gc.collect()
    return row


def _float_exports(model: nn.Module, x: torch.Tensor, folder: str) -> bool:
    from qat_ste.export import export_float_onnx

    try:
        export_float_onnx(model.eval(), f"{folder}/float.onnx", x)
        return True
    except Exception:  # noqa: BLE001 - only the yes/no matters here
        return False


def _export_and_check(q: nn.Module, x: torch.Tensor, row: CoverageRow, problems: list[str],
                      float_model: nn.Module | None = None) -> None:
    """Export the quantized model (deploy form) and check per-site code parity in ONNX Runtime."""
    import tempfile

    from qat_ste.export import check_onnx, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_onnx(q, f"{tmp}/model.onnx", x)
            rep = check_onnx(q, f"{tmp}/model.onnx", x, latency=False, min_code_agreement=0.0,
                             min_top1_agreement=0.0)
        except Exception as e:  # noqa: BLE001 - recorded in the table
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0][:160] if str(e) else ""
            row.exported = f"export/check failed: {type(e).__name__}: {text}"
            if float_model is not None and not _float_exports(float_model, x, tmp):
                row.exported += " (the float model fails the same torch.onnx export: not a qat_ste limit)"
            problems.append(row.exported)
            return
    row.site_parity = rep.site_parity
    row.exported = "ok" if rep.site_parity == 1.0 else f"site parity {rep.site_parity:.4f}"
    if rep.site_parity != 1.0:
        problems.append(row.exported)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in {type(out).__name__}")


def rows_to_markdown(rows: list[CoverageRow]) -> str:
    head = ("| model | sites found | sites counted | pass | methods | ONNX export + ORT parity | reason | s |\n"
            "|---|---:|---:|---|---|---|---|---:|\n")
    body = "".join(
        f"| {r.model} | {r.sites_found} | {r.sites_counted} | {'pass' if r.passed else 'FAIL'} | {r.methods} | "
        f"{r.exported or '-'} | {r.reason.replace('|', '/')} | {r.seconds} |\n" for r in rows)
    passed = sum(r.passed for r in rows)
    return head + body + f"\n{passed}/{len(rows)} models pass.\n"


def rows_to_json(rows: list[CoverageRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]

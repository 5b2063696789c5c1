"""Coverage of the rewrite on torchvision (every task) and timm models: quantize, census, train, export, parity.

For each model (random weights): quantize -> calibrate -> compare the quantized sites with an
independent census of the float model's activation calls, in eval and training mode
(qat_ste.rewrite.verify.check_coverage) -> one training step of the task's loss, whose gradients must
all be finite -> (with ``export``) export to ONNX and check it in ONNX Runtime: per-site code parity and
the task's agreement figure (qat_ste.export.tasks), in the bit-exact mode and under ORT's default options.

Tasks: torchvision classification and its quantizable variants (top-1), detection (boxes matched by
IoU and label), segmentation (per-pixel class), video (top-1 over clips) and optical flow (relative
error); timm models are classifiers.
"""

from __future__ import annotations

import gc
import inspect
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    # families added for issue 15 (one model each; 84 timm families in all)
    "beit_base_patch16_224", "nest_tiny", "twins_svt_small", "hiera_tiny_224", "eva02_tiny_patch14_224",
    "convit_tiny", "visformer_tiny", "tnt_s_patch16_224", "pit_ti_224", "gcvit_xxtiny", "focalnet_tiny_srf",
    "davit_tiny", "efficientformerv2_s0", "tiny_vit_5m_224", "inception_next_tiny", "mambaout_femto",
    "rdnet_tiny", "starnet_s050", "repvit_m0_9", "sequencer2d_s", "res2net50_26w_4s", "resnest14d",
    "skresnet18", "ese_vovnet19b_dw", "hardcorenas_a", "botnet26t_256", "volo_d1_224", "inception_v4",
    "inception_resnet_v2", "coat_lite_tiny", "vitamin_small_224", "nextvit_small", "efficientvit_m0",
    "fasternet_t0", "csatv2", "sam2_hiera_tiny", "resnetv2_50", "legacy_seresnet18",
    "vit_relpos_small_patch16_224", "mvitv2_tiny", "shvit_s1", "samvit_base_patch16_224", "hgnet_tiny",
    "legacy_xception", "swinv2_tiny_window8_256", "vit_tiny_r_s16_p8_224",
)

#: a small, fast subset for CI
CI_MODELS = (
    "torchvision:resnet18", "torchvision:googlenet", "torchvision:mobilenet_v3_small",
    "torchvision:squeezenet1_1", "torchvision:shufflenet_v2_x0_5", "timm:resnet18",
    "timm:mobilenetv3_small_050", "timm:vit_tiny_patch16_224", "timm:levit_128s", "timm:ghostnet_050",
)


#: the CI subset's model of each task beyond classification (exported and checked in tests/test_coverage.py)
CI_TASK_MODELS = (
    "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision:lraspp_mobilenet_v3_large",
    "torchvision:r3d_18", "torchvision:raft_small", "torchvision:quantized_mobilenet_v2",
)

#: torchvision model modules beyond classification -> the task of their models
TORCHVISION_TASKS = {"detection": "detection", "segmentation": "segmentation", "video": "video",
                     "optical_flow": "optical_flow", "quantization": "classification"}
#: our task -> check_onnx()'s task (qat_ste.export.tasks)
CHECK_TASK = {"classification": "classification", "detection": "detection", "segmentation": "segmentation",
              "video": "classification", "optical_flow": "regression"}


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
    task: str = "classification"   # classification / detection / segmentation / video / optical_flow
    census_ok: bool | None = None  # the sites match the census in eval and training mode
    trained: bool | None = None    # one training step of the task's loss gave finite gradients
    exporter: str = ""             # the exporter path that wrote the file (qat_ste.export.exporters)
    task_figure: str = ""          # what task_agreement measures (check_onnx's figure for the task)
    task_agreement: float | None = None     # that figure, bit-exact mode, PyTorch given the file's codes at every
                                            # site (check_onnx's task figure)
    default_agreement: float | None = None  # that figure under ONNX Runtime's default options (given its codes)
    float64_agreement: float | None = None  # that figure for the quantized PyTorch model in float32 against
                                            # itself in float64 (measured when the end-to-end figure misses the
                                            # threshold: how far float rounding alone moves these outputs)
    float64_codes: float | None = None      # the share of equal codes in that comparison
    chained_codes: float | None = None      # codes equal given the file's upstream codes (bit-exact mode)
    end_to_end_agreement: float | None = None  # the task's figure end to end (each runtime computing every site)
    end_to_end_codes: float | None = None      # the share of equal codes end to end


@dataclass
class ModelCase:
    """A model with inputs for every stage of the check."""

    model: nn.Module
    task: str
    inputs: tuple            # positional arguments of one forward (a batch of 2)
    train_args: tuple        # positional arguments of the training forward (targets for detection)
    loss: Callable[[Any], torch.Tensor]  # the training forward's output -> the loss
    export_input: Any        # export_onnx()'s example input (a batch of 1 where the exporter fixes it)
    check_inputs: list       # check_onnx()'s batches


def torchvision_models() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def torchvision_task_models() -> list[str]:
    """Every torchvision model of detection, segmentation, video, optical flow and quantization."""
    import torchvision

    return [f"torchvision:{n}" for module in TORCHVISION_TASKS
            for n in torchvision.models.list_models(module=getattr(torchvision.models, module))]


def all_models() -> list[str]:
    return torchvision_models() + torchvision_task_models() + [f"timm:{n}" for n in TIMM_MODELS]


def task_of(spec: str) -> str:
    """The task of a model spec (timm models and torchvision's classification models: classification)."""
    source, _, name = spec.partition(":")
    if source != "torchvision":
        return "classification"
    import torchvision

    for module, task in TORCHVISION_TASKS.items():
        if name in torchvision.models.list_models(module=getattr(torchvision.models, module)):
            return task
    return "classification"


def build_model(spec: str, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    """A randomly initialised classifier and a small input batch (2 images) it accepts."""
    source, _, name = spec.partition(":")
    if source == "torchvision":
        import torchvision

        kwargs: dict[str, Any] = {"num_classes": num_classes}
        size = 64
        if name.startswith("vit_"):  # the image size must be a multiple of the patch size
            size = kwargs["image_size"] = 64 if "_14" not in name else 56
        elif name in ("inception_v3", "quantized_inception_v3"):  # its auxiliary head needs 299x299
            size, kwargs["init_weights"] = 299, False
        elif name.startswith("maxvit"):  # partitions of 7 need 224x224
            kwargs["input_size"], size = (224, 224), 224
        elif name == "quantized_googlenet":
            kwargs["init_weights"] = False
        if name.startswith("quantized_"):
            kwargs["quantize"] = False  # the float model with QuantStub / FloatFunctional, as users train it
        model = torchvision.models.get_model(name, **kwargs)
    elif source == "timm":
        import timm

        model = timm.create_model(name, num_classes=num_classes)
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-1]
        if size > 448 and _runs_at(model, 224):  # sam2_hiera_tiny (896 px) took 24 GiB through the export
            size = 224
    else:
        raise ValueError(f"unknown model source in {spec!r}")
    x = torch.randn(2, 3, size, size)
    _settle_norms(model, lambda: model(x))
    return model, x


@torch.no_grad()
def _runs_at(model: nn.Module, size: int) -> bool:
    """Whether ``model`` (eval mode) takes a ``size`` x ``size`` image."""
    try:
        model.eval()(torch.randn(1, 3, size, size))
        return True
    except Exception:  # noqa: BLE001 - any failure: it needs its own size
        return False


def build_case(spec: str, num_classes: int = 10) -> ModelCase:
    """The model of ``spec`` (random weights, seeded) with inputs, training step and check batches."""
    torch.manual_seed(0)
    task = task_of(spec)
    builders = {"detection": _detection_case, "segmentation": _segmentation_case, "video": _video_case,
                "optical_flow": _flow_case}
    if task in builders:
        return builders[task](spec.partition(":")[2], num_classes)
    model, x = build_model(spec, num_classes)
    labels = torch.arange(x.shape[0]) % num_classes
    checked = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))  # top-1 over 8 images
    return ModelCase(model, task, (x,), (x,), lambda out: F.cross_entropy(_logits(out).float(), labels), x,
                     [checked])


def _get_torchvision(name: str, **kwargs: Any) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs)


def _detection_case(name: str, num_classes: int) -> ModelCase:
    kwargs: dict[str, Any] = {"weights_backbone": None, "num_classes": 2 if "keypoint" in name else num_classes}
    size = 320 if name.startswith("ssd") else 128
    if not name.startswith("ssd"):
        kwargs.update(min_size=size, max_size=size)
    if name.startswith(("fcos", "retinanet")):  # their score prior (0.01) leaves random weights no box above 0.05
        kwargs["score_thresh"] = 0.001
    model = _get_torchvision(name, **kwargs)
    images = torch.rand(2, 3, size, size)
    targets = [_detection_target(name, size, k) for k in range(2)]
    _settle_norms(model, lambda: model(list(images), targets))
    return ModelCase(model, "detection", (list(images),), (list(images), targets),
                     lambda losses: sum(losses.values()), images[:1], [images[:1], images[1:]])


def _detection_target(name: str, size: int, k: int) -> dict[str, torch.Tensor]:
    s = size / 128
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [30.0 + k, 30.0, 100.0, 110.0]]) * s
    target = {"boxes": boxes, "labels": torch.tensor([1, 1 + k])}
    if "mask" in name:
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        target["masks"] = masks
    if "keypoint" in name:
        xy = boxes[:, None, :2] + torch.rand(2, 17, 2) * (boxes[:, None, 2:] - boxes[:, None, :2])
        target["keypoints"] = torch.cat([xy, torch.ones(2, 17, 1)], dim=-1)
        target["labels"] = torch.ones(2, dtype=torch.int64)
    return target


def _segmentation_case(name: str, num_classes: int) -> ModelCase:
    model = _get_torchvision(name, weights_backbone=None, num_classes=num_classes)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, num_classes, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    _settle_norms(model, lambda: model(x))
    return ModelCase(model, "segmentation", (x,), (x,), lambda out: F.cross_entropy(out["out"], labels), x, [x])


def _video_case(name: str, num_classes: int) -> ModelCase:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    frames, size = (16, 224) if name.startswith(("mvit", "s3d")) else (4, 64)  # mvit: fixed; s3d: its pool
    model = _get_torchvision(name, **kwargs)
    x = torch.randn(2, 3, frames, size, size)
    labels = torch.arange(2) % num_classes
    _settle_norms(model, lambda: model(x))
    return ModelCase(model, "video", (x,), (x,), lambda out: F.cross_entropy(out, labels), x[:1], [x[:1], x[1:]])


def _flow_case(name: str, num_classes: int) -> ModelCase:
    model = _get_torchvision(name)
    a, b = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)
    _settle_norms(model, lambda: model(a, b))
    return ModelCase(model, "optical_flow", (a, b), (a, b), lambda flows: sum(f.abs().mean() for f in flows),
                     (a[:1], b[:1]), [(a[:1], b[:1]), (a[1:], b[1:])])


def _settle_norms(model: nn.Module, run: Callable[[], Any]) -> None:
    """Norm layers as a trained model has them: their own affine parameters, and BatchNorm running
    statistics from ``run()`` (a training-mode forward); no layer left at zero weights."""
    _vary_norm_layers(model)
    _fill_zero_layers(model)
    _match_norm_statistics(model, run)


@torch.no_grad()
def _fill_zero_layers(model: nn.Module, seed: int = 0) -> list[str]:
    """Give every conv / linear layer whose weight is all zeros (torchvision's ViT heads, timm's MLP-Mixer
    and ResMLP heads start so) seeded random weights (std 0.02), as a trained model has them: a zero
    head makes every logit its bias, and top-1 agreement a tie broken the same way in every runtime.
    Returns the layers filled."""
    g = torch.Generator().manual_seed(seed)
    filled = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if (isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(weight, torch.Tensor)
                and weight.numel() and not bool(weight.any())):
            weight.copy_(0.02 * torch.randn(weight.shape, generator=g).to(weight.dtype))
            filled.append(name)
    return filled


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
def _match_norm_statistics(model: nn.Module, run: Callable[[], Any]) -> None:
    """Set BatchNorm running statistics to the batch statistics of ``run()`` (a training-mode forward
    of the model), as training would.

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
            run()
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training


def _calibration_batch(model: nn.Module, inputs: tuple) -> Any:
    """One calibrate() batch: the input tensor, or the forward's arguments by name."""
    if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    names = list(inspect.signature(model.forward).parameters)
    return dict(zip(names, inputs, strict=False))


def check_model(spec: str, bits: int = 4, ste: str = "clipped_relu", export: bool = False) -> CoverageRow:
    """Quantize one model and verify it (see the module docstring)."""
    import qat_ste
    from qat_ste.rewrite.verify import check_coverage

    row = CoverageRow(spec)
    start = time.perf_counter()
    try:
        row.task = task_of(spec)
        case = build_case(spec)
        model = case.model.eval()
        q = qat_ste.quantize(model, bits=bits, ste=ste, example_input=case.inputs)
        qat_ste.calibrate(q, [_calibration_batch(model, case.inputs)])
        rep = qat_ste.report(q)
        row.sites_found = len(rep.quantized)
        row.methods = ", ".join(f"{k}: {v}" for k, v in sorted(rep.methods().items()))
        q.train()  # a training step first: it initialises sites only training mode reaches (aux heads)
        case.loss(q(*case.train_args)).backward()
        grads = [p.grad for p in q.parameters() if p.grad is not None]
        problems = []
        row.trained = bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
        if not row.trained:
            problems.append("no gradients" if not grads else "non-finite gradients")
        del grads
        q.zero_grad(set_to_none=True)  # the gradients take as much memory as the weights (GiBs for vit_h_14)
        for training in (False, True):
            cov = check_coverage(model, q, *(case.train_args if training else case.inputs), training=training)
            if not cov.ok:
                problems.append(f"{'train' if training else 'eval'}-mode census mismatch (counted {cov.counted}, "
                                f"quantized calls {cov.quantized_calls}, distinct {cov.distinct_sites}, "
                                f"still float {cov.left_float})")
        row.sites_counted = cov.counted  # training mode: every branch, auxiliary heads included
        row.quantized_calls = cov.quantized_calls
        row.census_ok = not any("census" in p for p in problems)
        if export and not problems:
            q.eval()
            _export_and_check(q, case, row, problems, float_model=model)
        row.passed = not problems
        row.reason = "; ".join(problems)
    except Exception as e:  # noqa: BLE001 - the table records every failure
        row.reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row.reason += " @ " + traceback.extract_tb(e.__traceback__)[-1].name
    finally:
        row.seconds = round(time.perf_counter() - start, 1)
        gc.collect()
    return row


def _float_exports(model: nn.Module, example_input: Any, folder: str) -> bool:
    from qat_ste.export import export_float_onnx

    try:
        export_float_onnx(model.eval(), f"{folder}/float.onnx", example_input)
        return True
    except Exception:  # noqa: BLE001 - only the yes/no matters here
        return False


def _export_and_check(q: nn.Module, case: ModelCase, row: CoverageRow, problems: list[str],
                      float_model: nn.Module | None = None) -> None:
    """Export the quantized model (deploy form) and check per-site code parity and the task's figure
    in ONNX Runtime (bit-exact mode and default options)."""
    import tempfile

    from qat_ste.export import check_onnx, export_onnx
    from qat_ste.export.tasks import meets

    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = export_onnx(q, f"{tmp}/model.onnx", case.export_input)
            row.exporter = result.exporter
            rep = check_onnx(q, f"{tmp}/model.onnx", case.check_inputs, task=CHECK_TASK[case.task], latency=False)
        except Exception as e:  # noqa: BLE001 - recorded in the table
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0][:160] if str(e) else ""
            row.exported = f"export/check failed: {type(e).__name__}: {text}"
            if float_model is not None and not _float_exports(float_model, case.export_input, tmp):
                row.exported += " (the float model fails the same torch.onnx export: not a qat_ste limit)"
            problems.append(row.exported)
            return
        row.site_parity = rep.site_parity
        row.task_figure = rep.task_figure
        row.task_agreement = rep.task_agreement
        row.default_agreement = rep.default_task_agreement
        row.chained_codes, row.end_to_end_codes = rep.chained_code_agreement, rep.code_agreement
        row.end_to_end_agreement = rep.end_to_end_task_agreement
        row.exported = "ok" if rep.ok else "; ".join(rep.failures)
        problems.extend(rep.failures)
        if not meets(rep.task, rep.end_to_end_task_agreement, rep.task_threshold()):
            # shown, not a failure: the end-to-end figure also measures how far the model carries one flipped
            # code; the baseline says how far float rounding alone moves it
            _, row.float64_agreement, row.float64_codes = _rounding_baseline(q, case, rep.task)


@torch.no_grad()
def _rounding_baseline(q: nn.Module, case: ModelCase, task: str) -> tuple[str, float | None, float | None]:
    """How far float rounding alone moves the quantized PyTorch model: (what was compared, the task's
    figure, the share of equal codes over every site). Compared: the model in float32 against itself in
    float64 (exact arithmetic, as far as float32 goes); a model that cannot run in float64 against itself
    on inputs one ulp apart. No runtime can agree with float32 PyTorch much better than that."""
    import copy

    from qat_ste import QuantAct
    from qat_ste.export.tasks import Agreement, flatten_outputs

    def run(model: nn.Module, xs: tuple) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        codes: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, a, o: codes.append(mod.codes(a[0])))
                 for m in model.modules() if isinstance(m, QuantAct)]
        try:
            outputs = [t.float() if t.is_floating_point() else t for t in flatten_outputs(model(*xs))]
        finally:
            for h in hooks:
                h.remove()
        return outputs, codes

    def compare(other: nn.Module, moved: list[tuple]) -> tuple[float, float | None]:
        agreement, equal, total = Agreement(task), 0, 0
        for xs, xs_other in zip(batches, moved, strict=True):
            outputs, codes = run(q, xs)
            outputs_other, codes_other = run(other, xs_other)
            agreement.add(outputs, outputs_other)
            for c, d in zip(codes, codes_other, strict=False):
                if c.shape == d.shape:
                    equal, total = equal + int((c == d).sum()), total + c.numel()
        return agreement.value, (equal / total if total else None)

    batches = [b if isinstance(b, tuple) else (b,) for b in case.check_inputs]
    try:
        figure, codes = compare(copy.deepcopy(q).double().eval(), [tuple(x.double() for x in b) for b in batches])
        return "the quantized PyTorch model in float32 and in float64", figure, codes
    except Exception:  # noqa: BLE001 - e.g. RAFT builds float32 grids: compare inputs one ulp apart instead
        nudged = [tuple(torch.nextafter(x, torch.full_like(x, float("inf"))) for x in b) for b in batches]
        figure, codes = compare(q, nudged)
        return "the quantized PyTorch model on inputs one ulp apart", figure, codes


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in {type(out).__name__}")


def _mark(value: bool | None) -> str:
    return "-" if value is None else "ok" if value else "FAIL"


def _figure(value: float | None, figure: str) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    if figure == "relative error":
        return f"{value:.4f}" if value >= 1e-3 else f"{value:.1e}"
    return f"{100 * value:.2f} %"


def _known(value: bool | None, r: CoverageRow) -> bool | None:
    """A stage's result; rows of the earlier sweep did not record it, but passed (or reached the export,
    which runs only after census and training held) only when it held."""
    if value is not None:
        return value
    return True if r.passed or r.reason.startswith("export/check failed") else None


def _export_cell(r: CoverageRow) -> str:
    if r.exporter:
        return r.exporter
    return "-" if not r.exported else "ok (path not recorded)" if r.exported == "ok" else "failed"


def preamble(bits: int, ste: str, export: bool) -> str:
    """What the table's columns mean and how the rows were made."""
    lines = [
        f"Made by `python -m tools.coverage` ({bits} bits, `{ste}`, random weights, seeded; one thread). Columns:",
        "",
        "- **quantize: sites**: quantized sites the rewrite made; **census: counted**: activation calls counted at "
        "run time on the float model (training mode); **census**: the quantized model calls a quantizer for "
        "every one of them and leaves none float, in eval and in training mode;",
        "- **train**: one training step of the task's loss (detection: torchvision's loss dict with targets; "
        "segmentation: per-pixel cross-entropy; optical flow: mean |flow|) gave finite gradients;",
    ]
    if export:
        lines += [
            "- **export (path)**: the exporter path that wrote the file (`qat_ste.export.exporters`); "
            "**site parity**: the lowest per-site share of equal codes given the same input u (must be 1);",
            "- **codes given file's**: check_onnx's chained code agreement: PyTorch runs with every site's output "
            "replaced by the codes the file computed there (ONNX Runtime, bit-exact mode), and this is the share of "
            "PyTorch's own codes, computed from the file's upstream codes, equal to the file's (min 99.9 %): each "
            "segment between two sites must compute the same values in both runtimes;",
            "- **task figure**, **given file's codes**: check_onnx's figure for the task (classification and video: "
            "top-1 agreement; segmentation: per-pixel class agreement; detection: boxes matched by IoU >= 0.9 with "
            "equal labels; optical flow: relative error) of that chained run against the file's outputs; it must "
            "meet check_onnx's threshold (0.9; relative error 0.1); **ORT defaults**: the same under ONNX Runtime's "
            "default session options (Q/DQ fused into integer kernels; PyTorch given the codes the file computes "
            "that way), same threshold;",
            "- **end to end**: the same figure with each runtime computing every site itself (shown, not required); "
            "where it misses the threshold, **float32 vs float64** gives the figure between the quantized PyTorch "
            "model in float32 and in float64 (or on inputs one ulp apart): in deep networks with random weights one "
            "code that float rounding flips moves the next layers' codes, so no two runtimes agree end to end there.",
        ]
    return "\n".join(lines) + "\n\n"


def rows_to_markdown(rows: list[CoverageRow], intro: str = "") -> str:
    head = intro + ("| model | task | quantize: sites | census: counted | census | train | export (path) | "
            "site parity | codes given file's | task figure | given file's codes | ORT defaults | end to end | "
            "float32 vs float64 | pass | reason | s |\n"
            "|---|---|---:|---:|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---|---:|\n")
    body = "".join(
        f"| {r.model} | {r.task} | {r.sites_found} | {r.sites_counted} | {_mark(_known(r.census_ok, r))} | "
        f"{_mark(_known(r.trained, r))} | {_export_cell(r)} | "
        f"{'-' if r.site_parity is None else f'{r.site_parity:.4f}'} | {_figure(r.chained_codes, 'share')} | "
        f"{r.task_figure or '-'} | {_figure(r.task_agreement, r.task_figure)} | "
        f"{_figure(r.default_agreement, r.task_figure)} | {_figure(r.end_to_end_agreement, r.task_figure)} | "
        f"{_figure(r.float64_agreement, r.task_figure)} | "
        f"{'pass' if r.passed else 'FAIL'} | {r.reason.replace('|', '/')} | {r.seconds} |\n" for r in rows)
    passed = sum(r.passed for r in rows)
    tasks = sorted({r.task for r in rows})
    per_task = "; ".join(f"{t}: {sum(r.passed for r in rows if r.task == t)}/{sum(r.task == t for r in rows)}"
                         for t in tasks)
    return head + body + f"\n{passed}/{len(rows)} models pass ({per_task}).\n"


def _group(table: str, r: CoverageRow) -> str:
    quantizable = r.model.startswith("torchvision:quantized_")
    return f"| {table} | {r.task}{' (quantizable variants)' if quantizable else ''} |"


def _default_threshold(task: str) -> float | None:
    """check_onnx()'s default threshold of ``task``'s figure (the one the sweep's checks used)."""
    from qat_ste.export.check import check_onnx, threshold_key

    return inspect.signature(check_onnx).parameters[threshold_key(task)].default


def summary_table(tables: dict[str, list[CoverageRow]]) -> str:
    """The counts per table and task (the README's coverage table): models; quantized, census and one
    training step held; exported; 100 % per-site parity; check_onnx passed (figures given the file's
    codes, bit-exact and under ORT's defaults); the end-to-end figure met; of the misses, how many the
    float32-vs-float64 baseline misses too."""
    from qat_ste.export.tasks import meets

    lines = ["| table | task | models | quantize + census + train | export | 100 % per-site parity | "
             "check passed (given the file's codes) | end-to-end figure met | end-to-end missed: float64 "
             "baseline misses too |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for table, rows in tables.items():
        groups: dict[str, list[CoverageRow]] = {}
        for r in rows:
            groups.setdefault(_group(table, r), []).append(r)
        for label, group in sorted(groups.items()):
            exported = [r for r in group if r.site_parity is not None]
            measured = [r for r in exported if r.end_to_end_agreement is not None]
            task = CHECK_TASK[group[0].task]
            threshold = _default_threshold(task)

            def met(value: float | None, task: str = task, threshold: float | None = threshold) -> bool:
                return value is not None and meets(task, value, threshold)
            missed = [r for r in measured if not met(r.end_to_end_agreement)]
            lines.append(
                f"{label} {len(group)} | {sum(bool(r.census_ok and r.trained) for r in group)} | {len(exported)} | "
                f"{sum(r.site_parity == 1.0 for r in exported)} | {sum(r.passed for r in group)} | "
                f"{len(measured) - len(missed)} of {len(measured)} | "
                f"{sum(r.float64_agreement is not None and not met(r.float64_agreement) for r in missed)} of "
                f"{len(missed)} |")
    return "\n".join(lines) + "\n"


def rows_to_json(rows: list[CoverageRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]

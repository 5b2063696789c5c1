"""Quantized weights (issue 11): the weight quantizers against hand computations, the layer swap and
its selection, BCGD's blended update (SGD exact, AdamW = blend then AdamW), rho = 0 = BinaryConnect,
the report, the config and CLI options, a short LeNet-5 run on digits and exact resume."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import qat_ste
from qat_ste.cli.quant_options import _quant_config
from qat_ste.errors import QatSteError
from qat_ste.quantizer.blend import WeightBlender, attach_bcgd
from qat_ste.quantizer.weight import (
    LS_ITERATIONS,
    QuantWeightConv2d,
    QuantWeightLinear,
    QuantWeightModule,
    WeightQuantizer,
    mark_epoch,
    quant_weight_layers,
    to_quant_weight,
)
from qat_ste.train import TrainConfig, load_checkpoint, train
from qat_ste.train.data import load_dataset
from qat_ste.zoo import lenet5

pytestmark = pytest.mark.usefixtures("single_thread")

W = torch.tensor([[0.5, -0.2, 0.0, 1.0], [0.1, -0.3, 0.3, -0.9]])


def codes_scale(bits, w=W, **kw):
    c, s = WeightQuantizer(bits, **kw).codes_and_scale(w)
    return c.tolist(), s


# ---- the quantizers -------------------------------------------------------------------------------


def test_binary_sign_with_zero_as_plus_one_and_mean_abs_scale() -> None:
    codes, scale = codes_scale(1)
    assert codes == [[1, -1, 1, 1], [1, -1, 1, -1]]  # sign(0) := +1
    assert scale.shape == () and scale.item() == pytest.approx(3.3 / 8, rel=1e-6)
    codes, scale = codes_scale("binary", per_channel=True)
    assert codes == [[1, -1, 1, 1], [1, -1, 1, -1]] and scale.shape == (2, 1)
    assert scale.flatten().tolist() == pytest.approx([1.7 / 4, 1.6 / 4], rel=1e-6)
    assert torch.equal(WeightQuantizer(1, scale="ls").codes_and_scale(W)[1], WeightQuantizer(1).codes_and_scale(W)[1])


def test_ternary_threshold_and_least_squares_scale() -> None:
    codes, scale = codes_scale("ternary")  # delta = 0.7 * 0.4125 = 0.28875
    assert codes == [[1, 0, 0, 1], [0, -1, 1, -1]]
    assert scale.item() == pytest.approx(3.0 / 5, rel=1e-6)  # mean |W| over the 5 nonzero codes
    codes, scale = codes_scale("ternary", per_channel=True)  # deltas 0.2975 and 0.28
    assert codes == [[1, 0, 0, 1], [0, -1, 1, -1]]
    assert scale.flatten().tolist() == pytest.approx([0.75, 0.5], rel=1e-6)
    assert codes_scale("ternary", w=torch.zeros(2, 3))[1].item() == 0.0  # no nonzero code: scale 0


def test_two_and_four_bit_least_squares_and_max_scales() -> None:
    codes, scale = codes_scale(2)  # start 1.0 -> 0.95 -> 0.8 (fixed point)
    assert codes == [[1, 0, 0, 1], [0, 0, 0, -1]] and scale.item() == pytest.approx(0.8, rel=1e-6)
    codes, scale = codes_scale(2, scale="max")
    assert codes == [[0, 0, 0, 1], [0, 0, 0, -1]] and scale.item() == 1.0  # round half to even: 0.5 -> 0
    w = torch.tensor([[7.0, -3.2, 0.4, 1.6], [-1.4, 0.6, 0.2, 0.0]])
    codes, scale = codes_scale(4, w=w[:1])  # start 1.0: codes 7,-3,0,2; LS 61.8/62, stable
    assert codes == [[7, -3, 0, 2]] and scale.item() == pytest.approx(61.8 / 62, rel=1e-6)
    codes, scale = codes_scale(4, w=w, per_channel=True)
    assert codes == [[7, -3, 0, 2], [-7, 3, 1, 0]] and scale.shape == (2, 1)
    assert scale.flatten().tolist() == pytest.approx([61.8 / 62, 0.2], rel=1e-6)
    codes, scale = codes_scale(4, w=w, scale="max")
    assert scale.item() == 1.0 and codes == [[7, -3, 0, 2], [-1, 1, 0, 0]]
    assert LS_ITERATIONS == 5


@pytest.mark.parametrize("bits", [1, "ternary", 2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_codes_and_scale_rebuild_the_forward_exactly(bits, per_channel) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1)
    q = WeightQuantizer(bits, per_channel=per_channel)
    codes, scale = q.codes_and_scale(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == ((6, 1, 1, 1) if per_channel else ())
    assert set(codes.unique().tolist()) <= set(q.allowed_codes)
    assert torch.equal(q(w), codes.float() * scale)
    top = 1 if bits in (1, "ternary") else 2 ** (bits - 1) - 1
    assert q.allowed_codes == ((-1, 1) if bits == 1 else tuple(range(-top, top + 1)))
    assert q.spec == {1: "binary", "ternary": "ternary"}.get(bits, f"int{bits}")
    assert q(w.to(torch.bfloat16)).dtype == torch.bfloat16


def test_gradient_passes_straight_through_to_the_float_weight() -> None:
    torch.manual_seed(0)
    conv = to_quant_weight(nn.Conv2d(2, 3, 3), WeightQuantizer(2))
    x = torch.randn(2, 2, 6, 6)
    conv(x).square().sum().backward()
    qw = conv.quantized_weight().requires_grad_()
    F.conv2d(x, qw, conv.bias).square().sum().backward()
    assert torch.equal(conv.weight.grad, qw.grad)


# ---- the swap and its selection ---------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 1)  # its out_proj is a Linear subclass
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def weight_rows(model: nn.Module) -> dict[str, dict]:
    return {r["layer"]: r for r in qat_ste.report(model).to_dict()["weights"]}


def test_swap_keeps_parameters_and_state_dict_keys_and_skips_first_and_last_by_default() -> None:
    torch.manual_seed(0)
    net = Net()
    params = dict(net.named_parameters())
    plain = qat_ste.quantize(net, bits=4)
    q = qat_ste.quantize(net, bits=4, weight_bits=1, inplace=True)
    assert q is net and all(dict(q.named_parameters())[n] is p for n, p in params.items())  # same objects
    assert list(q.state_dict()) == list(plain.state_dict())
    rows = weight_rows(q)
    assert [n for n, m in quant_weight_layers(q)] == ["conv2", "fc1"]
    assert isinstance(q.conv2, QuantWeightConv2d) and isinstance(q.fc1, QuantWeightLinear)
    assert rows["conv1"]["reason"].startswith("keep_first_weights") and rows["fc2"]["reason"].startswith("keep_last")
    assert not rows["attn.out_proj"]["quantized"] and "subclass" in rows["attn.out_proj"]["reason"]
    x = torch.randn(2, 1, 5, 5)
    assert q(x).shape == (2, 3)
    with pytest.raises(QatSteError, match="already quantized"):
        qat_ste.quantize(q, weight_bits=1)
    assert "weights" not in qat_ste.report(plain).to_dict()  # no weights section without weight_bits


def test_include_exclude_overrides_and_keep_options_select_layers() -> None:
    net = Net()
    q = qat_ste.quantize(net, weight_bits=4, keep_first_weights=False, keep_last_weights=False,
                         exclude=("fc1",),
                         overrides={"conv2": {"weight_bits": "ternary"}, "fc2": {"weight_bits": None}})
    rows = weight_rows(q)
    assert {n: r["spec"] for n, r in rows.items()} == {"conv1": "int4", "conv2": "ternary", "attn.out_proj": None,
                                                        "fc1": None, "fc2": None}
    assert rows["fc1"]["reason"] == "not selected by include/exclude" and "override" in rows["fc2"]["reason"]
    q = qat_ste.quantize(net, weight_bits=8, include=("fc*", "relu*"), keep_first_weights=False)
    assert [n for n, _ in quant_weight_layers(q)] == ["fc1"]  # fc2 is the model's last layer
    q = qat_ste.quantize(net, weight_bits=8, include=("conv2", "relu*"), keep_first_weights=False)
    assert [n for n, _ in quant_weight_layers(q)] == ["conv2"]  # first/last: of the model, not of the selection
    assert weight_rows(q)["conv1"]["reason"] == "not selected by include/exclude"
    q = qat_ste.quantize(net, overrides={"fc1": {"weight_bits": 2, "weight_per_channel": True}})
    assert [n for n, _ in quant_weight_layers(q)] == ["fc1"] and q.fc1.weight_quantizer.per_channel
    assert weight_rows(q)["conv2"]["reason"] == "weight_bits=None"


def test_report_lists_scale_sign_changes_and_method() -> None:
    torch.manual_seed(0)
    q = qat_ste.quantize(Net(), weight_bits=1, weight_per_channel=True, keep_first_weights=False,
                         weight_method="binaryconnect")
    assert weight_rows(q)["conv1"]["sign_change"] is None and "n/a" in qat_ste.report(q).table()
    mark_epoch(q)
    assert not any("weight_quantizer" in k for k in q.state_dict())  # the reference codes are not saved
    with torch.no_grad():
        q.conv1.weight[0, 0, 0, 0] *= -1  # one code flips
    row = weight_rows(q)["conv1"]
    assert row["sign_change"] == pytest.approx(1 / 36, abs=1e-6) and row["method"] == "binaryconnect"
    assert row["spec"] == "binary" and len(row["scale"]) == 4 and row["rho"] == 0.0
    table = qat_ste.report(q).table()
    assert "conv1          Conv2d                           binary   [4 ch]  2.78%    binaryconnect" in table
    assert "3 weight layer(s) quantized, 2 left float" in table


# ---- the training rules -----------------------------------------------------------------------


def tiny(rho: float, method: str = "bcgd") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return qat_ste.quantize(net, bits=4, step_init=0.25, weight_bits=1, keep_first_weights=False,
                            keep_last_weights=False, weight_method=method, bcgd_rho=rho)


def grads_at_q(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


XY = (torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1, 0]))


def test_bcgd_step_with_sgd_equals_the_formula_exactly() -> None:
    model, rho, lr = tiny(0.25), 0.25, 0.1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantized = {n + ".weight": m.quantized_weight() for n, m in quant_weight_layers(model)}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    assert attach_bcgd(model, opt) is not None
    grads = grads_at_q(model, *XY)
    opt.step()
    for name, p in model.named_parameters():  # the formula in float32, as SGD writes it (p + (-lr) g)
        start = before[name]
        if name in quantized:
            start = torch.add(start * (1 - rho), quantized[name], alpha=rho)
        assert torch.equal(p.detach(), torch.add(start, grads[name], alpha=-lr)), name


def test_bcgd_with_adamw_blends_then_takes_adamws_step() -> None:
    model, rho, lr, wd, eps = tiny(0.25), 0.25, 0.01, 0.1, 1e-8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantized = {n + ".weight": m.quantized_weight() for n, m in quant_weight_layers(model)}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=eps)
    WeightBlender(model).attach(opt)
    grads = grads_at_q(model, *XY)
    opt.step()
    for name, p in model.named_parameters():
        start = before[name] * (1 - rho) + quantized[name] * rho if name in quantized else before[name]
        g = grads[name]
        m_hat, v_hat = (0.1 * g) / 0.1, (0.001 * g * g) / 0.001  # first step: bias corrections 1 - beta
        expected = start * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        if name in quantized:  # the blend is visible: without it the result is far off
            assert (p.detach() - (before[name] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps))).abs().max() > 1e-3


def test_rho_zero_is_binaryconnect_is_plain_ste_training_bit_for_bit() -> None:
    def run(model: nn.Module, blender: bool) -> dict[str, torch.Tensor]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        if blender:
            WeightBlender(model, rho=0.0).attach(opt)
        for _ in range(3):
            grads_at_q(model, *XY)
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    bc = run(tiny(0.0, "binaryconnect"), blender=False)
    assert run(tiny(0.0, "bcgd"), blender=True).keys() == bc.keys()
    for name, value in run(tiny(0.0, "bcgd"), blender=True).items():
        assert torch.equal(value, bc[name]), name
    # the hand-written BinaryConnect: an activation-only model run with Q(w) as leaf tensors
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = qat_ste.quantize(net, bits=4, step_init=0.25)
    quantizer = WeightQuantizer(1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        qw = {n: quantizer.quantize(p).requires_grad_() for n, p in ref.named_parameters() if n.endswith("weight")}
        ref.zero_grad()
        F.cross_entropy(functional_call(ref, qw, (XY[0],)), XY[1]).backward()
        for n, p in ref.named_parameters():
            if n in qw:
                p.grad = qw[n].grad
        opt.step()
    for name, p in ref.named_parameters():
        assert torch.equal(p.detach(), bc[name]), name


def test_blender_skips_parameters_without_gradient_and_detaches() -> None:
    model = tiny(0.5)
    w0 = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = WeightBlender(model).attach(opt)
    opt.step()  # no gradients: nothing moves
    assert torch.equal(model[0].weight, w0)
    handle.remove()
    grads_at_q(model, *XY)
    opt.step()
    assert torch.equal(model[0].weight.detach(), w0 - 0.1 * model[0].weight.grad)
    assert attach_bcgd(tiny(0.0, "binaryconnect"), opt) is None


# ---- config, CLI, errors ----------------------------------------------------------------------


def test_config_fields_round_trip_and_defaults_stay_out_of_to_dict() -> None:
    assert not {"weight_bits", "weight_method", "bcgd_rho", "keep_first_weights"} & set(qat_ste.QuantConfig().to_dict())
    cfg = qat_ste.QuantConfig(weight_bits="1", weight_method="binaryconnect", bcgd_rho=0, weight_scale="ls",
                              weight_per_channel=True, keep_last_weights=False)
    assert cfg.weight_bits == 1 and cfg.bcgd_rho == 0.0
    d = cfg.to_dict()
    assert {k: d[k] for k in ("weight_bits", "weight_method", "bcgd_rho", "weight_scale", "keep_last_weights")} == {
        "weight_bits": 1, "weight_method": "binaryconnect", "bcgd_rho": 0.0, "weight_scale": "ls",
        "keep_last_weights": False}
    assert qat_ste.QuantConfig.from_dict(d) == cfg
    assert qat_ste.QuantConfig(weight_bits="binary").weight_bits == 1
    assert qat_ste.QuantConfig(weight_bits="Ternary").weight_bits == "ternary"


def test_public_names() -> None:
    for name in ("WeightQuantizer", "WeightBlender", "QuantWeightConv2d", "QuantWeightLinear", "mark_epoch",
                 "quant_weight_layers", "QuantWeightModule"):
        assert name in qat_ste.__all__ and hasattr(qat_ste, name)


def test_cli_options_reach_the_config() -> None:
    names = ("bits", "ste", "alpha_mode", "step_init", "rounding", "per_channel", "include", "exclude", "keep_first",
             "keep_last", "kinds", "quantize_gates", "kernel")
    args = argparse.Namespace(**dict.fromkeys(names), quant_config=None, override=None, weight_bits="ternary",
                              weight_method="bcgd", bcgd_rho=1e-3)
    cfg = _quant_config(args)
    assert (cfg.weight_bits, cfg.weight_method, cfg.bcgd_rho) == ("ternary", "bcgd", 1e-3)
    args.weight_bits = "4"
    assert _quant_config(args).weight_bits == 4


@pytest.mark.parametrize(("make", "match"), [
    (lambda: qat_ste.QuantConfig(weight_bits=0), "weight_bits=0 is not supported"),
    (lambda: qat_ste.QuantConfig(weight_bits=9), "weight_bits=9 is not supported"),
    (lambda: qat_ste.QuantConfig(weight_bits="quaternary"), "weight_bits='quaternary'"),
    (lambda: qat_ste.QuantConfig(weight_bits=True), "weight_bits=True"),
    (lambda: qat_ste.QuantConfig(bcgd_rho=-0.1), r"bcgd_rho=-0.1: .* in \[0, 1\]"),
    (lambda: qat_ste.QuantConfig(bcgd_rho=1.5), r"bcgd_rho=1.5"),
    (lambda: qat_ste.QuantConfig(bcgd_rho=math.nan), r"bcgd_rho=nan"),
    (lambda: qat_ste.QuantConfig(weight_method="sgd"), "unknown weight method 'sgd'"),
    (lambda: qat_ste.QuantConfig(weight_bits=4, weight_scale="mean"), "'mean' does not apply to int4"),
    (lambda: qat_ste.QuantConfig(weight_scale="median"), "weight_scale='median'"),
    (lambda: qat_ste.QuantConfig(overrides={"fc": {"weight_bits": 9}}), "weight_bits=9"),
    (lambda: qat_ste.QuantConfig(keep_first_weights="yes"), "keep_first_weights='yes'"),
    (lambda: WeightQuantizer("int4"), "weight_bits='int4'"),
    (lambda: WeightQuantizer(2, scale="mean"), "scale= 'auto' or one of: ls, max"),
    (lambda: WeightQuantizer(1).codes_and_scale(torch.empty(0)), "empty weight"),
    (lambda: to_quant_weight(nn.BatchNorm2d(3), WeightQuantizer(1)), "cannot quantize the weights of a BatchNorm2d"),
    (lambda: WeightBlender(nn.Linear(2, 2), rho=2.0), r"rho=2.0"),
])
def test_bad_input_is_a_clear_error(make, match) -> None:
    with pytest.raises(QatSteError, match=match) as info:
        make()
    assert info.value.fix


# ---- training ---------------------------------------------------------------------------------


def quiet(**kw) -> TrainConfig:
    values = {"progress": False, "print_summary": False, "plot": False, "verbose": False, "tensorboard": False,
              "calibrate_batches": 2, "calibrate_method": "percentile", "device": "cpu", "compile": False}
    return TrainConfig(**{**values, **kw})


def test_lenet5_binary_weights_4bit_activations_learn_digits() -> None:
    torch.manual_seed(0)
    train_set, val_set = (load_dataset("digits", s, resize=28) for s in ("train", "val"))
    model = qat_ste.quantize(lenet5(), bits=4, weight_bits=1, keep_first_weights=False, keep_last_weights=False)
    assert len(quant_weight_layers(model)) == 5
    result = train(model, train_set, val_set, quiet(epochs=2, batch_size=64, lr=0.05))
    assert result.final_val_accuracy > 0.6  # chance: 0.1
    codes, _ = model.fc1.weight_quantizer.codes_and_scale(model.fc1.weight)
    assert set(codes.unique().tolist()) == {-1, 1}
    # train() marks each epoch's codes: the report gives the share that changed in the last epoch
    changed = {name: row["sign_change"] for name, row in weight_rows(model).items() if row["quantized"]}
    assert len(changed) == 5 and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in changed.values()), changed
    assert any(v > 0 for v in changed.values())  # lr 0.05 flips some signs in an epoch


def small_bcgd_model(seed: int = 0, method: str = "bcgd") -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return qat_ste.quantize(net, bits=3, weight_bits="ternary", bcgd_rho=0.05, keep_first_weights=False,
                            weight_method=method, example_input=torch.randn(1, 3, 16, 16))


def test_bcgd_resume_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    data = (load_dataset("synthetic", "train", size=16, n=128, augment=True),
            load_dataset("synthetic", "val", size=16, n=64))
    cfg = {"epochs": 2, "batch_size": 32, "lr": 0.05, "schedule": "cosine"}
    reference = small_bcgd_model()
    train(reference, *data, quiet(out_dir=str(tmp_path / "ref"), **cfg))
    first = train(small_bcgd_model(), *data, quiet(out_dir=str(tmp_path / "cut"), stop_after_steps=6, **cfg))
    assert first.stopped_early and load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 6
    resumed = small_bcgd_model(seed=7)
    train(resumed, *data, quiet(out_dir=str(tmp_path / "cut"), resume=True, **cfg))
    expected = reference.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert isinstance(resumed[0], QuantWeightModule)
    plain = small_bcgd_model(method="binaryconnect")  # train() does blend: BinaryConnect ends elsewhere
    train(plain, *data, quiet(out_dir=str(tmp_path / "bc"), **cfg))
    assert not torch.equal(plain[0].weight, expected["0.weight"])

"""The fused Triton quantizer (quantizer/triton_kernels.py, ops.py) against the torch path, on CPU.

Triton reads TRITON_INTERPRET when ``triton.jit`` decorates a kernel, so the ``interpreter`` fixture
sets it and (re)loads qat_ste.quantizer.triton_kernels before these tests, and restores both after:
other test modules keep compiled kernels. The interpreter runs the kernels on CPU tensors with
numpy's IEEE float32 arithmetic. What it cannot do: inductor (and aot_eager) decompose a triton_op
into its kernels under AOT functionalization, where an interpreted kernel would read the data of
fake tensors, so on CPU the compile tests stop at dynamo (one graph, no break, the custom op in it)
plus ``torch.library.opcheck``'s schema / fake-tensor / autograd-registration checks; the GPU tests
(``-m gpu``) compile with inductor.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os

import pytest
import torch
import torch.nn as nn

import qat_ste
from qat_ste import QatSteError, QuantAct, QuantConfig, get_ste
from qat_ste.kinds import GELU, RELU
from qat_ste.quantizer import functional
from qat_ste.quantizer.functional import fake_quantize

STES = ["identity", "relu", "clipped_relu", "log_tailed_relu"]
MODES = ["fixed", "lsq", "pact", "bcgd"]
NAN, INF = float("nan"), float("inf")

pytestmark = [pytest.mark.usefixtures("single_thread"),
              # the interpreter's numpy warns on inf - inf and on overflows (the NaN/Inf inputs)
              pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]


def _reload_kernels(interpret: str | None) -> None:
    if interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = interpret
    from qat_ste.quantizer import triton_kernels

    importlib.reload(triton_kernels)


@pytest.fixture(scope="module")
def interpreter():
    """TRITON_INTERPRET=1 and interpreted kernels for this module's CPU tests; restored afterwards."""
    pytest.importorskip("triton")
    previous = os.environ.get("TRITON_INTERPRET")
    _reload_kernels("1")
    yield
    _reload_kernels(previous)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaNs canonicalised: their payload is not part of the contract)."""
    t = torch.where(t.isnan(), torch.full_like(t, NAN), t)
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _run(kernel, u, alpha, z, ste, mode, rounding="nearest", bits=4, g=None):
    u = u.detach().clone().requires_grad_(True)
    a = alpha.detach().clone().requires_grad_(mode != "fixed")
    y = fake_quantize(u, a, z, 2 ** bits - 1, get_ste(ste), mode, rounding, 0.125, kernel=kernel)
    y.backward(torch.randn_like(y) if g is None else g)
    return y.detach(), u.grad, a.grad


def _special(shape, step: float) -> torch.Tensor:
    """Random values with ties (k + 1/2) * step, +-0, huge values, NaN and +-Inf in front."""
    u = torch.randn(shape) * 6 * step
    head = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 0.5 * step, -0.5 * step, 1.5 * step, 2.5 * step,
                         -2.5 * step, 1e30, -1e30, 3e38, step * 15, step * 15.5])
    u.view(-1)[:head.numel()] = head
    return u


def _assert_same(a, b, alpha_rtol=1e-5):
    assert torch.equal(_bits(a[0]), _bits(b[0])), "forward differs"
    assert torch.equal(_bits(a[1]), _bits(b[1])), "input gradient differs"
    if a[2] is None or b[2] is None:
        assert a[2] is None and b[2] is None
    else:
        torch.testing.assert_close(a[2], b[2], rtol=alpha_rtol, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("mode", MODES)
def test_triton_equals_torch_all_stes_and_modes(interpreter, ste: str, mode: str) -> None:
    # per-channel steps with zero points != 0 (the non-ReLU grid), then one step; both roundings
    torch.manual_seed(1)
    for rounding in ("nearest", "ceil"):
        u = _special((2, 3, 4, 5), 0.25)
        g = torch.randn_like(u)
        alpha = torch.tensor([0.1, 0.25, 0.5]).view(1, 3, 1, 1)
        z = torch.tensor([0.0, 2.0, 1.0]).view(1, 3, 1, 1)
        _assert_same(_run("torch", u, alpha, z, ste, mode, rounding, g=g),
                     _run("triton", u, alpha, z, ste, mode, rounding, g=g))
        one, z0 = torch.tensor(0.25), torch.tensor(3.0)
        _assert_same(_run("torch", u, one, z0, ste, mode, rounding, g=g),
                     _run("triton", u, one, z0, ste, mode, rounding, g=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted", "strided"])
def test_triton_equals_torch_dtypes_and_layouts(interpreter, dtype: torch.dtype, layout: str) -> None:
    base = _special((2, 4, 6, 10), 0.125).to(dtype)
    u = {"contiguous": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
         "permuted": base.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),  # dense, odd order
         "strided": base[:, :, :, ::2]}[layout]
    assert (layout == "contiguous") == u.is_contiguous()
    alpha = torch.tensor([0.125, 0.1, 0.3, 0.05]).view(1, 4, 1, 1)
    z = torch.tensor([0.0, 1.0, 3.0, 0.0]).view(1, 4, 1, 1)
    g = torch.randn(u.shape).to(dtype)
    for mode, ste in (("lsq", "clipped_relu"), ("bcgd", "relu"), ("pact", "log_tailed_relu")):
        a = _run("torch", u, alpha, z, ste, mode, g=g)
        b = _run("triton", u, alpha, z, ste, mode, g=g)
        _assert_same(a, b, alpha_rtol=1e-4)
        if layout != "strided":  # outputs keep the input's layout, like torch.empty_like
            assert b[0].stride() == u.stride() and b[1].stride() == u.stride()


def test_triton_equals_torch_all_bits_last_axis(interpreter) -> None:
    # 2-D input, per-channel steps along the last axis (QuantAct.grid's rule), bits 1..8
    u = _special((40, 6), 0.2)
    alpha = torch.tensor([0.2, 0.07, 0.5, 0.3, 0.011, 1.0]).view(1, 6)
    g = torch.randn_like(u)
    for bits in range(1, 9):
        z = torch.tensor([0.0, 1.0, 0.0, 2 ** bits - 1, 0.0, 2.0]).clamp(max=2 ** bits - 1).view(1, 6)
        for rounding in ("nearest", "ceil"):
            _assert_same(_run("torch", u, alpha, z, "clipped_relu", "lsq", rounding, bits, g),
                         _run("triton", u, alpha, z, "clipped_relu", "lsq", rounding, bits, g))


def test_quantact_triton_matches_torch_generic_site(interpreter) -> None:
    # a GELU site (zero point > 0): the chain rule through the float function, per-channel steps
    torch.manual_seed(2)
    x = torch.randn(3, 5, 4, 4) * 2
    out = {}
    for kernel in ("torch", "triton"):
        qa = QuantAct(GELU, nn.GELU(), bits=3, alpha_mode="lsq", per_channel=True, kernel=kernel)
        qa.set_range(torch.full((5,), -0.3), torch.linspace(1.0, 3.0, 5))
        assert bool((qa.zero_point > 0).all())
        xi = x.clone().requires_grad_(True)
        y = qa(xi)
        y.backward(torch.ones_like(y))
        out[kernel] = (y.detach(), xi.grad, qa.alpha.grad)
        assert qa.implementation() == kernel
    _assert_same(out["torch"], out["triton"])


def _saved_bytes(kernel: str, ste: str, mode: str, n: int = 4096) -> int:
    from tools.bench_lean_backward import saved_bytes_per_element

    return round(saved_bytes_per_element(ste, mode, torch.bfloat16, n, "cpu", kernel) * n)


#: bytes saved for backward per element (bf16 input; it was 2 = the input for every STE and mode)
SAVED_PER_ELEMENT = {
    ("identity", "fixed"): 0, ("relu", "fixed"): 1 / 8, ("clipped_relu", "fixed"): 1 / 8,
    ("identity", "pact"): 2 / 8, ("relu", "pact"): 2 / 8, ("clipped_relu", "pact"): 2 / 8,
    ("identity", "bcgd"): 2 / 8, ("relu", "bcgd"): 2 / 8, ("clipped_relu", "bcgd"): 2 / 8,
    ("identity", "lsq"): 1, ("relu", "lsq"): 1 + 1 / 8, ("clipped_relu", "lsq"): 1 + 1 / 8,
    **{("log_tailed_relu", m): 2 for m in MODES},
}


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_bytes_saved_for_backward(interpreter, kernel: str) -> None:
    n = 4096
    measured = {(s, m): _saved_bytes(kernel, s, m, n) / n for s in STES for m in MODES}
    assert measured == SAVED_PER_ELEMENT


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_no_grad_forward_is_the_same_and_saves_nothing(interpreter, kernel: str) -> None:
    u = _special((3, 4, 5), 0.1)
    alpha, z = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.1]).view(1, 1, 5), torch.tensor(1.0)
    y_train = _run(kernel, u, alpha, z, "clipped_relu", "lsq")[0]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), torch.no_grad():
        y = fake_quantize(u, alpha.requires_grad_(True), z, 15, get_ste("clipped_relu"), "lsq", kernel=kernel)
    assert torch.equal(_bits(y), _bits(y_train)) and saved == [] and y.grad_fn is None


def test_user_ste_falls_back_to_torch(interpreter, ste_registry) -> None:
    @qat_ste.register_ste("half_inside")
    def half_inside(u, lo, hi):
        return 0.5 * ((u > lo) & (u <= hi)).to(u.dtype)

    qa = QuantAct(RELU, bits=2, ste="half_inside", alpha_mode="fixed", step_init=0.25, kernel="triton")
    assert qa.implementation() == "torch (user STE)"
    u = torch.tensor([-1.0, 0.0, 0.1, 0.75, 0.76], requires_grad=True)
    qa(u).sum().backward()
    assert u.grad.tolist() == [0.0, 0.0, 0.5, 0.5, 0.0]


def test_compile_keeps_the_custom_op_in_one_graph(interpreter) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), QuantAct(RELU, bits=4, step_init=0.1, kernel="triton"),
                          nn.Conv2d(4, 4, 3), QuantAct(GELU, nn.GELU(), bits=4, step_init=0.1, kernel="triton"))
    x = torch.randn(2, 3, 8, 8)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert str(explained.graphs[0].code).count("qat_ste.fake_quant") == 2
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    y = compiled(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager = model(x)
    y_eager.sum().backward()
    assert torch.equal(y, y_eager)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))


def test_opcheck(interpreter) -> None:
    from qat_ste.quantizer import ops

    u = torch.randn(2, 3, 4, 4, requires_grad=True)
    a = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    result = torch.library.opcheck(ops.fake_quant, (u, a, torch.zeros(3), 15, 2, 1, False, 1, 0.1, True),
                                     test_utils=checks)
    assert set(result.values()) == {"SUCCESS"}
    packed, code = torch.zeros(12, dtype=torch.uint8), torch.zeros(96, dtype=torch.uint8)
    args = (torch.randn(2, 3, 4, 4), None, packed, code, a.detach(), torch.zeros(3), 15, 2, 1, False, 1, 0.1,
            [2, 3, 4, 4], [48, 16, 4, 1])
    result = torch.library.opcheck(ops.fake_quant_backward, args, test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}


# ---- the kernel option --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None, 1])
def test_bad_kernel_values(bad) -> None:
    with pytest.raises(QatSteError, match=f"unknown kernel {bad!r}; choose one of: auto, triton, torch") as e:
        QuantAct(RELU, kernel=bad)
    assert "kernel='auto'" in e.value.fix
    with pytest.raises(QatSteError, match="unknown kernel"):
        QuantConfig(kernel=bad)
    with pytest.raises(QatSteError, match="unknown kernel"):
        qat_ste.quantize(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), kernel=bad)
    with pytest.raises(QatSteError, match="unknown kernel"):
        QuantConfig(overrides={"*": {"kernel": bad}})


def test_triton_on_cpu_without_interpreter_or_triton(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(functional, "TRITON_FOUND", True)  # as if importable (a CPU-only torch has no triton)
    qa = QuantAct(RELU, bits=2, alpha_mode="fixed", step_init=0.5, kernel="triton")
    with pytest.raises(QatSteError, match="kernel='triton' got a tensor on cpu") as e:
        qa(torch.randn(4))
    assert "TRITON_INTERPRET=1" in e.value.fix and "kernel='auto' or 'torch'" in e.value.fix
    assert qa.implementation().startswith("unavailable: kernel='triton' got a tensor on cpu")
    assert QuantAct(RELU, step_init=0.5).implementation() == "torch"  # auto on CPU
    monkeypatch.setattr(functional, "TRITON_FOUND", False)
    with pytest.raises(QatSteError, match="needs the triton package, which is not importable"):
        qa(torch.randn(4))
    assert functional.implementation("auto", get_ste("relu"), torch.device("cuda")) == "torch"


def test_kernel_option_config_quantize_and_state_dict(tmp_path) -> None:
    cfg = QuantConfig(kernel="torch", overrides={"1": {"kernel": "triton"}})
    assert cfg.to_dict()["kernel"] == "torch" and QuantConfig.from_dict(cfg.to_dict()) == cfg
    # the default is left out of to_dict(): checkpoints stay readable by releases without the option
    assert "kernel" not in QuantConfig().to_dict() and QuantConfig.from_dict({"bits": 4}).kernel == "auto"
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    q = qat_ste.quantize(model, config=cfg)
    assert [m.kernel for _, m in qat_ste.quant_modules(q)] == ["triton", "torch"]
    assert qat_ste.report(q).implementations(device="cpu")["3"] == "torch"
    assert "zero_point=0, kernel=torch" in repr(q[3])
    assert "kernel" not in repr(qat_ste.quantize(model, step_init=0.5)[3])
    # an execution detail: same state_dict keys and values, loads across kernels
    other = qat_ste.quantize(model, bits=4, step_init=0.5)
    assert other.state_dict().keys() == q.state_dict().keys()
    q.load_state_dict(other.state_dict())
    assert qat_ste.quantize(model, bits=4, ste="clipped_relu", kernel="torch")[1].kernel == "torch"
    # a config stored with kernel="triton" runs anywhere with_kernel("auto")
    stored = QuantConfig(kernel="triton", overrides={"1": {"kernel": "triton", "bits": 8}, "3": {"kernel": "torch"}})
    moved = QuantConfig.from_dict(stored.to_dict()).with_kernel("auto")
    assert moved == QuantConfig(overrides={"1": {"bits": 8}})
    with pytest.raises(QatSteError, match="unknown kernel 'gpu'"):
        stored.with_kernel("gpu")


def test_quantact_pickled_before_the_kernel_option_loads() -> None:
    import pickle

    qa = QuantAct(RELU, bits=2, alpha_mode="fixed", step_init=0.5, kernel="torch")
    del qa.__dict__["kernel"]  # as an object saved by an earlier release
    loaded = pickle.loads(pickle.dumps(qa))
    assert loaded.kernel == "auto" and loaded(torch.tensor([0.3, 2.0])).tolist() == [0.5, 1.5]


def test_cli_kernel_option_reaches_the_config() -> None:
    from qat_ste.cli.quant_options import QUANT_OPTIONS, _quant_config

    assert "kernel" in QUANT_OPTIONS
    args = argparse.Namespace(**dict.fromkeys(QUANT_OPTIONS), quant_config=None, override=None)
    assert _quant_config(args).kernel == "auto"
    args.kernel = "torch"
    assert _quant_config(args).kernel == "torch"


# ---- compiled for the GPU -----------------------------------------------------------------------


@pytest.fixture
def compiled_kernels():
    """Compiled (not interpreted) kernels for the GPU tests."""
    pytest.importorskip("triton")
    previous = os.environ.get("TRITON_INTERPRET")
    _reload_kernels(None)
    yield
    _reload_kernels(previous)


def test_kernels_compile_for_cuda_with_ieee_division(compiled_kernels, tmp_path, monkeypatch) -> None:
    # no GPU needed: triton compiles to PTX and runs its bundled ptxas for sm_90. The forward must
    # divide with div.rn (not Triton's approximate fp32 '/': div.full), round with cvt.rni (rint),
    # convert to bf16 with cvt.rn, and hold no FMA (a fused multiply-add would round differently)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qat_ste.quantizer import triton_kernels as tk

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    sig = {"u_ptr": "*bf16", "y_ptr": "*bf16", "bits_ptr": "*u8", "code_ptr": "*u8", "alpha_ptr": "*fp32",
           "zp_ptr": "*fp32", "n": "i64", "ch_stride": "i64", "channels": "i32", "levels": "i32"}
    const = {"PER_CHANNEL": True, "CEIL": False, "STE": 2, "MODE": 1, "BITS": 1, "LSQ_CODE": True,
             "LIBDEVICE": True, "BLOCK": 1024}
    try:
        compiled = triton.compile(ASTSource(tk.fq_forward_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const),
                                  target=GPUTarget("cuda", 90, 32))
    except (TypeError, KeyError, RuntimeError, FileNotFoundError) as error:  # another triton's API, no ptxas
        pytest.skip(f"cannot compile for sm_90 here: {error}")
    ptx = compiled.asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
    assert "cvt.rni.f32.f32" in ptx and "cvt.rn.bf16.f32" in ptx and "fma." not in ptx


# ---- on a real GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_bit_exact_near_ties(compiled_kernels, dtype: torch.dtype) -> None:
    # near-ties: (k + 1/2) * alpha nudged by a few ulps, where an approximate division or
    # multiplication by 1/alpha rounds the wrong way; the kernel's IEEE division must match torch
    torch.manual_seed(4)
    alpha = torch.tensor([0.1, 0.3, 0.07, 0.013], device="cuda").view(1, 4, 1, 1)
    k = torch.randint(-3, 20, (64, 4, 16, 16), device="cuda").float() + 0.5
    u = (k * alpha).contiguous()
    step = torch.randint(-1, 2, u.shape, device="cuda")  # one ulp down, none, one ulp up
    u = torch.nextafter(u, torch.where(step > 0, INF, torch.where(step < 0, -INF, u))).to(dtype)
    z = torch.tensor([0.0, 2.0, 1.0, 0.0], device="cuda").view(1, 4, 1, 1)
    for ste, mode in (("clipped_relu", "lsq"), ("relu", "pact"), ("identity", "bcgd"), ("log_tailed_relu", "lsq")):
        g = torch.randn(u.shape, device="cuda").to(dtype)
        _assert_same(_run("torch", u, alpha, z, ste, mode, g=g), _run("triton", u, alpha, z, ste, mode, g=g),
                     alpha_rtol=1e-3)
    cl = u.contiguous(memory_format=torch.channels_last)
    g = torch.randn(u.shape, device="cuda").to(dtype)
    _assert_same(_run("torch", cl, alpha, z, "clipped_relu", "lsq", g=g),
                 _run("triton", cl, alpha, z, "clipped_relu", "lsq", g=g), alpha_rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inductor_fullgraph(compiled_kernels) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), QuantAct(RELU, bits=4, step_init=0.1, per_channel=True),
                          nn.Conv2d(8, 8, 3), QuantAct(GELU, nn.GELU(), bits=4, step_init=0.1)).cuda()
    model[1].set_range(torch.zeros(8), torch.linspace(1, 2, 8))
    assert model[1].implementation() == "triton"
    x = torch.randn(4, 3, 16, 16, device="cuda")
    y_eager = model(x)
    y_eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert math.isfinite(model[1].alpha.grad.sum().item())
    for p, expected in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-4)

"""torch.compile of a quantized model: one graph (no break), same numbers as eager; CUDA vs CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qat_ste
from qat_ste import QuantAct
from qat_ste.quantizer.functional import quantize_codes

pytestmark = pytest.mark.usefixtures("single_thread")


class CNN(nn.Module):
    """Module-swapped (nn.ReLU, nn.SiLU) and FX-rewritten (F.relu, F.gelu, shared nn.ReLU) sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.silu = nn.SiLU()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.silu(F.gelu(self.conv3(x)))
        x = self.shared(self.shared(x) * 2 - 0.05)
        return self.fc(x.mean((2, 3)))


def make_qmodel(alpha: str = "lsq", per_channel: bool = False) -> nn.Module:
    torch.manual_seed(0)
    q = qat_ste.quantize(CNN(), bits=4, alpha_mode=alpha, per_channel=per_channel)
    qat_ste.calibrate(q, [torch.randn(4, 3, 8, 8) for _ in range(2)], method="mse", include_fixed=True)
    return q


def test_model_uses_both_rewrite_paths() -> None:
    methods = qat_ste.report(make_qmodel()).methods()
    assert methods == {"module swap": 2, "fx rewrite": 4}


def _run(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def _assert_same(eager, compiled, atol: float = 0.0) -> None:
    (o1, gx1, g1), (o2, gx2, g2) = eager, compiled
    torch.testing.assert_close(o2, o1, rtol=0 if atol == 0 else 1e-5, atol=atol)
    torch.testing.assert_close(gx2, gx1, rtol=1e-5, atol=max(atol, 1e-6))
    assert g1.keys() == g2.keys() and len(g1) >= 8
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=max(atol, 1e-6), msg=k)


@pytest.mark.parametrize("train", [True, False])
def test_dynamo_captures_one_graph(train: bool) -> None:
    q = make_qmodel()
    q.train(train)
    explanation = torch._dynamo.explain(q)(torch.randn(2, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("alpha, per_channel", [("lsq", False), ("bcgd", True), ("pact", False), ("fixed", True)])
def test_fullgraph_aot_eager_matches_eager(alpha: str, per_channel: bool) -> None:
    torch._dynamo.reset()
    q = make_qmodel(alpha, per_channel)
    q.train()
    x = torch.randn(2, 3, 8, 8)
    twin = copy.deepcopy(q)
    eager = _run(q, x)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    result = _run(compiled, x)
    _assert_same(eager, result)
    assert any("alpha" in k for k in result[2]) == (alpha != "fixed")


@pytest.fixture(scope="module")
def inductor_cpu() -> None:
    """Skip when the CPU inductor cannot build kernels here (no C++ toolchain / OpenMP)."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda t: t * 2 + 1, backend="inductor", fullgraph=True)(torch.randn(4))
    except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError,
            torch._inductor.exc.CppCompileError, torch._inductor.exc.InvalidCxxCompiler) as e:
        pytest.skip(f"CPU inductor toolchain unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


@pytest.mark.slow
def test_fullgraph_inductor_matches_eager(inductor_cpu) -> None:
    torch._dynamo.reset()
    q = make_qmodel("lsq")
    q.train()
    x = torch.randn(2, 3, 8, 8)
    twin = copy.deepcopy(q)
    eager = _run(q, x)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor")
    _assert_same(eager, _run(compiled, x), atol=1e-5)
    # the quantized values (codes) are the same in eval mode too
    q.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), q(x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per_channel", [False, True])
def test_cuda_matches_cpu(no_tf32, per_channel: bool) -> None:
    q = make_qmodel("lsq", per_channel=per_channel)
    q.train()
    x = torch.randn(4, 3, 8, 8)
    gpu = copy.deepcopy(q).cuda()
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(mod, args, out) -> None:
            inputs.setdefault(name, args[0].detach())
        return hook

    handles = [m.register_forward_hook(keep_input(n)) for n, m in q.named_modules() if isinstance(m, QuantAct)]
    cpu_res = _run(q, x)
    for h in handles:
        h.remove()
    gpu_res = _run(gpu, x.cuda())
    o, gx, g = gpu_res
    _assert_same(cpu_res, (o.cpu(), gx.cpu(), {k: v.cpu() for k, v in g.items()}), atol=1e-4)
    # per site, on identical inputs: identical codes (relu family) and identical quantization of
    # identical float activations (generic sites; GELU/SiLU themselves may differ by an ulp)
    assert len(inputs) == 6
    gpu_sites = dict(gpu.named_modules())
    for name, u in inputs.items():
        cpu_site, gpu_site = dict(q.named_modules())[name], gpu_sites[name]
        if cpu_site.quantizes_input:
            assert torch.equal(cpu_site.codes(u), gpu_site.codes(u.cuda()).cpu()), name
            y = u
        else:
            y = cpu_site.float_function(u).detach()
        a, z = cpu_site.grid(y)
        ga, gz = gpu_site.grid(y.cuda())
        levels = cpu_site.levels
        assert torch.equal(quantize_codes(y, a, z, levels), quantize_codes(y.cuda(), ga, gz, levels).cpu()), name

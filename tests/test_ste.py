"""STE registry and the built-in proxy derivatives mu'(u) (reference ste-math.md section 2).

Convention (the authors' code): u <= lo takes the lower branch, lo < u <= hi is inside, u > hi the
upper branch. Expected values below are written out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qat_ste
from qat_ste import QatSteError, get_ste, list_stes, register_ste, unregister_ste
from qat_ste.ste import STE

BUILTINS = ["identity", "relu", "clipped_relu", "log_tailed_relu"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _d(name: str, u: list[float], lo: float, hi: float) -> list[float]:
    t = torch.tensor(u, dtype=torch.float64)
    out = get_ste(name)(t, torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))
    assert out.shape == t.shape and out.dtype == t.dtype
    return out.tolist()


# ReLU family: lo = 0, hi = L * alpha = 3 (2 bits, alpha = 1)
U = [-2.0, -1e-6, 0.0, 1e-6, 1.5, 3.0, 3.0 + 1e-6, 3.5, 7.0]


def test_builtins_are_registered_in_order() -> None:
    assert list_stes()[:4] == BUILTINS
    for name in BUILTINS:
        s = get_ste(name)
        assert isinstance(s, STE) and s.name == name and s.description


def test_identity() -> None:
    assert _d("identity", U, 0.0, 3.0) == [1.0] * len(U)


def test_relu() -> None:
    # u = lo is the lower branch; everything above lo passes, including above hi
    assert _d("relu", U, 0.0, 3.0) == [0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_clipped_relu() -> None:
    # u = lo -> 0, u = hi -> inside (1), just above hi -> 0
    assert _d("clipped_relu", U, 0.0, 3.0) == [0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_log_tailed_relu() -> None:
    got = _d("log_tailed_relu", U, 0.0, 3.0)
    tau = 3.0 - 1.0
    expected = [0, 0, 0, 1, 1, 1, 1 / (3.0 + 1e-6 - tau), 1 / (3.5 - tau), 1 / (7.0 - tau)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got[7] == pytest.approx(2 / 3) and got[8] == pytest.approx(0.2)
    # continuous at hi (1/(hi - tau) = 1) and decreasing above
    assert got[6] == pytest.approx(1.0, abs=1e-5) and got[6] > got[7] > got[8] > 0


def test_log_tailed_relu_tail_follows_hi() -> None:
    # tau = hi - 1 for any hi, and a zero-point grid (lo < 0) keeps the same branches
    got = _d("log_tailed_relu", [-0.5, -0.49, 0.0, 1.5, 2.0, 4.0], -0.5, 1.5)
    assert got == pytest.approx([0, 1, 1, 1, 1 / (2.0 - 0.5), 1 / (4.0 - 0.5)], rel=1e-12)


def test_generic_grid_branches() -> None:
    # lo < 0 (zero point): relu -> 1{u > lo}, clipped_relu -> 1{lo < u <= hi}
    u = [-1.0, -0.25, -0.2, 0.0, 2.0, 2.01]
    assert _d("relu", u, -0.25, 2.0) == [0, 0, 1, 1, 1, 1]
    assert _d("clipped_relu", u, -0.25, 2.0) == [0, 0, 1, 1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_builtins_keep_dtype_and_shape(dtype: torch.dtype) -> None:
    u = torch.linspace(-2, 5, 24, dtype=dtype).reshape(2, 3, 4)
    for name in BUILTINS:
        d = get_ste(name)(u, torch.tensor(0.0, dtype=dtype), torch.tensor(3.0, dtype=dtype))
        assert d.shape == u.shape and d.dtype == dtype and (d >= 0).all()


# ---- registering custom STEs -------------------------------------------------------------------


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_register_decorator_and_use_in_quantize(ste_registry) -> None:
    @register_ste("half_inside", description="0.5 inside the range")
    def half_inside(u, lo, hi):
        return 0.5 * ((u > lo) & (u <= hi)).to(u.dtype)

    assert half_inside(torch.tensor([1.0]), torch.tensor(0.0), torch.tensor(2.0)).item() == 0.5  # fn returned
    assert list_stes()[-1] == "half_inside"
    assert get_ste("half_inside").description == "0.5 inside the range"

    q = qat_ste.quantize(_tiny_model(), ste="half_inside", alpha_mode="fixed", step_init=0.25)
    qa = q[1]
    assert qa.ste.name == "half_inside"
    assert qat_ste.report(q).to_dict()["sites"][0]["ste"] == "half_inside"
    # the backward uses the custom derivative: grad_u = 0.5 on (0, 15 * 0.25], else 0
    u = torch.tensor([[-1.0, 0.0, 0.1, 1.0, 3.75, 3.76]], requires_grad=True)
    qa(u).sum().backward()
    assert u.grad.tolist() == [[0.0, 0.0, 0.5, 0.5, 0.5, 0.0]]


def test_register_call_form_with_docstring_description(ste_registry) -> None:
    def soft(u, lo, hi):
        """Sigmoid-smoothed clipped ReLU.

        More text.
        """
        return torch.sigmoid(4 * (u - lo)) * torch.sigmoid(4 * (hi - u))

    assert register_ste("soft", soft) is soft
    assert get_ste("soft").description == "Sigmoid-smoothed clipped ReLU."
    q = qat_ste.quantize(_tiny_model(), bits=2, ste="soft", alpha_mode="fixed", step_init=0.5)
    x = torch.randn(3, 4)
    u = q[0](x).detach().requires_grad_(True)
    q[1](u).backward(torch.ones_like(u))
    lo, hi = torch.tensor(0.0), torch.tensor(1.5)
    expected = torch.sigmoid(4 * (u.detach() - lo)) * torch.sigmoid(4 * (hi - u.detach()))
    torch.testing.assert_close(u.grad, expected)


def test_config_accepts_registered_ste_and_rejects_unknown(ste_registry) -> None:
    register_ste("mine", lambda u, lo, hi: torch.ones_like(u))
    assert qat_ste.QuantConfig(ste="mine").ste == "mine"
    unregister_ste("mine")
    with pytest.raises(QatSteError, match="unknown STE 'mine'"):
        qat_ste.QuantConfig(ste="mine")


def test_negative_derivative_rejected(ste_registry) -> None:
    with pytest.raises(QatSteError) as e:
        register_ste("decreasing", lambda u, lo, hi: -torch.ones_like(u))
    assert "negative" in e.value.problem and e.value.fix
    assert "decreasing" not in list_stes()
    # negative only somewhere (outside [0, 1] on the probe grid) is still caught
    with pytest.raises(QatSteError):
        register_ste("sometimes", lambda u, lo, hi: torch.where(u > 5, -1.0, 1.0).to(u.dtype))
    with pytest.raises(QatSteError, match="not finite"):
        register_ste("inf", lambda u, lo, hi: 1.0 / (u - u))
    assert "sometimes" not in list_stes() and "inf" not in list_stes()


def test_wrong_shape_rejected(ste_registry) -> None:
    with pytest.raises(QatSteError, match="shape") as e:
        register_ste("scalar", lambda u, lo, hi: torch.tensor(1.0))
    assert "same shape" in e.value.fix
    with pytest.raises(QatSteError, match="float"):
        register_ste("number", lambda u, lo, hi: 1.0)
    assert "scalar" not in list_stes() and "number" not in list_stes()


def test_duplicate_name_needs_overwrite(ste_registry) -> None:
    with pytest.raises(QatSteError, match="already registered") as e:
        register_ste("relu", lambda u, lo, hi: torch.ones_like(u))
    assert "overwrite=True" in e.value.fix
    assert get_ste("relu")(torch.tensor([-1.0]), torch.tensor(0.0), torch.tensor(1.0)).item() == 0.0

    register_ste("relu", lambda u, lo, hi: torch.ones_like(u), overwrite=True)
    assert get_ste("relu")(torch.tensor([-1.0]), torch.tensor(0.0), torch.tensor(1.0)).item() == 1.0
    # a rejected overwrite keeps the previous one
    with pytest.raises(QatSteError):
        register_ste("relu", lambda u, lo, hi: -torch.ones_like(u), overwrite=True)
    assert get_ste("relu")(torch.tensor([-1.0]), torch.tensor(0.0), torch.tensor(1.0)).item() == 1.0


def test_unknown_name_lists_registered(ste_registry) -> None:
    register_ste("extra_one", lambda u, lo, hi: torch.ones_like(u))
    with pytest.raises(QatSteError) as e:
        get_ste("clippd_relu")
    msg = str(e.value)
    assert "'clippd_relu'" in msg
    for name in BUILTINS + ["extra_one"]:
        assert name in msg
    assert "register_ste" in e.value.fix
    with pytest.raises(QatSteError, match="unknown STE"):
        get_ste(["not", "hashable"])
    with pytest.raises(QatSteError, match="registered STEs: identity, relu"):
        qat_ste.quantize(_tiny_model(), ste="nope")


def test_bad_name_rejected(ste_registry) -> None:
    for bad in ("with space", "", "1abc", None):
        with pytest.raises(QatSteError, match="not a valid identifier"):
            register_ste(bad, lambda u, lo, hi: torch.ones_like(u))


def test_unregister(ste_registry) -> None:
    register_ste("temp", lambda u, lo, hi: torch.ones_like(u))
    unregister_ste("temp")
    assert "temp" not in list_stes()
    with pytest.raises(QatSteError, match="unknown STE 'temp'"):
        get_ste("temp")
    with pytest.raises(QatSteError, match="unknown STE 'temp'"):
        unregister_ste("temp")
    unregister_ste("identity")  # built-ins too (restored by the fixture)
    assert list_stes()[:3] == ["relu", "clipped_relu", "log_tailed_relu"]


def test_get_ste_passes_instances_through() -> None:
    s = get_ste("relu")
    assert get_ste(s) is s

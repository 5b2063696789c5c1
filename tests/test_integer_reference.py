"""BatchNorm folding and integer_reference(): PyTorch computing what ONNX Runtime's integer kernels compute."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from integer_models import DepthwiseCNN, ResidualCNN, SqueezeExciteCNN
from onnx import TensorProto, helper

import qat_ste
from qat_ste.errors import QatSteError
from qat_ste.export import export_onnx
from qat_ste.export.integer_reference import IntegerLayer, integer_reference
from qat_ste.export.ops import reference_codes
from qat_ste.export.passes import site_tensors
from qat_ste.rewrite.engine import owner_graphs
from qat_ste.rewrite.fold import fold_batchnorm


def _with_statistics(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that folding changes the weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def test_folding_batchnorm_gives_the_unfolded_models_outputs():
    torch.manual_seed(0)
    model = _with_statistics(ResidualCNN())
    x = torch.randn(4, 3, 16, 16)
    expected = model(x)
    folded = fold_batchnorm(model, owner_graphs(model))
    assert sorted(folded) == ["b1.bn1", "b1.bn2", "b2.bn1", "b2.bn2", "b2.down.1", "stem.1"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.b1.conv1.bias is not None  # a conv without bias gains one
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_batchnorm1d_after_a_linear_layer_is_folded_too():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3, bias=False), nn.BatchNorm1d(3))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(4, 6)
    expected = model(x)
    assert fold_batchnorm(model, owner_graphs(model)) == ["1", "4"]
    assert isinstance(model[1], nn.Identity) and model[3].bias is not None
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_batchnorm_whose_conv_output_is_read_elsewhere_is_not_folded():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _with_statistics(Shared())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert fold_batchnorm(model, owner_graphs(model)) == []
    torch.testing.assert_close(model(x), expected)


def _quantized(model: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    q = qat_ste.quantize(model, bits=4, integer_graph=True, example_input=x[:1])
    qat_ste.calibrate(q, [x])
    return q.eval()


def _deployed_codes(path, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every site's codes and the logits, from ONNX Runtime with default options (integer kernels);
    only the code tensors are exposed, which keeps every fusion."""
    proto = onnx.load(str(path))
    tensors = site_tensors(proto)
    for t in tensors:
        proto.graph.output.append(helper.make_tensor_value_info(t.codes, TensorProto.UINT8, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    by_name = dict(zip([o.name for o in session.get_outputs()], values, strict=True))
    return {t.name: by_name[t.codes].astype(np.int64) for t in tensors}, values[0]


def _torch_codes(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    codes: dict[str, np.ndarray] = {}
    hooks = [m.register_forward_hook(
        lambda mod, args, out: codes.__setitem__(mod.site, reference_codes(mod, mod.float_function(args[0])).numpy()))
        for m in model.modules() if isinstance(m, qat_ste.QuantAct)]
    with torch.no_grad():
        logits = model(x).numpy()
    for h in hooks:
        h.remove()
    return {k: v.astype(np.int64) for k, v in codes.items()}, logits


@pytest.mark.parametrize("factory", [ResidualCNN, DepthwiseCNN, SqueezeExciteCNN])
def test_the_integer_reference_agrees_with_the_deployed_file_code_for_code(tmp_path, factory):
    x = torch.randn(8, 3, 16, 16)
    q = _quantized(_with_statistics(factory()), x)
    export_onnx(q, tmp_path / "m.onnx", x[:1])
    reference, counts = integer_reference(q, x[:1])
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in factory().modules())
    assert counts["integer"] == n_layers and counts["float"] == 0
    assert counts["folded"] == sum(isinstance(m, nn.BatchNorm2d) for m in factory().modules())
    deployed, logits = _deployed_codes(tmp_path / "m.onnx", x)
    ours, our_logits = _torch_codes(reference, x)
    fake, _ = _torch_codes(q, x)
    total = sum(v.size for v in deployed.values())
    agree = sum(int((deployed[k] == ours[k].reshape(deployed[k].shape)).sum()) for k in deployed)
    agree_fake = sum(int((deployed[k] == fake[k].reshape(deployed[k].shape)).sum()) for k in deployed)
    assert agree == total  # every code of every site, end to end
    assert agree_fake <= agree
    np.testing.assert_allclose(our_logits, logits, rtol=1e-5, atol=1e-5)


def test_an_integer_layer_without_requantization_is_the_float_layer_on_the_same_codes():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    step = 0.05
    x = torch.randint(0, 16, (2, 4, 8, 8)).float() * step  # codes x step, as a quantizer returns them
    layer = IntegerLayer(conv, step, "conv")
    assert layer.requant is None
    w = layer.weight_codes.float() * (layer.out_scale.float() / step).view(-1, 1, 1, 1)
    b = layer.bias_codes.float() * layer.out_scale.float()
    expected = nn.functional.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight_codes, layer.weight_codes.round()) and layer.weight_codes.abs().max() == 127


def test_integer_reference_of_a_float_model_is_a_clear_error():
    with pytest.raises(QatSteError, match="needs a quantized model"):
        integer_reference(ResidualCNN(), torch.randn(1, 3, 16, 16))

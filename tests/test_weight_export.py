"""Export of quantized weights (issue 11): int codes -> DequantizeLinear -> Conv/Gemm, the file's
value sets, exact ORT parity, check_onnx's weight checks (tampering), metadata, and the done
criterion: LeNet-5 with binary weights + 4-bit activations trained with BCGD on MNIST, exported
with 2-valued weights and exact parity.

Dynamo exports take seconds each, so every exported file is built once per module (``exports``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

import qat_ste  # noqa: E402
from qat_ste.export import check_onnx, export_float_onnx, export_onnx, read_metadata  # noqa: E402
from qat_ste.export.check import allowed_weight_codes  # noqa: E402
from qat_ste.quantizer.weight import WeightQuantizer, quant_weight_layers, to_quant_weight  # noqa: E402
from qat_ste.zoo import lenet5  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


class SmallCNN(nn.Module):
    """conv-BN-ReLU, maxpool, conv-BN-ReLU, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


SHAPES = {"cnn": (3, 12, 12), "lenet": (1, 28, 28)}
# name -> (model, weight bits, per-channel, export options, expected container)
CASES = {
    "cnn_binary_tensor": ("cnn", 1, False, {}, TensorProto.INT8),
    "cnn_ternary_channel_int8": ("cnn", "ternary", True, {"weight_format": "int8"}, TensorProto.INT8),
    "cnn_int4_channel_spec": ("cnn", 4, True, {"form": "spec"}, TensorProto.INT4),
    "cnn_binary_spec_opset21": ("cnn", 1, False, {"form": "spec", "opset": 21}, TensorProto.INT4),  # no INT2 < 25
    "lenet_binary_channel_spec": ("lenet", 1, True, {"form": "spec"}, TensorProto.INT2),
    "lenet_ternary_tensor": ("lenet", "ternary", False, {}, TensorProto.INT8),
}


def make_model(kind: str, weight_bits: int | str, per_channel: bool) -> nn.Module:
    """4-bit activations (calibrated) and every Conv/Linear with quantized weights."""
    torch.manual_seed(0)
    model = SmallCNN() if kind == "cnn" else lenet5()
    shape = SHAPES[kind]
    q = qat_ste.quantize(model, bits=4, example_input=torch.randn(2, *shape))
    for m in list(q.modules()):
        if type(m) in (nn.Conv2d, nn.Linear):
            to_quant_weight(m, WeightQuantizer(weight_bits, per_channel=per_channel))
    qat_ste.calibrate(q, [torch.randn(16, *shape) for _ in range(2)])
    return q.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weight_export")
    done: dict[str, tuple] = {}

    def get(case: str):
        if case not in done:
            kind, bits, per_channel, options, _ = CASES[case]
            model = make_model(kind, bits, per_channel)
            result = export_onnx(model, directory / f"{case}.onnx", torch.randn(1, *SHAPES[kind]), **options)
            done[case] = (model, result)
        return done[case]
    return get


def _weights_in_file(path: Path) -> dict[str, tuple[onnx.NodeProto, onnx.TensorProto, np.ndarray, np.ndarray]]:
    """layer -> (its weight DequantizeLinear, the codes initializer, codes, scale) read from the file."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    meta = read_metadata(proto)
    found = {}
    for w in meta["weight_layers"]:
        node = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == w["codes"])
        codes = np.asarray(numpy_helper.to_array(inits[node.input[0]])).astype(np.int64)
        found[w["name"]] = (node, inits[node.input[0]], codes, numpy_helper.to_array(inits[node.input[1]]))
    return found


@pytest.mark.parametrize("case", CASES)
def test_exported_weight_value_sets(exports, case) -> None:
    model, result = exports(case)
    kind, bits, per_channel, _, container = CASES[case]
    in_file = _weights_in_file(result.path)
    layers = dict(quant_weight_layers(model))
    assert set(in_file) == set(layers) and len(in_file) == (3 if kind == "cnn" else 5)
    for name, (node, init, codes, scale) in in_file.items():
        present = set(np.unique(codes).tolist())
        if bits == 1:
            assert present == {-1, 1}
        elif bits == "ternary":
            assert present == {-1, 0, 1}
        else:
            assert present <= set(range(-7, 8)) and len(present) <= 15 and len(present) > 3
        assert init.data_type == container
        assert len(node.input) == 2  # no zero point: symmetric codes
        axis = [a.i for a in node.attribute if a.name == "axis"]
        assert (axis == [0] and scale.shape == (codes.shape[0],)) if per_channel else (axis == [] and scale.ndim == 0)
        assert codes.shape == tuple(layers[name].weight.shape)


@pytest.mark.parametrize("case", CASES)
def test_file_codes_times_scale_equal_pytorch_q_bit_for_bit(exports, case) -> None:
    model, result = exports(case)
    layers = dict(quant_weight_layers(model))
    for name, (node, _, codes, scale) in _weights_in_file(result.path).items():
        shape = [-1] + [1] * (codes.ndim - 1) if scale.ndim else []
        in_file = codes.astype(np.float32) * scale.astype(np.float32).reshape(shape)
        expected = layers[name].quantized_weight().detach().numpy()
        assert in_file.dtype == np.float32 and np.array_equal(in_file.view(np.int32), expected.view(np.int32))
        proto = onnx.load(str(result.path))
        users = [n.op_type for n in proto.graph.node if node.output[0] in n.input]
        assert users and set(users) <= {"Conv", "Gemm", "MatMul"}


@pytest.mark.parametrize("case", CASES)
def test_ort_parity_is_exact(exports, case) -> None:
    model, result = exports(case)
    x = torch.randn(12, *SHAPES[CASES[case][0]])
    report = check_onnx(model, result.path, x, latency=False)
    assert report.ok, report.failures
    assert report.site_parity == 1.0 and all(s.dequant_exact for s in report.sites)
    assert report.max_logit_diff < 1e-4 and report.top1_agreement == 1.0
    assert len(report.weight_layers) == len(quant_weight_layers(model))
    for w in report.weight_layers:
        assert w.exact and w.ort_exact and w.outside == 0
        assert w.allowed == len(allowed_weight_codes(w.spec)) and set(w.distinct) <= set(allowed_weight_codes(w.spec))
    assert "file=Q(w)" in report.table()
    assert report.to_dict()["weight_layers"][0]["name"] == report.weight_layers[0].name


def test_metadata_records_each_layers_weight_spec(exports) -> None:
    model, result = exports("lenet_binary_channel_spec")
    meta = read_metadata(onnx.load(str(result.path)))
    assert [w["name"] for w in meta["weight_layers"]] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    for w, info in zip(meta["weight_layers"], result.weight_layers, strict=True):
        assert w["spec"] == "binary" and w["allowed_codes"] == [-1, 1] and w["container"] == "int2"
        assert w["axis"] == 0 and w["distinct_codes"] == [-1, 1] and w == info.to_dict() | {
            "allowed_codes": list(info.allowed_codes), "shape": list(info.shape), "scale": list(info.scale),
            "distinct_codes": list(info.distinct_codes), "consumers": list(info.consumers)}
    assert result.opset == 25  # spec: INT2 codes need opset 25


def test_int8_weight_format_leaves_quantized_layers_their_own_codes(exports) -> None:
    _, result = exports("cnn_ternary_channel_int8")
    assert result.weight_counts["weights"] == 0  # every Conv/Linear has quantized weights
    assert any("keep their own codes and scale" in n for n in result.notes)
    assert all(w.container == "int8" and w.distinct_codes == (-1, 0, 1) for w in result.weight_layers)


def test_a_weight_code_outside_the_set_fails_the_check(exports, tmp_path) -> None:
    model, result = exports("lenet_ternary_tensor")
    proto = onnx.load(str(result.path))
    target = next(t for t in proto.graph.initializer if t.name == "conv2/weight_codes")
    codes = numpy_helper.to_array(target).copy()
    codes.flat[7] = 2  # ternary allows -1, 0, 1
    target.CopyFrom(numpy_helper.from_array(codes, target.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    report = check_onnx(model, tampered, torch.randn(4, 1, 28, 28), latency=False)
    assert not report.ok
    conv2 = next(w for w in report.weight_layers if w.name == "conv2")
    assert conv2.outside == 1 and conv2.distinct == (-1, 0, 1, 2) and not conv2.exact and not conv2.ort_exact
    assert any(f.startswith("weight layer conv2: 1 of 2400 codes lie outside the ternary value set") for f in
               report.failures)
    assert all(w.outside == 0 and w.exact for w in report.weight_layers if w.name != "conv2")


def test_a_changed_weight_scale_fails_the_check(exports, tmp_path) -> None:
    model, result = exports("cnn_binary_tensor")
    proto = onnx.load(str(result.path))
    target = next(t for t in proto.graph.initializer if t.name == "fc/weight_scale")
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.001), target.name))
    changed = tmp_path / "scale.onnx"
    onnx.save(proto, str(changed))
    report = check_onnx(model, changed, torch.randn(4, *SHAPES["cnn"]), latency=False)
    assert "weight layer fc: the file's codes x scale differ from PyTorch's Q(w)" in report.failures
    assert next(w for w in report.weight_layers if w.name == "fc").outside == 0


def test_checking_against_a_model_without_those_quantized_weights_is_refused(exports) -> None:
    from qat_ste.errors import QatSteError

    _, result = exports("cnn_binary_tensor")
    torch.manual_seed(0)
    float_weights = qat_ste.quantize(SmallCNN(), bits=4, example_input=torch.randn(2, *SHAPES["cnn"]))
    qat_ste.calibrate(float_weights, [torch.randn(16, *SHAPES["cnn"])])
    with pytest.raises(QatSteError, match="no quantized-weight layer"):
        check_onnx(float_weights.eval(), result.path, torch.randn(2, *SHAPES["cnn"]), latency=False)


def test_spec_with_quantized_weights_below_opset_21_is_refused(tmp_path) -> None:
    """8-bit activations need no narrow type; the binary weights' INT4/INT2 codes do."""
    from qat_ste.errors import QatSteError

    model = qat_ste.quantize(SmallCNN(), bits=8, example_input=torch.randn(2, *SHAPES["cnn"]))
    to_quant_weight(model.conv1, WeightQuantizer(1))
    qat_ste.calibrate(model, [torch.randn(8, *SHAPES["cnn"])])
    with pytest.raises(QatSteError, match=r"UINT4/INT4 .*need opset >= 21; got opset=18"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, *SHAPES["cnn"]), form="spec", opset=18)


def test_float_baseline_export_uses_the_float_weights(exports, tmp_path) -> None:
    model, _ = exports("cnn_binary_tensor")
    path = export_float_onnx(model, tmp_path / "float.onnx", torch.randn(1, *SHAPES["cnn"]))
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    fc = next(numpy_helper.to_array(t) for t in proto.graph.initializer
              if t.dims == [10, 16] or t.dims == [16, 10])
    weight = model.fc.weight.detach().numpy()
    assert np.array_equal(fc, weight) or np.array_equal(fc, weight.T)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST not present at {MNIST_DIR}")
def test_lenet5_binary_weights_bcgd_on_mnist_exports_two_valued_weights_with_exact_parity(tmp_path) -> None:
    """The done criterion of issue 11, CI-sized: train, export, check."""
    from qat_ste.train import TrainConfig, train
    from qat_ste.train.data import load_dataset
    from tools.reproduce_paper import subset

    train_set = subset(load_dataset(f"mnist:{MNIST_DIR}", "train"), 3000, 0)
    val_set = subset(load_dataset(f"mnist:{MNIST_DIR}", "val"), 1000, 1)
    torch.manual_seed(0)
    q = qat_ste.quantize(lenet5(bn_affine=False), 4, "clipped_relu", alpha_mode="bcgd", weight_bits=1,
                         weight_method="bcgd", keep_first_weights=False, keep_last_weights=False)
    assert len(quant_weight_layers(q)) == 5 and all(m.weight_quantizer.rho == 1e-5 for _, m in quant_weight_layers(q))
    result = train(q, train_set, val_set, TrainConfig(epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False,
                                                      log_format="none", tensorboard=False, plot=False,
                                                      print_summary=False, verbose=False))
    assert result.final_val_accuracy is not None and result.final_val_accuracy > 0.8
    q.eval()
    images = torch.stack([val_set[i][0] for i in range(256)])
    labels = torch.tensor([val_set[i][1] for i in range(256)])
    exported = export_onnx(q, tmp_path / "lenet5_binary.onnx", images[:1])
    assert [w.distinct_codes for w in exported.weight_layers] == [(-1, 1)] * 5
    report = check_onnx(q, exported.path, images, labels, latency=False)
    assert report.ok, report.failures
    assert report.site_parity == 1.0 and report.max_logit_diff < 1e-4
    assert all(len(w.distinct) == 2 and w.exact and w.ort_exact for w in report.weight_layers)
    assert report.accuracy_onnx == report.accuracy_torch

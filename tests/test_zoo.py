"""Model zoo: shapes, parameter counts, BatchNorm options, one ReLU instance per call site; the recipes
as package data (importlib.resources, the built wheel)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qat_ste
from qat_ste.errors import QatSteError
from qat_ste.zoo import (
    ZOO_MODELS,
    BasicBlock,
    ZeroPadShortcut,
    create_zoo_model,
    lenet5,
    list_zoo_models,
    resnet20,
    vgg11,
)
from qat_ste.zoo.recipes import default_recipes_path, load_recipes, parse_recipes


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_three_models() -> None:
    assert list_zoo_models() == ["lenet5", "resnet20", "vgg11"]
    assert set(ZOO_MODELS) == {"lenet5", "resnet20", "vgg11"}


@pytest.mark.parametrize(
    "name, kwargs, input_shape",
    [
        ("lenet5", {}, (1, 28, 28)),
        ("lenet5", {"image_size": 32}, (1, 32, 32)),
        ("vgg11", {}, (3, 32, 32)),
        ("vgg11", {"in_channels": 1}, (1, 32, 32)),
        ("resnet20", {}, (3, 32, 32)),
        ("resnet20", {"in_channels": 1, "num_classes": 7}, (1, 32, 32)),
    ],
)
def test_output_shapes(name: str, kwargs: dict, input_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = create_zoo_model(name, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *input_shape))
    assert out.shape == (3, kwargs.get("num_classes", 10))
    assert torch.isfinite(out).all()


def test_resnet20_parameter_count() -> None:
    # Worked out by hand (3x3 convs have no bias; each affine BatchNorm has 2 x channels):
    #   stem:   conv 3->16: 3*16*9 = 432, BN 2*16 = 32                                  ->    464
    #   stage1: 3 blocks x (2 convs 16*16*9 = 2304 each + 2 BNs of 32)   = 3 * 4672      ->  14016
    #   stage2: block 1: conv 16*32*9 = 4608 + conv 32*32*9 = 9216 + BNs 128 = 13952
    #           blocks 2, 3: 2 * (2 * 9216 + 128) = 37120                               ->  51072
    #   stage3: block 1: conv 32*64*9 = 18432 + conv 64*64*9 = 36864 + BNs 256 = 55552
    #           blocks 2, 3: 2 * (2 * 36864 + 256) = 147968                             -> 203520
    #   fc:     64*10 + 10 = 650                                                        ->    650
    #   total                                                                           -> 269722
    # (the "0.27M" of the ResNet paper). Option-A shortcuts add nothing. Without BN affine the
    # 19 BNs' 2 * (16 + 6*16 + 6*32 + 6*64) = 1376 parameters disappear: 268346.
    assert count_parameters(resnet20()) == 269722
    assert count_parameters(resnet20(bn_affine=False)) == 269722 - 1376
    # Each extra class adds 64 weights + 1 bias in the last layer.
    assert count_parameters(resnet20(num_classes=100)) == 269722 + 90 * 65


def test_other_parameter_counts() -> None:
    # LeNet-5 (28x28): conv1 1*6*25 = 150, BN 12, conv2 6*16*25 = 2400, BN 32, fc1 400*120 = 48000,
    # BN 240, fc2 120*84 = 10080, BN 168, fc3 84*10+10 = 850 -> 61932. (32x32: fc1 576*120.)
    assert count_parameters(lenet5()) == 61932
    assert count_parameters(lenet5(image_size=32)) == 61932 + (576 - 400) * 120
    # VGG-11: bias-free 3x3 convs 9*(3*64 + 64*128 + 128*256 + 256*256 + 256*512 + 3*512*512)
    # = 9217728, BNs 2*(64+128+256+256+4*512) = 5504, classifier 512*10+10 = 5130 -> 9228362.
    convs = 9 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 3 * 512 * 512)
    bns = 2 * (64 + 128 + 256 + 256 + 512 * 4)
    assert count_parameters(vgg11()) == convs + bns + 512 * 10 + 10 == 9228362


@pytest.mark.parametrize("name", ["lenet5", "vgg11", "resnet20"])
def test_bn_affine_false_has_no_bn_weights(name: str) -> None:
    model = create_zoo_model(name, bn_affine=False)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms, "every zoo model has BatchNorm layers"
    for norm in norms:
        assert norm.weight is None and norm.bias is None
        assert list(norm.parameters()) == []
        assert norm.running_mean is not None  # still normalises with batch statistics
    with_affine = create_zoo_model(name)
    assert all(m.weight is not None for m in with_affine.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize(
    "name, kwargs, input_shape, relus",
    [
        ("lenet5", {}, (1, 28, 28), 4),
        ("vgg11", {}, (3, 32, 32), 8),
        ("resnet20", {}, (3, 32, 32), 19),  # 1 stem + 2 per block x 9 blocks
    ],
)
def test_each_relu_module_is_called_exactly_once(name: str, kwargs: dict, input_shape: tuple, relus: int) -> None:
    model = create_zoo_model(name, **kwargs)
    relu_modules = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relu_modules) == relus
    assert len({id(m) for m in relu_modules}) == relus  # distinct instances
    calls: dict[int, int] = {}

    def count_call(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1

    handles = [m.register_forward_hook(count_call) for m in relu_modules]
    try:
        model(torch.randn(2, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(calls.values()) == [1] * relus
    assert set(calls) == {id(m) for m in relu_modules}
    # No functional activations hide in forward: only these modules touch the graph.
    traced = torch.fx.symbolic_trace(model)
    functions = {str(node.target) for node in traced.graph.nodes if node.op == "call_function"}
    assert not any("relu" in f for f in functions), functions


def test_option_a_shortcut_has_no_parameters_and_pads_channels() -> None:
    shortcut = ZeroPadShortcut(16, 32, stride=2)
    assert list(shortcut.parameters()) == [] and list(shortcut.buffers()) == []
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    model = resnet20()
    shortcuts = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(shortcuts) == 2  # entering stages 2 and 3
    assert all(list(s.parameters()) == [] for s in shortcuts)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    assert sum(isinstance(b.shortcut, nn.Identity) for b in blocks) == 7


def test_resnet20_kaiming_init_and_gradients() -> None:
    torch.manual_seed(0)
    model = resnet20()
    conv = model.layer3[1].conv1  # fan_in 64*9 -> std sqrt(2/576)
    assert conv.weight.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_model_and_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(QatSteError, match="unknown zoo model 'resnet18'") as info:
        create_zoo_model("resnet18")
    assert "lenet5, resnet20, vgg11" in str(info.value)
    with pytest.raises(QatSteError, match="does not take argument"):
        create_zoo_model("vgg11", image_size=32)
    with pytest.raises(QatSteError, match="num_classes"):
        create_zoo_model("lenet5", num_classes=0)
    with pytest.raises(QatSteError, match="at least 12x12"):
        lenet5(image_size=8)
    assert isinstance(create_zoo_model(" ResNet20 "), nn.Module)


def test_vgg11_structure() -> None:
    model = vgg11()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert model.classifier.in_features == 512


# ---------------------------------------------------------------------------------------------
# Recipes as package data (issue 13): found through importlib.resources, shipped in the wheel
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_recipes_load_through_importlib_resources() -> None:
    resource = files("qat_ste.zoo").joinpath("recipes.json")
    assert resource.is_file()
    assert default_recipes_path() == resource
    assert load_recipes() == parse_recipes(json.loads(resource.read_text(encoding="utf-8")))
    assert load_recipes().grid_nets == ("lenet5", "vgg11", "resnet20")
    assert not (REPO / "model_zoo" / "recipes.json").exists(), "one copy of the recipes: qat_ste/zoo/recipes.json"


def test_missing_recipes_file_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(QatSteError, match="cannot read the recipes file .*absent.json") as info:
        load_recipes(tmp_path / "absent.json")
    assert "pass the path of an existing, readable recipes file" in str(info.value)


def _setuptools_can_build() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline (no build isolation) from a copy of the sources, so the checkout
    gets no build/ or egg-info folders."""
    if not _setuptools_can_build():
        pytest.skip("building a wheel offline needs setuptools >= 77 in this environment")
    root = tmp_path_factory.mktemp("wheel")
    src, out = root / "src", root / "dist"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "qat_ste", src / "qat_ste", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("qat_ste-*.whl")
    return wheel


def test_wheel_ships_the_recipes_and_not_the_tools(built_wheel: Path) -> None:
    names = zipfile.ZipFile(built_wheel).namelist()
    assert "qat_ste/zoo/recipes.json" in names and "qat_ste/zoo/recipes.py" in names
    assert not [n for n in names if n.startswith(("tools/", "tests/", "examples/"))]
    assert "qat_ste/coverage.py" not in names and "qat_ste/theory.py" not in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(built_wheel).read(metadata).decode()
    assert f"\nVersion: {qat_ste.__version__}\n" in text  # the version comes from qat_ste.__version__


def test_recipes_load_from_the_wheel_away_from_the_checkout(built_wheel: Path, tmp_path: Path) -> None:
    code = ("import qat_ste.zoo.recipes as r; print(r.__file__); "
            "print(len(r.load_recipes().grid_cells()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(built_wheel)})
    assert done.returncode == 0, done.stderr[-3000:]
    module_file, cells = done.stdout.split()
    assert module_file.startswith(str(built_wheel)) and cells == "18"


def test_recipes_rounding_choices_give_the_quantize_options() -> None:
    import copy

    from qat_ste.errors import QatSteError
    from qat_ste.zoo.recipes import parse_recipes

    data = json.loads(files("qat_ste.zoo").joinpath("recipes.json").read_text(encoding="utf-8"))
    assert parse_recipes(data).quant_options(2) == {"alpha_mode": "fixed", "rounding": "nearest"}
    for rounding, options in (("ceil", {"alpha_mode": "fixed", "rounding": "ceil"}),
                              ("paper_ceil", {"alpha_mode": "fixed", "rounding": "ceil", "step_init": 0.1946})):
        changed = copy.deepcopy(data)
        changed["quantization"]["rounding"] = rounding
        assert parse_recipes(changed).quant_options(4) == options
    changed["quantization"]["rounding"] = "floor"
    with pytest.raises(QatSteError, match="rounding 'floor' is unknown"):
        parse_recipes(changed)

"""--weights FILE: torchvision state dicts, timm checkpoints (.pth.tar with state_dict / model /
state_dict_ema, .safetensors) load into timm and torchvision models; a classifier for another number
of classes becomes a new, randomly initialised head (said); any other mismatch is refused listing
the keys; a damaged .safetensors file is a clear error."""

from __future__ import annotations

import argparse

import pytest
import torch

from qat_ste.errors import QatSteError
from qat_ste.train.pretrained import classifier_names, load_weights_file

pytestmark = pytest.mark.usefixtures("single_thread")


def _timm(name: str, classes: int):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=classes)


def _same(model, state, skip=()) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k not in skip)


@pytest.mark.parametrize("key", ["state_dict", "model", "state_dict_ema"])
def test_timm_pth_tar_checkpoints_load_with_their_args_and_prefixes(tmp_path, key):
    source = _timm("test_resnet", 10)
    path = tmp_path / "checkpoint.pth.tar"
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}  # saved from a DDP model
    torch.save({"epoch": 3, "arch": "test_resnet", key: wrapped, "optimizer": {"state": {}},
                "args": argparse.Namespace(model="test_resnet", lr=0.1), "version": 2}, path)
    target = _timm("test_resnet", 10)
    assert load_weights_file(target, path) == []
    assert _same(target, source.state_dict())


def test_ema_weights_are_preferred_as_timm_does(tmp_path):
    raw, ema = _timm("test_resnet", 10), _timm("test_resnet", 10)
    path = tmp_path / "both.pth.tar"
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    target = _timm("test_resnet", 10)
    load_weights_file(target, path)
    assert _same(target, ema.state_dict()) and not _same(target, raw.state_dict())


def test_timm_imagenet_file_gets_a_new_head_for_ten_classes(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source = _timm("test_resnet", 1000)
    path = tmp_path / "test_resnet.safetensors"
    safetensors.save_file(source.state_dict(), str(path))
    target = _timm("test_resnet", 10)
    assert classifier_names(target) == ["fc"]  # from pretrained_cfg["classifier"]
    head_before = target.fc.weight.detach().clone()
    notes = []
    skipped = load_weights_file(target, path, on_note=notes.append)
    assert notes == ["new head: fc (1000 → 10 classes), randomly initialised"]
    assert skipped == ["fc.bias", "fc.weight"]
    assert _same(target, source.state_dict(), skip=("fc.weight", "fc.bias"))
    assert torch.equal(target.fc.weight, head_before)  # the fresh init is kept


def test_torchvision_resnet18_imagenet_state_dict_gets_a_new_head(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    target = torchvision.models.resnet18(num_classes=10)
    with pytest.warns(UserWarning, match="new head: fc \\(1000 → 10 classes\\), randomly initialised"):
        skipped = load_weights_file(target, path)
    assert skipped == ["fc.bias", "fc.weight"]
    assert _same(target, source.state_dict(), skip=("fc.weight", "fc.bias"))


def test_partial_weights_are_refused_listing_the_keys(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    del state["layer1.0.bn1.bias"]
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    target = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(QatSteError) as info:
        load_weights_file(target, path)
    message = str(info.value)
    assert "1 tensor(s) missing from the file: layer1.0.bn1.bias" in message
    assert "layer1.0.conv1.weight (64, 64, 1, 1) in the file vs (64, 64, 3, 3) in the model" in message
    assert "--allow-partial" in message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing loaded
    with pytest.warns(UserWarning, match="fits this model only in part"):
        skipped = load_weights_file(target, path, allow_partial=True)
    assert skipped == ["fc.bias", "fc.weight", "layer1.0.bn1.bias", "layer1.0.conv1.weight"]


def test_a_head_with_another_input_width_is_not_a_new_head(tmp_path):
    from qat_ste.zoo import create_zoo_model

    state = create_zoo_model("lenet5", num_classes=10).state_dict()
    state["fc3.weight"] = torch.zeros(10, 50)  # another feature width: another architecture
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(QatSteError, match="fc3.weight \\(10, 50\\) in the file vs \\(10, 84\\) in the model"):
        load_weights_file(create_zoo_model("lenet5", num_classes=10), path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_file_is_a_clear_error(tmp_path, damage):
    safetensors = pytest.importorskip("safetensors.torch")
    from qat_ste.zoo import create_zoo_model

    model = create_zoo_model("lenet5", num_classes=10)
    good = tmp_path / "good.safetensors"
    safetensors.save_file(model.state_dict(), str(good))
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with pytest.raises(QatSteError) as info:
        load_weights_file(model, bad)
    assert f"cannot read weights file {bad}: not a complete .safetensors file" in str(info.value)
    assert "damaged or truncated" in info.value.fix
    assert load_weights_file(model, good) == []


def test_unsafe_objects_in_a_checkpoint_are_still_refused(tmp_path):
    from qat_ste.zoo import create_zoo_model

    model = create_zoo_model("lenet5", num_classes=10)
    path = tmp_path / "hostile.pth.tar"
    torch.save({"state_dict": model.state_dict(), "extra": torch.nn.ReLU()}, path)
    with pytest.raises(QatSteError, match="refused: weights file .* contains code/objects"):
        load_weights_file(model, path)

"""Streamed image folders: files decoded in worker processes with the model's preprocessing, the
StatefulDataLoader-based StreamLoader (order, DDP shards, exact mid-epoch resume), the corrupt-file
policy (the next readable file stands in, a warning names the bad one), flat host memory, and the
CLI on an image folder."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from qat_ste.data import (
    StreamLoader,
    load_dataset,
    make_loader,
    resolve_preprocess,
    resolve_workers,
    stream_imagefolder,
)
from qat_ste.errors import QatSteError

REPO = Path(__file__).resolve().parents[1]


def write_folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("ant", "bee", "cat"),
                 sizes: tuple[tuple[int, int], ...] = ((20, 30), (33, 17), (64, 48))) -> None:
    """JPEG and PNG files of several sizes per class, plus one greyscale, one RGBA and one palette
    file in the first class; each class has its own mean colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = (rng.integers(0, 60, (h, w, 3)) + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.{'jpg' if i % 2 else 'png'}")
    first = root / classes[0]
    Image.fromarray(rng.integers(0, 255, (25, 25), dtype=np.uint8)).save(first / "grey.png")
    Image.fromarray(rng.integers(0, 255, (18, 22, 4), dtype=np.uint8)).save(first / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (21, 21, 3), dtype=np.uint8)).convert("P").save(first / "palette.png")


def tiny_preprocess(size: int = 16):
    return resolve_preprocess(None, size, kind="torchvision")


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def assert_same(batches_a, batches_b) -> None:
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def roundtrip(state: dict) -> dict:
    """Through torch.save and a weights-only load, as a checkpoint takes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------------
# the data set
# ------------------------------------------------------------------------------------------


def test_mixed_files_are_served_in_the_models_channels_and_size(tmp_path):
    write_folder(tmp_path / "imgs")
    train = stream_imagefolder(tmp_path / "imgs", "train", tiny_preprocess(16), val_fraction=0.25)
    val = stream_imagefolder(tmp_path / "imgs", "val", tiny_preprocess(16), val_fraction=0.25)
    assert len(train) + len(val) == 3 * 6 + 3 and train.augment and not val.augment
    assert train.info.class_names == ("ant", "bee", "cat") and train.info.image_size == (16, 16)
    names = {train.path(i).name for i in range(len(train))} | {val.path(i).name for i in range(len(val))}
    assert {"grey.png", "rgba.png", "palette.png"} <= names
    for dataset in (train.with_augment(False), val):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and torch.isfinite(image).all()
            assert label == int(dataset.labels[index])
    grey = resolve_preprocess(None, 12, kind="small", channels=1)
    single = stream_imagefolder(tmp_path / "imgs", "train", grey, val_fraction=0.25)
    assert single[0][0].shape == (1, 12, 12) and single.info.channels == 1


def test_split_layout_and_folder_errors(tmp_path):
    write_folder(tmp_path / "split" / "train", per_class=2)
    write_folder(tmp_path / "split" / "val", per_class=1)
    steps = tiny_preprocess()
    assert len(stream_imagefolder(tmp_path / "split", "train", steps)) == 3 * 2 + 3
    assert len(stream_imagefolder(tmp_path / "split", "test", steps)) == 3 * 1 + 3  # test falls back to val/
    with pytest.raises(QatSteError, match="does not exist"):
        stream_imagefolder(tmp_path / "missing", "train", steps)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QatSteError, match="no class subfolders"):
        stream_imagefolder(tmp_path / "empty", "train", steps)
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "b").mkdir()
    (tmp_path / "noimages" / "a" / "notes.txt").write_text("x")
    with pytest.raises(QatSteError, match=r"class folder .*noimages.a holds no images"):
        stream_imagefolder(tmp_path / "noimages", "train", steps)
    for bad in (-1, 1.5, True):
        with pytest.raises(QatSteError, match="--workers must be a whole number >= 0"):
            resolve_workers(bad)
    assert resolve_workers(0) == 0 and 1 <= resolve_workers(None) <= 8


def test_a_corrupt_file_is_replaced_by_the_next_readable_one_with_a_warning_naming_it(tmp_path):
    write_folder(tmp_path / "imgs", per_class=4)
    (tmp_path / "imgs" / "bee" / "img1.jpg").write_bytes(b"this is not a jpeg")
    dataset = stream_imagefolder(tmp_path / "imgs", "train", tiny_preprocess(), val_fraction=0.0, augment=False)
    bad = next(i for i in range(len(dataset)) if dataset.path(i).name == "img1.jpg" and "bee" in str(dataset.path(i)))
    with pytest.warns(UserWarning, match=r"cannot read image .*bee.img1\.jpg.*next readable image") as caught:
        image, label = dataset[bad]
        dataset[bad]  # warned once per file
    assert len([w for w in caught if "img1.jpg" in str(w.message)]) == 1
    stand_in, stand_in_label = dataset[bad + 1]
    assert torch.equal(image, stand_in) and label == stand_in_label
    loader = StreamLoader(dataset, 5, workers=0)
    assert sum(1 for _ in loader) == len(loader) == 3  # 13 files, the epoch keeps its length


def test_a_corrupt_file_in_a_worker_is_named_on_stderr(tmp_path, capfd):
    write_folder(tmp_path / "imgs", per_class=3)
    (tmp_path / "imgs" / "cat" / "img0.png").write_bytes(b"\x89PNG broken")
    dataset = stream_imagefolder(tmp_path / "imgs", "train", tiny_preprocess(), val_fraction=0.0)
    loader = StreamLoader(dataset, 4, workers=2)
    assert len(collect(loader)) == len(loader) == 3
    del loader
    err = capfd.readouterr().err
    assert f"qat-ste: warning: cannot read image {tmp_path / 'imgs' / 'cat' / 'img0.png'}" in err


# ------------------------------------------------------------------------------------------
# the loader: order, workers, resume
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    write_folder(root, per_class=8)
    return root


def test_workers_do_not_change_the_batches_and_epochs_reshuffle(folder):
    dataset = stream_imagefolder(folder, "train", tiny_preprocess(), val_fraction=0.0)
    in_process = StreamLoader(dataset, 4, seed=5, workers=0)
    two_workers = StreamLoader(dataset, 4, seed=5, workers=2)
    first = collect(in_process)
    assert_same(first, collect(two_workers))
    assert in_process.epoch == 1 and in_process.batch_index == 0
    second = collect(in_process)  # epoch 1: another order and other crops
    assert not torch.equal(torch.cat([b[0] for b in first]), torch.cat([b[0] for b in second]))
    assert sorted(torch.cat([b[1] for b in first]).tolist()) == sorted(torch.cat([b[1] for b in second]).tolist())
    two_workers.set_epoch(1)
    assert_same(second, collect(two_workers))  # persistent workers, next epoch


@pytest.mark.parametrize("workers_before, workers_after", [(2, 2), (2, 0)])
def test_mid_epoch_resume_is_bit_exact(folder, workers_before, workers_after):
    dataset = stream_imagefolder(folder, "train", tiny_preprocess(), val_fraction=0.0)
    reference = StreamLoader(dataset, 4, seed=1, workers=0)
    reference.set_epoch(1)
    expected = collect(reference)
    stopped = StreamLoader(dataset, 4, seed=1, workers=workers_before)
    stopped.set_epoch(1)
    batches = iter(stopped)
    seen = [next(batches) for _ in range(3)]
    state = roundtrip(stopped.state_dict())
    assert state["batch_index"] == 3 and (state["dataloader"] is not None) == (workers_before > 0)
    del batches, stopped
    resumed = StreamLoader(dataset, 4, seed=1, workers=workers_after)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what the training loop calls: the position is kept
    assert_same(seen, expected[:3])
    assert_same(collect(resumed), expected[3:])
    assert (resumed.epoch, resumed.batch_index) == (2, 0)
    with pytest.raises(QatSteError, match="batch_size=4, this loader has batch_size=3"):
        StreamLoader(dataset, 3, seed=1, workers=0).load_state_dict(state)


def test_train_stopped_mid_epoch_resumes_to_identical_weights(folder, tmp_path):
    from qat_ste.train import TrainConfig, train

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def config(out: Path, **extra) -> TrainConfig:
        return TrainConfig(epochs=2, batch_size=6, lr=0.05, device="cpu", out_dir=str(out), workers=2,
                           progress=False, print_summary=False, plot=False, **extra)

    train_set = stream_imagefolder(folder, "train", tiny_preprocess(), val_fraction=0.25)
    val_set = stream_imagefolder(folder, "val", tiny_preprocess(), val_fraction=0.25)
    full = model()
    result = train(full, train_set, val_set, config(tmp_path / "full"))
    assert result.steps == 2 * 4 and result.final_val_accuracy is not None
    stopped = model()
    assert train(stopped, train_set, val_set, config(tmp_path / "cut", stop_after_steps=6)).stopped_early
    resumed = model()
    train(resumed, train_set, val_set, config(tmp_path / "cut", resume=True))
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------
# DDP: each rank its shard
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shard_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from qat_ste.train import TrainConfig
    from qat_ste.train.distributed import setup_distributed, teardown_distributed
    from qat_ste.train.setup import as_train_loader

    info = setup_distributed(torch.device("cpu"))
    try:
        dataset = stream_imagefolder(root, "train", tiny_preprocess(), val_fraction=0.0, augment=False)
        loader = as_train_loader(dataset, TrainConfig(batch_size=3, seed=2, workers=2, device="cpu"), info,
                                 torch.device("cpu"))
        record = {}
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            images = torch.cat([x for x, _ in loader])
            indices = loader.sampler.indices(epoch)
            expected, _ = dataset.get_batch(indices)
            record[epoch] = {"indices": indices.tolist(), "delivered_match": bool(torch.equal(images, expected))}
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": loader.rank, "world": loader.world_size,
                                                             "epochs": record}))
    finally:
        teardown_distributed(info)


@pytest.mark.slow
def test_two_gloo_ranks_read_disjoint_complete_shards(folder, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert name not in os.environ, "run the test suite outside torchrun"
    # forked, not spawned: the ranks need no fresh interpreter (and start in a fraction of the time)
    mp.start_processes(_shard_worker, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n = len(stream_imagefolder(folder, "train", tiny_preprocess(), val_fraction=0.0))
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    orders = []
    for epoch in ("0", "1"):
        shards = [r["epochs"][epoch]["indices"] for r in ranks]
        assert all(r["epochs"][epoch]["delivered_match"] for r in ranks)
        # 27 files: 14 per rank, the permutation padded by repeating its first position
        assert n == 27 and len(shards[0]) == len(shards[1]) == 14
        assert set(shards[0]) | set(shards[1]) == set(range(n)) and len(set(shards[0]) & set(shards[1])) == 1
        assert len(set(shards[0])) == len(set(shards[1])) == 14  # no file twice within a rank
        orders.append(shards[0])
    assert orders[0] != orders[1]  # set_epoch reshuffles


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------

_RSS_SCRIPT = r"""
import json, sys, torch
from qat_ste.data import StreamLoader, resolve_preprocess, stream_imagefolder

def peak_kib(pid="self"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

torch.set_num_threads(1)
steps = resolve_preprocess(None, 96, kind="torchvision")
dataset = stream_imagefolder(sys.argv[1], "train", steps, val_fraction=0.0)
loader = StreamLoader(dataset, 50, workers=2)
count = 0
for images, _ in loader:
    count += images.shape[0]
workers = [peak_kib(w.pid) for w in loader._loader._iterator._workers]
print(json.dumps({"main": peak_kib(), "workers": max(workers), "count": count}))
"""


def _write_tiny_pngs(root: Path, total: int) -> None:
    from PIL import Image

    pixels = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(total // 4):
            pixels.save(root / f"c{c}" / f"{i:05d}.png")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_peak_host_memory_does_not_grow_with_the_number_of_files(tmp_path):
    """200 and 2000 tiny files served at 96 px: a decoded cache of the larger set would hold 2000 x
    3 x 96 x 96 bytes = 55 MB (4x that as float); the peaks of the main process and of the workers
    may differ by at most 20 MB (batches in flight are the same for both)."""
    peaks = {}
    for total in (200, 2000):
        _write_tiny_pngs(tmp_path / str(total), total)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / str(total))], capture_output=True,
                             text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[total] = json.loads(run.stdout.strip().splitlines()[-1])
        assert peaks[total]["count"] == total
    for process in ("main", "workers"):
        grown_mib = (peaks[2000][process] - peaks[200][process]) / 1024
        assert grown_mib < 20, f"{process}: peak RSS grew {grown_mib:.1f} MiB ({peaks})"


# ------------------------------------------------------------------------------------------
# model-aware preprocessing
# ------------------------------------------------------------------------------------------


def test_a_timm_model_gets_its_pretrained_data_config(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    from qat_ste.train.build import default_image_size, parse_model_spec

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    expected = resolve_data_config(model=model)
    steps = resolve_preprocess(model)
    assert steps.kind == "timm" and steps.size == expected["input_size"][-1]
    assert steps.mean == tuple(expected["mean"]) and steps.std == tuple(expected["std"])
    assert steps.interpolation == expected["interpolation"] and steps.crop_pct == expected["crop_pct"]
    assert type(steps.train.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    assert default_image_size(parse_model_spec("timm:resnet18"), f"imagefolder:{tmp_path}") == steps.size
    write_folder(tmp_path / "imgs", per_class=1)
    dataset = stream_imagefolder(tmp_path / "imgs", "val", steps, val_fraction=0.5)
    image, _ = dataset[0]
    assert image.shape == (3, steps.size, steps.size)
    assert f"timm preprocessing {steps.size} px {expected['interpolation']} crop_pct {expected['crop_pct']:g}" \
        == steps.describe()
    assert resolve_preprocess(model, 64).size == 64  # an explicit side wins


def test_torchvision_weights_transforms_by_name():
    from torchvision.transforms._presets import ImageClassification

    steps = resolve_preprocess(None, None, "ResNet18_Weights.IMAGENET1K_V1")
    assert isinstance(steps.eval, ImageClassification)
    assert (steps.size, steps.eval.crop_size, steps.eval.resize_size) == (224, [224], [256])
    assert steps.mean == (0.485, 0.456, 0.406) and steps.source == "ResNet18_Weights.IMAGENET1K_V1"
    small = resolve_preprocess(None, 64, "ResNet18_Weights.IMAGENET1K_V1")
    assert (small.size, small.eval.crop_size, small.eval.resize_size) == (64, [64], [73])
    vit = resolve_preprocess(None, None, "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1")
    assert vit.size == 384 and vit.interpolation == "bicubic"
    plain = resolve_preprocess(nn.Conv2d(3, 3, 1), 224)  # a torchvision-like model without weights named
    assert plain.kind == "torchvision" and [type(t).__name__ for t in plain.eval.transforms][:2] == \
        ["Resize", "CenterCrop"] and plain.eval.transforms[0].size == 256
    for bad in ("ResNet18_Weights.NOPE", "NoSuchWeights.X", "resnet18"):
        with pytest.raises(QatSteError, match="is not a torchvision weights name"):
            resolve_preprocess(None, None, bad)


def test_make_loader_keeps_the_in_memory_path_for_tensor_data():
    from qat_ste.data import TensorLoader

    digits = load_dataset("digits", "train")
    assert isinstance(make_loader(digits, 32), TensorLoader)


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------


def _cli_folder(root: Path, per_class: int, size: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, count in (("train", per_class), ("val", max(2, per_class // 3))):
        for c, name in enumerate(("cat", "dog", "eel")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (rng.integers(0, 50, (size, size, 3)) + 70 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


@pytest.mark.slow
def test_convert_streams_an_image_folder_and_resumes(tmp_path, capsys):
    from qat_ste.cli import main

    data = _cli_folder(tmp_path / "data", 12, 64)
    out = tmp_path / "run"
    argv = ["convert", "--model", "torchvision:resnet18", "--data", f"imagefolder:{data}", "--image-size", "64",
            "--float-epochs", "0", "--epochs", "1", "--workers", "2", "--no-export", "--batch-size", "8",
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (f"data: imagefolder:{data} streamed from 48 files (36 train / 12 val images), 2 worker(s), "
            "torchvision preprocessing 64 px bilinear crop_pct 0.875, 3 classes") in printed
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["train_images"] == 36 and report["data"]["image_size"] == [64, 64]
    from qat_ste.train import load_checkpoint

    saved = load_checkpoint(out / "qat" / "last.pt")
    assert saved["metadata"]["preprocess"] == "auto" and saved["step"] == 5
    assert main(argv[:-1] + [str(out), "--resume"]) == 0  # a finished run resumes to the same end


def test_convert_refuses_bad_workers_and_missing_folders(tmp_path, capsys):
    from qat_ste.cli import main

    data = _cli_folder(tmp_path / "data", 2, 16)
    base = ["convert", "--model", "zoo:lenet5", "--float-epochs", "0", "--epochs", "0", "--no-export",
            "--out", str(tmp_path / "out")]
    assert main([*base, "--data", f"imagefolder:{data}", "--workers", "-1"]) == 2
    err = capsys.readouterr().err  # refused by the settings check or by the data layer, before any work
    assert err.startswith("qat-ste: error: ") and "workers" in err and "-1" in err and ">= 0" in err
    assert main([*base, "--data", f"imagefolder:{tmp_path / 'nowhere'}"]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_export_and_check_read_an_image_folder_run(tmp_path, capsys):
    """convert on an image folder with a zoo model (its small size, no crop), then export and check
    from the checkpoint: the example input and the validation batches come from the streamed val set."""
    pytest.importorskip("onnxruntime")
    from qat_ste.cli import main

    data = _cli_folder(tmp_path / "data", 6, 20)
    out = tmp_path / "run"
    assert main(["convert", "--model", "zoo:lenet5", "--data", f"imagefolder:{data}", "--float-epochs", "0",
                 "--epochs", "1", "--workers", "1", "--batch-size", "6", "--calib-batches", "1", "--check-samples",
                 "6", "--no-latency", "--no-progress", "--out", str(out)]) == 0
    assert "small preprocessing 28 px bilinear no crop" in capsys.readouterr().out
    target = tmp_path / "again.onnx"
    assert main(["export", "--checkpoint", str(out / "qat" / "last.pt"), "--out", str(target)]) == 0
    capsys.readouterr()
    code = main(["check", "--onnx", str(target), "--checkpoint", str(out / "qat" / "last.pt"), "--json",
                 "--check-samples", "6", "--no-latency"])
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 6 and report["site_parity"] == 1.0 and code == (0 if report["ok"] else 1)


def test_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_run(folder, tmp_path):
    import signal

    from helpers import SignalAt

    from qat_ste.train import TrainConfig, train

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))

    def config(out: Path, **extra) -> TrainConfig:
        return TrainConfig(epochs=1, batch_size=5, lr=0.05, device="cpu", out_dir=str(out), workers=2,
                           progress=False, print_summary=False, plot=False, **extra)

    train_set = stream_imagefolder(folder, "train", tiny_preprocess(), val_fraction=0.0)
    full = model()
    train(full, train_set, None, config(tmp_path / "full"))
    stopped = train(SignalAt(model(), 3, signal.SIGTERM), train_set, None, config(tmp_path / "cut"))
    assert stopped.stop_reason == "SIGTERM" and stopped.steps == 3
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["loader"]["batch_index"] == 3 and saved["loader"]["dataloader"] is not None
    resumed = SignalAt(model(), -1)
    train(resumed, train_set, None, config(tmp_path / "cut", resume=True))
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.inner.state_dict()[key], value), key


def test_resume_refuses_another_preprocessing_of_a_streamed_folder(tmp_path):
    from qat_ste.train import TrainConfig
    from qat_ste.train.run_state import check_resume_metadata

    saved = {"model": "torchvision:resnet18", "data": "imagefolder:x", "preprocess": "auto"}
    now = {**saved, "preprocess": "ResNet18_Weights.IMAGENET1K_V1"}
    with pytest.raises(QatSteError, match="preprocess: 'auto' -> 'ResNet18_Weights.IMAGENET1K_V1'"):
        check_resume_metadata(saved, now, TrainConfig(), tmp_path / "last.pt")
    check_resume_metadata({k: v for k, v in saved.items() if k != "preprocess"}, now, TrainConfig(), None)


def test_sigterm_to_the_whole_process_group_stops_in_order(tmp_path):
    """A scheduler (SLURM, Kubernetes) signals every process of the job, the loader's workers too: the
    workers must leave the signal to the main process, which finishes its step and saves last.pt
    (exit 143), instead of dying and ending the run with a "worker killed" error."""
    import signal
    import time

    data = _cli_folder(tmp_path / "data", 12, 28)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "qat_ste.cli", "convert", "--model", "zoo:lenet5", "--data", f"imagefolder:{data}",
            "--image-size", "28", "--float-epochs", "0", "--epochs", "50", "--workers", "2", "--batch-size", "2",
            "--checkpoint-every", "1", "--no-export", "--no-progress", "--threads", "1", "--out", str(out)]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "qat" / "last.pt").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, run.communicate()[0]
        os.killpg(run.pid, signal.SIGTERM)
        printed = run.communicate(timeout=120)[0]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143, printed
    assert "stopped (SIGTERM)" in printed and "internal error" not in printed, printed

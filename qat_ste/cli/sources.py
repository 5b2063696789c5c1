"""Models and data for the commands: from a convert checkpoint or from --model/--data, and the ONNX check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import QatSteError
from .parser import DEFAULT_DATA, DEFAULT_MODEL, check_threshold_options
from .quant_options import _quant_config, quant_from_plain

CONVERT_FORMAT = "qat_ste.convert/1"


def _load_data(spec: str, image_size: int, seed: int) -> tuple[Any, Any]:
    """The (train, val) sets of ``spec`` held in memory."""
    from ..data.sources import load_dataset, parse_dataset_spec
    from ..train.build import data_options

    parse_dataset_spec(spec)
    options = data_options(spec, image_size)
    return load_dataset(spec, "train", **options), load_dataset(spec, "val", **options)


def _streamed_folder(spec: str) -> Path | None:
    """The folder of an ``imagefolder:`` spec (streamed from its files, with the model's
    preprocessing), None for the data sets held in memory."""
    from ..data.sources import parse_dataset_spec

    name, folder = parse_dataset_spec(spec)
    return folder if name == "imagefolder" else None


def _data_shape(spec: str, image_size: int, seed: int) -> tuple[int, int, tuple[Any, Any] | None]:
    """(classes, channels, the loaded (train, val) sets or None): what the model is built for. A
    streamed folder's classes are its subfolders, read without opening an image; its sets are
    made once the model (and so its preprocessing) exists, by :func:`_stream_data`."""
    folder = _streamed_folder(spec)
    if folder is not None:
        from ..data.folders import imagefolder_classes

        return len(imagefolder_classes(folder)), 3, None
    train_set, val_set = _load_data(spec, image_size, seed)
    return train_set.info.num_classes, train_set.info.channels, (train_set, val_set)


def _stream_data(spec: str, model: Any, image_size: int, preprocess: str, workers: int | None
                 ) -> tuple[Any, Any]:
    """The (train, val) sets of a streamed image folder with ``model``'s preprocessing."""
    from ..data.loaders import resolve_workers
    from ..data.stream import stream_imagefolder
    from ..data.transforms import resolve_preprocess

    folder = _streamed_folder(spec)
    if folder is None:
        raise QatSteError(f"--data {spec} is not an image folder", "stream only imagefolder:FOLDER data")
    count = resolve_workers(workers)
    steps = resolve_preprocess(model, image_size, preprocess)
    return (stream_imagefolder(folder, "train", steps, workers=count),
            stream_imagefolder(folder, "val", steps, workers=count))


def _data_line(spec: str, train_set: Any, val_set: Any) -> str:
    """The log line saying which data path a run takes."""
    info = train_set.info
    sizes = f"{len(train_set)} train / {len(val_set)} val images"
    if hasattr(train_set, "preprocess"):
        return (f"data: {spec} streamed from {len(train_set) + len(val_set)} files ({sizes}), "
                f"{train_set.workers} worker(s), {train_set.preprocess.describe()}, {info.num_classes} classes")
    return (f"data: {spec}: {sizes} in memory, {info.channels}x{info.image_size[0]}x{info.image_size[1]}, "
            f"{info.num_classes} classes")


def _resolve_model_and_data(args: argparse.Namespace, metadata: dict[str, Any] | None = None
                            ) -> tuple[Any, str, int]:
    from ..train.build import default_image_size, parse_model_spec

    model_text = args.model or (metadata or {}).get("model") or DEFAULT_MODEL
    spec = parse_model_spec(model_text)
    data = args.data or (metadata or {}).get("data") or DEFAULT_DATA
    image_size = args.image_size
    if image_size is None:
        saved = (metadata or {}).get("image_size")
        preprocess = str((metadata or {}).get("preprocess") or getattr(args, "preprocess", "auto"))
        image_size = int(saved[0]) if saved else default_image_size(spec, data, preprocess)
    return spec, data, int(image_size)


def _example_input(dataset: Any) -> Any:
    import torch

    images, _ = dataset.get_batch(torch.arange(1))
    return images


def _val_batches(dataset: Any, samples: int, batch_size: int = 128) -> tuple[list[Any], list[Any]]:
    import torch

    count = min(int(samples), len(dataset))
    inputs, labels = [], []
    for start in range(0, count, batch_size):
        images, targets = dataset.get_batch(torch.arange(start, min(start + batch_size, count)))
        inputs.append(images)
        labels.append(targets)
    return inputs, labels


def _metadata(spec: Any, data: str, info: Any, stage: str, quant: Any | None,
              calibration: dict[str, Any] | None = None, preprocess: str | None = None) -> dict[str, Any]:
    """What a checkpoint records about the run: the model, the data, the whole QuantConfig (plain
    values) and the calibration; resume refuses a change to any of it (unless --force-resume).
    A streamed folder's run also records its --preprocess (export/check rebuild the same)."""
    metadata = {
        "kind": CONVERT_FORMAT, "stage": stage, "model": str(spec), "data": data,
        "num_classes": info.num_classes, "in_channels": info.channels, "image_size": list(info.image_size),
        "quant": None if quant is None else quant.to_dict(), "calibration": calibration,
        "title": f"{spec} on {data} ({stage})",
    }
    if preprocess is not None:
        metadata["preprocess"] = preprocess
    return metadata


def _quantize(model: Any, quant: Any, example: Any) -> Any:
    import qat_ste

    return qat_ste.quantize(model, config=quant, example_input=example)


def _calibrate(qmodel: Any, train_set: Any, method: str, batches: int, batch_size: int, seed: int) -> None:
    import qat_ste

    from ..data.loaders import make_loader

    device = next((p.device for p in qmodel.parameters()), None)
    loader = make_loader(train_set.with_augment(False), batch_size, shuffle=True, seed=seed + 7919, device=device,
                         persistent=False)
    qat_ste.calibrate(qmodel, loader, method, num_batches=batches)


def _model_from_checkpoint(path: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any, Any]:
    """(quantized model with the checkpoint's weights, its metadata, train set, val set)."""
    from ..train.build import build_model
    from ..train.checkpoint import load_checkpoint, load_model_state
    from ..train.ema import checkpoint_weights

    state = load_checkpoint(path)
    meta = state.get("metadata") or {}
    if meta.get("kind") != CONVERT_FORMAT:
        raise QatSteError(f"{path} has no model description (it was not written by qat-ste convert)",
                          "export it from Python with qat_ste.export.export_onnx(model, path, example_input)")
    if meta.get("stage") != "qat" or not meta.get("quant"):
        raise QatSteError(f"{path} is the float pre-training checkpoint", "pass OUT/qat/last.pt or OUT/qat/best.pt")
    spec, data, image_size = _resolve_model_and_data(args, meta)
    if args.model and str(spec) != meta["model"]:
        raise QatSteError(f"--model {args.model} differs from the checkpoint's model {meta['model']}",
                          "leave --model out when passing --checkpoint")
    classes, channels, loaded = _data_shape(data, image_size, args.seed)
    if (classes, channels) != (meta["num_classes"], meta["in_channels"]):
        raise QatSteError(f"--data {data} has {classes} classes and {channels} "
                          f"channel(s); the checkpoint's model expects {meta['num_classes']} and {meta['in_channels']}",
                          f"use data like the checkpoint's ({meta['data']})")
    model = build_model(spec, meta["num_classes"], meta["in_channels"], image_size)
    train_set, val_set = loaded or _stream_data(data, model, image_size, meta.get("preprocess") or "auto",
                                                getattr(args, "workers", None))
    # the kernel it trained with may not run here (triton on a CPU-only machine): export/check pick their own
    qmodel = _quantize(model, quant_from_plain(meta["quant"]).with_kernel("auto"), _example_input(val_set))
    # a run with weight EMA evaluated (and chose best.pt by) its EMA weights: those are the model
    load_model_state(qmodel, checkpoint_weights(state), f"checkpoint {path}",
                     "pass a checkpoint written by qat-ste convert")
    qmodel.eval()
    return qmodel, meta, train_set, val_set


def _model_from_arguments(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """A --model quantized and calibrated on --data (post-training quantization)."""
    from ..train.build import build_model, load_weights_file
    from ..train.setup import seed_everything

    quant = _quant_config(args)
    spec, data, image_size = _resolve_model_and_data(args)
    seed_everything(args.seed)  # before anything random: data, then the model's initialization
    classes, channels, loaded = _data_shape(data, image_size, args.seed)
    seed_everything(args.seed)
    model = build_model(spec, classes, channels, image_size)
    if args.model_weights:
        load_weights_file(model, args.model_weights, allow_partial=args.allow_partial,
                          on_partial=lambda message: print(f"qat-ste: warning: {message}", file=sys.stderr))
    train_set, val_set = loaded or _stream_data(data, model, image_size, getattr(args, "preprocess", "auto"),
                                                getattr(args, "workers", None))
    qmodel = _quantize(model, quant, _example_input(val_set))
    _calibrate(qmodel, train_set, args.calib_method, args.calib_batches, 64, args.seed)
    qmodel.eval()
    return qmodel, train_set, val_set


def _source_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    if args.checkpoint:
        qmodel, _, train_set, val_set = _model_from_checkpoint(args.checkpoint, args)
        return qmodel, train_set, val_set
    return _model_from_arguments(args)


def _run_check(qmodel: Any, onnx_path: Path, val_set: Any, args: argparse.Namespace) -> Any:
    from ..export import check_onnx

    inputs, labels = _val_batches(val_set, args.check_samples)
    return check_onnx(qmodel, onnx_path, inputs, labels, **check_threshold_options(args), latency=not args.no_latency)

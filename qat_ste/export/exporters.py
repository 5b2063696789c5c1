"""The exporter chain behind export_onnx(): torch.export/dynamo first, then the TorchScript exporter,
each also with timm's fused attention switched off where the model has it.

Paths, in the order tried (the first that succeeds writes the file; its name is recorded):

- ``"dynamo"``: ``torch.onnx.export(dynamo=True)``, the quantizer op lowered through the
  ``custom_translation_table`` (node metadata tags each site).
- ``"dynamo, timm fused attention off"``: the same with every module's ``fused_attn`` flag (timm's
  attention blocks) set to False, so attention exports as MatMul/Softmax instead of
  ``scaled_dot_product_attention``; only tried when the model has such a flag set.
- ``"torchscript"``: ``torch.onnx.export(dynamo=False)`` (the TorchScript-based exporter, for models
  torch.export cannot capture, e.g. data-dependent shape guards in detection models). The quantizer
  op goes through a registered symbolic that emits QuantizeLinear(uint8) -> Clip -> DequantizeLinear
  with a ``qat_ste::Site`` marker node carrying the site index (this exporter writes no node
  metadata); :func:`qat_ste.export.passes.resolve_markers` turns the markers into the same node
  metadata the dynamo path writes and removes them.
- ``"torchscript, timm fused attention off"``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import QatSteError

DYNAMO = "dynamo"
TORCHSCRIPT = "torchscript"
NO_FUSED_ATTENTION = "timm fused attention off"
#: every path, in the order tried
PATHS = (DYNAMO, f"{DYNAMO}, {NO_FUSED_ATTENTION}", TORCHSCRIPT, f"{TORCHSCRIPT}, {NO_FUSED_ATTENTION}")
#: custom domain of the TorchScript path's marker nodes (removed before the file is written)
MARKER_DOMAIN = "qat_ste"


def fused_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with a ``fused_attn`` flag set (timm's attention blocks)."""
    return [m for m in model.modules() if getattr(m, "fused_attn", None) is True]


@contextlib.contextmanager
def fused_attention_off(model: nn.Module) -> Iterator[None]:
    """Within the block every ``fused_attn`` flag of ``model`` is False (and timm's global default,
    when timm is already imported); restored on exit. timm is never imported here."""
    modules = fused_attention_modules(model)
    timm_config = sys.modules.get("timm.layers.config")
    saved = getattr(timm_config, "_USE_FUSED_ATTN", None) if timm_config is not None else None
    try:
        for m in modules:
            m.fused_attn = False  # type: ignore[assignment]
        if timm_config is not None and saved is not None:
            timm_config._USE_FUSED_ATTN = 0  # type: ignore[attr-defined]
        yield
    finally:
        for m in modules:
            m.fused_attn = True  # type: ignore[assignment]
        if timm_config is not None and saved is not None:
            timm_config._USE_FUSED_ATTN = saved  # type: ignore[attr-defined]


def _input_names(model: nn.Module, count: int) -> list[str]:
    """The forward's positional parameter names for ``count`` inputs (``input_{i}`` past them)."""
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _dynamo(model: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int, dynamic_batch: bool,
            weight_shapes: Mapping[int, tuple[int, ...]]) -> Any:
    from .ops import translation_table

    dynamic_shapes = None
    if dynamic_batch:  # torch.export specialises a batch of 1: trace a dynamic batch with 2 rows
        inputs = tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 else None for t in inputs)
    program = torch.onnx.export(
        model, inputs, dynamo=True, opset_version=opset, optimize=True, verbose=False,
        custom_translation_table=translation_table(), dynamic_shapes=dynamic_shapes)
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    return program.model_proto


def _torchscript(model: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int, dynamic_batch: bool,
                 weight_shapes: Mapping[int, tuple[int, ...]], required_opset: int = 0) -> Any:
    """The TorchScript exporter writes opsets up to 20: a file that needs a newer one (``required_opset``:
    spec's UINT4/UINT2 codes) goes through onnx's version converter; any other stays at the exporter's
    opset, as the converter breaks some graphs (torchvision's FCOS: a Reshape of no detections fails)."""
    import onnx

    from .ops import register_legacy_symbolics

    register_legacy_symbolics(weight_shapes)
    opset = min(opset, _torchscript_max_opset())
    requested = max(opset, required_opset)
    names = _input_names(model, len(inputs))
    axes = {n: {0: "batch"} for n, t in zip(names, inputs, strict=True) if t.dim() > 0} if dynamic_batch else None
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings
        target = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, inputs, target, dynamo=False, opset_version=opset, input_names=names,
                          dynamic_axes=axes, do_constant_folding=True, custom_opsets={MARKER_DOMAIN: 1},
                          training=torch.onnx.TrainingMode.EVAL)
        # a model over 2 GiB comes with its weights in files next to it (torch decides): loaded with them
        proto = onnx.load(target, load_external_data=True)
    _name_outputs(proto)
    return proto if opset == requested else _convert_opset(proto, requested)


def _torchscript_max_opset() -> int:
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


def _convert_opset(proto: Any, opset: int) -> Any:
    """``proto`` (from an older opset) converted to ``opset`` by onnx's version converter, with the
    site / weight index metadata kept (the converter drops node metadata; node names survive)."""
    from onnx import version_converter

    from .ops import SITE_INDEX_KEY, WEIGHT_INDEX_KEY
    from .passes import resolve_markers

    detached = detach_large_tensors(proto)  # the converter takes one serialized protobuf (< 2 GiB)
    resolve_markers(proto)
    keys = (SITE_INDEX_KEY, WEIGHT_INDEX_KEY)
    for n in proto.graph.node:
        tags = {p.key: p.value for p in n.metadata_props if p.key in keys}
        if tags:
            key, value = next(iter(tags.items()))
            n.name = f"{key}={value}"
    try:
        converted = version_converter.convert_version(proto, opset)
    finally:
        attach_tensors(proto, detached)
    attach_tensors(converted, detached)
    for n in converted.graph.node:
        key, _, value = n.name.partition("=")
        if key in keys and value:
            entry = n.metadata_props.add()
            entry.key, entry.value = key, value
    return converted


#: detach_large_tensors() moves out tensors of at least this many bytes
DETACH_THRESHOLD = 2**16
#: the location a detached tensor points at (no such file: the tensor's data is held in memory)
DETACHED = "qat_ste-detached"


def detach_large_tensors(proto: Any, threshold: int | None = None) -> dict[str, bytes]:
    """Move the raw data of every main-graph initializer of >= ``threshold`` bytes (default
    :data:`DETACH_THRESHOLD`) out of ``proto``, leaving each marked as external data at :data:`DETACHED`;
    returns {name: data} for :func:`attach_tensors`. onnx's passes that serialize the model (the
    version converter) then work on models over protobuf's 2 GiB and carry such tensors through untouched."""
    from onnx.external_data_helper import set_external_data

    least = DETACH_THRESHOLD if threshold is None else threshold
    detached: dict[str, bytes] = {}
    for tensor in proto.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= least:
            detached[tensor.name] = tensor.raw_data
            set_external_data(tensor, DETACHED, 0, len(detached[tensor.name]))
            tensor.ClearField("raw_data")
    return detached


def attach_tensors(proto: Any, detached: Mapping[str, bytes]) -> None:
    """Give the initializers :func:`detach_large_tensors` moved out their data back (by name)."""
    from onnx import TensorProto

    for tensor in proto.graph.initializer:
        if tensor.name in detached and tensor.data_location == TensorProto.EXTERNAL and any(
                e.key == "location" and e.value == DETACHED for e in tensor.external_data):
            tensor.raw_data = detached[tensor.name]
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


def _name_outputs(proto: Any) -> None:
    """The TorchScript exporter numbers its outputs ("48"): name them ``output`` / ``output_{i}``."""
    from .passes import rename_tensor

    outputs = [o.name for o in proto.graph.output]
    taken = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer}
    for i, name in enumerate(outputs):
        new = "output" if len(outputs) == 1 else f"output_{i}"
        if name.isdigit() and new not in taken:
            rename_tensor(proto.graph, name, new)


def has_dynamic_batch(proto: Any) -> bool:
    """Whether the first axis of every graph input with one is symbolic (a dynamic batch)."""
    dims = [i.type.tensor_type.shape.dim for i in proto.graph.input]
    return all(d[0].dim_param and not d[0].HasField("dim_value") for d in dims if len(d) > 0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # torch.export's wrapper puts the real exception under "## Exception summary"
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1][:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def run_chain(model: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int, dynamic_batch: bool,
              routing: Callable[[], contextlib.AbstractContextManager],
              weight_shapes: Mapping[int, tuple[int, ...]] | None = None,
              required_opset: int = 0) -> tuple[Any, str, list[str]]:
    """Export with the first path of :data:`PATHS` that succeeds, each run inside ``routing()``;
    ``weight_shapes``: {layer index: weight shape} of the quantized-weight layers routed; ``opset``
    is asked for, ``required_opset`` is the lowest the file's types need (the TorchScript path stays
    below ``opset`` where it may, see :func:`_torchscript`).
    Returns (the ONNX ModelProto, the path's name, notes on the paths that failed before it).
    Raises QatSteError naming every path's error when all fail."""
    attention = bool(fused_attention_modules(model))
    errors: list[str] = []
    for path in PATHS:
        if NO_FUSED_ATTENTION in path and not attention:
            continue
        export = _dynamo if path.startswith(DYNAMO) else functools.partial(_torchscript, required_opset=required_opset)
        try:
            with contextlib.ExitStack() as stack:
                if NO_FUSED_ATTENTION in path:
                    stack.enter_context(fused_attention_off(model))
                stack.enter_context(routing())
                proto = export(model, inputs, opset, dynamic_batch, weight_shapes or {})
                fixed = dynamic_batch and not has_dynamic_batch(proto)
                if fixed:  # the exporter specialised the batch: export the example input's batch instead
                    proto = export(model, inputs, opset, False, weight_shapes or {})
        except Exception as e:  # noqa: BLE001 - any exporter failure moves on to the next path
            errors.append(f"{path}: {type(e).__name__}: {_first_line(e)}")
            continue
        notes = [f"exported by the {path} path; earlier paths failed: " + "; ".join(errors)] if errors else []
        if fixed:
            batch = ", ".join(str(t.shape[0]) for t in inputs if t.dim() > 0)
            notes.append(f"the {path} path fixed the batch size (the model's code specialises it): the file "
                         f"takes the example input's batch ({batch}) only")
        if path.startswith(TORCHSCRIPT):
            batch = ", ".join(str(t.shape[0]) for t in inputs if t.dim() > 0)
            notes.append("the TorchScript exporter records Python control flow and data-dependent values as "
                         f"the example input (batch {batch}) took them, loops over the batch included; "
                         "check the file at the batch sizes it will see")
        return proto, path, notes
    fix = ("pass dynamic_batch=False if the model fixes its batch size; if the float model fails the same "
           "way (qat_ste.export.export_float_onnx), the model cannot be exported by torch; otherwise report it")
    raise QatSteError("every ONNX exporter failed: " + " | ".join(errors), fix)

"""export_onnx(): a quantized model to an ONNX file with one QuantizeLinear -> DequantizeLinear per site.

Forms:

- ``deploy``: uint8 code tensors, limited to [0, 2^b - 1] by an integer Clip between Q and DQ when
  b < 8. With ``weights="int8"`` (per-channel symmetric int8 weights, int32 biases) ONNX Runtime's
  CPU provider fuses DQ -> Conv -> Q into QLinearConv (and Gemm/MatMul into QGemm/QLinearMatMul)
  with its default session options; the integer Clip does not stop that fusion (a float Clip
  before Q does). BatchNorm is folded into the convolutions by the exporter's optimizer.
- ``spec``: each site's codes in the narrowest standard type: UINT2 for 1-2 bits (opset 25),
  UINT4 for 3-4 bits (opset 21), uint8 + Clip above. Bit-identical to ``deploy``; ONNX Runtime
  loads it only with the session config entry ``session.disable_quant_qdq = 1`` (its QDQ fusions
  take no 4-bit types), which the file's metadata records.

Ceil rounding is exported exactly as Div -> Ceil -> QuantizeLinear(scale 1) -> DequantizeLinear(alpha);
those sites cannot fuse into the preceding integer op.

Layers with quantized weights (``weight_bits``: binary, ternary, b-bit) always export their own
integer codes and scale, whatever ``weight_format`` says (it applies to the float layers):
``LAYER/weight_codes`` (int8 initializer holding the spec's values; INT4 / INT2 in ``spec`` where the
values fit and the opset has the type) -> ``DequantizeLinear(codes, LAYER/weight_scale[, axis=0]
per channel)`` -> the float Conv / Gemm / MatMul. codes x scale in float32 is PyTorch's Q(w) bit for
bit. BatchNorm after such a layer stays a separate node (folding it would change the weight).

A model over protobuf's 2 GiB (torchvision's vit_h_14, regnet_y_128gf) is written with its tensors in an
external data file next to the .onnx (``model.onnx.data``, see ``export_onnx(external_data=...)``);
check_onnx() and both runtimes read it from there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..atomic import atomic_write_bytes
from ..errors import QatSteError
from ..quantizer.module import QuantAct, channel_axis_of
from ..validation import check_choice
from .exporters import has_dynamic_batch, run_chain
from .ops import (
    RoutedSite,
    WeightLayer,
    export_routing,
    float_activation,
    quant_sites,
    reference_codes,
    weight_layers,
    weight_routing,
)

FORMS = ("deploy", "spec")
WEIGHT_FORMATS = ("float", "int8")
#: opsets the export supports: the torch exporter implements >= 18 (lower ones go through a converter
#: that drops the node metadata the site search needs); 25 is the newest ORT 1.31 runs (UINT2)
SUPPORTED_OPSETS = tuple(range(18, 26))
DEFAULT_OPSET = 21
#: ONNX Runtime 1.31 refuses newer IR versions
MAX_IR_VERSION = 13
METADATA_KEY = "qat_ste"
#: the format of that metadata; /2 renamed "weights" to "weight_format" and a site's "scale" to "step"
METADATA_FORMAT = "qat_ste.onnx/2"
#: session config entry that stops ONNX Runtime from re-quantizing float weights next to Q/DQ and
#: from trying (and failing) to fuse 4-bit Q/DQ
DISABLE_QDQ = {"session.disable_quant_qdq": "1"}


@dataclass(frozen=True)
class SiteInfo:
    """One quantized site as written to the file."""

    name: str
    index: int
    kind: str
    bits: int
    container: str              # "uint8", "uint4" or "uint2"
    range_limit: str            # "none", "integer_clip" (Clip on uint8 codes) or "float_limit" (before Q)
    step: tuple[float, ...]     # the step alpha (one value, or one per channel): Q/DQ's scale
    zero_point: tuple[int, ...]
    axis: int | None            # the channel axis when per-channel
    rounding: str
    quantizes_input: bool       # ReLU family: the quantizer replaces the whole activation
    input: str                  # tensor the quantizer reads (u)
    codes: str                  # the integer code tensor
    output: str                 # the dequantized tensor
    occurrences: int = 1        # times the site appears in the graph (a module called more than once)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WeightInfo:
    """One layer with quantized weights as written to the file: int codes -> DequantizeLinear -> the layer."""

    name: str
    spec: str                     # "binary", "ternary", "int{b}"
    allowed_codes: tuple[int, ...]
    container: str                # "int8" (default), "int4" or "int2" (form="spec")
    shape: tuple[int, ...]
    axis: int | None              # 0 when one scale per output channel
    scale: tuple[float, ...]      # DequantizeLinear's scale (one value, or one per output channel)
    distinct_codes: tuple[int, ...]  # the codes present in the file
    codes: str                    # initializer of the integer codes
    scale_tensor: str             # initializer of the scale
    output: str                   # the dequantized weight the layer reads
    consumers: tuple[str, ...]    # op types reading it (Conv, Gemm, MatMul, ...)
    occurrences: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExportResult:
    """What export_onnx() wrote."""

    path: Path
    form: str
    weight_format: str              # "float" or "int8"
    opset: int
    ir_version: int
    file_size: int
    sites: tuple[SiteInfo, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    session_config: dict[str, str]  # ORT session config entries this file is meant to run with
    weight_counts: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    weight_layers: tuple[WeightInfo, ...] = ()   # layers with quantized weights (their own codes and scale)
    exporter: str = "dynamo"        # the exporter path that produced the file (qat_ste.export.exporters.PATHS)
    data_path: Path | None = None   # the external data file next to ``path`` (None: one file); see export_onnx()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["data_path"] = None if self.data_path is None else str(self.data_path)
        return d

    @property
    def weights(self) -> str:
        """Deprecated alias of ``weight_format``."""
        warnings.warn("ExportResult.weights is deprecated; use ExportResult.weight_format", DeprecationWarning,
                      stacklevel=2)
        return self.weight_format


# ---- validation ------------------------------------------------------------------------------------


def _as_inputs(example_input: Any) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise QatSteError(
            f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}",
            "pass e.g. torch.randn(1, 3, 224, 224)")
    return inputs


def _check_path(path: str | os.PathLike) -> Path:
    target = Path(path)
    if target.is_dir():
        raise QatSteError(f"{target} is a directory", "pass a file path, e.g. model.onnx")
    parent = target.parent
    if not parent.is_dir():
        raise QatSteError(f"cannot write {target}: directory {parent} does not exist",
                          "create the directory first or pass a path in an existing one")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise QatSteError(f"cannot write {target}: no write permission", "pass a path you can write to")
    return target


def _required_opset(bits: Sequence[int], form: str, weight_codes: Sequence[tuple[int, ...]] = ()) -> int:
    """The lowest opset ``form`` needs: spec's UINT2 activation codes need 25, UINT4 (and INT4
    weight codes, which quantized weights of at most 4 bits take in spec) 21."""
    if form != "spec":
        return SUPPORTED_OPSETS[0]
    if min(bits) <= 2:
        return 25
    if min(bits) <= 4 or any(-8 <= min(c) and max(c) <= 7 for c in weight_codes):
        return 21
    return SUPPORTED_OPSETS[0]


def _default_opset(required: int, form: str, weight_codes: Sequence[tuple[int, ...]]) -> int:
    """opset=None: 21, or 25 where spec has codes that fit INT2/UINT2 (narrowest standard type)."""
    if form == "spec" and any(-2 <= min(c) and max(c) <= 1 for c in weight_codes):
        return 25
    return max(DEFAULT_OPSET, required)


def _resolve_opset(opset: int | None, required: int, form: str, bits: Sequence[int],
                   weight_codes: Sequence[tuple[int, ...]] = ()) -> int:
    if opset is None:
        return max(_default_opset(required, form, weight_codes), required)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise QatSteError(
            f"opset={opset!r} is not supported; supported opsets: {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]}",
            f"pass opset=None (default {DEFAULT_OPSET}) or one of those")
    if opset < required:
        kind = "UINT2 (1-2 bit sites)" if required == 25 else "UINT4/INT4 (3-4 bit sites, <= 4-bit weights)"
        raise QatSteError(
            f"form='spec' carries {kind} codes, which need opset >= {required}; got opset={opset} "
            f"(site bit widths: {sorted(set(bits))})",
            f"pass opset={required} (or opset=None), or use form='deploy' (uint8 codes, any opset)")
    return opset


def _probe(model: nn.Module, sites: list[RoutedSite], inputs: tuple[torch.Tensor, ...]
           ) -> dict[int, tuple[int, int | None]]:
    """Run the model once on the example input; returns {site index: (rank, channel axis)} of the
    sites that ran. Shape errors become a QatSteError."""
    seen: dict[int, tuple[int, int | None]] = {}

    def hook_for(site: RoutedSite):
        def run(module: QuantAct, u: torch.Tensor) -> torch.Tensor:
            module.require_initialized()  # only sites that run: a module the forward never calls is left out
            per_channel = module.alpha.dim() == 1
            seen[site.index] = (u.dim(), channel_axis_of(u) % u.dim() if per_channel else None)
            alpha, zero_point = module.grid(u)
            return ((reference_codes(module, u) - zero_point) * alpha).to(u.dtype)
        return run

    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    try:
        with torch.no_grad(), export_routing(model, sites, hook_for):
            model(*inputs)
    except QatSteError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the input not fitting the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QatSteError(
            f"the model does not run on the example input of shape {shapes}: {type(e).__name__}: {first}",
            "pass an example input shaped like the model's input (batch first), e.g. torch.randn(1, 3, 224, 224)",
        ) from e
    return seen


# ---- the export ------------------------------------------------------------------------------------


def _run_exporter(model: nn.Module, sites: list[RoutedSite], inputs: tuple[torch.Tensor, ...],
                  opset: int, dynamic_batch: bool, hook=None, layers: Sequence[WeightLayer] = (),
                  quantized_weights: bool = True, required_opset: int = 0) -> tuple[Any, str, list[str]]:
    """The exporter chain (see :mod:`qat_ste.export.exporters`): the ONNX ModelProto with every
    site's QuantizeLinear (and quantized weight's DequantizeLinear) tagged by node metadata, the
    name of the path that produced it, and notes on the paths that failed before it."""
    from .passes import resolve_markers

    @contextlib.contextmanager
    def routing() -> Iterator[None]:
        with export_routing(model, sites, hook), weight_routing(list(layers), quantized_weights):
            yield

    shapes = {w.index: tuple(w.codes.shape) for w in layers}
    proto, path, notes = run_chain(model, inputs, opset, dynamic_batch, routing, shapes, required_opset)
    resolve_markers(proto)
    return proto, path, notes


def _site_quants(sites: list[RoutedSite], seen: dict[int, tuple[int, int | None]], form: str):
    from .passes import SiteQuant, container_for

    quants = []
    for s in sites:
        if s.index not in seen:
            continue
        m = s.module
        rank, axis = seen[s.index]
        quants.append(SiteQuant(
            index=s.index, name=s.name, bits=m.bits,
            scale=m.alpha.detach().cpu().float().numpy(),
            zero_point=m.zero_point.detach().cpu().numpy().round().astype("int64"),
            axis=axis, rank=rank, rounding=m.rounding,
            container=container_for(m.bits, narrow=form == "spec")))
    return quants


def _site_infos(quants: list, site_graphs: list, sites: list[RoutedSite]) -> list[SiteInfo]:
    """SiteInfo per exported site (tensor names from its first occurrence in the graph)."""
    occurrences: dict[int, int] = {}
    first: dict[int, Any] = {}
    for sg in site_graphs:
        occurrences[sg.quant.index] = occurrences.get(sg.quant.index, 0) + 1
        first.setdefault(sg.quant.index, sg)
    infos = []
    for q in quants:
        sg, m = first[q.index], sites[q.index].module
        infos.append(SiteInfo(
            name=q.name, index=q.index, kind=m.kind.name, bits=q.bits, container=q.container,
            range_limit=q.range_limit, step=tuple(float(v) for v in q.scale.reshape(-1)),
            zero_point=tuple(int(v) for v in q.zero_point.reshape(-1)), axis=q.axis, rounding=q.rounding,
            quantizes_input=m.quantizes_input, input=sg.input, codes=sg.codes, output=sg.output,
            occurrences=occurrences[q.index]))
    return infos


#: protobuf's limit on one serialised ONNX model: a larger model's weights go to an external data file
PROTOBUF_LIMIT = 2**31
#: tensors of at least this many bytes go to the external data file (onnx's own default)
EXTERNAL_DATA_THRESHOLD = 1024
#: tensors of at least _ALIGN_FROM bytes start at a multiple of _ALIGNMENT in the data file (so a runtime
#: may map them from the file; 64 KiB is every platform's mapping granularity)
_ALIGN_FROM, _ALIGNMENT = 2**20, 2**16


def data_file_name(path: str | os.PathLike) -> str:
    """The name of the external data file export_onnx() writes next to ``path``: ``model.onnx.data``."""
    return Path(path).name + ".data"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    form: str = "deploy",
    weight_format: str | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    weights: str | None = None,
    external_data: bool | None = None,
) -> ExportResult:
    """Export a quantized model (from ``qat_ste.quantize``) to ONNX at ``path``.

    Every quantized activation becomes QuantizeLinear -> integer codes -> DequantizeLinear with its
    step and zero point; the codes equal PyTorch's. ``form``: ``"deploy"`` (uint8 codes, fusable
    by ONNX Runtime) or ``"spec"`` (UINT4/UINT2 codes where they fit). ``weight_format``: ``"float"``
    or ``"int8"`` (per-channel int8 weights + int32 biases, for integer kernels; ``weights=`` is its
    deprecated alias); by default ``"int8"`` for a model quantized with ``integer_graph=True`` (the
    fully integer form), else ``"float"``. ``opset``: 18..25, default 21 (25 when ``spec`` has 1-2 bit sites).
    ``dynamic_batch``: the first axis of every input is dynamic. The model is not changed. The file
    is checked with ``onnx.checker.check_model(full_check=True)`` and written atomically; its
    metadata_props ``"qat_ste"`` holds the settings of every site (and, under ``weight_layers``, the
    spec of every quantized-weight layer) as JSON. Layers with quantized weights export their own
    codes and scale in any ``weight_format`` (see the module docstring). Raises QatSteError on bad input.

    ``external_data``: None (default) writes one file while the graph fits one protobuf (2 GiB), else
    the tensors of >= 1 KiB go to ``<file name>.data`` next to it (``model.onnx.data``, named relatively:
    keep the two together); True always writes it; False refuses a model that does not fit one file.
    ``ExportResult.data_path`` names it, ``file_size`` counts both files, written atomically (the data
    file renamed into place just before the graph; a failure leaves neither, nor a temporary file).
    """
    _check_external_data(external_data)
    if weights is not None:
        warnings.warn("export_onnx(weights=...) is deprecated; use weight_format=...", DeprecationWarning,
                      stacklevel=2)
        weight_format = weights
    weight_format = weight_format or ("int8" if has_integer_points(model) else "float")
    sites = _exportable_sites(model, form, weight_format, external_data)
    layers = weight_layers(model)
    bits = [s.module.bits for s in sites]
    weight_codes = [w.allowed_codes for w in layers]
    required = _required_opset(bits, form, weight_codes)
    opset = _resolve_opset(opset, required, form, bits, weight_codes)
    target = _check_path(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = tuple(t.to(device) for t in _as_inputs(example_input))
    seen = _probe(model, sites, inputs)
    if not seen:
        raise QatSteError("no quantized activation ran on the example input", "check the model's forward and input")
    skipped = [s.name for s in sites if s.index not in seen]
    notes = [f"{len(skipped)} site(s) did not run in eval mode and are not in the file: "
             f"{', '.join(skipped[:5])}"] if skipped else []
    proto, exporter, exporter_notes = _run_exporter(model, sites, inputs, opset,
                                                    dynamic_batch, layers=layers, required_opset=required)
    notes.extend(exporter_notes)
    quants = _site_quants(sites, seen, form)
    weight_quants = _weight_quants(layers, form, opset)
    site_graphs, weight_counts, weight_graphs = _rewrite_graph(proto.graph, quants, form, weight_format, notes,
                                                               weight_quants)
    opset = _settle_opset(proto, opset, required, form, notes)
    session_config = {} if (form == "deploy" and weight_format == "int8") else dict(DISABLE_QDQ)
    infos = _site_infos(quants, site_graphs, sites)
    weight_infos = _weight_infos(weight_graphs)
    if weight_infos and weight_format == "int8":
        notes.append(f"{len(weight_infos)} layer(s) with quantized weights keep their own codes and scale "
                     "(weight_format='int8' applies to the float layers only)")
    metadata = {"format": METADATA_FORMAT, "form": form, "weight_format": weight_format, "opset": opset,
                "exporter": exporter, "session_config": session_config, "sites": [i.to_dict() for i in infos],
                "weight_layers": [w.to_dict() for w in weight_infos]}
    size, data_path = _finish_and_write(proto, metadata, target, external_data)
    graph = proto.graph
    return ExportResult(
        path=target, form=form, weight_format=weight_format, opset=opset, ir_version=proto.ir_version,
        file_size=size, data_path=data_path, sites=tuple(infos), input_names=tuple(i.name for i in graph.input),
        output_names=tuple(o.name for o in graph.output), dynamic_batch=dynamic_batch and has_dynamic_batch(proto),
        session_config=session_config, weight_counts=weight_counts, notes=tuple(notes),
        weight_layers=tuple(weight_infos), exporter=exporter)


def has_integer_points(model: nn.Module) -> bool:
    """Whether ``model`` was quantized with ``integer_graph=True`` (it has quantization points)."""
    return any(isinstance(m, QuantAct) and m.kind.family == "point" for m in model.modules())


def _weight_quants(layers: Sequence[WeightLayer], form: str, opset: int) -> list:
    """The numbers of every quantized-weight layer, with the container its codes take in ``form``."""
    from .passes import WeightQuant, weight_container_for

    return [WeightQuant(
        index=w.index, name=w.name, spec=w.spec, allowed_codes=w.allowed_codes,
        codes=w.codes.detach().cpu().numpy().astype("int8"), scale=w.scale.detach().cpu().float().numpy(),
        axis=w.axis, container=weight_container_for(w.allowed_codes, opset, narrow=form == "spec"))
        for w in layers]


def _weight_infos(weight_graphs: list) -> list[WeightInfo]:
    """WeightInfo per exported quantized-weight layer (names from its first occurrence in the graph)."""
    import numpy as np

    occurrences: dict[int, int] = {}
    first: dict[int, Any] = {}
    for wg in weight_graphs:
        occurrences[wg.quant.index] = occurrences.get(wg.quant.index, 0) + 1
        first.setdefault(wg.quant.index, wg)
    infos = []
    for index in sorted(first):
        wg = first[index]
        q = wg.quant
        infos.append(WeightInfo(
            name=q.name, spec=q.spec, allowed_codes=tuple(q.allowed_codes), container=q.container,
            shape=tuple(int(d) for d in q.codes.shape), axis=q.axis,
            scale=tuple(float(v) for v in q.scale.reshape(-1)),
            distinct_codes=tuple(int(v) for v in np.unique(q.codes)), codes=wg.codes, scale_tensor=wg.scale,
            output=wg.output, consumers=wg.consumers, occurrences=occurrences[index]))
    return infos


def _check_external_data(external_data: Any) -> None:
    if external_data is not None and not isinstance(external_data, bool):
        raise QatSteError(f"external_data={external_data!r} is not None, True or False",
                          "pass external_data=None (a data file only when the model needs one), True or False")


def _exportable_sites(model: nn.Module, form: str, weight_format: str, external_data: bool | None = None
                      ) -> list[RoutedSite]:
    """The model's quantized sites, after checking the arguments and, with ``external_data=False``,
    that the model fits one file."""
    if not isinstance(model, nn.Module):
        raise QatSteError(f"export_onnx() takes a torch.nn.Module, got {type(model).__name__}",
                          "pass the model returned by qat_ste.quantize()")
    check_choice("form", form, FORMS)
    check_choice("weight_format", weight_format, WEIGHT_FORMATS)
    sites = quant_sites(model)
    if not sites:
        raise QatSteError("the model has no quantized activations (no QuantAct modules)",
                          "quantize it first: qmodel = qat_ste.quantize(model, bits=4); "
                          "qat_ste.calibrate(qmodel, batches)")
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if external_data is False and size >= PROTOBUF_LIMIT and weight_format != "int8":
        raise QatSteError(
            f"the model's weights take {size / 2**30:.1f} GiB; one ONNX file holds at most 2 GiB "
            "(external_data=False)", _TOO_BIG_FIX)
    return sites


_TOO_BIG_FIX = ("pass external_data=None (the default: the weights go to a data file next to the .onnx when they "
                "do not fit), or weight_format='int8' (4x smaller weights) if that fits")


def _rewrite_graph(graph: Any, quants: list, form: str, weight_format: str, notes: list[str],
                   weight_quants: list | None = None) -> tuple[list, dict[str, int], list]:
    """The post-passes: tag the sites and the quantized weights, int8 float weights, narrow
    containers, prune; notes on what cannot fuse."""
    from . import passes

    passes.clean_metadata(graph)
    site_graphs = passes.tag_sites(graph, quants)
    weight_graphs = passes.tag_weights(graph, weight_quants or [])
    weight_counts: dict[str, int] = {}
    if form == "spec":  # before the int8 pass, which rebuilds the node list the site graphs point into
        passes.narrow_containers(graph, site_graphs)
        passes.narrow_weight_containers(graph, weight_graphs)
    if weight_format == "int8":  # float layers only: a quantized weight is not an initializer
        weight_counts = passes.quantize_weights_int8(graph, site_graphs)
    passes.prune(graph)
    unfolded = sum(n.op_type == "BatchNormalization" for n in graph.node)
    if unfolded:
        notes.append(f"{unfolded} BatchNormalization node(s) could not be folded into a convolution; "
                     "the layers around them cannot run as integer ops")
    if any(q.rounding == "ceil" for q in quants):
        notes.append("ceil-rounding sites are exported as Div -> Ceil -> QuantizeLinear(scale 1); "
                     "the op before them cannot fuse into an integer kernel")
    return site_graphs, weight_counts, weight_graphs


def _settle_opset(proto: Any, opset: int, required: int, form: str, notes: list[str]) -> int:
    """The opset the exporter produced (noted when it differs) and an IR version ORT reads."""
    import onnx

    produced = next((imp.version for imp in proto.opset_import if imp.domain in ("", "ai.onnx")), opset)
    if produced != opset:  # the TorchScript path stays at its highest opset where the file's types allow
        notes.append(f"the file has opset {produced}, not the requested {opset}: the exporter path writes at most "
                     f"{produced} and the file needs no newer type (onnx's version converter, which could raise it, "
                     "breaks some graphs)")
        if produced < required:
            raise RuntimeError(f"the exporter produced opset {produced}, below what form={form!r} needs")
        opset = produced
    ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(list(proto.opset_import)))
    if ir_version > MAX_IR_VERSION:
        raise QatSteError(f"opset {opset} needs ONNX IR version {ir_version}; "
                          f"ONNX Runtime 1.31 reads <= {MAX_IR_VERSION}",
                          "pass a lower opset")
    proto.ir_version = ir_version
    return opset


def _finish_and_write(proto: Any, metadata: dict[str, Any], target: Path, external_data: bool | None = None
                      ) -> tuple[int, Path | None]:
    """Attach the metadata (naming the data file, when there is one), check the model and write it
    atomically; returns (the bytes written, both files together; the data file or None)."""
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    proto.producer_name = "qat_ste"
    external = _needs_external_data(proto, external_data)  # measured with the metadata on
    if external:  # the one entry set above
        proto.metadata_props[0].value = json.dumps({**metadata, "external_data": data_file_name(target)})
    return _write_model(proto, target, external, full_check=True)


def _needs_external_data(proto: Any, external_data: bool | None) -> bool:
    """Whether ``proto`` is written with an external data file: as asked, else when it does not fit one
    protobuf (``PROTOBUF_LIMIT``). A model that must not (``external_data=False``) but does not fit is refused."""
    if external_data:
        return True
    fits = _tensor_bytes(proto.graph) < PROTOBUF_LIMIT
    if fits:
        try:
            fits = proto.ByteSize() < PROTOBUF_LIMIT
        except Exception:  # noqa: BLE001 - protobuf's EncodeError: over its own 2 GiB limit
            fits = False
    if external_data is False and not fits:
        raise QatSteError("the exported graph takes more than one ONNX file holds (2 GiB; external_data=False)",
                          _TOO_BIG_FIX)
    return not fits


def _initializers(graph: Any, attributes: bool = False) -> Iterator[Any]:
    """Every initializer of ``graph`` and of its subgraphs (If/Loop/Scan bodies); with ``attributes``
    also the tensors in node attributes (Constant's value)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attributes:
                yield from ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _initializers(sub, attributes)


def check_data_files(path: Path, proto: Any) -> list[Any]:
    """The tensors of ``proto`` (loaded from ``path`` without its external data) stored in external
    data files, after checking that each such file lies in ``path``'s folder and holds their bytes;
    else a QatSteError naming the file."""
    from onnx import TensorProto

    fix = (f"re-export the model with export_onnx() and keep {path.name} and its data file together in one "
           "folder (the file names its data file by a relative name)")
    tensors = [t for t in _initializers(proto.graph, attributes=True) if t.data_location == TensorProto.EXTERNAL]
    sizes: dict[str, int] = {}
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        data = path.parent / location
        if location not in sizes:
            if not location or Path(location).is_absolute() or ".." in Path(location).parts:
                raise QatSteError(f"{path}: tensor {t.name} points at external data {location!r} outside its "
                                  "folder", fix)
            if not data.is_file():
                raise QatSteError(f"the external data file {data} of {path} is missing", fix)
            sizes[location] = data.stat().st_size
        end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        if end > sizes[location]:
            raise QatSteError(f"the external data file {data} of {path} is truncated or not its own: "
                              f"{sizes[location]:,} bytes, tensor {t.name} ends at byte {end:,}", fix)
    return tensors


def _tensor_bytes(graph: Any) -> int:
    return sum(len(t.raw_data) for t in _initializers(graph))


def _check_written(model: Any, full_check: bool) -> None:
    """onnx's checker on a proto or a file path (the only way for a model with external data)."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=full_check)
    except Exception as e:  # noqa: BLE001 - the checker raises several types
        raise RuntimeError(f"qat_ste produced an invalid ONNX graph (a bug, please report): {e}") from e


def _write_model(proto: Any, target: Path, external: bool, full_check: bool) -> tuple[int, Path | None]:
    """Check ``proto`` and write it to ``target`` atomically, with its weights in an external data file
    when ``external``; returns (the bytes written, the data file or None)."""
    if external:
        return _write_with_data_file(proto, target, full_check)
    _check_written(proto, full_check)
    data = proto.SerializeToString()
    try:
        atomic_write_bytes(target, data)
    except OSError as e:
        raise QatSteError(f"cannot write {target}: {e}", "pass a path you can write to") from e
    return len(data), None


def _write_with_data_file(proto: Any, target: Path, full_check: bool) -> tuple[int, Path]:
    """The model at ``target`` and its tensors in ``target``'s data file: both are written under their
    final names into a private folder next to ``target`` (the checker reads them there), then renamed
    into place, the data file first; the folder goes, whatever happens. ``proto`` loses its tensor
    data (it points at the data file)."""
    data_target = target.with_name(data_file_name(target))
    staging = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmpdir"
    staged, staged_data = staging / target.name, staging / data_target.name
    try:
        staging.mkdir()
        data_size = _move_tensors_out(proto, staged_data)
        with open(staged, "xb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        _check_written(str(staged), full_check)
        size = staged.stat().st_size + data_size
        os.replace(staged_data, data_target)
        try:
            os.replace(staged, target)
        except BaseException:
            data_target.unlink(missing_ok=True)  # no data file without its graph
            raise
    except OSError as e:
        raise QatSteError(f"cannot write {target} and its data file {data_target.name}: {e}",
                          "pass a path you can write to, on a device with room for both") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return size, data_target


def _move_tensors_out(proto: Any, data_path: Path) -> int:
    """Write every initializer of >= EXTERNAL_DATA_THRESHOLD bytes to ``data_path`` (a new file) and
    point the tensor at it (location: the file's name); returns the file's size."""
    from onnx.external_data_helper import set_external_data

    offset = 0
    with open(data_path, "xb") as f:
        for tensor in _initializers(proto.graph):
            if not _as_raw(tensor) or len(tensor.raw_data) < EXTERNAL_DATA_THRESHOLD:
                continue
            raw = tensor.raw_data
            if len(raw) >= _ALIGN_FROM and offset % _ALIGNMENT:
                f.write(bytes(_ALIGNMENT - offset % _ALIGNMENT))
                offset += _ALIGNMENT - offset % _ALIGNMENT
            f.write(raw)
            set_external_data(tensor, data_path.name, offset, len(raw))
            tensor.ClearField("raw_data")
            offset += len(raw)
        f.flush()
        os.fsync(f.fileno())
    return offset


def _as_raw(tensor: Any) -> bool:
    """Whether ``tensor`` holds its data as raw bytes, after moving it there from a typed field (e.g.
    the INT4 codes passes.narrow_weight_containers writes) when it has at least EXTERNAL_DATA_THRESHOLD
    elements; strings and tensors already external stay as they are."""
    from onnx import TensorProto, numpy_helper

    if tensor.HasField("raw_data"):
        return True
    numel = 1
    for d in tensor.dims:
        numel *= d
    if (tensor.data_location == TensorProto.EXTERNAL or tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED)
            or numel < EXTERNAL_DATA_THRESHOLD):
        return False
    packed = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
    if packed.data_type != tensor.data_type or not packed.HasField("raw_data"):
        return False
    tensor.CopyFrom(packed)
    return True


def export_float_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    external_data: bool | None = None,
) -> Path:
    """Export ``model`` with every quantized site replaced by the float activation it wraps (the
    float baseline for latency and size comparisons). BatchNorm is folded as in export_onnx();
    ``external_data`` as there (the weights go to ``<file name>.data`` when they do not fit one file)."""
    _check_external_data(external_data)
    target = _check_path(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = tuple(t.to(device) for t in _as_inputs(example_input))
    sites = quant_sites(model)
    proto, _, _ = _run_exporter(model, sites, inputs, opset, dynamic_batch,
                                hook=lambda site: float_activation, layers=weight_layers(model),
                                quantized_weights=False)
    from . import passes

    passes.clean_metadata(proto.graph)
    _write_model(proto, target, _needs_external_data(proto, external_data), full_check=False)
    return target


def read_metadata(onnx_model: Any) -> dict[str, Any]:
    """The ``qat_ste`` metadata of a loaded ONNX model (``onnx.ModelProto``); {} if absent. Files of
    the first format (``weights``, per-site ``scale``) are read with today's names."""
    for p in onnx_model.metadata_props:
        if p.key == METADATA_KEY:
            return _current_names(json.loads(p.value))
    return {}


def _current_names(metadata: dict[str, Any]) -> dict[str, Any]:
    if "weights" in metadata and "weight_format" not in metadata:
        metadata["weight_format"] = metadata.pop("weights")
    for site in metadata.get("sites", []):
        if "scale" in site and "step" not in site:
            site["step"] = site.pop("scale")
    return metadata

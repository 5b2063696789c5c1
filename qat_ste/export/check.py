"""check_onnx(): does an exported file compute what the PyTorch model computes?

In ONNX Runtime (``runtime="onnxruntime"``, the default) or OpenVINO (``runtime="openvino"``, the
optional ``openvino`` extra); the report says which (``CheckReport.runtime``). Figures (each names
the runtime options it used, see ``CheckReport.options``):

- per-site code parity: every site's quantizer gets the SAME input ``u`` in both runtimes (the
  runtime's own upstream value, exposed as an extra graph output) and must give identical codes and
  dequantized values. This is exact; anything below 100 % is a failure. In OpenVINO each site's
  quantizer nodes run alone on PyTorch's u (its CPU plugin miscomputes codes after an integer
  convolution whose output is also a graph output), in float32 (``INFERENCE_PRECISION_HINT=f32``);
  OpenVINO quantizes as u * (1/step) where ONNX divides, so a code may differ by one where u/step
  lies within an ulp of a rounding boundary: counted (``SiteCheck.near_boundary``) and noted, not a
  failure there. The file as deployed runs with OpenVINO's defaults (bf16 float arithmetic on CPUs
  that have it) unless ``runtime_options`` say otherwise.
- given the file's codes (:mod:`qat_ste.export.chained`): PyTorch runs with every site's output
  replaced by the codes the file computed there; the share of PyTorch's codes, computed from the
  file's upstream codes, equal to the file's (ties at a rounding boundary counted as agreeing), and
  the task's figure (``qat_ste.export.tasks``: top-1 agreement over the classes, per-pixel class
  agreement over the channel axis, boxes matched by IoU and label, or the relative error) of that
  run against the file's outputs. These decide ``ok``: a wrong op between two sites shows at the
  site after it, while a code that float rounding flips upstream does not carry on.
- end to end: the runtime's codes, max |logit difference| (over every float output, in the file's
  output order), relative output drift and the task's figure against PyTorch's, each runtime
  computing everything itself. Float convolutions accumulate in a different order, so codes near a
  rounding boundary differ, and a sensitive model (deep, random weights) carries them on: reported,
  limited only when asked. With int8 weights in the file (the PyTorch model keeps float weights)
  these also carry the weight quantization error. The accuracy of both when labels are given (and
  of the model as given, when the reference rounds its weights as an int8 file does). A model of
  several inputs gets one tensor per input of the file, by name, in the forward's order.
- with ONNX Runtime's default session options, which fuse Q/DQ into integer kernels (the file's
  ``session.disable_quant_qdq=1`` keeps the check bit-exact; users open files with the defaults): the
  task's figure given the codes the file computes there (its own threshold), and the end-to-end
  figure and drift; a file those options cannot load is noted.
- which ops run as integer kernels (ORT's optimized graph; OpenVINO's runtime graph, each compute
  node's runtime precision), and latency against the float model's own export in the same runtime.
- per layer with quantized weights: the distinct codes in the file against the spec's value set
  (binary 2, ternary 3, b-bit 2^b - 1 symmetric values; any value outside fails), and codes x scale,
  in numpy and as the runtime's DequantizeLinear computes it, against PyTorch's Q(w) bit for bit.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..atomic import json_safe
from ..errors import QatSteError
from ..nn_utils import logits_of
from .chained import (
    ChainedCounts,
    boundary_distance,
    chained_notes,
    file_codes,
    forcing_hook,
    pooled_agreement,
    step_ratio,
)
from .integer_reference import integer_reference
from .onnx_export import DISABLE_QDQ, export_float_onnx, has_integer_points, read_metadata
from .ops import RoutedSite, export_routing, quant_sites, reference_codes
from .runtime import (
    FLOAT_COMPUTE_OPS,
    RUNTIMES,
    Runner,
    check_runtime,
    describe_options,
    is_integer_op,
    median_call_ms,
    open_runner,
    optimized_op_counts,
)
from .tasks import TASKS, Agreement, flatten_outputs, meets, resolve_task
from .weights import dequantize_per_channel, int8_per_channel


@dataclass(frozen=True)
class SiteCheck:
    """One site's figures."""

    name: str
    bits: int
    container: str
    occurrences: int
    values: int          # code values compared
    parity: float        # share of equal codes given the same input u (must be 1.0)
    dequant_exact: bool  # DequantizeLinear's output equals (q - z) * step bit for bit (q: the file's codes)
    end_to_end: float    # share of the runtime's codes equal to PyTorch's through the whole network
    near_boundary: int = 0  # codes given the same u that differ by one where u/step lies within 2 float32
                            # ulps of a rounding boundary (OpenVINO quantizes as u * (1/step); ONNX: u / step)
    chained: float = 1.0    # share of PyTorch's codes equal to the file's, given the file's upstream codes


@dataclass(frozen=True)
class WeightCheck:
    """One layer with quantized weights: the integers in the file against the spec's value set, and
    the file's codes x scale against PyTorch's Q(w)."""

    name: str
    spec: str                    # "binary", "ternary", "int{b}"
    container: str               # "int8", "int4", "int2"
    per_channel: bool
    values: int                  # weight values in the file
    distinct: tuple[int, ...]    # the distinct codes present
    allowed: int                 # size of the spec's value set (2, 3, 2^b - 1)
    outside: int                 # codes outside that set (must be 0)
    exact: bool                  # codes x scale (float32) equals PyTorch's Q(w) bit for bit
    ort_exact: bool              # the runtime's DequantizeLinear output equals PyTorch's Q(w) bit for bit


@dataclass
class CheckReport:
    """What check_onnx() found. ``ok`` is True when every check passed; ``failures`` says why not."""

    onnx_path: str
    form: str
    weight_format: str                 # "float" or "int8"
    reference: str                     # what the PyTorch side of the comparison is
    samples: int                       # input samples compared
    ok: bool
    failures: list[str]
    sites: list[SiteCheck]
    site_parity: float                 # lowest per-site parity (1.0 = exact everywhere)
    code_agreement: float              # end-to-end (each runtime computing everything itself), all sites pooled
    max_logit_diff: float              # end to end
    top1_agreement: float              # the task's share of agreement given the file's codes (classification:
                                       # equal argmax over the classes; regression: NaN)
    accuracy_torch: float | None       # the PyTorch reference's accuracy on the labelled samples
    accuracy_onnx: float | None        # the file's, in ``runtime``
    integer_ops: dict[str, int]        # integer kernels in ORT's optimized graph (the file's session options),
                                       # or in OpenVINO's runtime graph (by layer type)
    float_ops: dict[str, int]          # float conv/matmul/gemm kernels left in that graph
    integer_ops_default_options: dict[str, int] | str  # same with ORT's default options (str: why it failed);
                                                       # OpenVINO: the same as integer_ops
    latency_ms: dict[str, float] | None  # quantized, float, speedup (float / quantized), batch
    thresholds: dict[str, float | None]
    options: dict[str, str]            # figure -> the ORT session options it used
    notes: list[str] = field(default_factory=list)
    weight_layers: list[WeightCheck] = field(default_factory=list)  # layers with quantized weights
    runtime: str = "onnxruntime"       # the runtime that ran the file: "onnxruntime" or "openvino"
    accuracy_model: float | None = None  # the model as given (differs from accuracy_torch when the
                                         # reference rounds the weights, as for an int8 file)
    task: str = "classification"       # the task whose figure is compared (see qat_ste.export.tasks)
    task_figure: str = "top-1 agreement"  # what that figure is
    task_agreement: float = float("nan")  # the figure given the file's codes at every site (regression: relative
                                          # error), the file's own options: what its thresholds bound
    relative_drift: float = float("nan")  # ||torch - file|| / ||torch|| over the float outputs, end to end
    default_task_agreement: float | None = None  # the figure given the codes the file computes under ORT's
                                                 # default options (None: it does not load with them)
    default_max_logit_diff: float | None = None  # end to end, under ORT's default options
    default_relative_drift: float | None = None  # end to end, under ORT's default options
    chained_code_agreement: float = 1.0   # PyTorch's codes equal to the file's given its upstream codes, pooled
    chained_relative_drift: float = float("nan")  # output drift given the file's codes
    end_to_end_task_agreement: float = float("nan")  # the task's figure end to end, the file's own options
    default_end_to_end_agreement: float | None = None  # the same under ORT's default options
    default_chained_code_agreement: float | None = None  # chained codes under ORT's default options

    @property
    def runtime_name(self) -> str:
        """The runtime as a reader names it ("ONNX Runtime", "OpenVINO")."""
        return RUNTIMES.get(self.runtime, self.runtime)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN becomes None)."""
        return json_safe(asdict(self))

    @property
    def weights(self) -> str:
        """Deprecated alias of ``weight_format``."""
        warnings.warn("CheckReport.weights is deprecated; use CheckReport.weight_format", DeprecationWarning,
                      stacklevel=2)
        return self.weight_format

    def table(self) -> str:
        """A readable text report."""
        name = self.runtime_name
        lines = [f"ONNX check of {self.onnx_path} in {name} (form={self.form}, weights={self.weight_format}, "
                 f"{self.samples} samples): {'OK' if self.ok else 'FAILED'}",
                 f"  compared with {self.reference}"]
        width = max([len("site")] + [len(s.name) for s in self.sites])
        lines.append(f"  {'site':<{width}}  bits  container  values    parity  dequant  given codes  end-to-end")
        for s in self.sites:
            lines.append(f"  {s.name:<{width}}  {s.bits:>4}  {s.container:<9}  {s.values:>7}  {s.parity:>7.2%}  "
                         f"{'exact' if s.dequant_exact else 'DIFF':<7}  {s.chained:>11.2%}  {s.end_to_end:>10.2%}")
        if self.weight_layers:
            wide = max([len("layer")] + [len(w.name) for w in self.weight_layers])
            short = "ORT" if self.runtime == "onnxruntime" else name
            lines.append(f"  {'layer':<{wide}}  spec      container  per-channel  values  codes present   "
                         f"outside  file=Q(w)  {short}=Q(w)")
            for w in self.weight_layers:
                present = f"{len(w.distinct)} of {w.allowed}"
                channel = "yes" if w.per_channel else "no"
                lines.append(f"  {w.name:<{wide}}  {w.spec:<8}  {w.container:<9}  {channel:<11}  "
                             f"{w.values:>6}  {present:<14}  {w.outside:>7}  {'exact' if w.exact else 'DIFF':<9}  "
                             f"{'exact' if w.ort_exact else 'DIFF'}")
        t = self.thresholds
        lines += [
            f"  per-site code parity (same input u)  {self.site_parity:.4%}  (required: 100%)",
            f"  task                                 {self.task}",
            "  given the file's codes at every site (each segment between sites starts from the same integers):",
            f"    code agreement                     {self.chained_code_agreement:.4%}  "
            f"{_limit_text('min', t.get('min_chained_code_agreement'))}",
            f"    {self.task_figure:<33}  {self._figure_text(self.task_agreement, self.task_threshold())}",
            f"    relative output drift              {self.chained_relative_drift:.4%}",
            "  end to end (each runtime computing every site itself; float rounding may flip codes):",
            f"    code agreement                     {self.code_agreement:.4%}  "
            f"{_limit_text('min', t.get('min_code_agreement'))}",
            f"    {self.task_figure:<33}  "
            f"{self._figure_text(self.end_to_end_task_agreement, self.task_threshold(end_to_end=True))}",
            f"    max |logit difference|             {self.max_logit_diff:.6g}  "
            f"{_limit_text('max', t.get('max_logit_diff'), '{:g}')}",
            f"    relative output drift              {self.relative_drift:.4%}",
        ]
        lines += self._default_lines()
        lines += self._accuracy_lines()
        lines += self._kernel_lines()
        if self.latency_ms:
            lat = self.latency_ms
            label = f"latency, batch {int(lat['batch'])} (median)"
            lines.append(f"  {label:<35}  quantized {lat['quantized']:.2f} ms, "
                         f"float {lat['float']:.2f} ms, speedup {lat['speedup']:.2f}x")
        lines.append(f"  {'ORT' if self.runtime == 'onnxruntime' else name} options per figure:")
        lines += [f"    {k}: {v}" for k, v in self.options.items()]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  FAILED: {f}" for f in self.failures]
        return "\n".join(lines)

    def task_threshold(self, default: bool = False, end_to_end: bool = False) -> float | None:
        """The threshold the task's figure must meet (given the file's codes; ``end_to_end``: the
        end-to-end figure; ``default``: under ORT's default options); None: not limited."""
        return self.thresholds.get(threshold_key(self.task, default, end_to_end))

    def _figure_text(self, value: float | None, threshold: float | None) -> str:
        if value is None:
            return "not measured"
        limit = _limit_text("min" if self.task != "regression" else "max", threshold)
        return f"{value:.4%}  {limit}" if self.task == "regression" else f"{value:.2%}  {limit}"

    def _default_lines(self) -> list[str]:
        if self.default_max_logit_diff is None:
            why = self.options.get("default_options", "not measured")
            return [f"  ORT default options                  {why}"]
        limit = self.thresholds.get("max_default_logit_diff")
        codes = self.default_chained_code_agreement
        return ["  ORT default options (Q/DQ fused into integer kernels where ORT can):",
                f"    {self.task_figure + ', given its codes':<33}  "
                f"{self._figure_text(self.default_task_agreement, self.task_threshold(True))}"
                + (f"; codes {codes:.4%}" if codes is not None else ""),
                f"    {self.task_figure + ', end to end':<33}  "
                f"{self._figure_text(self.default_end_to_end_agreement, None)}, "
                f"max |logit difference| {self.default_max_logit_diff:.6g}"
                + (f" (max {limit:g})" if limit is not None else "")
                + f", relative drift {self.default_relative_drift or 0.0:.4%}"]

    def _accuracy_lines(self) -> list[str]:
        if self.accuracy_torch is None or self.accuracy_onnx is None:
            return []
        delta = (self.accuracy_onnx - self.accuracy_torch) * 100
        label = f"accuracy ({self.samples} labelled samples{', per pixel' if self.task == 'segmentation' else ''})"
        lines = [f"  {label:<35}  PyTorch {self.accuracy_torch:.2%}, {self.runtime_name} "
                 f"{self.accuracy_onnx:.2%} ({delta:+.2f} points)"]
        if self.accuracy_model is not None and "as given" not in self.reference:
            lines.append(f"  {'accuracy of the model as given':<35}  {self.accuracy_model:.2%} (PyTorch, before "
                         "the file's weight rounding)")
        return lines

    def _kernel_lines(self) -> list[str]:
        if self.runtime == "openvino":
            return [f"  integer kernels (runtime graph)      {_ops_text(self.integer_ops)}; "
                    f"float conv/matmul left: {_ops_text(self.float_ops)}"]
        default = self.integer_ops_default_options
        return [f"  integer ops (file's options)         {_ops_text(self.integer_ops)}; "
                f"float conv/matmul left: {_ops_text(self.float_ops)}",
                "  integer ops (ORT default options)    "
                + (_ops_text(default) if isinstance(default, dict) else f"not loadable: {default}")]


def _limit_text(bound: str, threshold: float | None, form: str = "{:.2%}") -> str:
    return f"({bound} {form.format(threshold)})" if threshold is not None else "(not limited)"


def _ops_text(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "none"


# ---- helpers ---------------------------------------------------------------------------------------


Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]


def _is_tensors(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(t, torch.Tensor) for t in value)


def _batches(inputs: Any, labels: Any, n_inputs: int = 1) -> list[Batch]:
    """[(the input tensors of one batch, its labels or None)]. For a model of ``n_inputs`` inputs
    (the file's), ``inputs`` is one batch (a tensor; with several inputs a tuple of them) or a
    sequence of batches."""
    example = "torch.randn(16, 3, 32, 32)" if n_inputs == 1 else f"a tuple of {n_inputs} tensors"
    if isinstance(inputs, torch.Tensor):
        xs: list[tuple[torch.Tensor, ...]] = [(inputs,)]
    elif n_inputs > 1 and _is_tensors(inputs) and len(inputs) == n_inputs:
        xs = [tuple(inputs)]
    elif isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
        xs = [(x,) for x in inputs]
    elif isinstance(inputs, (tuple, list)) and inputs and all(_is_tensors(x) for x in inputs):
        xs = [tuple(x) for x in inputs]
    else:
        raise QatSteError("inputs must be a tensor (one batch) or a sequence of tensors (batches)"
                          + (f"; this file takes {n_inputs} inputs: a tuple of {n_inputs} tensors per batch"
                             if n_inputs > 1 else ""), f"pass e.g. {example}")
    wrong = next((x for x in xs if len(x) != n_inputs), None)
    if wrong is not None:
        raise QatSteError(f"the file takes {n_inputs} input(s), but a batch of {len(wrong)} tensor(s) was given",
                          f"pass {example} per batch, in the order of the model's forward arguments")
    if labels is None:
        return [(x, None) for x in xs]
    ys = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    if len(ys) != len(xs) or any(len(y) != len(x[0]) for x, y in zip(xs, ys, strict=True)):
        raise QatSteError("labels do not match inputs (one label per input sample)",
                          "pass labels shaped like the inputs' batches, e.g. a tensor of N class indices")
    return list(zip(xs, ys, strict=True))


def _file_inputs(proto: Any) -> list[str]:
    """The file's graph inputs (initializers excluded), in order: the forward's arguments."""
    initializers = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


def _feeds(names: Sequence[str], xs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {name: x.detach().cpu().numpy() for name, x in zip(names, xs, strict=True)}


def _instrumented(proto: Any, tensors: list[Any], expose_inputs: bool = True, expose_outputs: bool = True
                  ) -> tuple[bytes, dict[str, str]]:
    """The file with each site's u (unless ``expose_inputs`` is False), codes (as uint8) and dequantized
    output (unless ``expose_outputs`` is False) as extra graph outputs."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    data_dir = _pop_data_dir(model)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    codes_as: dict[str, str] = {}

    def expose(name: str, elem: int) -> None:
        if name not in outputs:
            graph.output.append(helper.make_tensor_value_info(name, elem, None))
            outputs.add(name)

    for t in tensors:
        if expose_inputs:
            expose(t.input, TensorProto.FLOAT)
        if expose_outputs:
            expose(t.output, TensorProto.FLOAT)
        codes = t.codes
        if t.codes_type != TensorProto.UINT8:  # 4/2-bit codes: widen for numpy
            codes = f"{t.codes}/as_uint8"
            if codes not in outputs:
                graph.node.append(helper.make_node("Cast", [t.codes], [codes], to=TensorProto.UINT8,
                                                   name=f"{t.prefix}/widen"))
        expose(codes, TensorProto.UINT8)
        codes_as[t.codes] = codes
    from .runtime import SerializedModel

    return SerializedModel(model.SerializeToString(), data_dir), codes_as


def _pop_data_dir(model: Any) -> str | None:
    """The folder of ``model``'s external data that _read_exported() recorded (None: none), removed from
    ``model`` (a copy handed to a runtime)."""
    from .runtime import DATA_DIR_KEY

    for i, entry in enumerate(model.metadata_props):
        if entry.key == DATA_DIR_KEY:
            del model.metadata_props[i]
            return str(entry.value)
    return None


def _quantizers_alone(instrumented: bytes, tensors: list[Any], codes_as: dict[str, str],
                      shapes: dict[str, tuple[int, ...]]) -> bytes:
    """Each site's quantizer nodes alone, cut from the instrumented file: its u as a graph input of
    the static shape ``shapes[u]`` (OpenVINO 2026.4 mis-broadcasts per-channel quantizers of several
    inputs with dynamic shapes), its codes and dequantized output as graph outputs."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.ParseFromString(instrumented)
    inputs = list(dict.fromkeys(t.input for t in tensors))
    outputs = list(dict.fromkeys([codes_as[t.codes] for t in tensors] + [t.output for t in tensors]))
    producer = {out: n for n in model.graph.node for out in n.output}
    needed: dict[int, Any] = {}
    stack, seen = list(outputs), set(inputs)
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        needed[id(producer[name])] = producer[name]
        stack.extend(producer[name].input)
    nodes = [n for n in model.graph.node if id(n) in needed]  # graph order
    used = {i for n in nodes for i in n.input}
    codes = set(codes_as.values())
    graph = helper.make_graph(
        nodes, "site_quantizers",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, list(shapes[i])) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.UINT8 if o in codes else TensorProto.FLOAT, None)
         for o in outputs],
        [t for t in model.graph.initializer if t.name in used])
    cut = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    from .runtime import SerializedModel, data_dir_of

    return SerializedModel(cut.SerializeToString(), data_dir_of(instrumented))


def int8_weight_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose conv/linear weights are rounded to per-channel symmetric int8, as
    export_onnx(weight_format="int8") stores them; layers with quantized weights are left as they
    are, as the file keeps their codes and scale (quantizing before or after BatchNorm folding gives the
    same integers: the fold scales each output channel, and so its step, by the same factor)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for m in reference.modules():
            if hasattr(m, "weight_quantizer"):  # quantized weights: the file keeps their own codes and scale
                continue
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                weight = m.weight.detach().cpu().float().numpy()
                codes, step = int8_per_channel(weight, axis=0)
                m.weight.copy_(torch.from_numpy(dequantize_per_channel(codes, step, axis=0)))
    return reference


def _capture_hook(store: dict[str, list[torch.Tensor]]):
    def for_site(site: RoutedSite):
        def run(module, u: torch.Tensor) -> torch.Tensor:
            store.setdefault(site.name, []).append(u.detach().float().cpu())
            step, zero_point = module.grid(u)
            return ((reference_codes(module, u) - zero_point) * step).to(u.dtype)
        return run
    return for_site


# ---- the check -------------------------------------------------------------------------------------


#: check_onnx()'s threshold arguments (CheckReport.thresholds)
THRESHOLD_ARGUMENTS = frozenset({
    "min_chained_code_agreement", "min_top1_agreement", "min_pixel_agreement", "min_box_agreement",
    "max_relative_error", "min_code_agreement", "min_end_to_end_agreement", "max_end_to_end_relative_error",
    "max_logit_diff", "min_default_agreement", "max_default_relative_error", "max_default_logit_diff"})
#: the threshold argument of each task's figure
TASK_THRESHOLDS = {"classification": "min_top1_agreement", "segmentation": "min_pixel_agreement",
                   "detection": "min_box_agreement", "regression": "max_relative_error"}


def threshold_key(task: str, default: bool = False, end_to_end: bool = False) -> str:
    """The check_onnx() threshold argument that bounds ``task``'s figure given the file's codes
    (``default``: under ORT's default options; ``end_to_end``: the end-to-end figure)."""
    if end_to_end:
        return "max_end_to_end_relative_error" if task == "regression" else "min_end_to_end_agreement"
    if default:
        return "max_default_relative_error" if task == "regression" else "min_default_agreement"
    return TASK_THRESHOLDS[task]


def check_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    inputs: torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
    labels: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    task: str | None = None,
    min_chained_code_agreement: float | None = 0.999,
    min_top1_agreement: float = 0.9,
    min_pixel_agreement: float = 0.9,
    min_box_agreement: float = 0.9,
    max_relative_error: float | None = 0.1,
    min_code_agreement: float | None = None,
    min_end_to_end_agreement: float | None = None,
    max_end_to_end_relative_error: float | None = None,
    max_logit_diff: float | None = None,
    min_default_agreement: float | None = 0.9,
    max_default_relative_error: float | None = 0.2,
    max_default_logit_diff: float | None = None,
    latency: bool = True,
    latency_runs: int = 10,
    threads: int | None = None,
    float_onnx_path: str | os.PathLike | None = None,
    runtime: str = "onnxruntime",
    runtime_options: Mapping[str, str] | None = None,
) -> CheckReport:
    """Compare the ONNX file written by ``export_onnx`` with the PyTorch ``model`` it came from.

    ``inputs``: one batch (a tensor, batch first; for a model of several inputs a tuple of tensors,
    fed to the file's inputs by name in the forward's order) or a sequence of batches; ``labels``:
    class indices matching them (per sample, or per pixel for segmentation; adds the accuracy of
    both). ``task``: "classification", "segmentation", "detection" or "regression" (None: picked by
    the output's shape, see :mod:`qat_ste.export.tasks`).
    ``ok`` requires exact per-site code parity and, PyTorch given the file's codes at every site
    (:mod:`qat_ste.export.chained`), code agreement >= ``min_chained_code_agreement`` and the task's
    figure within ``min_top1_agreement`` / ``min_pixel_agreement`` / ``min_box_agreement`` /
    ``max_relative_error``. End-to-end figures (each runtime computing every site itself: float rounding
    may flip codes that a sensitive model carries on) are limited only when given: ``min_code_agreement``,
    ``min_end_to_end_agreement`` (regression: ``max_end_to_end_relative_error``), ``max_logit_diff``. Under
    ORT's default options (Q/DQ fused into integer kernels): the task's figure given the codes computed
    that way against ``min_default_agreement`` (``max_default_relative_error``), the end-to-end max
    |output difference| against ``max_default_logit_diff``; a file they cannot load is noted.
    ``runtime``: ``"onnxruntime"`` or ``"openvino"`` (the ``openvino`` extra); ``runtime_options`` join
    the options of the file as deployed and of both latency runs (ORT session config entries, OpenVINO
    properties such as ``{"INFERENCE_PRECISION_HINT": "f32"}``). ``latency``: also time the file against
    the float model's export (``float_onnx_path``, or exported to a temp dir) with ``threads`` intra-op
    threads, median of ``latency_runs`` runs on the first batch. The module docstring explains each figure.
    """
    thresholds = {name: value for name, value in locals().items() if name in THRESHOLD_ARGUMENTS}
    check_runtime(runtime)
    if task is not None:
        resolve_task(task, [])  # an unknown task fails before any work
    path, proto, meta = _read_exported(onnx_path, model)
    batches = _batches(inputs, labels, len(_file_inputs(proto)))
    integer = meta.get("weight_format") == "int8" and has_integer_points(model)
    deploy_config, probe_config = _runtime_configs(runtime, meta, integer)
    deploy_config.update(extra := {str(k): str(v) for k, v in (runtime_options or {}).items()})
    first = batches[0][0]
    reference_model, reference, notes = _reference_for(model, meta, _example(first) if integer else None)
    deployed, probe = _open_runners(runtime, proto, path, deploy_config, probe_config, integer)
    tally = _compare(model, reference_model, deployed, probe, batches, task)
    default_described = _default_pass(runtime, (proto, path, deploy_config), (deployed, probe), tally,
                                      (reference_model, batches), notes)
    options = _options(probe, deployed, default_described)
    site_checks = _site_checks(tally, meta)
    weight_checks = _weight_checks(model, proto, meta, first, runtime, probe_config)
    if weight_checks:
        options["weights"] = probe.runner.description + " (each quantized weight as an extra output)"
    failures = (tally.failures + _threshold_failures(site_checks, tally, thresholds, runtime)
                + _weight_failures(weight_checks))
    notes += _boundary_notes(site_checks, runtime)
    integer_ops, float_ops, default_ops, ops_options = _integer_ops(runtime, path, deploy_config, deployed)
    options["integer_ops"] = ops_options
    latency_ms = None
    if latency:
        latency_ms = _latency(model, path, first, runtime, (deploy_config, extra), meta, latency_runs,
                              threads, float_onnx_path, notes, options)
    return _report(path, meta, reference, tally, failures, site_checks, thresholds, options, notes,
                   (integer_ops, float_ops, default_ops), latency_ms, weight_checks, runtime, labels is not None)


def _example(xs: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One sample of a batch: a tensor for a single-input model, else a tuple."""
    return xs[0][:1] if len(xs) == 1 else tuple(x[:1] for x in xs)


def _default_probe(runtime: str, proto: Any, probe: _Probe, default: Runner | None, notes: list[str]
                   ) -> Runner | None:
    """The file with each site's codes as extra outputs under ORT's default options, for the chained
    figures there (None: OpenVINO, or the file does not load with ORT's defaults, or the file's own
    options are ORT's defaults: then its figures are those)."""
    if runtime != "onnxruntime" or default is None:
        return None
    instrumented, _ = _instrumented(proto, probe.tensors, expose_inputs=False, expose_outputs=False)
    try:
        return open_runner(runtime, instrumented, {})
    except Exception as e:  # noqa: BLE001 - ORT raises several types for a graph it cannot fuse
        notes.append(f"the file with its codes exposed does not load with ORT's default options ({e}); "
                     "no figures given its codes there")
        return None


def _options(probe: _Probe, deployed: Runner, default_described: str) -> dict[str, str]:
    """Figure -> the runtime options it used (latency, weights and integer ops are added later)."""
    return {
        "site_parity": probe.runner.description + (
            " (each site's quantizer nodes alone, fed PyTorch's u)" if probe.alone
            else " (the file with each site's u/codes as extra outputs)"),
        "end_to_end_codes": probe.runner.description + (
            " (the file with each site's codes as extra outputs)" if probe.alone else " (same run)"),
        "given_codes": probe.runner.description + " (the instrumented file's codes and outputs; PyTorch given "
                       "those codes at every site)",
        "logits": deployed.description + " (the file as deployed)",
        "default_options": default_described,
    } | ({"default_given_codes": probe.defaults.description + " (the file with its codes as extra outputs)"}
         if probe.defaults is not None else {})


def _boundary_notes(site_checks: list[SiteCheck], runtime: str) -> list[str]:
    boundary = {c.name: c.near_boundary for c in site_checks if c.near_boundary}
    if not boundary or runtime != "openvino":
        return []
    return [f"{sum(boundary.values())} code(s) given the same u differ by one at u/step within 2 ulps of a "
            f"rounding boundary (site(s) {', '.join(list(boundary)[:5])}): OpenVINO quantizes as "
            "u * (1/step), ONNX as u / step; not a failure in OpenVINO"]


def _report(path: Path, meta: dict[str, Any], reference: str, tally: _Tally, failures: list[str],
            site_checks: list[SiteCheck], thresholds: dict[str, float | None], options: dict[str, str],
            notes: list[str], ops: tuple[dict[str, int], dict[str, int], dict[str, int] | str],
            latency_ms: dict[str, float] | None, weight_checks: list[WeightCheck], runtime: str,
            labelled: bool) -> CheckReport:
    """The CheckReport of the figures gathered."""
    assert tally.agreement is not None and tally.task is not None
    agreement, default, chained = tally.agreement, tally.default, tally.chained
    assert chained is not None
    notes = notes + [n for n in tally.notes + agreement.notes if n not in notes]
    notes += chained_notes(tally.chained_codes)
    labelled = labelled and tally.labelled > 0
    value, default_chained = chained.value, tally.default_chained
    return CheckReport(
        onnx_path=str(path), form=str(meta.get("form")), weight_format=str(meta.get("weight_format")),
        reference=reference, samples=tally.samples, ok=not failures, failures=failures, sites=site_checks,
        site_parity=min((s.parity for s in site_checks), default=1.0), code_agreement=tally.code_agreement,
        max_logit_diff=agreement.max_diff, top1_agreement=value if tally.task != "regression" else float("nan"),
        accuracy_torch=tally.correct_torch / tally.labelled if labelled else None,
        accuracy_onnx=tally.correct_onnx / tally.labelled if labelled else None,
        integer_ops=ops[0], float_ops=ops[1], integer_ops_default_options=ops[2],
        latency_ms=latency_ms, thresholds=thresholds, options=options, notes=notes, weight_layers=weight_checks,
        runtime=runtime, accuracy_model=tally.correct_model / tally.labelled if labelled else None,
        task=tally.task, task_figure=agreement.figure, task_agreement=value, relative_drift=agreement.relative_drift,
        default_task_agreement=default_chained.value if default_chained is not None else None,
        default_max_logit_diff=default.max_diff if default is not None else None,
        default_relative_drift=default.relative_drift if default is not None else None,
        chained_code_agreement=pooled_agreement(tally.chained_codes), chained_relative_drift=chained.relative_drift,
        end_to_end_task_agreement=agreement.value,
        default_end_to_end_agreement=default.value if default is not None else None,
        default_chained_code_agreement=(pooled_agreement(tally.default_chained_codes)
                                        if default_chained is not None else None))


def _default_runner(runtime: str, path: Path, deploy_config: dict[str, str], notes: list[str]
                    ) -> tuple[Runner | None, str, bool]:
    """The file under ORT's default session options, how that is described, and whether those options
    are the deployed file's own (then its figures are the default-options figures). A runner of None
    otherwise: the file does not load that way (said in the description and in ``notes``)."""
    if runtime == "openvino":
        return None, "the same as the file as deployed (OpenVINO's defaults)", True
    if not deploy_config:
        return None, "the same as the file as deployed (its options are ORT's defaults)", True
    try:
        runner = open_runner(runtime, path, {})
    except Exception as e:  # noqa: BLE001 - ORT refuses 4-bit Q/DQ around convs with default options
        why = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        notes.append(f"the file does not load with ORT's default session options ({why}): no default-options "
                     "figures")
        return None, f"not loadable with ORT's default options: {why}", False
    return runner, runner.description + " (ORT's defaults: Q/DQ fused into integer kernels where ORT can)", False


def _runtime_configs(runtime: str, meta: dict[str, Any], integer: bool = False
                     ) -> tuple[dict[str, str], dict[str, str]]:
    """(the options the file is deployed with, the options of the instrumented file) in ``runtime``:
    ORT session config entries (the file's own, recorded in its metadata; the probe stops ORT's QDQ
    fusions, except for an ``integer`` graph, whose probe runs the integer kernels as deployed), or
    OpenVINO properties (its defaults; the probe computes floats in float32)."""
    if runtime == "openvino":
        from .openvino_runtime import PRECISION_HINT

        return {}, {PRECISION_HINT: "f32"}
    deployed = dict(meta.get("session_config", {}))
    return deployed, (dict(deployed) if integer else dict(DISABLE_QDQ))


@dataclass
class _Probe:
    """The instrumented file in the check's runtime, and how to read each site from it."""

    runner: Runner               # the file with each site's codes and output (ORT: and u) as extra outputs
    tensors: list[Any]           # the site occurrences (passes.SiteTensors)
    codes_as: dict[str, str]     # codes tensor -> the name it is exposed under (uint8)
    alone: bytes | None = None   # OpenVINO: the instrumented file, whose quantizers run alone on PyTorch's u
    config: dict[str, str] = field(default_factory=dict)  # the options they run with
    quantizers: dict[tuple[Any, ...], Runner] = field(default_factory=dict)  # by the u shapes they take
    defaults: Runner | None = None  # the file with its codes as extra outputs, under ORT's default options


def _open_runners(runtime: str, proto: Any, path: Path, deploy_config: dict[str, str],
                  probe_config: dict[str, str], integer: bool = False) -> tuple[Runner, _Probe]:
    """(the file as deployed, the instrumented file). OpenVINO 2026.4's CPU plugin gives wrong codes
    after an integer convolution whose float output is also a graph output, so there the site
    inputs u are not exposed: each site's quantizer runs alone on PyTorch's u for the parity. The
    same holds for an ``integer`` graph in ORT, whose instrumented file exposes the codes only, so
    that every integer kernel stays fused: its end-to-end codes are the deployed file's."""
    from .passes import site_tensors

    tensors = site_tensors(proto)
    ov = runtime == "openvino" or integer
    instrumented, codes_as = _instrumented(proto, tensors, expose_inputs=not ov, expose_outputs=not integer)
    deployed = open_runner(runtime, path, deploy_config)  # first: a file the runtime cannot read is named
    probe = open_runner(runtime, instrumented, probe_config)
    missing = sorted({codes_as[t.codes] for t in tensors} - set(probe.outputs))
    if missing:
        raise QatSteError(f"{RUNTIMES[runtime]} does not expose the site codes {', '.join(missing[:5])} of "
                          f"{path}", "check the file with runtime='onnxruntime'")
    return deployed, _Probe(probe, tensors, codes_as, instrumented if ov else None, probe_config)


def _read_exported(onnx_path: str | os.PathLike, model: nn.Module) -> tuple[Path, Any, dict[str, Any]]:
    """(path, loaded proto, qat_ste metadata) of a file export_onnx() wrote for ``model``. A file with
    an external data file (see export_onnx's ``external_data``) is loaded without it, once the data file
    is found whole: the proto and its copies stay small and point at it (their runtime sessions read it
    from its folder); only the tensors the check reads in numpy (the Q/DQ inputs) are loaded."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    from .onnx_export import check_data_files
    from .runtime import DATA_DIR_KEY

    path = Path(onnx_path)
    if not path.is_file():
        raise QatSteError(f"no ONNX file at {path}", "pass the path export_onnx() wrote")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types for a file that is not ONNX
        raise QatSteError(f"cannot read {path} as ONNX: {e}", "pass a file written by export_onnx()") from e
    external = check_data_files(path, proto)
    if external:
        read_in_numpy = {i for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                         for i in n.input}
        for t in external:
            if t.name in read_in_numpy:
                load_external_data_for_tensor(t, str(path.parent))
        entry = proto.metadata_props.add()  # for the copies handed to a runtime (see _instrumented)
        entry.key, entry.value = DATA_DIR_KEY, str(path.parent.resolve())
    meta = read_metadata(proto)
    if not meta.get("sites"):
        raise QatSteError(f"{path} has no qat_ste metadata", "check a file written by qat_ste's export_onnx()")
    names = {s.name for s in quant_sites(model)}
    missing = [s["name"] for s in meta["sites"] if s["name"] not in names]
    if missing:
        raise QatSteError(f"the model has no quantized site(s) {', '.join(missing[:5])} that the file has",
                          "check the file against the model it was exported from")
    layers = {name for name, m in model.named_modules() if hasattr(m, "weight_quantizer")}
    missing = [w["name"] for w in meta.get("weight_layers", []) if w["name"] not in layers]
    if missing:
        raise QatSteError(f"the model has no quantized-weight layer(s) {', '.join(missing[:5])} that the file has",
                          "check the file against the model it was exported from")
    return path, proto, meta


def _reference_for(model: nn.Module, meta: dict[str, Any], integer_input: Any = None
                   ) -> tuple[nn.Module, str, list[str]]:
    """(the PyTorch model to compare with, how it is described, notes): with int8 weights in the file,
    a copy of ``model`` whose weights are rounded the same way; for an integer graph
    (``integer_input``: an example batch), :func:`integer_reference`, which computes what the
    integer kernels compute."""
    if integer_input is not None:
        reference, counts = integer_reference(model, integer_input)
        note = (f"integer graph: PyTorch figures use the integer reference ({counts['folded']} BatchNorm(s) folded, "
                f"{counts['integer']} layer(s) as integer kernels with int8 weights and exact sums"
                + (f", {counts['float']} left float" if counts["float"] else "")
                + "); end-to-end codes are the file's as deployed, with integer kernels")
        return reference, "the integer reference: what the file's integer kernels compute", [note]
    if meta.get("weight_format") == "int8":
        note = ("the file has int8 weights: PyTorch figures use the model with its conv/linear weights "
                "rounded the same way")
        return (int8_weight_reference(model), "the PyTorch model with per-channel int8 weights, as in the file",
                [note])
    return model, "the PyTorch model as given", []


@dataclass
class _SiteTally:
    values: int = 0
    parity: int = 0
    end_to_end: int = 0
    not_compared: int = 0    # values whose end-to-end codes have no PyTorch counterpart (detection only)
    dequant_exact: bool = True
    occurrences: int = 0
    near_boundary: int = 0


@dataclass
class _Tally:
    """Counts gathered over the batches."""

    sites: dict[str, _SiteTally]
    task: str | None = None                  # as asked (None: picked from the first batch's outputs)
    agreement: Agreement | None = None       # the task's figure and the output drift, the file as deployed
    default: Agreement | None = None         # the same under ORT's default session options
    chained: Agreement | None = None         # the same, PyTorch given the file's codes at every site
    default_chained: Agreement | None = None  # ... given the codes of the file under ORT's default options
    chained_codes: dict[str, ChainedCounts] = field(default_factory=dict)
    default_chained_codes: dict[str, ChainedCounts] = field(default_factory=dict)
    torch_outputs: list[list[torch.Tensor]] = field(default_factory=list)  # PyTorch's, per batch
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    correct_torch: int = 0
    correct_onnx: int = 0
    correct_model: int = 0   # the model as given (the reference may round its weights)
    labelled: int = 0        # labelled class decisions (samples; pixels for segmentation)
    samples: int = 0

    def copy_default_figures(self, same_as_deployed: bool) -> None:
        """Where the file's own options are the runtime's defaults, its figures are the default-options ones."""
        if same_as_deployed:
            self.default, self.default_chained = copy.deepcopy(self.agreement), copy.deepcopy(self.chained)
            self.default_chained_codes = copy.deepcopy(self.chained_codes)

    @property
    def code_agreement(self) -> float:
        values = max(sum(c.values - c.not_compared for c in self.sites.values()), 1)
        return sum(c.end_to_end for c in self.sites.values()) / values


def _torch_outputs(model: nn.Module, xs: tuple[torch.Tensor, ...], device: torch.device, n_file: int,
                   notes: list[str] | None = None) -> list[torch.Tensor]:
    """The model's output tensors on ``xs`` (CPU), one per output of the file (``n_file``); where the
    counts differ, only the class scores (logits_of), compared with the file's first output (said in
    ``notes``)."""
    output = model(*(x.to(device) for x in xs))
    flat = flatten_outputs(output)
    if len(flat) != n_file:
        flat = [logits_of(output)]
        note = (f"the model's output ({len(flatten_outputs(output))} tensors) does not flatten to the file's {n_file} "
                "output tensor(s): only its class scores (logits_of) are compared, with the file's first output")
        if notes is not None and note not in notes:
            notes.append(note)
    return [t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu() for t in flat]


def _file_outputs(runner: Runner, feeds: dict[str, np.ndarray], n_file: int) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(v)) for v in runner.run(feeds)[:n_file]]


def _site_maps(model: nn.Module, tensors: list[Any]) -> tuple[dict[str, RoutedSite], dict[str, list[Any]]]:
    """(the model's sites by name, the file's occurrences of each site in order)."""
    by_site: dict[str, list[Any]] = {}
    for t in tensors:
        by_site.setdefault(t.name, []).append(t)
    return {s.name: s for s in quant_sites(model)}, by_site


def _compare(model: nn.Module, reference_model: nn.Module, deployed: Runner, probe: _Probe,
             batches: list[Batch], task: str | None = None) -> _Tally:
    """Run every batch through PyTorch, the file as deployed and the instrumented file; count (and keep
    PyTorch's outputs for :func:`_compare_defaults`)."""
    n_file = len(deployed.outputs)
    device = next((p.device for p in reference_model.parameters()), torch.device("cpu"))
    sites, by_site = _site_maps(reference_model, probe.tensors)
    tally = _Tally(sites={name: _SiteTally(occurrences=len(occ)) for name, occ in by_site.items()}, task=task)
    with torch.no_grad():
        for xs, y in batches:
            store: dict[str, list[torch.Tensor]] = {}
            with export_routing(reference_model, list(sites.values()), _capture_hook(store)):
                outs_t = _torch_outputs(reference_model, xs, device, n_file, tally.notes)
            tally.torch_outputs.append(outs_t)
            outs_o = _file_outputs(deployed, _feeds(deployed.inputs, xs), len(outs_t))
            values = probe.runner.named(_feeds(probe.runner.inputs, xs))
            given = _quantizers_on(probe, store, by_site) if probe.alone else values
            if tally.agreement is None:
                tally.task = resolve_task(tally.task, outs_t)
                tally.agreement, tally.chained = Agreement(tally.task), Agreement(tally.task)
            for name, occurrences in by_site.items():
                _count_site(tally, name, sites[name].module, occurrences, (given, values), probe.codes_as,
                            store.get(name, []))
            tally.agreement.add(outs_t, outs_o)
            assert tally.chained is not None
            _add_chained(tally.chained, tally.chained_codes, (reference_model, sites, by_site), probe.runner, values,
                         probe.codes_as, xs, n_file)
            if y is not None:
                as_given = outs_t if model is reference_model else _torch_outputs(model, xs, device, n_file)
                _count_labels(tally, outs_t[0], outs_o[0], as_given[0], y)
            tally.samples += len(xs[0])
    return tally


def _default_pass(runtime: str, file: tuple[Any, Path, dict[str, str]], runners: tuple[Runner, _Probe],
                  tally: _Tally, reference: tuple[nn.Module, list[Batch]], notes: list[str]) -> str:
    """After the file's own sessions are closed (in ORT: one model's sessions at a time, each holds the
    weights, GiBs for a big model), the figures under ORT's default options; returns how they ran."""
    (proto, path, deploy_config), (deployed, probe) = file, runners
    for session in (deployed, probe.runner) if runtime == "onnxruntime" else ():
        session.close()
    default, default_described, same_as_deployed = _default_runner(runtime, path, deploy_config, notes)
    probe.defaults = _default_probe(runtime, proto, probe, default, notes)
    _compare_defaults(tally, reference[0], default, probe, reference[1])
    tally.copy_default_figures(same_as_deployed)
    return default_described


def _compare_defaults(tally: _Tally, reference_model: nn.Module, default: Runner | None, probe: _Probe,
                      batches: list[Batch]) -> None:
    """The figures under ORT's default options: the file (``default``) against PyTorch's outputs kept by
    :func:`_compare`, then the file with its codes exposed (``probe.defaults``) in the chained run; each
    session is closed once its batches ran, so one copy of the weights is loaded at a time."""
    if default is None or tally.task is None:
        return
    tally.default = Agreement(tally.task)
    with torch.no_grad():
        for (xs, _), outs_t in zip(batches, tally.torch_outputs, strict=True):
            tally.default.add(outs_t, _file_outputs(default, _feeds(default.inputs, xs), len(outs_t)))
        default.close()
        if probe.defaults is None:
            return
        tally.default_chained = Agreement(tally.task)
        sites, by_site = _site_maps(reference_model, probe.tensors)
        n_file = len(default.outputs)
        for xs, _ in batches:
            _add_chained(tally.default_chained, tally.default_chained_codes, (reference_model, sites, by_site),
                         probe.defaults, probe.defaults.named(_feeds(probe.defaults.inputs, xs)), probe.codes_as,
                         xs, n_file)
        probe.defaults.close()


def _add_chained(agreement: Agreement, counts: dict[str, ChainedCounts],
                 model_sites: tuple[nn.Module, dict[str, RoutedSite], dict[str, list[Any]]], runner: Runner,
                 values: dict[str, np.ndarray], codes_as: dict[str, str], xs: tuple[torch.Tensor, ...],
                 n_file: int) -> None:
    """Count one batch of the chained run (see :mod:`qat_ste.export.chained`): ``model`` given the
    codes ``runner`` computed at every site (``values``, by tensor name) against that run's outputs."""
    model, sites, by_site = model_sites
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    codes = {name: file_codes(values, occurrences, codes_as) for name, occurrences in by_site.items()}
    with export_routing(model, list(sites.values()), forcing_hook(codes, counts)):
        outs = _torch_outputs(model, xs, device, n_file)
    order = sorted(runner.outputs.items(), key=lambda item: item[1])
    agreement.add(outs, [torch.from_numpy(np.asarray(values[name])) for name, _ in order[:len(outs)]])


def _count_labels(tally: _Tally, torch_scores: torch.Tensor, file_scores: torch.Tensor, given_scores: torch.Tensor,
                  labels: torch.Tensor) -> None:
    """Accuracy counts of one labelled batch: class indices per sample (classification) or per pixel
    (segmentation, labels (N, H, W))."""
    if tally.task not in ("classification", "segmentation"):
        raise QatSteError(f"labels were given for a {tally.task} output",
                          "pass labels only for classification (class per sample) or segmentation (class per pixel)")
    axis = -1 if tally.task == "classification" else 1
    top_torch = torch_scores.argmax(axis)
    target = labels.cpu().reshape(top_torch.shape)
    tally.correct_torch += int((top_torch == target).sum())
    tally.correct_onnx += int((file_scores.argmax(axis) == target).sum())
    tally.correct_model += int((given_scores.argmax(axis) == target).sum())
    tally.labelled += target.numel()


def _quantizers_on(probe: _Probe, store: dict[str, list[torch.Tensor]], by_site: dict[str, list[Any]]
                   ) -> dict[str, np.ndarray]:
    """Each site's u (PyTorch's), and its codes and output from the runtime's quantizer nodes alone.
    Empty when a site occurrence has no PyTorch u (a failure, counted where it is compared)."""
    assert probe.alone is not None
    feeds: dict[str, np.ndarray] = {}
    for name, occurrences in by_site.items():
        captured = store.get(name, [])
        if len(captured) < len(occurrences):
            return {}
        for t, u in zip(occurrences, captured, strict=False):
            feeds[t.input] = u.numpy()
    key = tuple(sorted((name, u.shape) for name, u in feeds.items()))
    if key not in probe.quantizers:
        shapes = {name: tuple(u.shape) for name, u in feeds.items()}
        probe.quantizers[key] = open_runner(probe.runner.runtime,
                                            _quantizers_alone(probe.alone, probe.tensors, probe.codes_as, shapes),
                                            probe.config)
    return {**feeds, **probe.quantizers[key].named(feeds)}


def _count_site(tally: _Tally, name: str, module: Any, occurrences: list[Any],
                values: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], codes_as: dict[str, str],
                captured: list[torch.Tensor]) -> None:
    """Per-site parity (same u in both runtimes), dequantization and end-to-end codes of one batch.
    ``values``: (u, codes and output given the same u; codes through the whole network)."""
    counts = tally.sites[name]
    given, network = values
    for k, t in enumerate(occurrences):
        codes_network = torch.from_numpy(network[codes_as[t.codes]].astype(np.float32))
        if t.input not in given:
            tally.failures.append(f"site {name}: occurrence {k} has no PyTorch counterpart")
            continue
        u_onnx = torch.from_numpy(given[t.input])
        codes_onnx = torch.from_numpy(given[codes_as[t.codes]].astype(np.float32))
        expected = reference_codes(module, u_onnx)
        step, zero_point = module.grid(u_onnx)
        y_expected = ((codes_onnx - zero_point.cpu()) * step.detach().cpu()).float().numpy()
        mismatch = expected != codes_onnx
        counts.values += expected.numel()
        counts.parity += expected.numel() - int(mismatch.sum())
        if bool(mismatch.any()):
            counts.near_boundary += _near_boundary(module.rounding, u_onnx, step, expected, codes_onnx, mismatch)
        counts.dequant_exact = counts.dequant_exact and np.array_equal(y_expected, given[t.output])
        if k < len(captured) and captured[k].shape == codes_network.shape:
            counts.end_to_end += int((reference_codes(module, captured[k]) == codes_network).sum())
        elif tally.task == "detection" and k < len(captured):
            # after a data-dependent selection (proposals kept by NMS) the file may keep other boxes than
            # PyTorch; the boxes themselves are compared by the task's figure
            counts.not_compared += expected.numel()
            note = (f"site {name}: shaped {tuple(codes_network.shape)} in the file and {tuple(captured[k].shape)} "
                    "in PyTorch (a data-dependent selection such as NMS kept other boxes); its end-to-end codes "
                    "are not compared there")
            if not any(n.startswith(f"site {name}: shaped") for n in tally.notes):
                tally.notes.append(note)
        else:
            tally.failures.append(f"site {name}: occurrence {k} has no PyTorch counterpart of the same shape")


def _near_boundary(rounding: str, u: torch.Tensor, step: torch.Tensor, expected: torch.Tensor, codes: torch.Tensor,
                   mismatch: torch.Tensor) -> int:
    """How many of the ``mismatch``ed codes differ by one where u/step lies within 2 float32 ulps of a
    rounding boundary (a half-way point for nearest rounding, an integer for ceil)."""
    ratio = step_ratio(u, step)
    near = boundary_distance(rounding, ratio) <= 2 * torch.finfo(torch.float32).eps * ratio.abs().clamp_min(1.0)
    return int((mismatch & near & ((expected - codes).abs() == 1)).sum())


def _site_checks(tally: _Tally, meta: dict[str, Any]) -> list[SiteCheck]:
    meta_sites = {s["name"]: s for s in meta["sites"]}
    checks = []
    for name, c in tally.sites.items():
        n = max(c.values, 1)
        checks.append(SiteCheck(
            name=name, bits=int(meta_sites[name]["bits"]), container=str(meta_sites[name].get("container", "?")),
            occurrences=c.occurrences, values=c.values, parity=c.parity / n, dequant_exact=c.dequant_exact,
            end_to_end=c.end_to_end / n, near_boundary=c.near_boundary,
            chained=tally.chained_codes[name].agreement if name in tally.chained_codes else 1.0))
    return checks


def _threshold_failures(site_checks: list[SiteCheck], tally: _Tally, thresholds: dict[str, float | None],
                        runtime: str = "onnxruntime") -> list[str]:
    failures = []
    for s in site_checks:
        differ = s.values - round(s.parity * s.values)
        if differ - (s.near_boundary if runtime == "openvino" else 0) > 0:
            failures.append(f"site {s.name}: {differ} of {s.values} codes differ given the same input "
                            "(the file's step/zero point/rounding differ from the model's)")
        if not s.dequant_exact:
            failures.append(f"site {s.name}: dequantized values differ from (q - z) * step")
    min_codes, max_diff = thresholds["min_code_agreement"], thresholds["max_logit_diff"]
    if min_codes is not None and tally.code_agreement < min_codes:
        failures.append(f"end-to-end code agreement {tally.code_agreement:.4%} < {min_codes:.2%}")
    chained_codes, min_chained = pooled_agreement(tally.chained_codes), thresholds["min_chained_code_agreement"]
    if min_chained is not None and chained_codes < min_chained:
        worst = sorted(tally.chained_codes.items(), key=lambda item: item[1].agreement)[:3]
        failures.append(f"code agreement given the file's codes {chained_codes:.4%} < {min_chained:.2%} (lowest: "
                        + ", ".join(f"{name} {c.agreement:.2%}" for name, c in worst)
                        + "): the ops between these sites compute other values in the file")
    agreement, default, chained = tally.agreement, tally.default, tally.chained
    if agreement is None or chained is None or tally.task is None:
        return failures
    if max_diff is not None and agreement.max_diff > max_diff:
        failures.append(f"max |logit difference| {agreement.max_diff:.6g} > {max_diff:g}")
    failures += _figure_failures(tally.task, chained.value, thresholds[threshold_key(tally.task)],
                                 " given the file's codes")
    failures += _figure_failures(tally.task, agreement.value, thresholds[threshold_key(tally.task, end_to_end=True)],
                                 " end to end")
    if tally.default_chained is not None:
        failures += _figure_failures(tally.task, tally.default_chained.value,
                                     thresholds[threshold_key(tally.task, True)],
                                     " under ORT's default options, given its codes")
    if default is not None:
        limit = thresholds["max_default_logit_diff"]
        if limit is not None and default.max_diff > limit:
            failures.append(f"max |logit difference| under ORT's default options {default.max_diff:.6g} > {limit:g}")
    return failures


def _figure_failures(task: str, value: float, threshold: float | None, where: str) -> list[str]:
    if meets(task, value, threshold):
        return []
    if task == "regression":
        return [f"relative error{where} {value:.4%} > {threshold:.2%}"]
    return [f"{TASKS[task]}{where} {value:.2%} < {threshold:.2%}"]


def _integer_ops(runtime: str, path: Path, file_config: dict[str, str], deployed: Runner
                 ) -> tuple[dict[str, int], dict[str, int], dict[str, int] | str, str]:
    """(integer kernels, float conv/matmul kernels) in ORT's optimized graph under the file's options,
    the integer kernels under ORT's defaults (a string: why the file does not load that way), and the
    options used; in OpenVINO, the compute nodes of the deployed model's runtime graph by precision."""
    if runtime == "openvino":
        from .openvino_runtime import kernel_counts

        integer, floating = kernel_counts(deployed.handle)
        return integer, floating, dict(integer), deployed.description + " (its runtime graph)"
    deployed_ops = optimized_op_counts(path, file_config)
    integer_ops = {k: v for k, v in deployed_ops.items() if is_integer_op(k)}
    float_ops = {k: v for k, v in deployed_ops.items() if k in FLOAT_COMPUTE_OPS}
    described = describe_options(file_config) + "; and ORT defaults"
    if not file_config:
        return integer_ops, float_ops, dict(integer_ops), described
    try:
        default_ops: dict[str, int] | str = {
            k: v for k, v in optimized_op_counts(path, {}).items() if is_integer_op(k)}
    except Exception as e:  # noqa: BLE001 - ORT refuses 4-bit Q/DQ around convs with default options
        default_ops = str(e).strip().splitlines()[-1][:200]
    return integer_ops, float_ops, default_ops, described


def _latency(model: nn.Module, path: Path, xs: tuple[torch.Tensor, ...], runtime: str,
             configs: tuple[dict[str, str], dict[str, str]], meta: dict[str, Any], runs: int, threads: int | None,
             float_path: str | os.PathLike | None, notes: list[str], options: dict[str, str]
             ) -> dict[str, float] | None:
    """Median latency of the file and of the float model's export, in ``runtime`` with ``threads``;
    ``configs``: (the file's options, the float export's)."""
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(float_path) if float_path is not None else Path(tmp) / "float.onnx"
        if float_path is None:
            try:
                export_float_onnx(model, reference, tuple(x[:1].cpu() for x in xs), opset=int(meta.get("opset", 21)))
            except Exception as e:  # noqa: BLE001
                notes.append(f"no latency comparison: the float model did not export ({e})")
                return None
        quantized = open_runner(runtime, path, configs[0], threads=threads)
        baseline = open_runner(runtime, reference, configs[1], threads=threads)
        q_feeds, f_feeds = _feeds(quantized.inputs, xs), _feeds(baseline.inputs, xs)
        q_ms = median_call_ms(lambda: quantized.run(q_feeds), runs)
        f_ms = median_call_ms(lambda: baseline.run(f_feeds), runs)
    options["latency"] = f"quantized: {quantized.description}; float export: {baseline.description}"
    return {"quantized": q_ms, "float": f_ms, "speedup": f_ms / q_ms, "batch": float(len(xs[0]))}


# ---- quantized weights -----------------------------------------------------------------------------


def allowed_weight_codes(spec: str) -> tuple[int, ...]:
    """The value set of a weight spec: binary {-1, 1}, ternary {-1, 0, 1}, int{b} the 2^b - 1
    symmetric integers -(2^(b-1) - 1) .. 2^(b-1) - 1."""
    if spec == "binary":
        return (-1, 1)
    if spec == "ternary":
        return (-1, 0, 1)
    if spec.startswith("int") and spec[3:].isdigit() and 2 <= int(spec[3:]) <= 8:
        top = 2 ** (int(spec[3:]) - 1) - 1
        return tuple(range(-top, top + 1))
    raise QatSteError(f"unknown weight spec {spec!r} in the file's metadata",
                      "check a file written by qat_ste's export_onnx()")


def _runtime_weights(proto: Any, outputs: list[str], xs: tuple[torch.Tensor, ...], runtime: str,
                     config: dict[str, str]
                     ) -> dict[str, np.ndarray]:
    """The runtime's value of each dequantized weight (the file with only those as outputs)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    data_dir = _pop_data_dir(model)
    from .runtime import SerializedModel

    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    runner = open_runner(runtime, SerializedModel(model.SerializeToString(), data_dir), config)
    values = runner.named(_feeds(runner.inputs, xs) if runner.inputs else {})
    return {o: values[o] for o in outputs}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.int32), b.view(np.int32)))


def _weight_checks(model: nn.Module, proto: Any, meta: dict[str, Any], xs: tuple[torch.Tensor, ...],
                   runtime: str = "onnxruntime",
                   config: dict[str, str] | None = None) -> list[WeightCheck]:
    """Per quantized-weight layer: the codes in the file against the spec's value set (the spec read
    from the metadata), and codes x scale (in numpy and in ``runtime`` with ``config``) against PyTorch's Q(w)."""
    from .passes import WEIGHT_CONTAINERS, weight_tensors
    from .weights import dequantize_per_channel

    specs = {w["name"]: w["spec"] for w in meta.get("weight_layers", [])}
    if not specs:
        return []
    tensors = [t for t in weight_tensors(proto) if t.name in specs]
    ort_values = _runtime_weights(proto, [t.output for t in tensors], xs, runtime,
                                  DISABLE_QDQ if config is None else config)
    modules = dict(model.named_modules())
    containers: dict[int, str] = {int(code): name for name, (code, _, _) in WEIGHT_CONTAINERS.items()}
    checks = []
    for t in tensors:
        allowed = allowed_weight_codes(specs[t.name])
        present = np.unique(t.codes)
        outside = int(np.isin(t.codes, np.asarray(allowed), invert=True).sum())
        with torch.no_grad():
            expected = modules[t.name].quantized_weight().detach().cpu().float().numpy()
        if t.axis is None:
            in_file = (t.codes.astype(np.float32) * t.scale.astype(np.float32)).astype(np.float32)
        else:
            in_file = dequantize_per_channel(t.codes, t.scale, t.axis)
        checks.append(WeightCheck(
            name=t.name, spec=specs[t.name], container=containers.get(int(t.codes_type), str(t.codes_type)),
            per_channel=t.axis is not None, values=int(t.codes.size), distinct=tuple(int(v) for v in present),
            allowed=len(allowed), outside=outside, exact=_same_bits(in_file, expected),
            ort_exact=_same_bits(ort_values[t.output], expected)))
    missing = sorted(set(specs) - {t.name for t in tensors})
    if missing:
        raise QatSteError(f"the file's metadata names quantized-weight layer(s) {', '.join(missing[:5])} "
                          "that its graph does not have", "re-export the model with export_onnx()")
    return checks


def _weight_failures(checks: list[WeightCheck]) -> list[str]:
    failures = []
    for w in checks:
        if w.outside:
            failures.append(f"weight layer {w.name}: {w.outside} of {w.values} codes lie outside the {w.spec} "
                            f"value set ({w.allowed} values; present: {', '.join(map(str, w.distinct))})")
        if not w.exact:
            failures.append(f"weight layer {w.name}: the file's codes x scale differ from PyTorch's Q(w)")
        if not w.ort_exact:
            failures.append(f"weight layer {w.name}: ONNX Runtime's dequantized weight differs from PyTorch's Q(w)")
    return failures

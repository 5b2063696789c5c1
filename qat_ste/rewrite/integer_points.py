"""Quantization points for a fully integer graph (``quantize(..., integer_graph=True)``).

An integer runtime (ONNX Runtime's QLinearConv / QLinearAdd / QGemm / QLinearMatMul, OpenVINO's int8
kernels) runs an op in integers only when every tensor it reads arrives as integer codes. The
activation sites give codes after each activation; this pass adds a *quantization point* (a
:class:`QuantAct` of kind ``point``: identity, then an 8-bit grid with a zero point) wherever a
tensor that is not yet codes feeds

- the data input of a Conv / Linear module or of ``F.conv*``, ``F.linear``, ``matmul``, ``bmm``;
- any tensor input of ``+``, ``-``, ``*`` (``operator.add``, ``torch.add``, ``x.add_``, ``+=``...)
  and ``torch.cat``;
- the input of an activation other than the quantized ReLU (GELU, Hardswish, a float gate...): it
  runs in float between DequantizeLinear and QuantizeLinear, and the op before it ends in codes;
- the input of a child module that reads that input as codes somewhere inside;

and the result of every add / mul / concat that a quantized ReLU does not read (an integer add ends
in codes). So the graph input, the non-activation input of every residual add, a squeeze-excite gate multiplied
into the features, the output of average pooling before the classifier and the inputs of attention
matmuls each get one. A tensor is codes when it comes from a QuantAct through ops that keep the codes
on the same grid (max pooling, flatten / reshape / view / permute / transpose / indexing / squeeze /
dropout / identity); parameters and buffers (``x + self.pos_embed``) are constants and get none.

Which tensors are codes across module boundaries is learnt from one run of the model on the example
input (inputs and outputs of every module call); the points are then placed in the owners' FX graphs
by the same machinery as the activation sites: one point per tensor, right after the node that makes
it, read by every later use of that tensor inside the owner (the owner's return value keeps the float
tensor, except an add / mul / concat result's). Owners are handled outermost first, so a point placed
in a parent makes the child's input codes and the child adds none. An owner FX cannot trace (the
runtime fallback), or whose trace would freeze a branch, gets no points; the report lists it.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..config import QuantConfig
from ..errors import QatSteError
from ..kinds import POINT, function_kind, method_kind, module_kind
from ..nn_utils import preserve_modes
from ..quantizer.module import QuantAct
from .report import Site

INTEGER_POINT = "integer point"
#: the bits of a quantization point unless an override gives others
POINT_BITS = 8

#: ops whose output holds the same codes as their first input (by torch function ``__name__``)
_CODE_PRESERVING = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "flatten", "unflatten", "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t",
    "movedim", "contiguous", "squeeze", "unsqueeze", "__getitem__", "chunk", "split", "split_with_sizes",
    "unbind", "narrow", "expand", "expand_as", "clone", "detach", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "feature_dropout", "alpha_dropout", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "flip",
})
#: the same, as FX nodes: functions and Tensor methods
_CODE_PRESERVING_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.unbind, torch.narrow, torch.movedim, torch.flip, operator.getitem,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.pixel_shuffle,
    F.pixel_unshuffle, torch.max_pool2d,
}
_CODE_PRESERVING_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
#: timm's stochastic-depth layer: identity in evaluation (matched by name: timm is optional)
_CODE_PRESERVING_CLASS_NAMES = frozenset({"DropPath"})

#: binary element-wise ops and concatenation: every tensor input must be codes
_ELEMENTWISE_FUNCTIONS = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.add: "add", torch.sub: "sub", torch.mul: "mul",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
}
_ELEMENTWISE_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul"}
#: matrix products and convolutions as functions: the first two arguments are data (weights are constants)
_PRODUCT_FUNCTIONS = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul", F.linear: "linear",
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
}
_PRODUCT_METHODS = {"matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul"}
_PRODUCT_MODULES: tuple[tuple[type, str], ...] = ((nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Conv3d, "conv"),
                                                  (nn.Linear, "linear"))


# ---- which tensors are codes at run time ------------------------------------------------------------


@dataclass
class CodeFlow:
    """What one run of the model showed: for every module call, whether its inputs and output were codes.

    ``inputs[id(module)][i]`` / ``output[id(module)]`` are True only when they were codes at every call;
    ``producer[id(module)]`` is the QuantAct whose codes the module's first input was at every call
    (absent when it was not codes, or codes of different quantizers at different calls).
    """

    inputs: dict[int, list[bool]] = field(default_factory=dict)
    output: dict[int, bool] = field(default_factory=dict)
    producer: dict[int, QuantAct] = field(default_factory=dict)
    #: id(module) -> the QuantAct that read the module's output tensor itself (through identities)
    consumer: dict[int, QuantAct] = field(default_factory=dict)
    _mixed: set[int] = field(default_factory=set)

    def saw_input(self, module: nn.Module, codes: list[bool], producer: QuantAct | None) -> None:
        key = id(module)
        before = self.inputs.get(key)
        self.inputs[key] = codes if before is None else [x and y for x, y in zip(before, codes, strict=False)]
        known = self.producer.get(key)
        if producer is None or key in self._mixed or (before is not None and known is not producer):
            self.producer.pop(key, None)
            self._mixed.add(key)
        else:
            self.producer[key] = producer


class _CodeTracker(TorchFunctionMode):
    """Follows codes (and the quantizer they come from) through code-preserving ops; forgets a
    tensor changed in place."""

    def __init__(self) -> None:
        super().__init__()
        #: id -> (tensor, its quantizer); the tensor is kept alive so that ids stay unique
        self.codes: dict[int, tuple[torch.Tensor, QuantAct]] = {}

    def mark(self, value: Any, producer: QuantAct) -> None:
        for t in _tensors(value):
            self.codes[id(t)] = (t, producer)

    def is_code(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self.codes

    def producer(self, value: Any) -> QuantAct | None:
        entry = self.codes.get(id(value)) if isinstance(value, torch.Tensor) else None
        return entry[1] if entry is not None else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _CODE_PRESERVING and args and self.is_code(args[0]):
            self.mark(result, self.codes[id(args[0])][1])
        elif (name.endswith("_") and not name.startswith("__")) or name.startswith("__i"):
            for t in (args[0] if args else None, result):  # in place: no longer the codes it was
                if isinstance(t, torch.Tensor):
                    self.codes.pop(id(t), None)
        return result


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


def code_flow(model: nn.Module, example_input: Any) -> CodeFlow:
    """Run ``model`` once on ``example_input`` (no grad, eval mode; quantizers not yet calibrated pass
    the float value through) and record which module inputs and outputs were codes."""
    tracker, flow = _CodeTracker(), CodeFlow()
    #: id(output) -> (output, the first module that returned it: identities pass the same tensor on)
    made_by: dict[int, tuple[torch.Tensor, nn.Module]] = {}

    def pre_hook(module: nn.Module, args: tuple) -> None:
        flow.saw_input(module, [tracker.is_code(a) for a in args], tracker.producer(args[0]) if args else None)
        if isinstance(module, QuantAct) and args and id(args[0]) in made_by:
            flow.consumer[id(made_by[id(args[0])][1])] = module

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(module, QuantAct):
            tracker.mark(output, module)
        flow.output[id(module)] = flow.output.get(id(module), True) and tracker.is_code(output)
        if isinstance(output, torch.Tensor):
            made_by.setdefault(id(output), (output, module))

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with ExitStack() as stack:
        for m in model.modules():
            stack.callback(m.register_forward_pre_hook(pre_hook).remove)
            stack.callback(m.register_forward_hook(post_hook).remove)
            if isinstance(m, QuantAct) and not m.is_initialized:
                stack.enter_context(m.observing(_ignore))
        stack.enter_context(preserve_modes(model, training=False))
        stack.enter_context(torch.no_grad())
        stack.enter_context(tracker)
        try:
            model(*inputs)
        except Exception as e:  # noqa: BLE001 - any failure of the user's model on the input
            raise QatSteError(f"integer_graph needs one run of the model to see which tensors are codes, and "
                              f"it failed: {type(e).__name__}: {e}",
                              "pass example_input=<a batch the model accepts> to quantize()") from e
    return flow


def _ignore(module: QuantAct, u: torch.Tensor) -> None:
    return None


# ---- where the points go ----------------------------------------------------------------------------


@dataclass
class _Need:
    """A tensor (FX node) of one owner's graph that an integer op reads and that is not codes."""

    node: fx.Node
    reads: str        # what reads it: "conv input", "add input", "cat input", "linear input", ...


def _is_code_preserving(node: fx.Node, owner: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in _CODE_PRESERVING_FUNCTIONS
    if node.op == "call_method":
        return str(node.target) in _CODE_PRESERVING
    if node.op == "call_module":
        sub = owner.get_submodule(str(node.target))
        return isinstance(sub, _CODE_PRESERVING_MODULES) or type(sub).__name__ in _CODE_PRESERVING_CLASS_NAMES
    return False


def _is_codes(node: fx.Node, owner: nn.Module, flow: CodeFlow, placeholders: dict[fx.Node, int]) -> bool | None:
    """Whether ``node``'s value is codes (None: a constant, which needs no point)."""
    node = _origin(node, owner)
    if node.op == "get_attr":
        return None
    if node.op == "placeholder":
        seen = flow.inputs.get(id(owner), [])
        i = placeholders[node]
        return i < len(seen) and seen[i]
    if node.op == "call_module":
        sub = owner.get_submodule(str(node.target))
        return isinstance(sub, QuantAct) or flow.output.get(id(sub), False)
    return False


def _integer_reads(node: fx.Node, owner: nn.Module) -> tuple[str, list[Any]]:
    """What ``node`` is ("" if it needs no codes) and the arguments it must read as codes.

    Besides the integer ops, an activation that is not the quantized ReLU itself (a generic
    QuantAct: GELU, Hardswish...; a float gate) reads codes: it runs as float between a
    DequantizeLinear and a QuantizeLinear, so that the op before it can end in integer codes.
    """
    if node.op == "call_module":
        sub = owner.get_submodule(str(node.target))
        for cls, what in _PRODUCT_MODULES:
            if isinstance(sub, cls):
                return what, list(node.args[:1])
        kind = sub.kind if isinstance(sub, QuantAct) else module_kind(sub)
        if kind is not None and kind.family != "relu" and kind is not POINT:
            return kind.name, list(node.args[:1])
        return "", []
    kind = (function_kind(node.target, node.args, node.kwargs) if node.op == "call_function" else
            method_kind(str(node.target)) if node.op == "call_method" else None)
    if kind is not None and kind.family != "relu":
        return kind.name, list(node.args[:1])
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            what = _ELEMENTWISE_FUNCTIONS[node.target]
            data = list(node.args[0]) if what == "cat" and isinstance(node.args[0], (list, tuple)) else \
                list(node.args[:2])
            return what, data
        if node.target in _PRODUCT_FUNCTIONS:
            return _PRODUCT_FUNCTIONS[node.target], list(node.args[:2])
    if node.op == "call_method":
        name = str(node.target)
        if name in _ELEMENTWISE_METHODS:
            return _ELEMENTWISE_METHODS[name], list(node.args[:2])
        if name in _PRODUCT_METHODS:
            return _PRODUCT_METHODS[name], list(node.args[:2])
    return "", []


def _placeholder_index(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}


def _origin(node: fx.Node, owner: nn.Module) -> fx.Node:
    """The node whose value ``node`` carries through code-preserving ops."""
    while _is_code_preserving(node, owner) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


class _Placer:
    """The owners' graphs and what they read as codes, for one model."""

    def __init__(self, graphs: dict[int, fx.Graph]) -> None:
        self.graphs = graphs               # id(owner) -> its graph (traceable owners only)
        self._reads: dict[int, list[bool]] = {}

    def reads_codes(self, module: nn.Module) -> list[bool]:
        """Per positional input of ``module``: whether something inside it must read that input as codes."""
        key = id(module)
        if key not in self._reads:
            self._reads[key] = []  # a module inside itself (recursion) reads nothing more
            graph = self.graphs.get(key)
            out: list[bool] = []
            if graph is not None:
                index = _placeholder_index(graph)
                out = [False] * len(index)
                for node in graph.nodes:
                    for arg, _ in self.reads(node, module):
                        origin = _origin(arg, module)
                        if origin.op == "placeholder":
                            out[index[origin]] = True
            self._reads[key] = out
        return self._reads[key]

    def reads(self, node: fx.Node, owner: nn.Module) -> list[tuple[fx.Node, str]]:
        """The arguments of ``node`` that must be codes, with what reads them: integer ops,
        activations that run in float, and child modules that read an input as codes."""
        what, data = _integer_reads(node, owner)
        if what:
            return [(a, f"{what} input") for a in data if isinstance(a, fx.Node)]
        if node.op == "call_module":
            sub = owner.get_submodule(str(node.target))
            flags = self.reads_codes(sub)
            return [(a, f"input of {type(sub).__name__}") for a, f in zip(node.args, flags, strict=False)
                    if f and isinstance(a, fx.Node)]
        return []

    def needed(self, owner: nn.Module, graph: fx.Graph, flow: CodeFlow) -> list[_Need]:
        """The tensors of ``owner``'s graph that must be codes and are not, once each."""
        placeholders = _placeholder_index(graph)
        needs: dict[fx.Node, _Need] = {}
        for node in graph.nodes:
            for arg, reads in self.reads(node, owner):
                if arg not in needs and _is_codes(arg, owner, flow, placeholders) is False:
                    needs[arg] = _Need(arg, reads)
        return list(needs.values())


def _elementwise_outputs(owner: nn.Module, graph: fx.Graph) -> list[_Need]:
    """Adds, muls and concatenations whose result is not read by a quantized ReLU alone: their
    result becomes codes (an integer runtime's QLinearAdd / QLinearMul / QLinearConcat end in codes)."""
    needs = []
    for node in graph.nodes:
        what, _ = _integer_reads(node, owner)
        if what not in ("add", "sub", "mul", "cat"):
            continue
        users = list(node.users)
        if users and all(u.op == "call_module" and isinstance(q := owner.get_submodule(str(u.target)), QuantAct)
                         and q.quantizes_input for u in users):
            continue
        needs.append(_Need(node, f"{what} output"))
    return needs


# ---- placing them ---------------------------------------------------------------------------------------


def _depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def _label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        return str(node.target).replace(".", "_")
    name = getattr(node.target, "__name__", str(node.target))
    return name.strip("_") or "value"


@dataclass
class FxTools:
    """The engine's FX machinery, so that points are placed exactly as activation sites are."""

    trace: Callable[[nn.Module], fx.Graph]           # a shallow trace of one module's forward
    hazard: Callable[[nn.Module], str]               # why its trace may not hold ("" if it does)
    install: Callable[[nn.Module, fx.Graph], None]   # a graph as the module's forward
    new_name: Callable[[nn.Module, str], str]        # a free attribute name on the module
    is_owner: Callable[[nn.Module], bool]            # whether a module's own forward makes calls to rewrite


def place_points(model: nn.Module, cfg: QuantConfig, example_input: Any, tools: FxTools
                 ) -> tuple[list[Site], dict[str, str]]:
    """Add the points to ``model`` in place; the new sites and the owners left without points (and why).

    First the results of adds / muls / concatenations become codes; then, outermost owners first,
    every tensor that must be codes and is not gets a point (one run of the model per depth says
    which tensors are codes).
    """
    skipped: dict[str, str] = {}
    owners = [(p, m) for p, m in model.named_modules() if tools.is_owner(m)]
    graphs, frozen = {}, {}
    for path, owner in owners:
        graph, why = _graph_of(owner, tools)
        if graph is not None:
            graphs[id(owner)] = graph
        if why:
            frozen[id(owner)] = why
            if graph is None:
                skipped[path] = why
    placer, sites = _Placer(graphs), []
    for path, owner in owners:
        graph = graphs.get(id(owner))
        if graph is None:
            continue
        needs = _elementwise_outputs(owner, graph)
        if needs and id(owner) in frozen:
            skipped[path] = frozen[id(owner)]
        elif needs:
            sites += _insert(owner, path, graph, needs, cfg, tools)
    flow, changed = code_flow(model, example_input), False
    for level in sorted({_depth(p) for p, _ in owners}):
        if changed:  # the level above placed points: run the model again
            flow, changed = code_flow(model, example_input), False
        for path, owner in owners:
            graph = graphs.get(id(owner))
            if graph is None or _depth(path) != level:
                continue
            needs = placer.needed(owner, graph, flow)
            if needs and id(owner) in frozen:
                skipped[path] = frozen[id(owner)]
            elif needs:
                sites += _insert(owner, path, graph, needs, cfg, tools)
                changed = True
    return sites, skipped


def _graph_of(owner: nn.Module, tools: FxTools) -> tuple[fx.Graph | None, str]:
    """The owner's shallow trace and why points must not be installed from it ("" when they may):
    a runtime-fallback owner has none, a trace that freezes a branch only serves the analysis."""
    cls = type(owner)
    if hasattr(cls, "_qat_base_class") and not hasattr(cls, "_qat_forward_src"):
        return None, "its activations are dispatched at run time (FX cannot trace it)"
    why = tools.hazard(owner)
    try:
        return tools.trace(owner), why
    except Exception as e:  # noqa: BLE001 - an untraceable owner just gets no points
        return None, f"FX cannot trace it ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def _insert(owner: nn.Module, path: str, graph: fx.Graph, needs: list[_Need], cfg: QuantConfig,
            tools: FxTools) -> list[Site]:
    """One point per need, read by every later use of the tensor (an element-wise result's point also
    by the owner's return value; an input's point not), then the graph installed as the forward."""
    prefix = f"{path}." if path else ""
    sites = []
    for need in needs:
        attr = tools.new_name(owner, f"{_label(need.node)}_point")
        name = f"{prefix}{attr}"
        quantized = cfg.name_selected(name)
        point = make_point(name, cfg, need.reads) if quantized else None
        sites.append(Site(name, path, need.reads, POINT.name, INTEGER_POINT, point,
                          "" if quantized else "excluded by include/exclude patterns"))
        if point is None:
            continue
        owner.add_module(attr, point)
        anchor = need.node
        if anchor.op == "placeholder":  # after the last placeholder: the graph's inputs stay first
            anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(anchor):
            new = graph.call_module(attr, (need.node,))
        keep_output = not need.reads.endswith(" output")
        for user in list(need.node.users):
            if user is not new and not (keep_output and user.op == "output"):
                user.replace_input_with(need.node, new)
    tools.install(owner, graph)
    return sites


def make_point(name: str, cfg: QuantConfig, reads: str) -> QuantAct:
    """The QuantAct of one quantization point: 8 bits and a calibrated step unless an override
    matching the point's name gives ``bits`` / ``step_init``; the config's STE."""
    site_cfg = cfg.for_site(name)
    given = {k for p, opts in cfg.overrides.items() if _matches(name, p) for k in opts}
    bits = site_cfg.bits if "bits" in given else POINT_BITS
    step_init = site_cfg.step_init if "step_init" in given else None
    # a point has no paper step: with alpha_mode "fixed" it is calibrated and then learnt (lsq)
    mode = site_cfg.alpha_mode if site_cfg.alpha_mode != "fixed" or step_init is not None else "lsq"
    point = QuantAct(POINT, nn.Identity(), bits=bits, ste=site_cfg.ste, alpha_mode=mode,
                     step_init=step_init, rounding="nearest", per_channel=False, original=reads)
    point.site = name
    return point


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)

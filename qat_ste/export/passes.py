"""Post-passes on the exported ONNX graph (onnx protobuf, edited in place).

- :func:`tag_sites`: find each site's nodes (tagged by the export op), give them readable names,
  their own scale / zero-point initializers taken from the PyTorch module, and named code tensors.
- :func:`quantize_weights_int8`: per-channel symmetric int8 weights behind DequantizeLinear, int32
  biases where the layer's input scale is a site's scale (what ORT needs to fuse QLinearConv etc.).
- :func:`narrow_containers`: uint8 + Clip -> UINT4 / UINT2 codes (bit-identical).
- :func:`prune`: drop nodes and initializers nothing uses.
- :func:`tag_weights` / :func:`narrow_weight_containers`: name each quantized-weight layer's
  DequantizeLinear and its codes / scale initializers; INT4 / INT2 codes in ``spec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ops import SITE_INDEX_KEY, SITE_MARKER, WEIGHT_INDEX_KEY, WEIGHT_MARKER
from .weights import int8_per_channel

SITE_KEY = "qat_ste.site"
#: node metadata the torch exporter adds that a deployment file does not need (stack traces
#: with local paths, FX node dumps)
_DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
#: ops that pass a quantized tensor on without changing its grid
_GRID_PRESERVING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
CONTAINERS = {"uint8": TensorProto.UINT8, "uint4": TensorProto.UINT4, "uint2": TensorProto.UINT2}


@dataclass
class SiteQuant:
    """What one site's quantizer is, in numbers (from the PyTorch module)."""

    index: int
    name: str
    bits: int
    scale: np.ndarray          # float32, shape () or (C,)
    zero_point: np.ndarray     # int, same shape
    axis: int | None           # channel axis when per-channel (non-negative)
    rank: int                  # rank of the quantized tensor
    rounding: str
    container: str = "uint8"   # set by narrow_containers
    range_limit: str = "none"  # "none", "integer_clip" (uint8), "float_limit" (before Q)


@dataclass
class SiteGraph:
    """The nodes and tensors of one occurrence of a site in the graph."""

    quant: SiteQuant
    occurrence: int
    input: str                                       # the float value u the quantizer sees
    codes: str                                       # the integer code tensor
    output: str                                      # the dequantized tensor
    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)  # role -> node


# ---- small graph helpers --------------------------------------------------------------------------


def _channel_axis(quant: SiteQuant) -> int:
    """The channel axis of a per-channel site (which always has one)."""
    if quant.axis is None:
        raise RuntimeError(f"site {quant.name} has one step per channel but no channel axis (a bug)")
    return int(quant.axis)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _nested_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of every subgraph (If branches, Loop / Scan bodies) inside ``graph``, at any depth;
    they read tensors of the enclosing graphs by name."""
    nested = []
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                nested.extend(sub.node)
                nested.extend(_nested_nodes(sub))
    return nested


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of every subgraph inside it."""
    return list(graph.node) + _nested_nodes(graph)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _set_meta(node: onnx.NodeProto, key: str, value: str) -> None:
    for p in node.metadata_props:
        if p.key == key:
            p.value = value
            return
    entry = node.metadata_props.add()
    entry.key, entry.value = key, value


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears (node inputs/outputs, graph outputs, value_info)."""
    if old == new:
        return
    for n in _all_nodes(graph):
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for i, name in enumerate(n.output):
            if name == old:
                n.output[i] = new
    for v in list(graph.output) + list(graph.value_info):
        if v.name == old:
            v.name = new


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray, data_type: int | None = None) -> str:
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            del graph.initializer[i]
            break
    if data_type is None:
        graph.initializer.append(numpy_helper.from_array(array, name))
    else:
        graph.initializer.append(helper.make_tensor(name, data_type, list(array.shape), array.flatten().tolist()))
    return name


def initializer_array(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def prune(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing uses (subgraphs' reads of outer tensors count), then unused
    initializers."""
    while True:
        used = {i for n in _all_nodes(graph) for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in _all_nodes(graph) for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    _drop_value_info(graph, {v.name for v in graph.value_info if v.name not in names})


def clean_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's stack traces and FX dumps from node metadata."""
    for n in graph.node:
        keep = [(p.key, p.value) for p in n.metadata_props if p.key not in _DROPPED_METADATA]
        del n.metadata_props[:]
        for k, v in keep:
            _set_meta(n, k, v)


def resolve_markers(model: onnx.ModelProto, domain: str = "qat_ste") -> int:
    """The TorchScript path's marker nodes -> node metadata: a ``Site`` marker tags the QuantizeLinear
    before it with its site index, a ``WeightSite`` marker the DequantizeLinear before it with the
    layer index, as the dynamo lowering does; the markers and their opset import are removed.
    Returns the number of markers resolved."""
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    markers = [n for n in graph.node if n.domain == domain and n.op_type in (SITE_MARKER, WEIGHT_MARKER)]
    nested = _nested_nodes(graph)
    for marker in markers:
        index = str(next(a.i for a in marker.attribute if a.name == "index"))
        source, out = marker.input[0], marker.output[0]
        expected = "QuantizeLinear" if marker.op_type == SITE_MARKER else "DequantizeLinear"
        tagged = producers.get(source)
        if tagged is None or tagged.op_type != expected:
            raise RuntimeError(f"{marker.op_type} marker {index} does not follow a {expected} (a bug, please report)")
        _set_meta(tagged, SITE_INDEX_KEY if marker.op_type == SITE_MARKER else WEIGHT_INDEX_KEY, index)
        for user in consumers.get(out, []) + [n for n in nested if out in n.input]:
            for i, name in enumerate(user.input):
                if name == out:
                    user.input[i] = source
        for o in graph.output:
            if o.name == out:
                raise RuntimeError(f"marker {index} feeds a graph output (a bug, please report)")
        graph.node.remove(marker)
    _drop_value_info(graph, {m.output[0] for m in markers})
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return len(markers)


# ---- sites ---------------------------------------------------------------------------------------


def tag_sites(graph: onnx.GraphProto, quants: list[SiteQuant]) -> list[SiteGraph]:
    """Find, name and re-parameterise every site's Q(/Clip)/DQ nodes; returns them in graph order."""
    by_index = {q.index: q for q in quants}
    consumers = _consumers(graph)
    producers = _producers(graph)
    found: list[SiteGraph] = []
    seen: dict[int, int] = {}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or SITE_INDEX_KEY not in _meta(node):
            continue
        quant = by_index[int(_meta(node)[SITE_INDEX_KEY])]
        occurrence = seen.get(quant.index, 0)
        seen[quant.index] = occurrence + 1
        prefix = quant.name if occurrence == 0 else f"{quant.name}#{occurrence}"
        nodes = {"quantize": node}
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Clip":
            nodes["clip"] = after[0]
            after = consumers.get(after[0].output[0], [])
        if len(after) != 1 or after[0].op_type != "DequantizeLinear":
            raise RuntimeError(f"site {quant.name}: QuantizeLinear is not followed by its DequantizeLinear")
        nodes["dequantize"] = after[0]
        source = node.input[0]
        if quant.rounding == "ceil":
            ceil = producers[source]
            div = producers[ceil.input[0]]
            nodes["ceil"], nodes["divide"] = ceil, div
            source = div.input[0]
        for role, n in nodes.items():
            n.name = f"{prefix}/{role}"
            _set_meta(n, SITE_KEY, quant.name)
        scale = quant.scale.astype(np.float32)
        q_scale = np.ones_like(scale) if quant.rounding == "ceil" else scale
        _add_initializer(graph, f"{prefix}/scale", scale)
        _add_initializer(graph, f"{prefix}/quantize_scale", q_scale)
        _add_initializer(graph, f"{prefix}/zero_point", quant.zero_point.astype(np.uint8))
        node.input[1] = f"{prefix}/quantize_scale" if quant.rounding == "ceil" else f"{prefix}/scale"
        node.input[2] = f"{prefix}/zero_point"
        dq = nodes["dequantize"]
        dq.input[1], dq.input[2] = f"{prefix}/scale", f"{prefix}/zero_point"
        codes = f"{prefix}/codes"
        if "clip" in nodes:
            clip = nodes["clip"]
            rename_tensor(graph, node.output[0], f"{prefix}/quantized")
            rename_tensor(graph, clip.output[0], codes)
            clip.input[1] = _add_initializer(graph, f"{prefix}/code_min", np.array(0, np.uint8))
            clip.input[2] = _add_initializer(graph, f"{prefix}/code_max", np.array(2 ** quant.bits - 1, np.uint8))
            quant.range_limit = "integer_clip"
        else:
            rename_tensor(graph, node.output[0], codes)
        if len(quant.scale.shape) == 0:
            for n in (node, dq):
                del n.attribute[:]  # per-tensor: no axis
        else:
            for n in (node, dq):
                del n.attribute[:]
                n.attribute.append(helper.make_attribute("axis", _channel_axis(quant)))
        found.append(SiteGraph(quant, occurrence, source, codes, dq.output[0], nodes))
    missing = [q.name for q in quants if q.index not in seen]
    if missing:
        raise RuntimeError(f"the exported graph has no quantizer for site(s) {', '.join(missing)}")
    return found


# ---- int8 weights --------------------------------------------------------------------------------


def _input_scale(graph: onnx.GraphProto, tensor: str, site_scale: dict[str, np.ndarray]) -> np.ndarray | None:
    """The scalar scale of a site's dequantized output feeding ``tensor`` (through grid-preserving ops)."""
    producers = _producers(graph)
    for _ in range(16):
        if tensor in site_scale:
            s = site_scale[tensor]
            return s if s.ndim == 0 else None
        node = producers.get(tensor)
        if node is None or node.op_type not in _GRID_PRESERVING:
            return None
        tensor = node.input[0]
    return None


def _weight_axis(node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and weight.ndim == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and weight.ndim == 2:
        return 1
    return None


def _bias_quantizable(node: onnx.NodeProto) -> bool:
    if node.op_type == "Conv":
        return True
    attrs = {a.name: a.f for a in node.attribute if a.name in ("alpha", "beta")}
    return node.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


def quantize_weights_int8(graph: onnx.GraphProto, sites: list[SiteGraph]) -> dict[str, int]:
    """Replace float Conv/Gemm/MatMul weights by per-channel symmetric int8 + DequantizeLinear, and
    biases by int32 (scale = input scale x weight scale) where the input scale is known.

    Returns counts: ``weights`` quantized, ``biases`` quantized, ``float_biases`` left float.
    """
    site_scale = {s.output: s.quant.scale for s in sites}
    consumers = _consumers(graph)
    done: dict[str, np.ndarray] = {}
    new_nodes: list[onnx.NodeProto] = []
    counts = {"weights": 0, "biases": 0, "float_biases": 0}
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        weight = initializer_array(graph, name)
        if name not in done:
            if weight is None or weight.dtype != np.float32:
                continue
            axis = _weight_axis(node, weight)
            if axis is None:
                continue
            q, scale = int8_per_channel(weight, axis)
            _add_initializer(graph, f"{name}/int8", q)
            _add_initializer(graph, f"{name}/scale", scale)
            _add_initializer(graph, f"{name}/zero_point", np.zeros(scale.shape, np.int8))
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{name}/int8", f"{name}/scale", f"{name}/zero_point"], [name],
                name=f"{name}/dequantize", axis=axis))
            done[name] = scale
            counts["weights"] += 1
        if len(node.input) < 3 or not node.input[2]:
            continue
        bias_name = node.input[2]
        bias = initializer_array(graph, bias_name)
        s_in = _input_scale(graph, node.input[0], site_scale)
        w_scale = done[name]
        if (bias is None or bias.dtype != np.float32 or s_in is None or not _bias_quantizable(node)
                or len(consumers.get(bias_name, [])) != 1 or bias.shape != w_scale.shape):
            counts["float_biases"] += int(bias is not None)
            continue
        b_scale = (np.float32(s_in) * w_scale).astype(np.float32)
        info = np.iinfo(np.int32)
        qb = np.clip(np.rint(bias.astype(np.float64) / b_scale), info.min, info.max).astype(np.int32)
        _add_initializer(graph, f"{bias_name}/int32", qb)
        _add_initializer(graph, f"{bias_name}/scale", b_scale)
        _add_initializer(graph, f"{bias_name}/zero_point", np.zeros(b_scale.shape, np.int32))
        new_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{bias_name}/int32", f"{bias_name}/scale", f"{bias_name}/zero_point"],
            [bias_name], name=f"{bias_name}/dequantize", axis=0))
        counts["biases"] += 1
    for name in done:
        for i, t in enumerate(graph.initializer):
            if t.name == name:
                del graph.initializer[i]
                break
    for n in new_nodes:
        for i, t in enumerate(graph.initializer):
            if t.name == n.output[0]:
                del graph.initializer[i]
                break
    _drop_value_info(graph, {n.output[0] for n in new_nodes})
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return counts


# ---- narrower containers -------------------------------------------------------------------------


def container_for(bits: int, narrow: bool) -> str:
    """The narrowest standard unsigned type for ``bits`` (uint8 unless ``narrow``)."""
    if not narrow or bits > 4:
        return "uint8"
    return "uint2" if bits <= 2 else "uint4"


def narrow_containers(graph: onnx.GraphProto, sites: list[SiteGraph]) -> None:
    """Carry each site's codes in its narrowest type (``SiteQuant.container``, set by the caller).

    Where the bit width fills the type (2 -> uint2, 4 -> uint4) the integer Clip goes: the type
    saturates. Where it does not (1 -> uint2, 3 -> uint4) the range limit moves before the
    QuantizeLinear as float Max/Min to ``[(0 - z) s, (L - z) s]``;
    ``round`` of those bounds gives exactly 0 and L, so the codes are unchanged.
    """
    for site in sites:
        quant = site.quant
        if quant.container == "uint8":
            continue
        prefix = site.nodes["quantize"].name.rsplit("/", 1)[0]
        data_type = CONTAINERS[quant.container]
        q, dq = site.nodes["quantize"], site.nodes["dequantize"]
        _add_initializer(graph, f"{prefix}/zero_point", quant.zero_point.astype(np.uint8), data_type)
        clip = site.nodes.pop("clip", None)
        if clip is not None:
            graph.node.remove(clip)
            dq.input[0] = q.output[0]
            rename_tensor(graph, q.output[0], site.codes)
            _drop_value_info(graph, {site.codes})
        levels = 2 ** quant.bits - 1
        if levels == (15 if quant.container == "uint4" else 3):
            quant.range_limit = "none"
            continue
        # float-side limit on the quantizer's input grid (u, or the integer Ceil(u/alpha))
        q_scale = np.ones_like(quant.scale) if quant.rounding == "ceil" else quant.scale
        z = quant.zero_point.astype(np.float32)
        lo = ((np.float32(0) - z) * q_scale).astype(np.float32)
        hi = ((np.float32(levels) - z) * q_scale).astype(np.float32)
        source = q.input[0]
        limited = f"{prefix}/limited"
        # Max/Min rather than Clip: ORT's Clip->QuantizeLinear fusion fails on 4/2-bit zero points
        shape = [-1] + [1] * (quant.rank - 1 - _channel_axis(quant)) if lo.ndim else []
        nodes = [
            helper.make_node("Max", [source, _add_initializer(graph, f"{prefix}/float_min", lo.reshape(shape))],
                             [f"{prefix}/limited_low"], name=f"{prefix}/limit_low"),
            helper.make_node("Min", [f"{prefix}/limited_low",
                                     _add_initializer(graph, f"{prefix}/float_max", hi.reshape(shape))],
                             [limited], name=f"{prefix}/limit_high"),
        ]
        for n in nodes:
            _set_meta(n, SITE_KEY, quant.name)
        at = list(graph.node).index(q)
        for k, n in enumerate(nodes):
            graph.node.insert(at + k, n)
            site.nodes[n.name.rsplit("/", 1)[1]] = n
        q.input[0] = limited
        quant.range_limit = "float_limit"


# ---- reading an exported file ----------------------------------------------------------------------


@dataclass(frozen=True)
class SiteTensors:
    """The tensors of one site occurrence in an exported graph."""

    name: str
    prefix: str       # node-name prefix: the site name, plus "#k" for the k-th extra occurrence
    input: str        # u
    codes: str
    output: str
    codes_type: int   # TensorProto data type of the codes


def site_tensors(model: onnx.ModelProto) -> list[SiteTensors]:
    """Every site occurrence of a file written by export_onnx(), in graph order."""
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    found = []
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or SITE_KEY not in _meta(n) or not n.name.endswith("/quantize"):
            continue
        prefix = n.name[: -len("/quantize")]
        first = by_name.get(f"{prefix}/divide") or by_name.get(f"{prefix}/limit_low") or n
        dq = by_name[f"{prefix}/dequantize"]
        zp = inits.get(n.input[2])
        found.append(SiteTensors(_meta(n)[SITE_KEY], prefix, first.input[0], dq.input[0], dq.output[0],
                                 zp.data_type if zp is not None else TensorProto.UINT8))
    return found


# ---- quantized weights ---------------------------------------------------------------------------

WEIGHT_KEY = "qat_ste.weight_layer"
#: signed containers of weight codes: name -> (TensorProto type, lowest code, highest code)
WEIGHT_CONTAINERS = {"int8": (TensorProto.INT8, -128, 127), "int4": (TensorProto.INT4, -8, 7),
                     "int2": (TensorProto.INT2, -2, 1)}


@dataclass
class WeightQuant:
    """One quantized-weight layer in numbers (from the PyTorch layer's quantizer)."""

    index: int
    name: str
    spec: str                       # "binary", "ternary", "int{b}"
    allowed_codes: tuple[int, ...]
    codes: np.ndarray               # int8, the weight's shape
    scale: np.ndarray               # float32, shape () or (C,)
    axis: int | None                # 0 when per-channel
    container: str = "int8"         # set by narrow_weight_containers


@dataclass
class WeightGraph:
    """The DequantizeLinear of one occurrence of a quantized-weight layer in the graph."""

    quant: WeightQuant
    occurrence: int
    codes: str                      # initializer of the codes
    scale: str                      # initializer of the scale
    output: str                     # the dequantized weight the Conv/Gemm/MatMul reads
    node: onnx.NodeProto
    consumers: tuple[str, ...]      # op types reading the dequantized weight


def weight_container_for(allowed_codes: tuple[int, ...], opset: int, narrow: bool) -> str:
    """The narrowest signed container holding ``allowed_codes`` that ``opset`` offers (int8 unless
    ``narrow``): INT2 from opset 25, INT4 from opset 21."""
    lo, hi = min(allowed_codes), max(allowed_codes)
    if narrow:
        for name, least in (("int2", 25), ("int4", 21)):
            _, c_lo, c_hi = WEIGHT_CONTAINERS[name]
            if opset >= least and c_lo <= lo and hi <= c_hi:
                return name
    return "int8"


def tag_weights(graph: onnx.GraphProto, quants: list[WeightQuant]) -> list[WeightGraph]:
    """Name each quantized-weight DequantizeLinear ``LAYER/weight_dequantize`` and give it the layer's
    own initializers ``LAYER/weight_codes`` (int8) and ``LAYER/weight_scale`` (float32; axis 0 when
    per-channel, no zero point); its output becomes ``LAYER/weight``."""
    by_index = {q.index: q for q in quants}
    consumers = _consumers(graph)
    found: list[WeightGraph] = []
    seen: dict[int, int] = {}
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or WEIGHT_INDEX_KEY not in _meta(node):
            continue
        quant = by_index[int(_meta(node)[WEIGHT_INDEX_KEY])]
        occurrence = seen.get(quant.index, 0)
        seen[quant.index] = occurrence + 1
        suffix = "" if occurrence == 0 else f"#{occurrence}"
        codes = _add_initializer(graph, f"{quant.name}/weight_codes", quant.codes.astype(np.int8))
        scale = _add_initializer(graph, f"{quant.name}/weight_scale", quant.scale.astype(np.float32))
        node.name = f"{quant.name}/weight_dequantize{suffix}"
        _set_meta(node, WEIGHT_KEY, quant.name)
        del node.input[:]
        node.input.extend([codes, scale])
        del node.attribute[:]
        if quant.axis is not None:
            node.attribute.append(helper.make_attribute("axis", int(quant.axis)))
        users = tuple(n.op_type for n in consumers.get(node.output[0], []))
        output = f"{quant.name}/weight{suffix}"
        rename_tensor(graph, node.output[0], output)
        found.append(WeightGraph(quant, occurrence, codes, scale, output, node, users))
    missing = [q.name for q in quants if q.index not in seen]
    if missing:
        raise RuntimeError(f"the exported graph has no quantized weight for layer(s) {', '.join(missing)}")
    return found


def narrow_weight_containers(graph: onnx.GraphProto, weights: list[WeightGraph]) -> None:
    """Store each layer's codes in its container (``WeightQuant.container``): the same integers,
    packed as INT4 / INT2 where set (DequantizeLinear reads them without a zero point)."""
    done: set[str] = set()
    for w in weights:
        quant = w.quant
        if quant.container == "int8" or w.codes in done:
            continue
        data_type = WEIGHT_CONTAINERS[quant.container][0]
        _add_initializer(graph, w.codes, quant.codes.astype(np.int8), data_type)
        done.add(w.codes)


@dataclass(frozen=True)
class WeightTensors:
    """The tensors of one quantized-weight layer in an exported file."""

    name: str
    codes: np.ndarray     # the stored integers (int8 numpy, whatever the container)
    codes_type: int       # TensorProto data type of the codes initializer
    scale: np.ndarray     # float32
    axis: int | None
    output: str           # the dequantized weight tensor


def weight_tensors(model: onnx.ModelProto) -> list[WeightTensors]:
    """Every quantized-weight layer of a file written by export_onnx() (first occurrences), in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or WEIGHT_KEY not in _meta(n) or "#" in n.name:
            continue
        codes_init, scale_init = inits.get(n.input[0]), inits.get(n.input[1])
        if codes_init is None or scale_init is None:
            raise RuntimeError(f"layer {_meta(n)[WEIGHT_KEY]}: its weight codes or scale is not an initializer")
        axis = next((int(a.i) for a in n.attribute if a.name == "axis"), None)
        scale = numpy_helper.to_array(scale_init).astype(np.float32)
        found.append(WeightTensors(_meta(n)[WEIGHT_KEY], np.asarray(numpy_helper.to_array(codes_init)).astype(np.int8),
                                   codes_init.data_type, scale, axis if scale.ndim else None, n.output[0]))
    return found

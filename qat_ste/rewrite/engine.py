"""The rewrite: find every activation call site of a model and give each its own quantizer.

1. Every module that is not an activation (nor a torch.nn building block) is traced shallowly with
   torch.fx, all its children as leaves, to list the activation calls its own forward makes.
2. An activation module called at exactly one place is swapped for a QuantAct in place
   ("module swap"). A module whose forward makes functional activation calls (F.relu,
   torch.relu, x.relu_(), ...) or calls one activation module at several places gets a rewritten
   forward from its traced graph, one QuantAct per call ("fx rewrite"); its class becomes a
   subclass of the original, so methods and isinstance checks still work.
3. A module that FX cannot trace (control flow on values or shapes), or whose trace would freeze a
   Python branch (on ``self.training``, or on optional arguments), is handled by runtime
   call-order dispatch ("runtime fallback"), with the sites taken from a census run (one forward
   pass with an example input). When the census ran, it decides which activation modules are
   shared; calls of a grandchild that are the parent's forward traced inline count once.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn as nn

from ..config import QuantConfig
from ..errors import QatSteError
from ..kinds import ActivationKind, function_kind, function_name, method_kind, module_kind
from ..nn_utils import preserve_modes
from ..quantizer.module import QuantAct
from .activations import is_inplace_call, strip_inplace
from .census import CallEvent, count_activation_calls
from .fallback import CallOrderDispatch, install_runtime_dispatch
from .report import QuantReport, Site

MODULE_SWAP, FX_REWRITE, RUNTIME_FALLBACK = "module swap", "fx rewrite", "runtime fallback"


class _ShallowTracer(fx.Tracer):
    """Traces one module's own forward; every child module is a leaf. The trace leaves no trace:
    attributes a forward sets on its modules while tracing (torchvision's MultiScaleRoIAlign caches
    its scales on first call; traced, that cache would hold Proxies) are put back as they were."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        saved = [(m, dict(vars(m))) for m in root.modules()] if isinstance(root, nn.Module) else []
        try:
            return super().trace(root, concrete_args)
        finally:
            for m, attributes in saved:
                now = vars(m)
                if now.keys() != attributes.keys() or any(now[k] is not v for k, v in attributes.items()):
                    now.clear()
                    now.update(attributes)


def _is_torch_builtin(m: nn.Module) -> bool:
    mod = type(m).__module__ or ""
    return mod.startswith("torch.") and not isinstance(m, nn.Sequential)


def _owns_calls(m: nn.Module) -> bool:
    """Whether ``m``'s own forward is traced for the calls it makes (not an activation, a quantizer
    or a torch building block; Sequential is traced)."""
    return not (isinstance(m, QuantAct) or module_kind(m) is not None or _is_torch_builtin(m))


def _trace_hazard(m: nn.Module) -> str:
    """Why a trace of ``m.forward`` may not hold for every call ("" when it does).

    A trace freezes Python branches: on ``self.training``, and on optional arguments (a traced
    ``if shortcut is None`` always takes the branch of a given argument).
    """
    training = _training_branch(m)
    if training:
        return training
    optional = _optional_arguments(m)
    if optional:
        return f"its forward has optional arguments ({', '.join(optional)}) a trace would freeze"
    return ""


def _training_branch(m: nn.Module) -> str:
    """Why ``m``'s forward cannot be traced once for both modes ("" when it can)."""
    try:
        if "self.training" in inspect.getsource(type(m).forward):
            return "its forward branches on self.training (a trace would freeze one branch)"
    except (OSError, TypeError):
        pass
    return ""


def _optional_arguments(m: nn.Module) -> list[str]:
    """The arguments of ``m``'s forward that default to None."""
    return [n for n, p in inspect.signature(type(m).forward).parameters.items() if p.default is None]


def _original_name(module: nn.Module) -> str:
    cls = type(module)
    root = (cls.__module__ or "").split(".")[0]
    prefix = {"torch": "nn", "timm": "timm"}.get(root, root)
    return f"{prefix}.{cls.__name__}"


@dataclass
class _Planned:
    """A call site found by the analysis, before it is quantized or left float."""

    name: str
    owner: str
    original: str
    kind: ActivationKind
    method: str
    key: tuple            # matches census events: ("module", path) / ("call", owner, target, k)
    order: int | None = None
    attr: str = ""        # attribute of the owner that will hold the QuantAct (fx rewrite / fallback)


class _AttrNames:
    """Hands out attribute names for new quantizers on one owner: relu_fn1, relu_fn2, act_call1..."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.taken: set[str] = set()
        self.counts: Counter = Counter()

    def new(self, base: str) -> str:
        base = base.replace(".", "_")
        while True:
            self.counts[base] += 1
            name = f"{base}{self.counts[base]}"
            if name not in self.taken and not hasattr(self.owner, name):
                self.taken.add(name)
                return name


def _default_example_input(model: nn.Module) -> torch.Tensor | None:
    """A plausible input for a census run when the caller gave none (timm/zoo configs, else 224x224)."""
    size = None
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "input_size" in cfg:
            size = tuple(cfg["input_size"])
            break
    if size is None:
        size = getattr(model, "qat_input_size", None)
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        return None
    if size is None:
        size = (first.in_channels, 224, 224) if isinstance(first, nn.Conv2d) else (first.in_features,)
    try:
        p = next(model.parameters())
        return torch.randn(1, *size, device=p.device, dtype=p.dtype)
    except StopIteration:
        return torch.randn(1, *size)


def _run_census(model: nn.Module, example_input: Any) -> list[CallEvent]:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with preserve_modes(model, training=False):
        return count_activation_calls(model, *inputs)


@dataclass
class _Analysis:
    """What the analysis found before any site is planned."""

    modules: dict[str, nn.Module]                    # every module by path (first path of shared ones)
    graphs: dict[str, fx.Graph]                      # shallow traces of the owners FX can trace safely
    untraced: dict[str, str]                         # owners left to the runtime fallback, and why
    static_calls: Counter                            # id(activation module) -> call sites in the traces
    events: list[CallEvent] | None = None            # the census, when it ran
    shared: set[int] = field(default_factory=set)    # id of activation modules called at several places


@dataclass
class _Plan:
    """Every site found, grouped by how it will be rewritten."""

    planned: list[_Planned] = field(default_factory=list)
    rewrites: dict[str, list[tuple[fx.Node, _Planned]]] = field(default_factory=dict)
    fallbacks: dict[str, list[_Planned]] = field(default_factory=dict)
    redirects: dict[str, list[fx.Node]] = field(default_factory=dict)


def analyse_and_rewrite(
    model: nn.Module, cfg: QuantConfig, example_input: Any = None
) -> QuantReport:
    """Rewrite ``model`` in place (see the module docstring) and return the report."""
    analysis = _trace_owners(model)
    analysis.events = _census_if_needed(model, cfg, example_input, analysis.untraced)
    analysis.shared = _shared_modules(analysis)
    plan = _plan_sites(analysis)
    _set_execution_order(plan.planned, analysis.events)
    decisions = _decide(plan.planned, cfg)
    _require_selection(plan.planned, decisions, cfg)
    sites = _apply(model, analysis, plan, decisions, cfg)
    sites.sort(key=lambda s: (s.order is None, s.order if s.order is not None else 0, s.name))
    events = analysis.events
    return QuantReport(sites=sites, untraced=analysis.untraced,
                       census_calls=len(events) if events is not None else None)


def _trace_owners(model: nn.Module) -> _Analysis:
    """Step 1: trace every owner shallowly, count the static calls of each activation module, and
    send owners whose trace would freeze a branch to the runtime fallback."""
    modules = dict(model.named_modules())
    graphs: dict[str, fx.Graph] = {}
    untraced: dict[str, str] = {}
    for path, m in modules.items():
        if not _owns_calls(m):
            continue
        try:
            graphs[path] = _ShallowTracer().trace(m)
        except Exception as e:  # noqa: BLE001 - any tracing failure sends the module to the fallback
            untraced[path] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    static_calls: Counter = Counter()
    for path, g in graphs.items():
        for node in g.nodes:
            if node.op == "call_module":
                sub = modules[path].get_submodule(str(node.target))
                if module_kind(sub) is not None and not _inlined_call(path, node.target, graphs, modules):
                    static_calls[id(sub)] += 1

    static_shared = {i for i, n in static_calls.items() if n > 1}
    for path in list(graphs):
        owner = modules[path]
        if any(_node_is_site(n, owner, static_shared) for n in graphs[path].nodes):
            hazard = _trace_hazard(owner)
            if hazard:
                untraced[path] = hazard
                del graphs[path]
    return _Analysis(modules, graphs, untraced, static_calls)


def _census_if_needed(model: nn.Module, cfg: QuantConfig, example_input: Any,
                      untraced: dict[str, str]) -> list[CallEvent] | None:
    """Step 2: the census run, when an example input is given or the plan needs one (untraced
    owners, keep_first/keep_last); None when it did not run."""
    events: list[CallEvent] | None = None
    census_error = ""
    needs_census = cfg.keep_first or cfg.keep_last or bool(untraced)
    if example_input is None and needs_census:
        example_input = _default_example_input(model)
    if example_input is not None:
        try:
            events = _run_census(model, example_input)
        except Exception as e:  # noqa: BLE001 - reported below if the census was needed
            census_error = f"{type(e).__name__}: {e}"
    if needs_census and events is None:
        what = "keep_first/keep_last need" if (cfg.keep_first or cfg.keep_last) else (
            f"{len(untraced)} module(s) FX cannot trace ({', '.join(list(untraced)[:3])}) need")
        raise QatSteError(
            f"{what} a run of the model to find their activation calls, and the model could not be "
            f"run{': ' + census_error if census_error else ' (no example input)'}",
            "pass example_input=<a batch the model accepts> to quantize()")
    return events


def _shared_modules(analysis: _Analysis) -> set[int]:
    """Activation modules called at several places; the census (when it ran) is authoritative for
    the modules it saw."""
    runtime_calls: Counter = Counter()
    for e in analysis.events or ():
        if e.is_module:
            runtime_calls[e.target] += 1
    return {id(m) for p, m in analysis.modules.items() if module_kind(m) is not None
            and (runtime_calls[p] > 1 or (analysis.static_calls[id(m)] > 1 and not runtime_calls[p]))}


def _plan_sites(analysis: _Analysis) -> _Plan:
    """Step 3: one _Planned per call site: fx-rewrite nodes, runtime-fallback calls, module swaps."""
    modules, shared, plan = analysis.modules, analysis.shared, _Plan()
    for path, g in analysis.graphs.items():
        owner = modules[path]
        counts: Counter = Counter()
        names = _AttrNames(owner)
        for node in g.nodes:
            site = _plan_node(node, owner, path, shared, counts, names)
            if site is not None:
                plan.rewrites.setdefault(path, []).append((node, site))
                plan.planned.append(site)
            elif _inplace_module_input_reused(node, owner):
                plan.redirects.setdefault(path, []).append(node)
    for path in analysis.untraced:
        names = _AttrNames(modules[path])
        for e in analysis.events or ():
            if e.owner != path:
                continue
            if e.is_module and id(modules.get(e.target)) not in shared:
                continue  # a plain swap covers it
            site = _plan_event(e, path, modules, names)
            plan.fallbacks.setdefault(path, []).append(site)
            plan.planned.append(site)
    for p, m in modules.items():
        kind = module_kind(m)
        if kind is not None and id(m) not in shared:
            plan.planned.append(_Planned(p, p.rpartition(".")[0], _original_name(m), kind, MODULE_SWAP, ("module", p)))
    return plan


def _set_execution_order(planned: list[_Planned], events: list[CallEvent] | None) -> None:
    """Each site's position in execution order, from the census (left None without one)."""
    if events is None:
        return
    order: dict[tuple, int] = {}
    for i, e in enumerate(events):
        if e.is_module:
            order.setdefault(("module", e.target), i)
        order.setdefault(("call", e.owner, e.target, e.index), i)
    for s in planned:
        s.order = order.get(s.key)


def _require_selection(planned: list[_Planned], decisions: dict[int, tuple[bool, str]], cfg: QuantConfig) -> None:
    """Step 4b: refuse a rewrite that would quantize nothing."""
    if any(q for q, _ in decisions.values()):
        return
    found = len(planned)
    raise QatSteError(
        f"nothing to quantize: the model has {found} activation call site(s) and none is selected"
        + (" (it has no activations qat_ste recognises)" if not found else
           f" by the options (kinds={cfg.kinds}, include={cfg.include}, exclude={cfg.exclude})"),
        "quantize a model with ReLU/GELU/SiLU/... activations, or widen include/kinds"
        if not found else "widen include= or kinds=, or set quantize_gates=True")


def _apply(model: nn.Module, analysis: _Analysis, plan: _Plan, decisions: dict[int, tuple[bool, str]],
           cfg: QuantConfig) -> list[Site]:
    """Step 5: make the QuantActs and install them (fx rewrites, runtime dispatch, module swaps)."""
    sites: list[Site] = []
    modules = analysis.modules

    def make(site: _Planned, fn: Any) -> QuantAct | None:
        quantize, reason = decisions[id(site)]
        qa = _make_quant_act(site, fn, cfg) if quantize else None
        sites.append(Site(site.name, site.owner, site.original, site.kind.name, site.method, qa, reason, site.order))
        return qa

    for path in set(plan.rewrites) | set(plan.redirects):
        _apply_fx_rewrite(modules[path], analysis.graphs[path], plan.rewrites.get(path, []),
                          plan.redirects.get(path, []), make)
    for path, items in plan.fallbacks.items():
        _apply_fallback(modules[path], items, make, modules)
    swaps: dict[int, nn.Module] = {}
    for s in plan.planned:
        if s.method == MODULE_SWAP:
            qa = make(s, modules[s.name])
            if qa is not None:
                swaps[id(modules[s.name])] = qa
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                parent._modules[name] = swaps[id(child)]
    return sites


def _make_quant_act(site: _Planned, fn: Any, cfg: QuantConfig) -> QuantAct:
    """The QuantAct of one site, with the config's settings for it (overrides applied)."""
    c = cfg.for_site(site.name)
    qa = QuantAct(site.kind, fn, bits=c.bits, ste=c.ste, alpha_mode=c.alpha_mode, step_init=c.step_init,
                  rounding=c.rounding, per_channel=c.per_channel, original=site.original)
    qa.site = site.name
    return qa


def _node_is_site(node: fx.Node, owner: nn.Module, shared: set[int]) -> bool:
    if node.op == "call_module":
        return id(owner.get_submodule(str(node.target))) in shared
    if node.op == "call_function":
        return function_kind(node.target, node.args, node.kwargs) is not None
    if node.op == "call_method":
        return method_kind(str(node.target)) is not None
    return False


def _inlined_call(path: str, target: str, graphs: dict[str, fx.Graph], modules: dict[str, nn.Module]) -> bool:
    """Whether a call of a grandchild (``target`` with a dot) is the parent's own forward traced
    inline (``self.seq.forward(x)`` bypasses the leaf): the parent's graph already counts it."""
    parent_rel, _, name = target.rpartition(".")
    if not parent_rel:
        return False
    parent = f"{path}.{parent_rel}" if path else parent_rel
    g = graphs.get(parent)
    return g is not None and any(n.op == "call_module" and n.target == name for n in g.nodes)


def _inplace_module_input_reused(node: fx.Node, owner: nn.Module) -> bool:
    """An in-place activation module (nn.ReLU(inplace=True)) whose input is used again later: the
    float model relies on the mutation, which the out-of-place quantizer does not do."""
    if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    sub = owner.get_submodule(str(node.target))
    if module_kind(sub) is None or not getattr(sub, "inplace", False):
        return False
    later = [u for u in node.args[0].users if u is not node and _after(u, node)]
    return bool(later)


def _after(a: fx.Node, b: fx.Node) -> bool:
    n = b.next
    while n.op != "root":
        if n is a:
            return True
        n = n.next
    return False


def _plan_node(node: fx.Node, owner: nn.Module, path: str, shared: set[int], counts: Counter,
               names: _AttrNames) -> _Planned | None:
    prefix = f"{path}." if path else ""
    if node.op == "call_module":
        sub = owner.get_submodule(str(node.target))
        kind = module_kind(sub)
        if kind is None or id(sub) not in shared:
            return None
        k = counts[node.target]
        counts[node.target] += 1
        attr = names.new(f"{node.target}_call")
        return _Planned(f"{prefix}{attr}", path, _original_name(sub), kind, FX_REWRITE,
                        ("call", path, f"{prefix}{node.target}", k), attr=attr)
    if node.op == "call_function":
        kind = function_kind(node.target, node.args, node.kwargs)
        fname = function_name(node.target)
    elif node.op == "call_method":
        kind = method_kind(str(node.target))
        fname = function_name(node.target)
    else:
        return None
    if kind is None:
        return None
    k = counts[fname]
    counts[fname] += 1
    attr = names.new(f"{fname.split('.')[-1].rstrip('_')}_fn")
    return _Planned(f"{prefix}{attr}", path, fname, kind, FX_REWRITE, ("call", path, fname, k), attr=attr)


def _plan_event(e: CallEvent, path: str, modules: dict[str, nn.Module], names: _AttrNames) -> _Planned:
    prefix = f"{path}." if path else ""
    if e.is_module:
        rel = e.target[len(prefix):] if e.target.startswith(prefix) else e.target
        attr = names.new(f"{rel}_call")
        return _Planned(f"{prefix}{attr}", path, _original_name(modules[e.target]), e.kind, RUNTIME_FALLBACK,
                        ("call", path, e.target, e.index), attr=attr)
    attr = names.new(f"{e.target.split('.')[-1].rstrip('_')}_fn")
    return _Planned(f"{prefix}{attr}", path, e.target, e.kind, RUNTIME_FALLBACK,
                    ("call", path, e.target, e.index), attr=attr)


def _decide(planned: list[_Planned], cfg: QuantConfig) -> dict[int, tuple[bool, str]]:
    out: dict[int, tuple[bool, str]] = {}
    for s in planned:
        if not cfg.kind_enabled(s.kind.name, s.kind.family):
            out[id(s)] = (False, f"{s.kind.family} kind '{s.kind.name}' not selected"
                          + (" (gates stay float; quantize_gates=True)" if s.kind.family == "gate" else ""))
        elif not cfg.name_selected(s.name):
            out[id(s)] = (False, "excluded by include/exclude patterns")
        else:
            out[id(s)] = (True, "")
    chosen = sorted((s for s in planned if out[id(s)][0] and s.order is not None), key=lambda s: s.order or 0)
    if cfg.keep_first and chosen:
        out[id(chosen[0])] = (False, "keep_first: first activation left float")
    if cfg.keep_last and chosen:
        out[id(chosen[-1])] = (False, "keep_last: last activation left float")
    return out


def _apply_fx_rewrite(owner: nn.Module, graph: fx.Graph, items: list, redirects: list[fx.Node], make) -> None:
    position = {n: i for i, n in enumerate(graph.nodes)}

    def redirect_later_uses(source: Any, result: fx.Node, call: fx.Node) -> None:
        """Later readers of an in-place call's input read the call's result instead."""
        if not isinstance(source, fx.Node):
            return
        for user in list(source.users):
            if user is not result and user is not call and position.get(user, -1) > position[call]:
                user.replace_input_with(source, result)

    for node in redirects:
        redirect_later_uses(node.args[0], node, node)
    changed = bool(redirects)
    for node, site in items:
        if node.op == "call_module":
            sub = owner.get_submodule(str(node.target))
            qa = make(site, sub)
            if qa is None:
                continue
            owner.add_module(site.attr, qa)
            node.target = site.attr
            if getattr(sub, "inplace", False):
                redirect_later_uses(node.args[0], node, node)
            changed = True
            continue
        if node.op == "call_function":
            inplace = is_inplace_call(node.target, dict(node.kwargs), tuple(node.args))
            fn, args, kwargs = strip_inplace(node.target, tuple(node.args), dict(node.kwargs))
        else:
            inplace = is_inplace_call(node.target)
            fn = getattr(torch.Tensor, node.target.rstrip("_"))
            args, kwargs = tuple(node.args), dict(node.kwargs)
        qa = make(site, fn)
        if qa is None:
            continue
        owner.add_module(site.attr, qa)
        with graph.inserting_after(node):
            new = graph.call_module(site.attr, args, kwargs)
        position[new] = position[node]
        node.replace_all_uses_with(new)
        if inplace:
            redirect_later_uses(args[0], new, node)
        graph.erase_node(node)
        changed = True
    if changed:
        _install_forward(owner, graph)


def _install_forward(owner: nn.Module, graph: fx.Graph) -> None:
    graph.lint()
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<qat_ste rewrite of {type(owner).__qualname__}>", "exec"), namespace)
    base = type(owner)
    owner.__class__ = type(base.__name__, (base,), {
        "forward": namespace["forward"], "_qat_base_class": base, "__module__": base.__module__,
        "_qat_forward_src": code.src})


def _apply_fallback(owner: nn.Module, items: list[_Planned], make, modules: dict[str, nn.Module]) -> None:
    functional: dict[str, str] = {}
    per_module: dict[str, list[str | None]] = {}
    for site in items:
        _, _, target, index = site.key
        is_module = target in modules and module_kind(modules[target]) is not None
        qa = make(site, modules[target] if is_module else _function_for(target))
        if qa is not None:
            owner.add_module(site.attr, qa)
        if is_module:
            per_module.setdefault(target, []).append(site.attr if qa is not None else None)
        elif qa is not None:
            functional[f"{target}@{index}"] = site.attr
    for target, attrs in per_module.items():
        parent_path, _, attr = target.rpartition(".")
        parent = modules[parent_path]
        if parent._modules.get(attr) is modules[target]:
            parent._modules[attr] = CallOrderDispatch(target, attrs, modules[target])
    install_runtime_dispatch(owner, functional)


def _function_for(name: str):
    """The callable behind a readable function name ('F.gelu', 'torch.relu', 'Tensor.relu')."""
    import torch.nn.functional as F

    space, _, attr = name.partition(".")
    if space == "Tensor":
        return getattr(torch.Tensor, attr.rstrip("_"))
    fn = getattr({"F": F, "torch": torch}[space], attr)
    return strip_inplace(fn, (), {})[0]


def add_integer_points(model: nn.Module, cfg: QuantConfig, example_input: Any, report: QuantReport) -> None:
    """``integer_graph=True``: add the quantization points of a fully integer graph (see
    :mod:`qat_ste.rewrite.integer_points`) to the rewritten ``model``; their sites join ``report``."""
    from .integer_points import FxTools, place_points

    if example_input is None:
        example_input = _default_example_input(model)
    if example_input is None:
        raise QatSteError("integer_graph=True needs one run of the model and no input size could be guessed",
                          "pass example_input=<a batch the model accepts> to quantize()")

    def install(owner: nn.Module, graph: fx.Graph) -> None:
        if hasattr(type(owner), "_qat_forward_src"):  # rewritten before: the new graph holds both rewrites
            owner.__class__ = cast(Any, type(owner))._qat_base_class
        _install_forward(owner, graph)

    names: dict[int, _AttrNames] = {}

    def new_name(owner: nn.Module, base: str) -> str:
        return names.setdefault(id(owner), _AttrNames(owner)).new(base)

    def hazard(owner: nn.Module) -> str:
        return "" if hasattr(type(owner), "_qat_forward_src") else _training_branch(owner)

    def trace(owner: nn.Module) -> fx.Graph:
        # optional arguments are traced as None: the installed forward asserts that they are (a call
        # that passes one fails loudly instead of silently taking the traced branch)
        return _ShallowTracer().trace(owner, concrete_args=dict.fromkeys(_optional_arguments(owner)) or None)

    tools = FxTools(trace=trace, hazard=hazard, install=install, new_name=new_name, is_owner=_owns_calls)
    sites, skipped = place_points(model, cfg, example_input, tools)
    report.sites.extend(sites)
    report.points_skipped = skipped


def owner_graphs(model: nn.Module) -> dict[str, fx.Graph]:
    """The shallow FX trace of every module of ``model`` that owns calls (not a torch building block,
    activation or quantizer), by path; modules FX cannot trace and runtime-fallback owners are left out."""
    graphs = {}
    for path, m in model.named_modules():
        cls = type(m)
        if not _owns_calls(m) or (hasattr(cls, "_qat_base_class") and not hasattr(cls, "_qat_forward_src")):
            continue
        try:
            graphs[path] = _ShallowTracer().trace(m)
        except Exception:  # noqa: BLE001, S112 - an untraceable module is simply not in the result
            continue
    return graphs

"""The package reads bottom-up: no module imports from a layer above its own, and ``import qat_ste``
does not import timm.

Two checks: a static scan of every import statement of every module (function-level ones included:
a lazy import upward is still a cycle unless it is allow-listed below with its reason), and a run
that imports each module alone, bottom-up, without the package's ``__init__`` (which imports the
public API), and looks at which qat_ste modules each import really loaded.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import qat_ste

PACKAGE = Path(qat_ste.__file__).parent

#: bottom-up; a module may import from its own layer and the layers below. A name covers the module
#: and everything under it (``qat_ste.export`` covers ``qat_ste.export.ops``); the package root
#: ``qat_ste`` (its ``__init__``, the public API) only itself.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("qat_ste.errors", "qat_ste.validation", "qat_ste.kinds", "qat_ste.atomic", "qat_ste.nn_utils",
              "qat_ste._version", "qat_ste.version")),
    ("ste", ("qat_ste.ste",)),
    ("quantizer", ("qat_ste.quantizer",)),
    ("config", ("qat_ste.config",)),
    ("rewrite", ("qat_ste.rewrite",)),
    ("api", ("qat_ste.quantize",)),
    ("export", ("qat_ste.export",)),
    ("package", ("qat_ste",)),
    ("zoo", ("qat_ste.zoo",)),
    ("data", ("qat_ste.data",)),
    ("train", ("qat_ste.train",)),
    ("cli", ("qat_ste.cli", "qat_ste.coverage", "qat_ste.theory", "qat_ste.experimental")),
]

#: (importer, imported) -> why an import upward is acceptable. Empty: there is none today.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> int:
    """The index of ``module``'s layer (the longest matching name wins)."""
    best, index = -1, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            hit = module == name or (name != "qat_ste" and module.startswith(name + "."))
            if hit and len(name) > best:
                best, index = len(name), i
    if index < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return index


def package_modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported qat_ste module, line) for every import statement in the file, wherever it is."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                candidate = f"{module}.{a.name}"
                found.append((candidate if candidate in known else module, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return [(m, line) for m, line in found if m == "qat_ste" or m.startswith("qat_ste.")]


def test_every_module_has_a_layer() -> None:
    for name in package_modules():
        layer_of(name)


def test_no_import_reaches_a_higher_layer() -> None:
    modules = package_modules()
    upward = []
    for name, path in modules.items():
        own = layer_of(name)
        for target, line in imports_of(name, path, set(modules)):
            if layer_of(target) > own and (name, target) not in ALLOWED_UPWARD:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({LAYERS[own][0]}) imports "
                              f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules() -> None:
    modules = package_modules()
    graph = {name: {t for t, _ in imports_of(name, path, set(modules)) if t != name and t in modules}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_static_scan_sees_lazy_and_relative_imports(tmp_path) -> None:
    source = ("from .errors import QatSteError\n"
              "def f():\n    from ..train import engine\n    import qat_ste.cli\n"
              "    importlib.import_module('qat_ste.export.ops')\n")
    path = tmp_path / "m.py"
    path.write_text(source)
    known = {"qat_ste.errors", "qat_ste.train", "qat_ste.train.engine", "qat_ste.cli", "qat_ste.export.ops"}
    assert [m for m, _ in imports_of("qat_ste.rewrite.m", path, known)] == [
        "qat_ste.rewrite.errors", "qat_ste.train.engine", "qat_ste.cli", "qat_ste.export.ops"]
    assert layer_of("qat_ste.quantizer.module") < layer_of("qat_ste.rewrite.engine") < layer_of("qat_ste.cli")


_IMPORT_EACH_ALONE = """
import importlib, json, sys, types
stub = types.ModuleType("qat_ste")  # the package without its __init__ (which imports the public API)
stub.__path__ = [sys.argv[1]]
sys.modules["qat_ste"] = stub
loaded = {}
for name in json.loads(sys.argv[2]):
    before = {m for m in sys.modules if m.startswith("qat_ste.")}
    importlib.import_module(name)
    loaded[name] = sorted({m for m in sys.modules if m.startswith("qat_ste.")} - before)
print(json.dumps(loaded))
"""


def test_each_module_imported_alone_loads_nothing_from_above() -> None:
    # the Triton kernels need triton, which CPU-only torch builds lack (the package never imports them there)
    optional = set() if importlib.util.find_spec("triton") else {"qat_ste.quantizer.triton_kernels"}
    names = sorted((n for n in package_modules() if n not in {"qat_ste", *optional}), key=lambda n: (layer_of(n), n))
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, str(PACKAGE), json.dumps(names)],
                         capture_output=True, text=True, check=True, timeout=600)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    upward = [f"importing {name} loaded {m}" for name, ms in loaded.items() for m in ms
              if layer_of(m) > layer_of(name)]
    assert not upward, "\n".join(upward)
    assert set().union(*map(set, loaded.values())) == set(names)  # every module really ran
    assert "qat_ste.rewrite.activations" not in loaded["qat_ste.quantizer.module"]


def test_import_qat_ste_does_not_import_timm() -> None:
    code = "import sys, qat_ste; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'timm')))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                         check=True, timeout=600)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_timm_activations_are_recognised_once_timm_is_loaded() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    from qat_ste.kinds import GELU, SILU, module_kind

    assert module_kind(timm_layers.activations.GELUTanh()) == GELU
    assert module_kind(timm_layers.activations_me.SwishMe()) == SILU

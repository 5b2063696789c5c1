"""``qat-ste convert --config FILE``: convert's options from a YAML or JSON file, and the resolved
options of a run written to ``OUT/config.yaml`` (the way timm's and torchvision's reference scripts
keep their arguments), so that ``qat-ste convert --config OUT/config.yaml`` runs the same again.

- Keys are the long option names, with ``-`` or ``_`` (``batch-size`` / ``batch_size``,
  ``weights`` for ``--weights``); an unknown key is refused with the list of valid ones.
- Values take the option's type: numbers, strings, booleans for switches, lists for repeatable
  options (``include``, ``exclude``, ``override``), null for "not given".
- Options given on the command line win over the file.
- ``OUT/config.yaml`` holds every option's final value: the 'auto' defaults resolved, the
  quantization resolved from ``--quant-config`` and the quantization options. The run-folder
  switches ``--resume``, ``--force-resume`` and ``--overwrite`` are left out: they say what to do
  with an existing ``--out``, not what the run is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import QatSteError

__all__ = ["CONFIG_FILE_NAME", "apply_config_file", "option_actions", "read_config_file", "resolved_options",
           "write_resolved_config"]

#: the file of resolved options in every convert run folder
CONFIG_FILE_NAME = "config.yaml"
#: options a config file may set but OUT/config.yaml leaves out (see the module doc)
_NOT_WRITTEN = ("config", "resume", "force_resume", "overwrite")

ParseKnown = Callable[..., tuple[argparse.Namespace, list[str]]]


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options by key (the first long option name, ``-`` as ``_``); help and the
    hidden deprecated spellings left out."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        out[longs[0][2:].replace("-", "_")] = action
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON file (``.json``: JSON; anything else: YAML, which reads JSON too)."""
    file = Path(path).expanduser()
    fix = "pass a YAML (or JSON) mapping of convert options, e.g.\n  model: torchvision:resnet18\n  epochs: 2"
    if not file.is_file():
        raise QatSteError(f"--config {file} does not exist", fix)
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise QatSteError(f"--config {file}: reading YAML needs PyYAML, which is not installed",
                          "pip install pyyaml") from None
    try:
        text = file.read_text(encoding="utf-8")
        values = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:  # JSONDecodeError is a ValueError
        raise QatSteError(f"cannot read --config {file}: {' '.join(str(error).split())[:300]}", fix) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise QatSteError(f"--config {file} holds a {type(values).__name__}, not a mapping of options", fix)
    return values


def config_values(values: dict[str, Any], actions: dict[str, argparse.Action], source: str) -> dict[str, Any]:
    """The file's values by destination, checked and converted to each option's type."""
    unknown = [str(k) for k in values if str(k).strip().lstrip("-").replace("-", "_") not in actions]
    if unknown:
        raise QatSteError(f"{source}: unknown option(s) {', '.join(sorted(unknown))}",
                          "use the long option names of qat-ste convert: " + ", ".join(sorted(actions)))
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).strip().lstrip("-").replace("-", "_")
        action = actions[name]
        out[action.dest] = _converted(action, value, f"{source}: {name}")
    return out


def _converted(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` as the option would have stored it from the command line."""
    if value is None:
        return None
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # switches
        if not isinstance(value, bool):
            raise QatSteError(f"{where} is {value!r}; this switch takes true or false", "write true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item, where) for item in items]
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    """One value of an option that takes an argument: through the option's type, checked against its choices."""
    if isinstance(value, bool) and action.choices and {"on", "off"} <= set(action.choices):
        value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
    if isinstance(value, (dict, list, bool)):
        raise QatSteError(f"{where} is {value!r}, not a single value", "write a number or a string")
    convert = action.type if callable(action.type) else None
    try:
        if convert is float and isinstance(value, (int, float)):
            result: Any = float(value)
        elif convert is int and isinstance(value, int):
            result = value
        elif convert is not None:
            result = convert(str(value))
        else:
            result = str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        detail = str(error) if isinstance(error, argparse.ArgumentTypeError) else (
            f"not a valid {getattr(convert, '__name__', 'value')}")
        raise QatSteError(f"{where} is {value!r}: {detail}", "write a value the option takes (see --help)") from None
    if action.choices is not None and result not in action.choices:
        raise QatSteError(f"{where} is {value!r}; choose from {', '.join(map(str, action.choices))}",
                          "write one of those")
    return result


def _explicit(parser: argparse.ArgumentParser, args: list[str], parse: ParseKnown) -> argparse.Namespace:
    """The options given on the command line (and only those: every default suppressed)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        with contextlib.redirect_stderr(io.StringIO()):  # notes of deprecated spellings: printed once, later
            return parse(args, None)[0]
    finally:
        for action, default in saved:
            action.default = default


def apply_config_file(parser: argparse.ArgumentParser, args: Sequence[str] | None,
                      namespace: argparse.Namespace | None, parse: ParseKnown) -> tuple[argparse.Namespace, list[str]]:
    """``parse(args, namespace)`` with the values of ``--config FILE`` (when given) as defaults:
    the parser's defaults, then the file, then the options on the command line."""
    argv = list(sys.argv[1:] if args is None else args)
    if not any(len(a.split("=")[0]) > 4 and "--config".startswith(a.split("=")[0]) for a in argv):
        return parse(argv, namespace)  # no --config (nor an abbreviation of it)
    explicit = vars(_explicit(parser, argv, parse))
    path = explicit.get("config")
    if not path:
        return parse(argv, namespace)
    values = config_values(read_config_file(path), option_actions(parser), f"--config {path}")
    namespace = namespace if namespace is not None else argparse.Namespace()
    for dest, value in values.items():
        if dest not in explicit:
            setattr(namespace, dest, value)
    return parse(argv, namespace)


# ---- OUT/config.yaml -------------------------------------------------------------------------------


def _override_strings(overrides: dict[str, dict[str, Any]]) -> list[str]:
    """QuantConfig.overrides as --override 'PATTERN:key=value[,key=value]' values."""
    def text(value: Any) -> str:
        return "true" if value is True else "false" if value is False else "none" if value is None else str(value)

    return [f"{pattern}:" + ",".join(f"{k}={text(v)}" for k, v in options.items())
            for pattern, options in overrides.items() if options]


def resolved_options(args: argparse.Namespace, actions: dict[str, argparse.Action], quant: Any) -> dict[str, Any]:
    """Every convert option's final value by key (see the module doc), for OUT/config.yaml."""
    out: dict[str, Any] = {}
    for key, action in actions.items():
        if key not in _NOT_WRITTEN:
            out[key] = getattr(args, action.dest, action.default)
    if quant is not None:  # the quantization as resolved, not the flags and file it came from
        values = quant.to_dict()
        values["override"] = _override_strings(values.pop("overrides", None) or {}) or None
        kinds = values.get("kinds")
        values["kinds"] = ",".join(kinds) if isinstance(kinds, (list, tuple)) else kinds
        for name in ("include", "exclude"):
            values[name] = list(values[name]) if values.get(name) else None
        out.update({k: v for k, v in values.items() if k in out})
        out["quant_config"] = None
    return out


def write_resolved_config(path: str | Path, args: argparse.Namespace, actions: dict[str, argparse.Action],
                          quant: Any, resolved: dict[str, Any] | None = None) -> Path:
    """Write the resolved options of a run as YAML, atomically; ``resolved``: final values of options
    that ``args`` leaves at None (the model, the data and the image size convert picked)."""
    import yaml

    from ..atomic import atomic_write_text

    values = resolved_options(args, actions, quant)
    values.update({k: v for k, v in (resolved or {}).items() if k in values})
    header = ("# qat-ste convert: every option of this run, resolved. Run it again with\n"
              f"#   qat-ste convert --config {path}   (plus --overwrite, or another --out)\n")
    return atomic_write_text(path, header + yaml.safe_dump(values, sort_keys=False, default_flow_style=False))

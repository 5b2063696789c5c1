"""The QuantConfig of the command line: its options, --quant-config FILE and --override."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import QatSteError

#: QuantConfig fields the options of _add_quant_arguments set (dest names)
QUANT_OPTIONS = ("bits", "ste", "alpha_mode", "step_init", "rounding", "per_channel", "include", "exclude",
                 "overrides", "keep_first", "keep_last", "kinds", "quantize_gates", "kernel", "weight_bits",
                 "weight_method", "bcgd_rho", "integer_graph")


def quant_from_plain(values: dict[str, Any]) -> Any:
    """The QuantConfig of a plain dict (checkpoint metadata, --quant-config; old names accepted)."""
    from ..config import QuantConfig

    return QuantConfig.from_dict(values)


def _parse_scalar(text: str) -> Any:
    """An override value: true/false, none, an int, a float, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """--override 'PATTERN:key=value[,key=value]' (repeatable) as QuantConfig.overrides."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        pattern, _, assignments = item.partition(":")
        options: dict[str, Any] = {}
        for assignment in assignments.split(","):
            key, equals, value = assignment.partition("=")
            if not equals or not key.strip():
                options = {}
                break
            options[key.strip()] = _parse_scalar(value)
        if not pattern.strip() or not options:
            raise QatSteError(f"--override {item!r} is not PATTERN:KEY=VALUE[,KEY=VALUE]",
                              "write e.g. --override 'layer4.*:bits=8,ste=identity'")
        overrides.setdefault(pattern.strip(), {}).update(options)
    return overrides


def _read_quant_file(path: str) -> dict[str, Any]:
    """The JSON object of --quant-config FILE."""
    file = Path(path).expanduser()
    fix = "pass a JSON object of QuantConfig fields, e.g. {\"bits\": 4, \"alpha_mode\": \"lsq\"}"
    if not file.is_file():
        raise QatSteError(f"--quant-config {file} does not exist", fix)
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QatSteError(f"cannot read --quant-config {file}: {error}", fix) from None
    if not isinstance(values, dict):
        raise QatSteError(f"--quant-config {file} holds a {type(values).__name__}, not a JSON object", fix)
    return values


def _quant_config(args: argparse.Namespace) -> Any:
    """The QuantConfig of the options: QuantConfig's defaults, then --quant-config, then the options given."""
    values = _read_quant_file(args.quant_config) if getattr(args, "quant_config", None) else {}
    given = {name: getattr(args, name, None) for name in QUANT_OPTIONS if name != "overrides"}
    if getattr(args, "override", None):
        given["overrides"] = _parse_overrides(args.override)
    kinds = given.get("kinds")
    if isinstance(kinds, str):
        given["kinds"] = [k.strip() for k in kinds.split(",") if k.strip()]
    from ..config import renamed_options

    values = {**renamed_options(values, f"--quant-config {args.quant_config}"),
              **{k: v for k, v in given.items() if v is not None}}
    return quant_from_plain(values)

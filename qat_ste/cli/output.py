"""What the command line prints: messages, errors, tables, sizes, shares; and its exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _out(message: str = "") -> None:
    print(message, flush=True)


def _silent(message: str = "") -> None:
    """What ranks other than 0 print: nothing."""


def _human_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000.0
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f} %"


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = "-" * (width + 2 + value_width)
    return "\n".join([title, rule] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [rule])


def _fail(problem: str, fix: str | None) -> None:
    text = f"qat-ste: error: {problem.rstrip('.')}."
    if fix:
        text += f" Fix: {fix.rstrip('.')}."
    print(" ".join(text.split()), file=sys.stderr, flush=True)

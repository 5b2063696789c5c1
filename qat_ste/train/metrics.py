"""Per-epoch metrics: CSV / JSON-lines logs, optional TensorBoard, a PNG of the curves, text tables."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import QatSteError
from .checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["LOG_FORMATS", "MetricsLog", "plot_curves", "format_table", "format_value"]

LOG_FORMATS = ("csv", "jsonl", "none")

#: columns of the per-epoch history, in the order the CSV file uses
HISTORY_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                   "images_per_s", "epoch_time_s")


def format_value(value: Any) -> str:
    """A compact human form of a metric value."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[tuple[str, Any]], title: str | None = None) -> str:
    """Two-column text table (name, value)."""
    cells = [(str(k), format_value(v)) for k, v in rows]
    width = max([len(k) for k, _ in cells] + [4])
    value_width = max([len(v) for _, v in cells] + [5])
    rule = "-" * (width + 2 + value_width)
    lines = ([title, rule] if title else []) + [f"{k.ljust(width)}  {v}" for k, v in cells] + [rule]
    return "\n".join(lines)


class MetricsLog:
    """Appends one row per epoch to ``metrics.csv`` or ``metrics.jsonl`` (and TensorBoard when
    ``tensorboard`` is on and the package is installed). :meth:`restart` rewrites the file from a
    history, which is how a resumed run avoids lost or duplicated rows."""

    def __init__(self, out_dir: Path | None, fmt: str = "csv", tensorboard: bool = False) -> None:
        if fmt not in LOG_FORMATS:
            raise QatSteError(f"unknown log format {fmt!r}", f"use one of {', '.join(LOG_FORMATS)}")
        self.fmt = fmt
        self.path: Path | None = None
        if out_dir is not None and fmt != "none":
            self.path = Path(out_dir) / ("metrics.csv" if fmt == "csv" else "metrics.jsonl")
        self._writer: Any = None
        if tensorboard and out_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                pass
            else:
                self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def _encode(self, rows: Sequence[dict[str, Any]], header: bool) -> str:
        if self.fmt == "jsonl":
            return "".join(json.dumps({k: _finite_or_none(v) for k, v in r.items()}) + "\n" for r in rows)
        buffer = io.StringIO()
        columns = list(HISTORY_COLUMNS) + sorted({k for r in rows for k in r} - set(HISTORY_COLUMNS))
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        return buffer.getvalue()

    def restart(self, history: Sequence[dict[str, Any]]) -> None:
        """(Re)write the log file so that it holds exactly ``history``."""
        if self.path is not None:
            atomic_write_text(self.path, self._encode(history, header=True) if history or self.fmt == "csv" else "")

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row."""
        if self.path is not None:
            if self.fmt == "csv" and set(row) - set(HISTORY_COLUMNS):
                raise QatSteError(f"unexpected metric columns {sorted(set(row) - set(HISTORY_COLUMNS))}",
                                  "log only the engine's history columns to CSV, or use jsonl")
            exists = self.path.exists() and self.path.stat().st_size > 0
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write(self._encode([row], header=not exists))
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and value is not None:
                    self._writer.add_scalar(key, value, int(row.get("epoch", 0)))
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Loss and accuracy per epoch (train and val) as a PNG, written atomically. Returns None when
    matplotlib is not installed or there is nothing to plot."""
    if not history:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    epochs = [r["epoch"] for r in history]
    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    for index, (metric, label) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{split}_{metric}") for r in history]
            points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None and math.isfinite(v)]
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], style, markersize=3, label=split)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())

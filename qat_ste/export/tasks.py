"""Task-aware agreement between a PyTorch model's outputs and an exported file's (check_onnx()).

Each task has one figure, computed over the output tensors in the file's output order (the model's
output flattened the way the exporter flattens it: tuples/lists in order, dicts by their values):

- ``classification``: top-1 agreement, the share of equal argmax over the classes (last axis of (N, C)).
- ``segmentation``: per-pixel class agreement, the share of equal argmax over the channel axis of
  (N, C, H, W).
- ``detection``: matched boxes, per image: a box of the file matches an unmatched box of the model
  with IoU >= 0.9 and the same label (when the outputs carry labels: an integer tensor of one value
  per box); the figure is the matched boxes over the larger of the two counts, pooled over images.
  Two boxes of zero area (a detector clips boxes to the image and may keep flat ones) have no IoU:
  they match when their coordinates agree within ``DEGENERATE_TOLERANCE`` (relative).
- ``regression`` (and optical flow): relative error ||a - b|| / ||a|| over every float output.

With ``task=None`` the task is picked by the outputs' shapes: a float (..., K, 4) box tensor next to
an integer tensor of K labels is detection; otherwise the first output decides: (N, C) with C > 1 is
classification, (N, C, H, W) with C > 1 segmentation, anything else regression. Optical flow
(N, 2, H, W) looks like segmentation: pass ``task="regression"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import QatSteError

#: the tasks check_onnx() knows -> the figure it reports for each
TASKS = {
    "classification": "top-1 agreement",
    "segmentation": "per-pixel class agreement",
    "detection": "matched boxes (IoU >= 0.9, equal labels)",
    "regression": "relative error",
}
#: tasks whose figure is a share of agreement (higher is better); regression's is an error
SHARE_TASKS = frozenset({"classification", "segmentation", "detection"})
#: the IoU a box must reach to match
MATCH_IOU = 0.9
#: two zero-area boxes match (IoU 1) when every coordinate agrees within this, relative to the largest
DEGENERATE_TOLERANCE = 1e-4


def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in the exporter's order (tuples/lists in order, dicts by
    their values, an object with ``logits``: those)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in flatten_outputs(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in flatten_outputs(v)]
    if hasattr(output, "logits"):
        return flatten_outputs(output.logits)
    raise QatSteError(f"the model returned {type(output).__name__}, not tensors",
                      "check a model whose forward returns tensors, or a tuple/list/dict of them")


def _box_groups(outputs: Sequence[torch.Tensor]) -> list[tuple[int, int | None]]:
    """(box tensor index, label tensor index or None): each float (..., K, 4) tensor followed by an
    integer tensor shaped (..., K) (its labels, each claimed once); when none is, every float
    (..., K, 4) tensor without labels."""
    boxes = [k for k, t in enumerate(outputs) if t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == 4]
    groups: list[tuple[int, int | None]] = []
    claimed: set[int] = set()
    for k in boxes:
        labels = next((j for j in range(k + 1, len(outputs)) if j not in claimed
                       and not outputs[j].is_floating_point()
                       and tuple(outputs[j].shape) == tuple(outputs[k].shape[:-1])), None)
        if labels is not None:
            claimed.add(labels)
            groups.append((k, labels))
    return groups or [(k, None) for k in boxes]


def resolve_task(task: str | None, outputs: Sequence[torch.Tensor]) -> str:
    """``task`` if it is one of TASKS, else (None) the task the outputs' shapes suggest."""
    if task is not None:
        if task not in TASKS:
            raise QatSteError(f"unknown task {task!r}", f"pass task= one of: {', '.join(TASKS)} (or None to pick "
                              "by the output's shape)")
        return task
    if not outputs:
        raise QatSteError("the model returned no tensors", "check a model whose forward returns tensors")
    if any(labels is not None for _, labels in _box_groups(outputs)):  # boxes with labels
        return "detection"
    first = outputs[0]
    if first.is_floating_point() and first.dim() == 2 and first.shape[1] > 1:
        return "classification"
    if first.is_floating_point() and first.dim() == 4 and first.shape[1] > 1:
        return "segmentation"
    return "regression"


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every (x1, y1, x2, y2) box in ``a`` (K, 4) with every one in ``b`` (M, 4): (K, M)."""
    a, b = a.double(), b.double()
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-300), torch.zeros_like(inter))
    flat = union <= 0  # both boxes of zero area: the same box when their coordinates agree
    if bool(flat.any()):
        gap = (a[:, None, :] - b[None, :, :]).abs().amax(-1)
        scale = torch.maximum(a.abs().amax(-1)[:, None], b.abs().amax(-1)[None, :]).clamp_min(1.0)
        iou = torch.where(flat & (gap <= DEGENERATE_TOLERANCE * scale), torch.ones_like(iou), iou)
    return iou


def matched_boxes(boxes_a: torch.Tensor, boxes_b: torch.Tensor, labels_a: torch.Tensor | None = None,
                  labels_b: torch.Tensor | None = None, iou: float = MATCH_IOU) -> int:
    """How many boxes of ``boxes_a`` (K, 4) match a distinct box of ``boxes_b`` (M, 4) with IoU >=
    ``iou`` and (when given) the same label; greedy, best IoU first."""
    if not len(boxes_a) or not len(boxes_b):
        return 0
    overlap = box_iou(boxes_a, boxes_b)
    if labels_a is not None and labels_b is not None:
        overlap = torch.where(labels_a.reshape(-1, 1) == labels_b.reshape(1, -1), overlap,
                              torch.zeros_like(overlap))
    overlap = torch.where(overlap >= iou, overlap, torch.full_like(overlap, -1.0))
    matched = 0
    while bool((overlap >= 0).any()):
        k = int(overlap.argmax())
        row, col = divmod(k, overlap.shape[1])
        overlap[row, :] = -1.0
        overlap[:, col] = -1.0
        matched += 1
    return matched


@dataclass
class Agreement:
    """One task's figure, and the output drift, accumulated over batches."""

    task: str
    agree: float = 0.0       # share tasks: agreeing elements (classes, pixels, matched boxes)
    total: float = 0.0       # ... out of
    err_sq: float = 0.0      # sum of squared differences over the float outputs compared
    ref_sq: float = 0.0      # sum of the PyTorch outputs' squares there
    max_diff: float = 0.0    # max |difference| over same-shaped float outputs
    notes: list[str] = field(default_factory=list)

    @property
    def figure(self) -> str:
        return TASKS[self.task]

    @property
    def relative_drift(self) -> float:
        """||torch - file|| / ||torch|| over every same-shaped float output."""
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else (0.0 if self.err_sq == 0 else float("inf"))

    @property
    def value(self) -> float:
        """The task's figure: a share of agreement, or (regression) the relative error."""
        if self.task == "regression":
            return self.relative_drift
        return self.agree / self.total if self.total else 1.0

    def add(self, torch_outputs: Sequence[torch.Tensor], file_outputs: Sequence[torch.Tensor]) -> None:
        """Count one batch: the model's output tensors and the file's, in the file's output order."""
        for a, b in zip(torch_outputs, file_outputs, strict=False):
            if a.is_floating_point() and tuple(a.shape) == tuple(b.shape):
                a64, b64 = a.double(), b.double()
                diff = (a64 - b64).abs()
                self.max_diff = max(self.max_diff, float(diff.max()) if diff.numel() else 0.0)
                self.err_sq += float((diff ** 2).sum())
                self.ref_sq += float((a64 ** 2).sum())
        if self.task == "detection":
            self._add_boxes(torch_outputs, file_outputs)
        elif self.task in ("classification", "segmentation"):
            a, b = torch_outputs[0], file_outputs[0]
            axis = -1 if self.task == "classification" else 1
            if a.dim() < 2 or tuple(a.shape) != tuple(b.shape):
                raise QatSteError(f"the {self.task} output has shape {tuple(a.shape)} in PyTorch and "
                                  f"{tuple(b.shape)} in the file", "pass the task that fits the model's output "
                                  f"(task= one of: {', '.join(TASKS)})")
            self.agree += int((a.argmax(axis) == b.argmax(axis)).sum())
            self.total += a.argmax(axis).numel()

    def _add_boxes(self, torch_outputs: Sequence[torch.Tensor], file_outputs: Sequence[torch.Tensor]) -> None:
        groups = _box_groups(torch_outputs)
        if not groups:
            raise QatSteError("task='detection' but the model's outputs have no (..., K, 4) box tensor",
                              f"pass the task that fits the model's output (one of: {', '.join(TASKS)})")
        for k, j in groups:
            boxes_a, boxes_b = torch_outputs[k], file_outputs[k]
            images_a = boxes_a.reshape(-1, *boxes_a.shape[-2:]) if boxes_a.dim() > 2 else boxes_a[None]
            images_b = boxes_b.reshape(-1, *boxes_b.shape[-2:]) if boxes_b.dim() > 2 else boxes_b[None]
            for n in range(min(len(images_a), len(images_b))):
                labels_a = labels_b = None
                if j is not None:
                    labels_a = torch_outputs[j].reshape(len(images_a), -1)[n]
                    labels_b = file_outputs[j].reshape(len(images_b), -1)[n]
                self.agree += matched_boxes(images_a[n], images_b[n], labels_a, labels_b)
                self.total += max(len(images_a[n]), len(images_b[n]))
            if j is None and "no labels" not in " ".join(self.notes):
                self.notes.append("detection: no integer label tensor next to the boxes; matched by IoU alone")


def meets(task: str, value: float, threshold: float | None) -> bool:
    """Whether ``value`` of ``task``'s figure meets ``threshold`` (None: not limited)."""
    if threshold is None:
        return True
    return value >= threshold if task in SHARE_TASKS else value <= threshold

"""Per-channel symmetric int8 weights: the one rounding rule that export and check share.

The export writes ``codes`` and ``step`` into the file (DequantizeLinear computes ``codes * step``);
the check rounds the PyTorch model's weights with the same function, so both sides see the same
float32 values bit for bit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["INT8_WEIGHT_LIMIT", "dequantize_per_channel", "int8_per_channel"]

#: symmetric range: codes in [-127, 127] (-128 unused, so the grid is symmetric around 0)
INT8_WEIGHT_LIMIT = 127


def int8_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, step)`` of ``weight`` with one step per index of ``axis``: step = max|w| / 127
    (1 where a channel is all zero), codes = clip(round_half_even(w / step), -127, 127) as int8.
    ``step`` is float32 of shape ``(weight.shape[axis],)``."""
    weight = np.asarray(weight, dtype=np.float32)
    axis = axis % weight.ndim
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    step = (np.abs(weight).max(axis=reduce) / np.float32(INT8_WEIGHT_LIMIT)).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    codes = np.clip(np.rint(weight / step.reshape(shape)), -INT8_WEIGHT_LIMIT, INT8_WEIGHT_LIMIT).astype(np.int8)
    return codes, step


def dequantize_per_channel(codes: np.ndarray, step: np.ndarray, axis: int) -> np.ndarray:
    """``codes * step`` in float32, as ONNX DequantizeLinear computes it (zero point 0)."""
    shape = [1] * codes.ndim
    shape[axis % codes.ndim] = -1
    return (codes.astype(np.float32) * step.reshape(shape)).astype(np.float32)

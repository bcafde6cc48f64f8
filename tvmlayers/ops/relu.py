"""relu as a tensor expression on a flat tensor (the caller flattens: relu does not care about shape)."""

from __future__ import annotations

from tvm import te, tirx


def relu_value(value: tirx.Expr, dtype: str) -> tirx.Expr:
    """max(0, x) as torch computes it (also the fused epilogue of conv2d and linear)."""
    zero = tirx.const(0, dtype)
    # Select, not max(): max lowers to maxnum, which turns NaN into 0; torch keeps the NaN.
    return tirx.Select(value < zero, zero, value)


def relu_compute(data: te.Tensor) -> te.Tensor:
    return te.compute(data.shape, lambda i: relu_value(data[i], data.dtype), name="relu")

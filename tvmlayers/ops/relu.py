"""relu as a tensor expression, on a tensor of any rank (the kernel takes torch's tensor without a reshape)."""

from __future__ import annotations

from tvm import te, tirx


def relu_value(value: tirx.Expr, dtype: str) -> tirx.Expr:
    """max(0, x) as torch computes it (also the fused epilogue of conv2d and linear)."""
    zero = tirx.const(0, dtype)
    # Select, not max(): max lowers to maxnum, which turns NaN into 0; torch keeps the NaN.
    return tirx.Select(value < zero, zero, value)


def relu_compute(data: te.Tensor) -> te.Tensor:
    return te.compute(data.shape, lambda *index: relu_value(data(*index), data.dtype), name="relu")

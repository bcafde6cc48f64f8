"""relu as a tensor expression on a flat tensor (the caller flattens: relu does not care about shape)."""

from __future__ import annotations

from tvm import te, tirx


def relu_compute(data: te.Tensor) -> te.Tensor:
    zero = tirx.const(0, data.dtype)
    # Select, not max(): max lowers to maxnum, which turns NaN into 0; torch keeps the NaN.
    return te.compute(data.shape, lambda i: tirx.Select(data[i] < zero, zero, data[i]), name="relu")

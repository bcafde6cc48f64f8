"""max_pool2d as a tensor expression, with torch's index semantics.

Windows read the input directly: a position outside the input counts as -inf and never wins.  Without indices
the window's maximum is taken in two passes, over its rows (``max_pool2d_rows``: each (padded) input column's
maximum over the window's rows, for each output row), then over its columns: the first pass reads whole input
rows (contiguous: SIMD vectors on a CPU), the second ``kW`` values per output instead of ``kH * kW``, without
bounds checks.  The maximum does not depend on the order (a NaN anywhere still gives NaN).  The argmax reducer
reproduces torch's CPU kernel exactly: the first maximum in row-major window order wins, a NaN wins over
everything and propagates, and the index is ``y * W + x`` within the input plane.  Both start from -inf, not
from the lowest finite value, so a window of -inf inputs gives -inf (and, like torch, the index of its first
position inside the input).
"""

from __future__ import annotations

from tvm import te, tirx


def _minus_infinity(dtype: str) -> tirx.PrimExpr:
    # te.min_value is the lowest *finite* float: a window of -inf inputs would come out as -3.4e38
    return tirx.const(float("-inf"), dtype)


def _argmax_reducer():
    def combine(acc, new):
        acc_index, acc_value = acc
        new_index, new_value = new
        take_new = tirx.Or(
            acc_index < 0,
            tirx.And(new_index >= 0, tirx.Or(new_value > acc_value, tirx.isnan(new_value))),
        )
        return tirx.Select(take_new, new_index, acc_index), tirx.Select(take_new, new_value, acc_value)

    def identity(index_dtype, value_dtype):
        return tirx.const(-1, index_dtype), _minus_infinity(value_dtype)

    return te.comm_reducer(combine, identity, name="torch_argmax")


def _max_reducer():
    # max() would drop NaNs (LLVM's maxnum); torch propagates them.
    def combine(acc, new):
        return tirx.Select(tirx.Or(new > acc, tirx.isnan(new)), new, acc)

    return te.comm_reducer(combine, _minus_infinity, name="torch_max")


def max_pool2d_compute(
    data: te.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    return_indices: bool,
) -> list[te.Tensor]:
    """[values] or [values, indices (int64)], each of shape (N, C, H_out, W_out)."""
    n, c, h, w = (int(d) for d in data.shape)
    i = te.reduce_axis((0, kernel_size[0]), name="i")
    j = te.reduce_axis((0, kernel_size[1]), name="j")
    lowest = _minus_infinity(data.dtype)

    def window(y, x):
        row = y * stride[0] - padding[0] + i * dilation[0]
        col = x * stride[1] - padding[1] + j * dilation[1]
        return row, col, tirx.all(row >= 0, row < h, col >= 0, col < w)

    shape = (n, c, out_hw[0], out_hw[1])
    if not return_indices:
        # columns of the window's row maxima, in padded coordinates: every column some window reads, so the second
        # pass reads no position outside them (and needs no bounds check)
        columns = (out_hw[1] - 1) * stride[1] + (kernel_size[1] - 1) * dilation[1] + 1

        def column_max(b, ch, y, padded_col):
            row, col = y * stride[0] - padding[0] + i * dilation[0], padded_col - padding[1]
            # the column tests only where columns lie outside the input: a vector of tests on every row otherwise
            bounds = [row >= 0, row < h]
            bounds += ([col >= 0] if padding[1] else []) + ([col < w] if columns - padding[1] > w else [])
            return _max_reducer()(tirx.if_then_else(tirx.all(*bounds), data[b, ch, row, col], lowest), axis=[i])

        rows = te.compute((n, c, out_hw[0], columns), column_max, name="max_pool2d_rows")

        def pool(b, ch, y, x):
            return _max_reducer()(rows[b, ch, y, x * stride[1] + j * dilation[1]], axis=[j])

        return [te.compute(shape, pool, name="max_pool2d")]

    reducer = _argmax_reducer()

    def pool_with_index(b, ch, y, x):
        row, col, inside = window(y, x)
        index = tirx.if_then_else(inside, tirx.Cast("int64", row * w + col), tirx.const(-1, "int64"))
        value = tirx.if_then_else(inside, data[b, ch, row, col], lowest)
        return reducer((index, value), axis=[i, j])

    indices, values = te.compute(shape, pool_with_index, name="max_pool2d")
    return [values, indices]

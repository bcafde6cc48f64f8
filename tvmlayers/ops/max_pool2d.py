"""max_pool2d as a tensor expression, with torch's index semantics.

Windows read the input directly: a position outside the input counts as -inf and never wins.  Without indices
the window's maximum is taken in two passes, over its rows (``max_pool2d_rows``: each (padded) input column's
maximum over the window's rows, for each output row), then over its columns: the first pass reads whole input
rows (contiguous: SIMD vectors on a CPU), the second ``kW`` values per output instead of ``kH * kW``, without
bounds checks.  The maximum does not depend on the order (a NaN anywhere still gives NaN).  The argmax reducer
reproduces torch's CPU kernel exactly: the first maximum in row-major window order wins, a NaN wins over
everything and propagates, and the index is ``y * W + x`` within the input plane.  Both start from -inf, not
from the lowest finite value, so a window of -inf inputs gives -inf (and, like torch, the index of its first
position inside the input).  A channel-blocked input (NCHW[x]c, in a recorded program) is pooled in one pass into
an output blocked alike (``_blocked_max_pool2d``).
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
    """[values] or [values, indices (int64)], each of shape (N, C, H_out, W_out); of a channel-blocked (5-D,
    NCHW[x]c) ``data`` its values alone, blocked alike."""
    if len(data.shape) == 5:
        return [_blocked_max_pool2d(data, kernel_size, stride, padding, dilation, out_hw)]
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


def _blocked_max_pool2d(
    data: te.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> te.Tensor:
    """The window's maximum of an NCHW[x]c input, in one pass, each tap a vector of a block's channels.

    A fold of the taps, not a reduction: a reduction's accumulator, stored per tap, made every output vector wait
    on a store (3-5x slower than the NCHW two-pass).  ``max`` is ``a > b ? a : b``, which keeps a NaN only as its
    second operand, and the reducer's NaN test reads the running maximum twice per tap, doubling the expression
    with every tap; so NaNs are found beside the maximum: ``tap >= -inf`` is false for a NaN alone.  (Not
    ``isnan``: TVM's vectorizer does not vectorize that call, and scalarized the whole kernel, 4x slower; nor
    ``not (tap >= -inf)``, which its simplifier turns into ``tap < -inf``, false for a NaN too.)
    """
    n, blocks, h, w, block = (int(d) for d in data.shape)
    lowest = _minus_infinity(data.dtype)
    # which bounds a window can cross: the padding's, and the far edge where ceil_mode lets a window start late
    rows_past = (out_hw[0] - 1) * stride[0] - padding[0] + (kernel_size[0] - 1) * dilation[0] >= h
    columns_past = (out_hw[1] - 1) * stride[1] - padding[1] + (kernel_size[1] - 1) * dilation[1] >= w

    def pool(b, cb, y, x, lane):
        maximum, ordered = None, None
        for i in range(kernel_size[0]):
            for j in range(kernel_size[1]):
                row = y * stride[0] - padding[0] + i * dilation[0]
                col = x * stride[1] - padding[1] + j * dilation[1]
                bounds = ([row >= 0] if padding[0] else []) + ([row < h] if rows_past else [])
                bounds += ([col >= 0] if padding[1] else []) + ([col < w] if columns_past else [])
                tap = data[b, cb, row, col, lane]
                tap = tirx.if_then_else(tirx.all(*bounds), tap, lowest) if bounds else tap
                maximum = tap if maximum is None else tirx.max(maximum, tap)
                ordered = tap >= lowest if ordered is None else tirx.And(ordered, tap >= lowest)
        return tirx.Select(ordered, maximum, tirx.const(float("nan"), data.dtype))

    return te.compute((n, blocks, *out_hw, block), pool, name="max_pool2d")

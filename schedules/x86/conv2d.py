"""x86 conv2d schedules.

``X86Conv2dBlocked`` is the NCHW[x]c micro-kernel of TOPI's x86 conv: ``block`` output channels (one
SIMD register) times ``reg_n`` output columns accumulate in registers while the reduction over input
channels and kernel taps streams broadcast inputs and vector weights.  ``X86Conv2dSpatial`` covers
block 1 (depthwise and odd channel counts) by vectorizing along the output row instead.

Both drive the loop nest from the final NCHW stage and ``compute_at`` the blocked accumulator into a
row tile, so the layout change back to NCHW happens while the tile is still in cache.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import (
    has_block,
    inner_loops,
    input_dtype,
    largest_divisor,
    op_of,
    parallel_outer,
    register_tile_limit,
    vector_lanes,
)


def _row_tile(out_width: int, limit: int) -> int:
    tile = largest_divisor(out_width, limit)
    # A prime-ish width would leave a 1- or 2-wide tile; a whole short row is better.
    return out_width if tile < 4 and out_width <= limit else tile


def _extents(sch: Schedule, block_name: str) -> list[int]:
    return [int(v.dom.extent) for v in sch.get(sch.get_sblock(block_name)).iter_vars]


def _schedule(func: tvm.tirx.PrimFunc, limit: int, tunable: bool, vector_inner: str) -> Schedule:
    """Row tiles of the output in parallel; inside a tile the reduction runs outermost and the
    ``vector_inner`` dimension ("channel" block or output "column") is the SIMD vector."""
    sch = Schedule(func)
    conv, out = sch.get_sblock("conv_blocked"), sch.get_sblock("conv2d")
    out_width, block = _extents(sch, "conv_blocked")[3:5]
    n, o, y, x = sch.get_loops(out)
    oo, oi = sch.split(o, [None, block])
    if tunable:
        factors = sch.sample_perfect_tile(x, n=2, max_innermost_factor=limit)
    else:
        factors = [None, _row_tile(out_width, limit)]
    xo, xi = sch.split(x, factors)
    sch.reorder(n, oo, y, xo, oi, xi)
    sch.parallel(sch.fuse(n, oo, y))
    sch.compute_at(conv, xo, preserve_unit_loops=True)
    loops = inner_loops(sch, conv, 2, ["n", "block", "y", "column", "channel", "c", "i", "j"])
    reduction = [loops["c"], loops["i"], loops["j"]]
    register_tile = [loops["column"], loops["channel"]]
    if vector_inner == "column":
        register_tile.reverse()
    sch.reorder(*reduction, *register_tile)
    sch.vectorize(loops[vector_inner])
    if vector_inner == "channel":
        sch.unroll(loops["column"])
    sch.decompose_reduction(conv, loops["c"])
    if vector_inner == "column":
        sch.vectorize(xi)
    if has_block(sch, "pad"):
        parallel_outer(sch, "pad", 3)
    return sch


class X86Conv2dBlocked:
    name = "x86.conv2d_blocked"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "conv2d" or int(func.params[1].shape[-1]) == 1:
            return None
        return _schedule(func, register_tile_limit(target), tunable, vector_inner="channel")


class X86Conv2dSpatial:
    name = "x86.conv2d_spatial"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "conv2d":
            return None
        # four registers' worth of output columns
        return _schedule(func, 4 * vector_lanes(target, input_dtype(func)), tunable, vector_inner="column")

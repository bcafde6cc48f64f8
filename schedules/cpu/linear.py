"""CPU linear schedules.

``CpuLinearBlocked``: a register tile of ``rows`` input rows times ``blocks`` SIMD vectors of output features
accumulates while the reduction streams the packed weight panels ``(in_features, block)``.  Several
independent accumulators matter even for one row: with a single vector every FMA waits for the previous one.

``CpuLinearDot``: for few output features (a classifier head: 2048 -> 10) a block of output features
fills a fraction of a register, so the weight stays in torch's layout (``weight_block`` 1) and each
output is a dot product vectorized along ``in_features``: one vector of partial sums per output, up to
``MAX_DOT_OUTPUTS`` outputs at a time as independent FMA chains, summed across lanes at the end.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import block_extents, inner_loops, input_dtype, largest_divisor, op_of
from .config import cpu_config

MAX_TILE_ROWS = 8
MAX_TILE_BLOCKS = 8
MAX_DOT_OUTPUTS = 10  # vectors of partial sums in flight: enough FMA chains, well inside 16/32 registers
# Below this many multiply-adds the kernel takes about as long as waking the thread pool (~2 us)
PARALLEL_MIN_MACS = 1 << 18


class CpuLinearBlocked:
    name = "cpu.linear_blocked"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "linear":
            return None
        sch = Schedule(func)
        acc, out = sch.get_sblock("linear_blocked"), sch.get_sblock("linear")
        rows, out_blocks, block, in_features = block_extents(sch, "linear_blocked")
        limit = cpu_config(target).register_tile_limit
        m, n = sch.get_loops(out)
        no, ni = sch.split(n, [None, block])
        if tunable:
            m_factors = sch.sample_perfect_tile(m, n=2, max_innermost_factor=MAX_TILE_ROWS)
            n_factors = sch.sample_perfect_tile(no, n=2, max_innermost_factor=MAX_TILE_BLOCKS)
        else:
            tile_rows = largest_divisor(rows, MAX_TILE_ROWS)
            tile_blocks = largest_divisor(out_blocks, min(MAX_TILE_BLOCKS, max(1, limit // tile_rows)))
            m_factors, n_factors = [None, tile_rows], [None, tile_blocks]
        mo, mi = sch.split(m, m_factors)
        nbo, nbi = sch.split(no, n_factors)
        # weight panels outermost: a panel stays in L2 while every row tile passes over it, so the weight
        # streams from memory once, not once per row tile
        sch.reorder(nbo, mo, mi, nbi, ni)
        tiles = sch.fuse(nbo, mo)
        if rows * out_blocks * block * in_features >= PARALLEL_MIN_MACS:
            sch.parallel(tiles)
        sch.compute_at(acc, sch.get_loops(out)[0], preserve_unit_loops=True)
        loops = inner_loops(sch, acc, 1, ["row", "blocks", "feature", "k"])
        sch.reorder(loops["k"], loops["row"], loops["blocks"], loops["feature"])
        sch.vectorize(loops["feature"])
        sch.unroll(loops["row"])
        sch.unroll(loops["blocks"])
        sch.decompose_reduction(acc, loops["k"])
        return sch


class CpuLinearDot:
    name = "cpu.linear_dot"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "linear":
            return None
        sch = Schedule(func)
        acc = sch.get_sblock("linear_blocked")
        rows, out_features, block, in_features = block_extents(sch, "linear_blocked")
        lanes = cpu_config(target).vector_lanes(input_dtype(func))
        if block != 1 or in_features % lanes:  # a tail of the reduction would need a predicate per vector
            return None
        row, _, _, k = sch.get_loops(acc)
        _, lane = sch.split(k, [None, lanes])
        partial = sch.rfactor(lane, factor_axis=0)  # partial[lane, row, o, 0]: one vector per output
        # per row: the partial sums shrink to one row's, and stay in registers
        sch.compute_at(partial, row, preserve_unit_loops=True)
        loops = inner_loops(sch, partial, 1, ["lane", "row", "out", "feature", "k"])
        out_outer, out_inner = sch.split(loops["out"], [None, largest_divisor(out_features, MAX_DOT_OUTPUTS)])
        sch.reorder(out_outer, loops["k"], out_inner, loops["lane"])
        sch.vectorize(loops["lane"])
        sch.unroll(out_inner)
        if rows > 1 and rows * out_features * in_features >= PARALLEL_MIN_MACS:
            sch.parallel(row)
        return sch

"""x86 linear schedule: a register tile of ``rows`` input rows times ``blocks`` SIMD vectors of output
features accumulates while the reduction streams the packed weight panels ``(in_features, block)``.

Several independent accumulators matter even for one row (a GEMV such as a classifier head): with a
single vector every FMA waits for the previous one.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import inner_loops, largest_divisor, op_of, register_tile_limit

MAX_TILE_ROWS = 8
MAX_TILE_BLOCKS = 8
# Below this many multiply-adds the kernel takes about as long as waking the thread pool (~2 us)
PARALLEL_MIN_MACS = 1 << 18


class X86Linear:
    name = "x86.linear_blocked"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "linear":
            return None
        sch = Schedule(func)
        acc, out = sch.get_sblock("linear_blocked"), sch.get_sblock("linear")
        rows, out_blocks, block, in_features = (int(v.dom.extent) for v in sch.get(acc).iter_vars)
        limit = register_tile_limit(target)
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

"""x86 linear schedule: ``block`` output features (one SIMD register) times ``reg_m`` rows accumulate in
registers while the reduction streams the packed weight panel ``(in_features, block)`` once per row tile."""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import inner_loops, largest_divisor, op_of, register_tile_limit


class X86Linear:
    name = "x86.linear_blocked"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "linear":
            return None
        sch = Schedule(func)
        acc, out = sch.get_sblock("linear_blocked"), sch.get_sblock("linear")
        rows, _, block, depth = (int(v.dom.extent) for v in sch.get(acc).iter_vars)
        limit = min(register_tile_limit(target), 16)
        m, n = sch.get_loops(out)
        no, ni = sch.split(n, [None, block])
        if tunable:
            factors = sch.sample_perfect_tile(m, n=2, max_innermost_factor=limit)
            tile = int(sch.get(factors[1]))
        else:
            tile = largest_divisor(rows, limit)
            factors = [None, tile]
        mo, mi = sch.split(m, factors)
        sch.reorder(mo, no, mi, ni)
        sch.parallel(sch.fuse(mo, no))
        sch.compute_at(acc, sch.get_loops(out)[0])
        loops = inner_loops(sch, acc, 1, [("row", tile), ("feature", block), ("k", depth)])
        sch.reorder(*(loops[k] for k in ("k", "row", "feature") if k in loops))
        if "feature" in loops:
            sch.vectorize(loops["feature"])
        if "row" in loops:
            sch.unroll(loops["row"])
        if "k" in loops:
            sch.decompose_reduction(acc, loops["k"])
        return sch

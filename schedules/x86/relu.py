"""x86 relu schedule: SIMD vectors, and the thread pool only where the tensor is large enough to pay
for waking it (a few microseconds)."""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import input_dtype, op_of, vector_lanes

PARALLEL_MIN_ELEMENTS = 1 << 16


class X86Relu:
    name = "x86.relu"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "relu":
            return None
        sch = Schedule(func)
        block = sch.get_sblock("relu")
        loops = sch.get_loops(block)
        loop = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        size = int(sch.get(loop).extent)
        lanes = vector_lanes(target, input_dtype(func))
        if size % lanes:
            return sch  # a ragged tail would need a predicate in every vector; tiny tensors are not worth it
        outer, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
        if size >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(outer)
        return sch

"""CPU max_pool2d schedule: memory-bound, so rows go to the thread pool and each window is unrolled."""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import op_of, parallel_outer


class CpuMaxPool2d:
    name = "cpu.max_pool2d"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "max_pool2d":
            return None
        sch = Schedule(func)
        parallel_outer(sch, "max_pool2d", 3)
        i, j = sch.get_loops(sch.get_sblock("max_pool2d"))[-2:]
        sch.unroll(i)
        sch.unroll(j)
        return sch

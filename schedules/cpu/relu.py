"""CPU relu schedule: SIMD vectors along the innermost dimension, and the thread pool only where the
tensor is large enough to pay for waking it (a few microseconds), as torch decides.

A vector does not cross a row that is at least one register wide: vectorizing a loop fused across
dimensions (a 56-wide row in 16-lane vectors) turned every vector access into a gather with a division
per lane, 14x slower than torch on a 1x64x56x56 tensor.  A row that is not a multiple of the SIMD
width is one longer vector (56 lanes), which LLVM splits into whole registers and a remainder.
"""

from __future__ import annotations

import math

import tvm
from tvm.s_tir import Schedule

from ..rule import input_dtype, largest_divisor, op_of
from .config import cpu_config

PARALLEL_MIN_ELEMENTS = 1 << 15  # torch's grain size for elementwise ops
MAX_VECTOR_REGISTERS = 4  # lanes of one vector access: at most this many SIMD registers


class CpuRelu:
    name = "cpu.relu"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "relu":
            return None
        sch = Schedule(func)
        *outer, row = sch.get_loops(sch.get_sblock("relu"))
        width = int(sch.get(row).extent)
        lanes = cpu_config(target).vector_lanes(input_dtype(func))
        limit = MAX_VECTOR_REGISTERS * lanes
        if width < lanes:
            # rows narrower than a register (7x7 planes): vectors across rows, which measured 2.5x
            # faster than partial vectors per row at 1x512x7x7 (they do not become gathers here)
            row = sch.fuse(*outer, row) if outer else row
            width, outer = int(sch.get(row).extent), []
        elif width % lanes and outer and width * int(sch.get(outer[-1]).extent) % lanes == 0:
            # rows that are not whole registers (28, 56) but planes that are: whole vectors along the
            # plane, 1.5x faster at 1x128x28x28 and 1x64x56x56 (one level of fusion simplifies back to
            # contiguous accesses; fusing three dimensions measured as gathers again)
            row = sch.fuse(outer.pop(), row)
            width = int(sch.get(row).extent)
        vector = lanes if width % lanes == 0 and width > limit else largest_divisor(width, limit)
        row_outer, row_inner = sch.split(row, [None, vector])
        sch.vectorize(row_inner)
        if width * math.prod(int(sch.get(loop).extent) for loop in outer) >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(sch.fuse(*outer, row_outer))
        return sch

"""CPU max_pool2d schedule: memory-bound, so rows go to the thread pool and each window is unrolled.

Without indices (two passes, see ``tvmlayers.ops.max_pool2d``) each output row first takes its window rows'
maximum along whole input rows, as SIMD vectors, into a row on the stack, then each output the maximum of its
``kW`` columns there.  Measured on znver4 (2 threads, one process, interleaved with the one-pass window): ResNet's
3x3 stride-2 pool of 64x112x112 0.12-0.13 ms against 1.05 ms (0.30 ms in ResNet-18 with the tuned record it had;
ONNX Runtime's 0.07 ms there); VGG's 2x2 pools 64x224x224 0.14-0.21 against 0.18-0.29 ms, 256x56x56 and
512x14x14 the same.

A channel-blocked pool (one pass, ``tvmlayers.ops.max_pool2d``) vectorizes each output over its block of channels.
Measured on znver4 against the NCHW two-pass, interleaved (2 threads): ResNet's 64x112x112 3x3/2 36-51 against
119-132 us, VGG's 2x2 pools 64x224x224 208-249 against 282-291 us, 128x112x112 84 against 96 us, 512x28x28 15 against
29 us.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import has_block, op_of, parallel_outer


class CpuMaxPool2d:
    name = "cpu.max_pool2d"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "max_pool2d":
            return None
        sch = Schedule(func)
        parallel_outer(sch, "max_pool2d", 3)
        if len(func.params[0].shape) == 5:  # channel-blocked: each output a vector of a block's channels
            sch.vectorize(sch.get_loops(sch.get_sblock("max_pool2d"))[-1])
            return sch
        loops = sch.get_loops(sch.get_sblock("max_pool2d"))  # output rows (parallel), columns, the window
        if has_block(sch, "max_pool2d_rows"):
            column_max = sch.get_sblock("max_pool2d_rows")
            sch.compute_at(column_max, loops[0], preserve_unit_loops=True)
            *_, column, window_row = sch.get_loops(column_max)
            sch.reorder(window_row, column)
            sch.vectorize(column)
            sch.unroll(loops[-1])
        else:
            sch.unroll(loops[-2])
            sch.unroll(loops[-1])
        return sch

"""One GPU thread per output element: the memory-bound kernels (relu, max_pool2d).

Their loops over the output are fused into one and split over blocks of threads; consecutive threads take
consecutive elements, so a warp's loads and stores are coalesced.  A count that does not divide the output
leaves the last block's surplus threads idle (a bounds check), never a second kernel.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV, SBlockRV

from ..rule import op_of
from .config import GpuConfig, gpu_config
from .tiling import DEFAULT_UNROLL, sample_threads


def spread_over_threads(sch: Schedule, block: SBlockRV, spatial: int, config: GpuConfig, tunable: bool) -> LoopRV:
    """Fuse the ``spatial`` outermost loops of ``block`` and bind them to blocks of ``elementwise_threads``
    threads (a sampled count when ``tunable``); returns the thread loop."""
    loops = sch.get_loops(block)[:spatial]
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    threads = sample_threads(sch, config.max_threads) if tunable else config.elementwise_threads
    block_loop, thread = sch.split(fused, [None, threads])
    sch.bind(block_loop, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")
    return thread


class GpuRelu:
    name = "gpu.relu"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "relu":
            return None
        sch = Schedule(func)
        block = sch.get_sblock("relu")
        spread_over_threads(sch, block, len(sch.get_loops(block)), gpu_config(target), tunable)
        return sch


class GpuMaxPool2d:
    """Each thread reduces its output's window (and its argmax) in registers, then writes each output once; the
    window's loops unroll.

    The accumulators must be registers (``cache_write`` to ``local``), not the outputs themselves: reduced in
    global memory, nvcc (sm_90, -O3) merged "the new value or the accumulator just stored" into one
    ``ld.global.nc`` (the read-only cache, which does not see the thread's own store: the outputs are
    ``__restrict__``), so on an H100 the argmax compared against stale accumulators (25 of 64 indices wrong).
    """

    name = "gpu.max_pool2d"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "max_pool2d":
            return None
        sch = Schedule(func)
        block = sch.get_sblock("max_pool2d")
        writes = [sch.cache_write(block, index, "local") for index in range(len(sch.get(block).writes))]
        thread = spread_over_threads(sch, block, 4, gpu_config(target), tunable)
        for write in writes:
            sch.reverse_compute_at(write, thread)
        sch.annotate(thread, "pragma_auto_unroll_max_step", DEFAULT_UNROLL)
        sch.annotate(thread, "pragma_unroll_explicit", 1)
        return sch

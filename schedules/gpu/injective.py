"""The memory-bound kernels (relu, max_pool2d): their loops over the output fused into one and spread over
blocks of threads, consecutive threads taking consecutive elements so that a warp's loads and stores are
coalesced.  A count that does not divide the output leaves the last block's surplus threads idle (a bounds check),
never a second kernel.

relu moves each element once and computes nothing: its speed is the memory bandwidth.  One scalar per thread
issued too many small loads to reach it (an H100: 47 us against torch's 39 us on 16x64x112x112), so each thread
moves 16-byte vectors (float4: the widest load a thread issues) and several of them, from a grid that still
keeps several full waves of blocks.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV, SBlockRV

from ..rule import has_block, input_dtype, op_of
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


# The widest load or store one CUDA thread issues (float4, double2)
VECTOR_BYTES = 16
# Vectors per thread: the default takes the most of these that leaves WAVES full waves of resident blocks; the search
# space samples among them
VECTORS_PER_THREAD = (1, 2, 4, 8)
# Resident blocks of ``elementwise_threads`` per SM (2048 threads per SM / 256), and the waves of them a grid
# keeps: a thread moves more vectors only while the grid has 4 or more full waves, so that the last, partly
# filled wave idles at most a quarter of the time (1.5 waves of 8 vectors per thread would idle a third)
RESIDENT_BLOCKS_PER_SM = 8
WAVES = 4


def _vector_lanes(elements: int, dtype: str) -> int:
    """Elements per vector access: 16 bytes' worth where they divide the tensor, else one (scalar accesses)."""
    lanes = VECTOR_BYTES * 8 // tvm.DataType(dtype).bits
    return lanes if elements % lanes == 0 else 1


def _default_vectors_per_thread(vectors: int, threads: int, config: GpuConfig) -> int:
    enough_blocks = WAVES * RESIDENT_BLOCKS_PER_SM * config.sm_count
    return max(
        (k for k in VECTORS_PER_THREAD if vectors // (threads * k) >= enough_blocks),
        default=VECTORS_PER_THREAD[0],
    )


class GpuRelu:
    """Each thread moves ``vectors per thread`` vectors of ``lanes`` elements, a whole block's worth apart (each
    access of a warp is one contiguous span: coalesced)."""

    name = "gpu.relu"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "relu":
            return None
        sch = Schedule(func)
        block = sch.get_sblock("relu")
        config = gpu_config(target)
        loops = sch.get_loops(block)
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        elements = int(sch.get(fused).extent)
        lanes = _vector_lanes(elements, input_dtype(func))
        if tunable:
            threads = sample_threads(sch, config.max_threads)
            per_thread = sch.sample_categorical(list(VECTORS_PER_THREAD), [1 / len(VECTORS_PER_THREAD)] * 4)
        else:
            threads = config.elementwise_threads
            per_thread = _default_vectors_per_thread(elements // lanes, threads, config)
        block_loop, vector, thread, lane = sch.split(fused, [None, per_thread, threads, lanes])
        sch.bind(block_loop, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
        sch.unroll(vector)
        sch.vectorize(lane)
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
        if has_block(sch, "max_pool2d_rows"):  # without indices: each thread its window's column maxima, in registers
            column_max = sch.get_sblock("max_pool2d_rows")
            sch.compute_at(column_max, thread, preserve_unit_loops=True)
            sch.set_scope(column_max, 0, "local")
        sch.annotate(thread, "pragma_auto_unroll_max_step", DEFAULT_UNROLL)
        sch.annotate(thread, "pragma_unroll_explicit", 1)
        return sch

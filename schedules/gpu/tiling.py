"""Multi-level tiling of a reduction block on a GPU: what the conv2d and linear rules share.

The output of the reduction block is tiled over thread blocks, threads and registers (each thread
accumulates a register tile in ``local`` memory, one accumulator per virtual thread); the reduction runs in
steps, and each step first copies the tile of every operand it reads into shared memory, all threads of the
block fetching together (a cooperative fetch), then every thread reads its operands from there.  The fused
epilogue (bias, residual, activation, the write to torch's layout) runs per thread on its register tile
(``reverse_compute_at``), so the kernel writes each output once.

With ``tunable`` every tile size is a sampling instruction, so that the same rule is a MetaSchedule search
space.  Threads per block and shared memory stay within the target's limits by construction, not by a
check after sampling: each dimension's threads are sampled below a bound (``max_threads``) and
its registers below another (``max_regs``), and the bounds are chosen so that the largest tiles fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV, SBlockRV

# pragma_auto_unroll_max_step choices (MetaSchedule's own for CUDA); the default 512 unrolls a register tile's
# FMAs and a 3x3 window's taps (so operands come from registers, indices fold), not a whole reduction step
UNROLL_STEPS = (0, 16, 64, 512, 1024)
DEFAULT_UNROLL = 512
# threads per block of the one-dimensional kernels' search spaces: whole warps, up to every SM's limit
THREAD_CHOICES = (64, 128, 256, 512, 1024)


def sample_uniformly(sch: Schedule, choices: Sequence[int]) -> object:
    """One of ``choices``, each as likely (nothing is known about them yet); a variable of the trace."""
    return sch.sample_categorical(list(choices), [1 / len(choices)] * len(choices))


def sample_threads(sch: Schedule, limit: int, choices: Sequence[int] = THREAD_CHOICES) -> object:
    """A sampled thread count among ``choices`` up to ``limit``."""
    return sample_uniformly(sch, [c for c in choices if c <= limit] or [min(choices)])


def divisors_between(extent: int, low: int, high: int) -> tuple[int, ...]:
    """The divisors of ``extent`` from ``low`` to ``high``, or the largest one below ``high`` if none is: the
    choices of a sampled tile that divides its loop (no bounds check) and stays within ``high``."""
    found = tuple(d for d in range(max(1, low), high + 1) if extent % d == 0)
    return found or (max(d for d in range(1, max(1, high) + 1) if extent % d == 0),)


def fill_sms(tiles: dict[str, list[int]], outputs: int, sm_count: int, spare_threads: Sequence[str] = ()) -> None:
    """Shrink the register tiles (``tiles``: dimension -> [threads, registers] of ``outputs`` outputs in all),
    the largest first, then the threads of the ``spare_threads`` dimensions, until the grid has a block for
    every SM or nothing is left to shrink: fewer blocks than SMs leave SMs idle (ResNet's 7x7 layers, linear
    layers at small batches)."""

    def blocks() -> int:
        return outputs // math.prod(threads * regs for threads, regs in tiles.values())

    def shrink(name: str, position: int) -> None:
        count = tiles[name][position]
        tiles[name][position] = max(d for d in range(1, count) if count % d == 0)

    while blocks() < sm_count:
        name = max(tiles, key=lambda d: tiles[d][1])
        if tiles[name][1] > 1:
            shrink(name, 1)
            continue
        spare = [d for d in spare_threads if tiles[d][0] > 1]
        if not spare:
            return
        shrink(spare[0], 0)


@dataclass(frozen=True)
class TileDim:
    """One dimension of the output tiled over blocks, threads and registers.

    Element ``e`` of the dimension belongs to block ``e // (regs * threads)``, register ``(e // threads) %
    regs`` and thread ``e % threads``: neighbouring threads write neighbouring elements (coalesced stores).
    """

    loop: LoopRV
    thread_axis: str  # "threadIdx.x", ".y" or ".z"
    threads: int  # the default schedule's
    regs: int
    max_threads: int  # bounds of the search space
    max_regs: int
    # The search space's thread counts (divisors of the extent), sampled among these when given; else any
    # divisor up to ``max_threads``.  Lists whose products stay within 64 to 512 threads per block keep the
    # samples where a GPU is busy: independent divisors up to a bound gave blocks of 2 to 8 threads.
    thread_choices: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReduceDim:
    """The reduction dimension staged in shared memory ``tile`` elements at a time (``max_tile`` when sampled)."""

    loop: LoopRV
    tile: int
    max_tile: int
    tile_choices: tuple[int, ...] = ()  # the search space's steps when given, else any divisor up to max_tile


def _split_dim(sch: Schedule, dim: TileDim, tunable: bool) -> tuple[LoopRV, LoopRV, LoopRV, object]:
    """(block, register, thread) loops of ``dim``, and its thread count (an int or a sampled variable)."""
    if not tunable:
        outer, reg, thread = sch.split(dim.loop, [None, dim.regs, dim.threads])
        return outer, reg, thread, dim.threads
    # threads first, then registers out of the rest: two samples, each bounded by its innermost factor, so
    # both are bounded (one sample of three factors bounds only the innermost)
    if dim.thread_choices:
        threads = sample_uniformly(sch, dim.thread_choices)
    else:
        _, threads = sch.sample_perfect_tile(dim.loop, n=2, max_innermost_factor=dim.max_threads)
    rest, thread = sch.split(dim.loop, [None, threads])
    _, regs = sch.sample_perfect_tile(rest, n=2, max_innermost_factor=dim.max_regs)
    outer, reg = sch.split(rest, [None, regs])
    return outer, reg, thread, threads


def tile_reduction(
    sch: Schedule,
    block: SBlockRV,
    epilogue: SBlockRV,
    block_only: Sequence[LoopRV],
    dims: Sequence[TileDim],
    unit: Sequence[LoopRV],
    reduce: ReduceDim,
    reduce_inner: Sequence[LoopRV],
    shared_reads: Sequence[int],
    tunable: bool,
) -> Schedule:
    """Tile ``block`` (its loops: ``block_only`` outer dimensions, one loop per ``dims``, ``unit`` loops of
    extent 1, ``reduce`` and the ``reduce_inner`` reduction loops, in any order) and stage its reads
    ``shared_reads`` (buffer indices) in shared memory at each reduction step."""
    split = [_split_dim(sch, dim, tunable) for dim in dims]
    if tunable and reduce.tile_choices:
        step = sample_uniformly(sch, reduce.tile_choices)
    elif tunable:
        _, step = sch.sample_perfect_tile(reduce.loop, n=2, max_innermost_factor=reduce.max_tile)
    else:
        step = reduce.tile
    reduce_outer, reduce_step = sch.split(reduce.loop, [None, step])
    blocks = [*block_only, *(s[0] for s in split)]
    threads = [s[2] for s in split]
    regs = [s[1] for s in split]
    sch.reorder(*blocks, *regs, *threads, reduce_outer, reduce_step, *reduce_inner, *unit)
    block_loop = sch.fuse(*blocks)
    sch.bind(block_loop, "blockIdx.x")
    # A thread's register tile is its virtual threads (TVM interleaves their code): its outputs lie ``threads``
    # apart, so a warp stores neighbouring outputs and reads neighbouring shared-memory words.  The same
    # strided tile as a loop inside the thread would make reverse_compute_at, which covers the box of what a
    # thread computes, write the other threads' outputs in between from this thread's registers.
    for reg, thread, dim in zip(regs, threads, dims, strict=True):
        sch.bind(thread, dim.thread_axis)
        sch.bind(reg, dim.thread_axis.replace("threadIdx", "vthread"))
    if tunable:
        unroll = sch.sample_categorical(list(UNROLL_STEPS), [1 / len(UNROLL_STEPS)] * len(UNROLL_STEPS))
    else:
        unroll = DEFAULT_UNROLL
    sch.annotate(block_loop, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(block_loop, "pragma_unroll_explicit", 1)
    # the accumulators live in registers; the epilogue reads them where they are
    sch.set_scope(block, 0, "local")
    sch.reverse_compute_at(epilogue, threads[-1], preserve_unit_loops=True)
    thread_counts = [s[3] for s in split]
    for index in shared_reads:
        cache = sch.cache_read(block, index, "shared")
        sch.compute_at(cache, reduce_outer, preserve_unit_loops=True)
        # below the block loop, the virtual thread and thread loops and the reduction step loop
        cooperative_fetch(sch, cache, 2 * len(threads) + 2, dims, thread_counts)
    sch.decompose_reduction(block, reduce_outer)
    return sch


def cooperative_fetch(
    sch: Schedule, cache: SBlockRV, outer: int, dims: Sequence[TileDim], thread_counts: Sequence[object]
) -> None:
    """Spread the copy ``cache`` (below its first ``outer`` loops) over the block's threads, the innermost
    thread axis fastest: consecutive threads copy consecutive elements of the innermost dimension."""
    fused = sch.fuse(*sch.get_loops(cache)[outer:])
    loops = sch.split(fused, [None, *thread_counts])
    for loop, dim in zip(loops[1:], dims, strict=True):
        sch.bind(loop, dim.thread_axis)

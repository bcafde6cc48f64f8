"""GPU conv2d schedules.

``GpuConv2dTiled`` is an implicit GEMM: output channels times output pixels (rows x columns) tiled over
thread blocks, threads and registers, the reduction over input channels staged in shared memory together with
the whole kernel window (the padded input tile of those channels and their weights), see :mod:`.tiling`.
A grouped conv's channel tiles stay inside one group (the channel loop is split by groups first), so a tile
reads the input channels of its group only.  The padding is computed while the input tile is copied into
shared memory: no padded copy of the input in global memory.

``GpuConv2dDepthwise`` (one input channel per group): no reduction over channels to share, so each thread
computes a few neighbouring output pixels of one channel straight from global memory (the window's overlap
between neighbouring threads is served by the L1 cache).
"""

from __future__ import annotations

import math
from dataclasses import replace

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV
from tvm.sym.pattern import detect_linear_equation

from ..rule import has_block, input_dtype, largest_divisor, op_of
from .config import GpuConfig, gpu_config
from .tiling import (
    DEFAULT_UNROLL,
    ReduceDim,
    TileDim,
    divisors_between,
    fill_sms,
    sample_threads,
    tile_reduction,
)

# Input channels per reduction step of the search space (where the group's channels have such divisors)
MIN_SAMPLED_STEP = 4
MAX_SAMPLED_STEP = 16


def _window(sch: Schedule) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stride, dilation) per spatial dimension, read off the conv's input index ``y * stride + i * dilation``."""
    conv = sch.get(sch.get_sblock("conv_blocked"))
    v = [iv.var for iv in conv.iter_vars]  # b, ob, y, x, oi, c, i, j
    region = conv.reads[0].region
    strides, dilations = [], []
    for index, out_var, tap_var in ((2, v[2], v[6]), (3, v[3], v[7])):
        stride, dilation, _ = detect_linear_equation(region[index].min, [out_var, tap_var])
        strides.append(int(stride))
        dilations.append(int(dilation))
    return (strides[0], strides[1]), (dilations[0], dilations[1])


def _span(tile: int, kernel: int, stride: int, dilation: int) -> int:
    """Input elements a tile of ``tile`` outputs reads along one dimension."""
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def _shared_bytes(
    channels: int, rows: int, cols: int, step: int, kernel: tuple[int, int], window: tuple, itemsize: int
) -> int:
    """Shared memory of one reduction step: the input tile and the weight tile of ``step`` input channels."""
    (sh, sw), (dh, dw) = window
    data = step * _span(rows, kernel[0], sh, dh) * _span(cols, kernel[1], sw, dw)
    weight = channels * step * kernel[0] * kernel[1]
    return (data + weight) * itemsize


def _largest_step(limit: int, in_per_group: int, bytes_of_step) -> int:
    """The most input channels per step (a divisor of the group's, up to ``limit``) whose tiles fit; 0 if none."""
    steps = [s for s in range(1, min(limit, in_per_group) + 1) if in_per_group % s == 0]
    fitting = [s for s in steps if bytes_of_step(s)]
    return max(fitting, default=0)


def _default_tiles(config: GpuConfig, extents: dict, fits) -> dict | None:
    """Threads and registers per dimension, and the channels per reduction step, of the default schedule: the
    large register tiles and steps of ``config`` where the grid still has ``large_blocks_per_sm`` blocks per SM,
    else the ordinary ones."""
    large = replace(config, reg_channels=config.large_reg_channels, reduce_tile=config.large_reduce_tile)
    tiles = _tiles(large, extents, fits)
    outputs = extents["outer"] * extents["channel"] * extents["row"] * extents["col"]
    if tiles is not None:
        per_block = math.prod(tiles[d][0] * tiles[d][1] for d in ("channel", "row", "col"))
        if outputs // per_block >= config.large_blocks_per_sm * config.sm_count:
            return tiles
    return _tiles(config, extents, fits)


def _tiles(config: GpuConfig, extents: dict, fits) -> dict | None:
    """The tiles of :func:`_default_tiles` for the register tile shape and step of ``config``."""
    out_per_group, rows, cols = extents["channel"], extents["row"], extents["col"]
    # Pixel threads first (about two warps, coalesced along the row), then channel threads up to gemm_threads.
    tx = largest_divisor(cols, config.max_thread_columns)
    ty = largest_divisor(rows, max(1, 2 * config.warp // tx))
    tc = largest_divisor(out_per_group, min(config.max_thread_channels, config.gemm_threads // (tx * ty)))
    tiles = {
        "channel": [tc, largest_divisor(out_per_group // tc, config.reg_channels)],
        "col": [tx, largest_divisor(cols // tx, config.reg_pixels)],
    }
    tiles["row"] = [ty, largest_divisor(rows // ty, config.reg_pixels // tiles["col"][1])]

    # channel threads go last (an output of 512 channels x 7 x 7 pixels, one register each, has 128 blocks of
    # 196 threads for an H100's 132 SMs); pixel threads stay, they keep the stores coalesced
    fill_sms(tiles, extents["outer"] * out_per_group * rows * cols, config.sm_count, spare_threads=("channel",))
    channels, rows_, cols_ = (math.prod(tiles[d]) for d in ("channel", "row", "col"))
    step = _largest_step(config.reduce_tile, extents["reduce"], lambda s: fits(channels, rows_, cols_, s))
    if step == 0:
        return None
    return {**tiles, "step": step}


def _search_bounds(config: GpuConfig, fits) -> dict | None:
    """(max threads, max registers) per dimension and the most input channels per step of the search space,
    such that its largest tiles fit in shared memory: registers of the largest dimension halve until one
    input channel's tiles fit (a large window at a large stride), then threads; None if nothing fits.

    Channels and columns take half the threads the config allows, rows twice (at most 8 x 8 x 8 = 512 threads,
    half the config's product, which fits the target: a 7 x 7 or 14 x 14 output gets 7 rows of threads), and
    channels twice the registers (up to 8 x 2 x 4 accumulators: several FMAs per shared-memory read)."""
    bounds = {
        "channel": [max(1, config.max_thread_channels // 2), 2 * config.max_regs],
        "row": [2 * config.max_thread_rows, config.max_regs_rows],
        "col": [max(1, config.max_thread_columns // 2), config.max_regs],
    }

    def tile(name: str) -> int:
        return bounds[name][0] * bounds[name][1]

    while not fits(tile("channel"), tile("row"), tile("col"), 1):
        name = max(bounds, key=tile)
        position = 1 if bounds[name][1] > 1 else 0
        if bounds[name][position] == 1:
            return None
        bounds[name][position] //= 2
    # the bound of a sampled step need not divide the channels: the sample takes the largest divisor below it
    steps = range(1, 4 * config.reduce_tile + 1)
    step = max(s for s in steps if fits(tile("channel"), tile("row"), tile("col"), s))
    return {**{name: tuple(b) for name, b in bounds.items()}, "step": step}


class GpuConv2dTiled:
    name = "gpu.conv2d_tiled"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "conv2d":
            return None
        _, in_per_group, kh, kw, block = (int(d) for d in func.params[1].shape)
        if in_per_group == 1 or block != 1:  # depthwise: GpuConv2dDepthwise; blocked weights: not a GPU layout
            return None
        config = gpu_config(target)
        sch = Schedule(func)
        conv, out = sch.get_sblock("conv_blocked"), sch.get_sblock("conv2d")
        n, ob, y, x, oi, c, i, j = sch.get_loops(conv)
        batch, out_channels, rows, cols = (int(sch.get(loop).extent) for loop in (n, ob, y, x))
        groups = int(func.params[0].shape[1]) // in_per_group
        itemsize = tvm.DataType(input_dtype(func)).bits // 8
        window = _window(sch)

        def fits(channels: int, rows_: int, cols_: int, step: int) -> bool:
            return _shared_bytes(channels, rows_, cols_, step, (kh, kw), window, itemsize) <= config.shared_bytes

        extents = {
            "outer": batch * groups,
            "channel": out_channels // groups,
            "row": rows,
            "col": cols,
            "reduce": in_per_group,
        }
        tiles = _default_tiles(config, extents, fits)
        bounds = _search_bounds(config, fits) if tunable else None
        if tiles is None or (tunable and bounds is None):
            return None  # a window too large for shared memory even one channel at a time
        group, channel = sch.split(ob, [groups, None])
        limits = bounds or {"channel": (1, 1), "row": (1, 1), "col": (1, 1), "step": 1}  # read when tunable only

        def dim(loop: LoopRV, name: str, axis: str) -> TileDim:
            # threads from half the bound to the bound: 4-8 channels x 4-8 rows x 4-8 columns, 64 to 512 threads
            # where the extents have such divisors
            most = limits[name][0]
            choices = divisors_between(extents[name], most // 2, most)
            return TileDim(loop, axis, *tiles[name], *limits[name], thread_choices=choices)

        dims = [dim(channel, "channel", "threadIdx.z"), dim(y, "row", "threadIdx.y"), dim(x, "col", "threadIdx.x")]
        # 4 to 16 input channels per shared-memory refill: fewer leave the barriers unamortized
        steps = divisors_between(in_per_group, MIN_SAMPLED_STEP, min(MAX_SAMPLED_STEP, limits["step"]))
        reduce = ReduceDim(c, tiles["step"], limits["step"], tile_choices=steps)
        tile_reduction(sch, conv, out, [n, group], dims, [oi], reduce, [i, j], [0, 1], tunable)
        if has_block(sch, "pad"):
            sch.compute_inline(sch.get_sblock("pad"))  # pads while copying the input tile into shared memory
        return sch


class GpuConv2dDepthwise:
    name = "gpu.conv2d_depthwise"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "conv2d":
            return None
        _, in_per_group, _, _, block = (int(d) for d in func.params[1].shape)
        if in_per_group != 1 or block != 1:
            return None
        config = gpu_config(target)
        sch = Schedule(func)
        conv, out = sch.get_sblock("conv_blocked"), sch.get_sblock("conv2d")
        if has_block(sch, "pad"):
            sch.compute_inline(sch.get_sblock("pad"))  # a bounds check per tap instead of a padded copy
        n, ob, y, x, oi, c, i, j = sch.get_loops(conv)
        cols = int(sch.get(x).extent)
        if tunable:
            _, regs = sch.sample_perfect_tile(x, n=2, max_innermost_factor=config.max_regs)
        else:
            # a few columns per thread reuse the input values their windows share (in registers)
            regs = largest_divisor(cols, config.reg_pixels)
        x_outer, x_reg = sch.split(x, [None, regs])
        pixels = sch.fuse(n, ob, y, x_outer)
        # whole warps; a count that does not divide the pixels leaves the last block partly idle
        threads = sample_threads(sch, config.max_threads) if tunable else config.elementwise_threads
        block_loop, thread = sch.split(pixels, [None, threads])
        sch.reorder(block_loop, thread, c, i, j, x_reg, oi)
        sch.bind(block_loop, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
        sch.annotate(block_loop, "pragma_auto_unroll_max_step", DEFAULT_UNROLL)
        sch.annotate(block_loop, "pragma_unroll_explicit", 1)
        sch.set_scope(conv, 0, "local")
        sch.reverse_compute_at(out, thread, preserve_unit_loops=True)
        sch.decompose_reduction(conv, c)
        return sch

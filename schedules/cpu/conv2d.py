"""CPU conv2d schedules.

``CpuConv2dBlocked`` is the NCHW[x]c micro-kernel of TOPI's x86 conv: one or more SIMD vectors of
``block`` output channels times a few output columns accumulate in registers while the reduction over
input channels and kernel taps streams broadcast inputs and vector weights.  ``CpuConv2dSpatial`` covers
block 1 (depthwise and odd channel counts) by vectorizing along the output row instead.

Both drive the loop nest from the final NCHW stage and ``compute_at`` the blocked accumulator into a
row tile, so the layout change back to NCHW happens while the tile is still in cache.
"""

from __future__ import annotations

import math

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

from ..rule import block_extents, has_block, inner_loops, input_dtype, largest_divisor, op_of, parallel_outer
from .config import cpu_config


def _row_tile(out_width: int, limit: int) -> int:
    tile = largest_divisor(out_width, limit)
    # A prime-ish width would leave a 1- or 2-wide tile; a whole short row is better.
    return out_width if tile < 4 and out_width <= limit else tile


def _channel_register_tile(out_width: int, out_blocks: int, limit: int) -> tuple[int, int]:
    """(output columns, channel vectors) of the default register tile: two vectors of output channels
    where the channel count allows, then a divisor of the row, 7 where it divides (every ResNet width).

    Measured on AVX-512 (ResNet-18 and VGG shapes): 7 columns x 2 vectors ran 1.3-2x faster than the
    28 x 1 tile that fills the register file, and 7 beat 8 columns: long runs of adjacent broadcast
    inputs get turned into vector loads plus shuffles, which compete with the FMAs for a port.
    Where two vectors leave a tile of fewer than 4 columns (a 7-wide row under AVX2's limit of 8: one
    column, two accumulators), one vector of more columns keeps more FMA chains busy.
    """

    def columns(vectors: int) -> int:
        limit_columns = limit // vectors
        return 7 if out_width % 7 == 0 and limit_columns >= 7 else _row_tile(out_width, limit_columns)

    vectors = largest_divisor(out_blocks, 2)
    if vectors == 2 and columns(2) < 4 and columns(1) > 2 * columns(2):
        vectors = 1
    return columns(vectors), vectors


# TVM allocates a buffer inside a parallel loop on the stack up to 1 KiB (its kMaxStackAlloca), larger ones with
# a TVMBackendAllocWorkspace call per iteration.  A strided depthwise conv pads its input rows per output row
# and channel: at 112x112 (96 channels, stride 2) the 3 rows of 113 floats made that call 5376 times per
# kernel, which took 0.27 or 0.56 ms depending on the process (znver4, 4 processes); padded per column tile
# on the stack 0.24-0.25 ms in each (224x224, 32 channels: 0.32-0.56 -> 0.33 ms).
STACK_ALLOCA_BYTES = 1024


def _strip_bytes(sch: Schedule, block: SBlockRV) -> int:
    """The bytes a block of the input's type, computed at the outermost loop, writes per iteration of it."""
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(block)[1:]]
    return math.prod(extents) * tvm.DataType(input_dtype(sch.mod["main"])).bits // 8


def _column_stride(sch: Schedule) -> int:
    """The conv's horizontal stride, read off its input index ``x * stride + j * dilation``."""
    conv = sch.get(sch.get_sblock("conv_blocked"))
    x = conv.iter_vars[3].var
    terms = [conv.reads[0].region[3].min]
    while terms:
        term = terms.pop()
        if isinstance(term, tvm.tirx.Add):
            terms += [term.a, term.b]
        elif isinstance(term, tvm.tirx.Mul) and term.a.same_as(x):
            return int(term.b)
    return 1


def _input_block(func: tvm.tirx.PrimFunc) -> int | None:
    """The channel block of a channel-blocked (5-D, NCHW[x]c) input, None for an NCHW one."""
    shape = func.params[0].shape
    return int(shape[4]) if len(shape) == 5 else None


def _input_channels(func: tvm.tirx.PrimFunc) -> int:
    shape = func.params[0].shape
    return int(shape[1]) * (_input_block(func) or 1)


def _schedule(
    sch: Schedule,
    limit: int,
    tunable: bool,
    vector_inner: str,
    taps_outer: bool,
    pad_per_row: bool = False,
    channels: int = 1,
    per_plane: bool = False,
) -> Schedule:
    """Row tiles of the output in parallel; inside a tile the reduction runs outermost and the
    ``vector_inner`` dimension ("channel" block or output "column") is the SIMD vector.  A channel tile
    holds ``vectors`` blocks of output channels, a column tile ``channels`` (the block is 1 there).  The reduction
    runs over input channels, then kernel taps, or with ``taps_outer`` (``CpuConfig.taps_outer``) the other way
    round.  ``pad_per_row`` pads the input rows of each output row next to their use instead of the whole
    input first (a row-vectorized tile's rows per column tile where a whole row's would not fit on the
    stack).  ``per_plane`` (column tiles) runs whole output planes in parallel instead of rows, each padding its
    input plane first (``PLANE_MAX_PIXELS``).  ``sch`` is the unscheduled kernel the rule has inspected."""
    conv, out = sch.get_sblock("conv_blocked"), sch.get_sblock("conv2d")
    out_blocks, _, out_width, block = block_extents(sch, "conv_blocked")[1:5]
    out_loops = sch.get_loops(out)
    blocked_out = len(out_loops) == 5  # an NCHW[x]c output: the epilogue writes the accumulator's layout
    if blocked_out:
        n, oo, y, x, oi = out_loops
    else:
        n, o, y, x = out_loops
        oo, oi = sch.split(o, [None, block])
    if vector_inner == "channel":
        if tunable:
            column_factors = sch.sample_perfect_tile(x, n=2, max_innermost_factor=limit)
            vector_factors = sch.sample_perfect_tile(oo, n=2, max_innermost_factor=4)
        else:
            columns, vectors = _channel_register_tile(out_width, out_blocks, limit)
            column_factors, vector_factors = [None, columns], [None, vectors]
    else:
        if tunable:
            column_factors = sch.sample_perfect_tile(x, n=2, max_innermost_factor=limit)
            vector_factors = (
                sch.sample_perfect_tile(oo, n=2, max_innermost_factor=channels) if channels > 1 else [None, 1]
            )
        else:
            column_factors, vector_factors = [None, _row_tile(out_width, limit)], [None, channels]
    xo, xi = sch.split(x, column_factors)
    ooo, ooi = sch.split(oo, vector_factors)
    # the write-back's innermost loop: a tile's columns per channel into NCHW, a channel block into NCHW[x]c
    tile = [ooi, xi, oi] if blocked_out else [ooi, oi, xi]
    if pad_per_row and vector_inner == "channel":
        # every channel block reads every input channel: pad a row once, then run all blocks over it
        sch.reorder(n, y, ooo, xo, *tile)
        rows, outer = sch.fuse(n, y), 3
    else:
        sch.reorder(n, ooo, y, xo, *tile)
        rows, outer = (sch.fuse(n, ooo), 3) if per_plane else (sch.fuse(n, ooo, y), 2)
    sch.parallel(rows)
    sch.compute_at(conv, xo, preserve_unit_loops=True)
    loops = inner_loops(sch, conv, outer, ["n", "blocks", "y", "column", "channel", "c", "i", "j"])
    channel_loops = [loops["c"]]
    in_block = _input_block(sch.mod["main"])
    if in_block is not None and block_extents(sch, "conv_blocked")[5] % in_block == 0 and in_block > 1:
        # a channel-blocked input: the reduction over input channels in its blocks, each block's lanes contiguous
        channel_loops = list(sch.split(loops["c"], [None, in_block]))
    reduction = [loops["i"], loops["j"], *channel_loops] if taps_outer else [*channel_loops, loops["i"], loops["j"]]
    if vector_inner == "channel":
        sch.reorder(*reduction, loops["blocks"], loops["column"], loops["channel"])
        sch.unroll(loops["blocks"])
        sch.unroll(loops["column"])
    else:
        sch.reorder(*reduction, loops["blocks"], loops["channel"], loops["column"])
        if channels > 1:
            sch.unroll(loops["blocks"])
    sch.vectorize(loops[vector_inner])
    # the NCHW write-back stores a tile's columns as one vector per channel (5% on ResNet's conv1, whose
    # short reduction makes the write-back a fifth of the work); the NCHW[x]c one a channel block
    sch.vectorize(tile[-1])
    sch.decompose_reduction(conv, reduction[0])
    if has_block(sch, "pad") and (pad_per_row or per_plane):
        pad = sch.get_sblock("pad")
        sch.compute_at(pad, rows, preserve_unit_loops=True)
        if pad_per_row and vector_inner == "column" and _strip_bytes(sch, pad) > STACK_ALLOCA_BYTES:
            sch.compute_at(pad, xo, preserve_unit_loops=True)  # the strip of one column tile instead
        sch.vectorize(sch.get_loops(pad)[-1])
    elif has_block(sch, "pad"):
        parallel_outer(sch, "pad", 3)
    return sch


class CpuConv2dBlocked:
    name = "cpu.conv2d_blocked"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "conv2d" or int(func.params[1].shape[-1]) == 1:
            return None
        # A padded input larger than L2 would go out to L3 and come back for the conv (VGG's 64x224x224:
        # 13 MB): padded a row at a time it stays in cache, 15% faster there, slower on small inputs.
        config = cpu_config(target)
        sch = Schedule(func)
        if _input_block(func) is not None and has_block(sch, "pad"):
            # A channel-blocked input is read where it lies, the padding a bounds test per tap and column that
            # holds for a whole vector of channels: no padded copy, no parallel pass of its own before the conv.
            # Measured on znver4 (2 threads, blocked in and out, against padding first, interleaved): depthwise
            # 3x3 1.4-1.7x at stride 1 (32x112x112 to 960x7x7), 2.0-2.3x at stride 2; ResNet's 3x3 convs 1.01-1.04x.
            sch.compute_inline(sch.get_sblock("pad"))
        itemsize = tvm.DataType(input_dtype(func)).bits // 8
        padded = math.prod(block_extents(sch, "pad")) * itemsize if has_block(sch, "pad") else 0
        pad_per_row = padded > config.l2_bytes
        return _schedule(sch, config.conv_accumulator_limit, tunable, "channel", config.taps_outer, pad_per_row)


MIN_CHANNEL_TILE = 4  # fewer output channels per column tile reuse too little (see CpuConv2dSpatial)
# A stride-1 depthwise conv with output planes up to this many pixels runs a plane per parallel iteration, padding
# it first, instead of rows: a 7- or 14-row plane's rows are too little work per iteration, and the whole input
# padded up front is a pass and a parallel region of its own.  Measured on znver4 (2 threads, 3x3, float32, both
# interleaved in one process; rows / planes): 960x7x7 1.9x, 1024x7x7 1.4x, 384x14x14 1.2x, 64x14x14 1.2x;
# 192x28x28 0.85-0.9x and 144x56x56 0.7x (hence the bound); strided ones (7x7 and 14x14 outputs) 0.8-0.9x.
PLANE_MAX_PIXELS = 14 * 14


class CpuConv2dSpatial:
    name = "cpu.conv2d_spatial"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if op_of(func) != "conv2d":
            return None
        config = cpu_config(target)
        lanes = config.vector_lanes(input_dtype(func))
        # A strided depthwise conv reads every other input column: vectors of output columns gather.
        # One register of columns, reading rows padded just before (still in L1), measured 2-5x faster
        # than four registers reading the whole padded input (MobileNetV2's stride-2 layers); on Zen 4 half a
        # register, the width its vector units compute at once: 8 columns ran 2.1x faster than 16 on 112x112
        # and 224x224 inputs, within 5% on 56x56 and smaller ones (znver4, float32; float64's 4 against 8
        # columns: 0.8-1.25x, all 60x faster than torch's float64).
        sch = Schedule(func)
        out_channels, in_per_group = (int(d) for d in func.params[1].shape[:2])
        depthwise = in_per_group == 1
        strided_depthwise = depthwise and _column_stride(sch) > 1
        columns = config.fma_lanes(input_dtype(func)) if strided_depthwise else config.row_vectors * lanes
        # The output channels of a group (odd counts per group come here) read the same inputs: a few of them
        # over one register of columns reuse each input vector.  Measured on znver4 against one channel over
        # four registers: 66->130 3x3 groups=2 (13 of 65 per group) at 26x50 1.41 -> 0.70 ms (torch 0.76),
        # 65->35 groups=5 (7 of 7) 0.62 -> 0.32 ms, 30->42 groups=6 (7 of 7) 0.17 -> 0.10 ms; tiles spanning
        # groups of 3 were up to 2x slower, 2 channels (134 = 2 x 67) ran as one did, and a tile that does not
        # divide the channels (a predicate in the unrolled loop) slower still.
        # On armv7 each channel's broadcast weight takes one of its 16 registers too: 7 channels spilled.
        limit = config.conv_accumulator_limit // 2 if config.taps_outer else config.conv_accumulator_limit
        groups = _input_channels(func) // in_per_group
        channels = 1 if depthwise else largest_divisor(out_channels // groups, limit)
        if channels >= MIN_CHANNEL_TILE:
            return _schedule(sch, lanes, tunable, "column", config.taps_outer, channels=channels)
        out_height, out_width = block_extents(sch, "conv2d")[2:]
        per_plane = depthwise and not strided_depthwise and out_height * out_width <= PLANE_MAX_PIXELS
        return _schedule(
            sch, columns, tunable, "column", config.taps_outer, pad_per_row=strided_depthwise, per_plane=per_plane
        )

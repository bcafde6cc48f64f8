"""GPU linear schedules.

``GpuLinearTiled``: a tiled GEMM (:mod:`.tiling`): rows times output features over thread blocks, threads and
registers, ``in_features`` staged in shared memory a step at a time (the input rows and the weight rows of the
tile: both read along ``in_features``, so a cooperative fetch is coalesced).

``GpuLinearGemv``: one input row (batch 1) is a matrix-vector product, bound by reading the weight once: a tile
of one row would leave most threads of a GEMM idle.  A warp of lanes reduces each output across
``in_features`` (consecutive lanes read consecutive weights: coalesced), a few outputs per block.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from ..rule import block_extents, largest_divisor, op_of
from .config import gpu_config
from .tiling import DEFAULT_UNROLL, ReduceDim, TileDim, fill_sms, sample_threads, tile_reduction

GEMV_LANES = (32, 64, 128)  # lanes per output of the GEMV search space


def _is_linear(func: tvm.tirx.PrimFunc) -> bool:
    return op_of(func) == "linear" and int(func.params[1].shape[-1]) == 1  # torch's layout (weight_block 1)


class GpuLinearTiled:
    name = "gpu.linear_tiled"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if not _is_linear(func):
            return None
        config = gpu_config(target)
        sch = Schedule(func)
        rows, features, _, in_features = block_extents(sch, "linear_blocked")
        if rows == 1:
            return None  # GpuLinearGemv
        acc, out = sch.get_sblock("linear_blocked"), sch.get_sblock("linear")
        m, ob, oi, k = sch.get_loops(acc)
        itemsize = tvm.DataType(str(func.params[0].dtype)).bits // 8
        # Threads: a warp's worth along the features (coalesced stores), the rest of gemm_threads along rows.
        tx = largest_divisor(features, config.warp)
        ty = largest_divisor(rows, max(1, config.gemm_threads // tx))
        tiles = {
            "row": [ty, largest_divisor(rows // ty, config.reg_channels)],
            "feature": [tx, largest_divisor(features // tx, config.reg_pixels)],
        }
        fill_sms(tiles, rows * features, config.sm_count)
        (ty, ry), (tx, rx) = tiles["row"], tiles["feature"]

        def step(tile_rows: int, tile_features: int, limit: int) -> int:
            """The most ``in_features`` per step (a divisor) whose two tiles fit in shared memory."""
            fits = [s for s in range(1, limit + 1) if in_features % s == 0]
            fits = [s for s in fits if (tile_rows + tile_features) * s * itemsize <= config.shared_bytes]
            return max(fits, default=1)

        # the search space: threads along rows as conv's along channels, along features as along columns
        dims = [
            TileDim(m, "threadIdx.y", ty, ry, config.max_thread_channels, config.max_regs),
            TileDim(ob, "threadIdx.x", tx, rx, config.max_thread_columns, config.max_regs),
        ]
        largest = max(config.max_thread_channels, config.max_thread_columns) * config.max_regs
        # 32 steps of in_features per refill: with 4 x 4 register tiles, 32 FMAs per shared value loaded twice
        reduce = ReduceDim(k, step(ty * ry, tx * rx, 4 * config.reduce_tile), step(largest, largest, 64))
        return tile_reduction(sch, acc, out, [], dims, [oi], reduce, [], [0, 1], tunable)


class GpuLinearGemv:
    name = "gpu.linear_gemv"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        if not _is_linear(func):
            return None
        config = gpu_config(target)
        sch = Schedule(func)
        rows, features, _, _ = block_extents(sch, "linear_blocked")
        if rows != 1:
            return None
        acc, out = sch.get_sblock("linear_blocked"), sch.get_sblock("linear")
        m, ob, oi, k = sch.get_loops(acc)
        if tunable:  # one to four warps of lanes, up to twice the outputs per block: at most 1024 threads
            most_outputs = max(1, min(2 * config.gemv_outputs, config.max_threads // GEMV_LANES[0]))
            lanes = sample_threads(sch, config.max_threads // most_outputs, GEMV_LANES)
            _, outputs = sch.sample_perfect_tile(ob, n=2, max_innermost_factor=most_outputs)
        else:
            lanes = config.gemv_lanes
            outputs = largest_divisor(features, min(config.gemv_outputs, max(1, config.max_threads // lanes)))
        block_loop, output = sch.split(ob, [None, outputs])
        k_outer, lane = sch.split(k, [None, lanes])
        sch.reorder(m, block_loop, output, oi, k_outer, lane)
        sch.bind(sch.fuse(m, block_loop), "blockIdx.x")
        sch.bind(output, "threadIdx.y")
        sch.bind(lane, "threadIdx.x")  # a reduction loop bound to threads: TVM sums across the lanes
        sch.annotate(k_outer, "pragma_auto_unroll_max_step", DEFAULT_UNROLL)
        sch.annotate(k_outer, "pragma_unroll_explicit", 1)
        sch.set_scope(acc, 0, "local")
        sch.reverse_compute_at(out, output, preserve_unit_loops=True)
        return sch

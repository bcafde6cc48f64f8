"""Per-target default schedules: rule families, each serving the targets it declares, whose rules
:func:`default_schedule` tries in order.

Also the layout policy (:func:`weight_layout`): how a target wants the weights of conv2d/linear blocked,
which decides the kernel's calling convention and so is part of the kernel's cache key.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from tvmlayers.spec import KernelSpec

from .cpu import CpuFamily, cpu_config, is_simd_cpu
from .generic import GenericFamily
from .gpu import GpuFamily, is_cuda
from .rule import RuleFamily, ScheduleRule

__all__ = ["FAMILIES", "RuleFamily", "ScheduleRule", "default_schedule", "rules_for", "weight_layout"]

# Most specific first: a target's own family, then the fallback every LLVM target has; CUDA targets have theirs.
FAMILIES: tuple[RuleFamily, ...] = (CpuFamily(), GenericFamily(), GpuFamily())


def rules_for(target: tvm.target.Target) -> list[ScheduleRule]:
    """The rules of every family that serves ``target``, in the order they are tried."""
    return [rule for family in FAMILIES if family.is_target_available(target) for rule in family.rules]


def default_schedule(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tuple[Schedule, str]:
    """The first rule that applies, and its name (the kernel's provenance)."""
    for rule in rules_for(target):
        sch = rule.apply(func, target, tunable=False)
        if sch is not None:
            return sch, rule.name
    raise ValueError(f"no schedule rule applies to this kernel on target {target.kind.name}")


def _block_size(channels: int, lanes: int) -> int:
    """The largest power of two up to one SIMD register that divides the channel count."""
    block = lanes
    while block > 1 and channels % block:
        block //= 2
    return block


def _padded_block(channels: int, lanes: int, fma_lanes: int) -> int:
    """The block whose zero-padded channels cost the fewest passes through the FMA units: ``ceil(channels /
    b)`` vectors of ``b`` lanes, each ``b / fma_lanes`` passes (one where it fits them); the wider on a tie.
    A whole register where the FMA units are as wide (33 channels: 3 blocks of 16 on Intel's AVX-512, 9 of 4
    on NEON), half a register on Zen 4 (5 blocks of 8: 5 passes instead of 6)."""
    blocks = [lanes >> k for k in range(lanes.bit_length()) if lanes >> k > 1]
    return min(blocks, key=lambda b: (-(-channels // b) * max(1, b // fma_lanes), -b))


def _pointwise_rows(spec: KernelSpec, min_pixels: int | None) -> bool:
    """Whether ``spec`` is an ungrouped stride-1 unpadded float32 1x1 conv of at least ``min_pixels`` output pixels
    whose output channels tile by 4 or more (the row-vectorized rule's channel tile; other counts get padded
    blocks)."""
    if min_pixels is None or spec["groups"] != 1 or tuple(spec["weight_shape"][2:]) != (1, 1):
        return False
    if spec.get("in_block") is not None:  # rows of a channel-blocked input are not contiguous
        return False
    if spec.dtype != "float32" or spec["weight_shape"][0] % 4:
        return False
    unpadded = not any(spec["padding"]) and spec["padding_mode"] == "zeros"
    pixels = spec.input_shape[-1] * spec.input_shape[-2]
    return tuple(spec["stride"]) == (1, 1) and unpadded and pixels >= min_pixels


def weight_layout(spec: KernelSpec) -> dict:
    """{"weight_block": b}: the weight's output channels are stored in blocks of b (1 = torch's layout); a
    block that does not divide the output channels pads the last block with zeros (ungrouped convs)."""
    if spec.op not in ("conv2d", "linear"):
        return {}
    if spec.get("out_block") is not None:  # a channel-blocked output is written in the weight's blocks
        return {"weight_block": spec["out_block"]}
    if is_cuda(spec.target):
        # the GPU rules stage weights through shared memory, which a cooperative fetch fills with coalesced
        # reads of torch's layout: blocks would only add a copy of the weights
        return {"weight_block": 1}
    # the CPU rules vectorize over a block; any other rule reads torch's layout best
    config = cpu_config(spec.target) if is_simd_cpu(spec.target) else None
    lanes = config.vector_lanes(spec.dtype) if config is not None else 1
    out_channels, in_per_group = spec["weight_shape"][:2]
    if spec.op == "conv2d":
        if in_per_group == 1:  # depthwise: vectorize along the output row instead
            return {"weight_block": 1}
        if config is not None and _pointwise_rows(spec, config.pointwise_rows_min_pixels):
            return {"weight_block": 1}  # row-vectorized (see CpuConfig.pointwise_rows_min_pixels)
        out_channels //= spec["groups"]
    block = _block_size(out_channels, lanes)
    if spec.op == "linear" and block < lanes // 2 and in_per_group % lanes == 0:
        return {"weight_block": 1}  # a narrow block wastes most of each register: dot products instead
    if spec.op == "conv2d" and lanes > 1 and block < max(2, lanes // 2) and spec["groups"] == 1:
        # Odd channel counts (block 1) and narrow blocks: zero-padded channels in whole vectors.  Measured
        # on znver4 against the row-vectorized rule (block 1): conv 16->33 3x5 on 2x16x50x100 1.09 -> 0.54 ms,
        # 3->33 3x3 stride 2 on 2x3x50x100 0.44 -> 0.04 ms, 33->65 3x3 on 2x33x26x100 2.9 -> 1.1 ms.
        return {"weight_block": _padded_block(out_channels, lanes, config.fma_lanes(spec.dtype))}
    return {"weight_block": block}

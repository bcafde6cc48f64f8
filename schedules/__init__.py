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
from .rule import RuleFamily, ScheduleRule

__all__ = ["FAMILIES", "RuleFamily", "ScheduleRule", "default_schedule", "rules_for", "weight_layout"]

# Most specific first: a target's own family, then the fallback every LLVM target has.
FAMILIES: tuple[RuleFamily, ...] = (CpuFamily(), GenericFamily())


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


def weight_layout(spec: KernelSpec) -> dict:
    """{"weight_block": b}: the weight's output channels are stored in blocks of b (1 = torch's layout)."""
    if spec.op not in ("conv2d", "linear"):
        return {}
    # the CPU rules vectorize over a block; any other rule reads torch's layout best
    lanes = cpu_config(spec.target).vector_lanes(spec.dtype) if is_simd_cpu(spec.target) else 1
    out_channels, in_per_group = spec["weight_shape"][:2]
    if spec.op == "conv2d":
        if in_per_group == 1:  # depthwise: vectorize along the output row instead
            return {"weight_block": 1}
        out_channels //= spec["groups"]
    block = _block_size(out_channels, lanes)
    if spec.op == "linear" and block < lanes // 2 and in_per_group % lanes == 0:
        return {"weight_block": 1}  # a narrow block wastes most of each register: dot products instead
    return {"weight_block": block}

"""Per-target default schedules: rule objects tried in order by :func:`default_schedule`.

Also the layout policy (:func:`weight_layout`): how a target wants the weights of conv2d/linear blocked,
which decides the kernel's calling convention and so is part of the kernel's cache key.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from tvmlayers.spec import KernelSpec

from .generic import GenericParallel
from .rule import ScheduleRule, vector_lanes
from .x86 import RULES as X86_RULES

__all__ = ["ScheduleRule", "default_schedule", "rules_for", "weight_layout"]


def rules_for(target: tvm.target.Target) -> list[ScheduleRule]:
    triple = str(target.attrs.get("mtriple", ""))
    rules: list[ScheduleRule] = []
    if target.kind.name == "llvm" and triple.startswith(("x86_64", "i686", "i386")):
        rules += X86_RULES
    return rules + [GenericParallel()]


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
    target = spec.target
    lanes = vector_lanes(target, spec.dtype) if target.kind.name == "llvm" else 1
    out_channels, in_per_group = spec["weight_shape"][:2]
    if spec.op == "conv2d":
        if in_per_group == 1:  # depthwise: vectorize along the output row instead
            return {"weight_block": 1}
        out_channels //= spec["groups"]
    block = _block_size(out_channels, lanes)
    if spec.op == "linear" and block < lanes // 2 and in_per_group % lanes == 0:
        return {"weight_block": 1}  # a narrow block wastes most of each register: dot products instead
    return {"weight_block": block}

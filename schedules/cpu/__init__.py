"""Default schedules for CPUs with SIMD (x86, AArch64 NEON, armv7 NEON), in the order the dispatcher tries
them; their per-target constants come from :func:`cpu_config`."""

from __future__ import annotations

import tvm

from .config import CpuConfig, cpu_config, is_simd_cpu
from .conv2d import CpuConv2dBlocked, CpuConv2dSpatial
from .linear import CpuLinearBlocked, CpuLinearDot
from .max_pool2d import CpuMaxPool2d
from .relu import CpuRelu

__all__ = [
    "CpuConfig",
    "CpuConv2dBlocked",
    "CpuConv2dSpatial",
    "CpuFamily",
    "CpuLinearBlocked",
    "CpuLinearDot",
    "CpuMaxPool2d",
    "CpuRelu",
    "cpu_config",
    "is_simd_cpu",
]


class CpuFamily:
    name = "cpu"
    rules = (
        CpuConv2dBlocked(),
        CpuConv2dSpatial(),
        CpuLinearDot(),
        CpuLinearBlocked(),
        CpuMaxPool2d(),
        CpuRelu(),
    )

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return is_simd_cpu(target)

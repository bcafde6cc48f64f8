"""Default schedules for NVIDIA GPUs (TVM's cuda targets), in the order the dispatcher tries them; their
per-target constants come from :func:`gpu_config`, and TVM's dlight rules take what ours do not."""

from __future__ import annotations

import tvm

from .config import GpuConfig, gpu_config, is_cuda
from .conv2d import GpuConv2dDepthwise, GpuConv2dTiled
from .dlight import GpuDlight
from .injective import GpuMaxPool2d, GpuRelu
from .linear import GpuLinearGemv, GpuLinearTiled

__all__ = [
    "GpuConfig",
    "GpuConv2dDepthwise",
    "GpuConv2dTiled",
    "GpuDlight",
    "GpuFamily",
    "GpuLinearGemv",
    "GpuLinearTiled",
    "GpuMaxPool2d",
    "GpuRelu",
    "gpu_config",
    "is_cuda",
]


class GpuFamily:
    name = "gpu"
    rules = (
        GpuConv2dTiled(),
        GpuConv2dDepthwise(),
        GpuLinearGemv(),
        GpuLinearTiled(),
        GpuMaxPool2d(),
        GpuRelu(),
        GpuDlight(),
    )

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return is_cuda(target)

"""Default schedules for NVIDIA GPUs (TVM's cuda targets), in the order the dispatcher tries them."""

from __future__ import annotations

import tvm

from .dlight import GpuDlight

__all__ = ["GpuDlight", "GpuFamily"]


class GpuFamily:
    name = "gpu"
    rules = (GpuDlight(),)

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return target.kind.name == "cuda"

"""The last rule of the GPU family: TVM's dlight GPU rules, for whatever our own rules do not take."""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir import dlight as dl


class GpuDlight:
    """dlight's Matmul, GEMV, Reduction, GeneralReduction and Fallback, the first that applies, as one of our
    rules.  dlight decides alone (its rules are fixed schedules), so ``tunable`` changes nothing here."""

    name = "gpu.dlight"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
        with target:  # dlight reads the target's thread limits from the scope
            for rule in rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception:  # noqa: BLE001 - a dlight rule that cannot handle the kernel raises TVM errors
                    continue
                if isinstance(sch, Schedule):
                    return sch
        return None

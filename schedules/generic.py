"""The rule of last resort for any LLVM target: outermost spatial loops of every block on the thread pool."""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule


class GenericParallel:
    name = "generic.parallel"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None:
        sch = Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(block)
            spatial = []
            for loop, var in zip(loops, sch.get(block).iter_vars, strict=False):
                if var.iter_type != tvm.tirx.IterVar.DataPar:
                    break
                spatial.append(loop)
            if spatial:
                sch.parallel(sch.fuse(*spatial[:3]) if len(spatial) > 1 else spatial[0])
        return sch


class GenericFamily:
    """Serves every LLVM target, after the families written for its CPU."""

    name = "generic"
    rules = (GenericParallel(),)

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return target.kind.name == "llvm"

"""The GPU schedule family, checked without a GPU: under every CUDA preset each op and mode gets a schedule
from our rules, TVM compiles it to CUDA (which rejects a loop not bound to blocks or threads), and nvcc
compiles the CUDA source for the preset's architecture.  Numbers are checked on a GPU (the GPU check script)."""

from __future__ import annotations

import pytest
import tvm

from test_cpu_schedules import CASES
from tvmlayers import ops, schedules
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import CUDA_PRESETS, resolve_target


def _func(case: tuple, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    op, shape, dtype, params = case
    spec = KernelSpec.make(op, shape, dtype, target, **params)
    return ops.prim_func(spec, schedules.weight_layout(spec))


@pytest.mark.parametrize("preset", CUDA_PRESETS)
@pytest.mark.parametrize("name, case", [(n, c) for n, c, _ in CASES], ids=[c[0] for c in CASES])
def test_every_op_is_scheduled_by_the_gpu_family_and_compiles_to_cuda(preset: str, name: str, case: tuple) -> None:
    target = resolve_target(preset)
    sch, rule = schedules.default_schedule(_func(case, target), target)
    assert rule.startswith("gpu.")
    source = tvm.compile(sch.mod, target=target).mod.imports[0].inspect_source("cuda")
    assert "__global__" in source

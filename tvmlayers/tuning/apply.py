"""Applying a tuning record: replay its trace on the spec's PrimFunc, compile, and check the kernel
against torch.  A record that does not replay, does not build, or computes something else is refused."""

from __future__ import annotations

import tvm

from .. import ops
from ..spec import KernelSpec
from ..verify import check_kernel
from .database import TuningRecord


class RecordError(Exception):
    """A tuning record that must not be used; the message says why."""


def compile_record(spec: KernelSpec, layout: dict, record: TuningRecord) -> tvm.runtime.Executable:
    """The compiled kernel of ``record``, verified against torch on random inputs."""
    try:
        sch = tvm.s_tir.Schedule(ops.prim_func(spec, layout))
        tvm.s_tir.Trace.apply_json_to_schedule(record.trace, sch)
        executable = tvm.compile(sch.mod, target=spec.target)
    except Exception as err:  # noqa: BLE001 - whatever TVM raises, the record is unusable
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise RecordError(f"does not build: {type(err).__name__}: {first_line[:200]}") from err
    problem = check_kernel(spec, layout, executable.jit()[ops.SYMBOL])
    if problem is not None:
        raise RecordError(problem)
    return executable

"""Applying a tuning record: check its trace against the allow-list, replay it on the spec's PrimFunc,
compile, and check the kernel against torch.  A record that is not on the allow-list, does not replay, does
not build, or computes something else is refused."""

from __future__ import annotations

import tvm

from .. import ops
from ..spec import KernelSpec
from ..verify import check_kernel
from .database import TuningRecord
from .record_check import trace_problem


class RecordError(Exception):
    """A tuning record that must not be used; the message says why."""


def compile_record(spec: KernelSpec, layout: dict, record: TuningRecord) -> tvm.runtime.Executable:
    """The compiled kernel of ``record``, verified against torch on random inputs."""
    # records are allow-listed when logs are read; checked again here, as compiling one is what runs it
    refused = trace_problem(record.trace)
    if refused is not None:
        raise RecordError(f"refused, not on the allow-list of tuning-record instructions: {refused}")
    try:
        sch = tvm.s_tir.Schedule(ops.prim_func(spec, layout))
        tvm.s_tir.Trace.apply_json_to_schedule(record.trace, sch)
        executable = tvm.compile(sch.mod, target=spec.target)
        kernel = executable.jit()[ops.SYMBOL]  # loading can fail too (e.g. unresolved symbols)
    except Exception as err:  # noqa: BLE001 - whatever TVM raises, the record is unusable
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise RecordError(f"does not build: {type(err).__name__}: {first_line[:200]}") from err
    problem = check_kernel(spec, layout, kernel)
    if problem is not None:
        raise RecordError(problem)
    return executable

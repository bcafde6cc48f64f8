"""Applying a tuning record: check its trace against the allow-list, replay it on the spec's PrimFunc,
compile, and check the kernel against torch.  A record that is not on the allow-list, does not replay, does
not build, or computes something else is refused."""

from __future__ import annotations

import tvm

from .. import ops
from ..spec import KernelSpec
from ..targets import runs_here
from ..verify import check_kernel
from .database import TuningRecord
from .record_check import trace_problem


class RecordError(Exception):
    """A tuning record that must not be used; the message says why."""


def schedule_record(spec: KernelSpec, layout: dict, record: TuningRecord) -> tvm.runtime.Executable:
    """The kernel of ``record`` compiled for ``spec.target``, neither loaded nor run: what a target that
    cannot run in this process gets (its records are checked on the device they were tuned on)."""
    # records are allow-listed when logs are read; checked again here, as compiling one is what runs it
    refused = trace_problem(record.trace)
    if refused is not None:
        raise RecordError(f"refused, not on the allow-list of tuning-record instructions: {refused}")
    try:
        sch = tvm.s_tir.Schedule(ops.prim_func(spec, layout))
        tvm.s_tir.Trace.apply_json_to_schedule(record.trace, sch)
        return tvm.compile(sch.mod, target=spec.target)
    except Exception as err:  # noqa: BLE001 - whatever TVM raises, the record is unusable
        raise RecordError(f"does not build: {_first_line(err)}") from err


def compile_record(spec: KernelSpec, layout: dict, record: TuningRecord) -> tvm.runtime.Executable:
    """The compiled kernel of ``record``, loaded here and verified against torch on random inputs.  A kernel
    for another architecture cannot be: its records were checked on the device when they were tuned
    (:mod:`tvmlayers.tuning.devices`), and a bundle checks its kernels again on the board."""
    executable = schedule_record(spec, layout, record)
    if not runs_here(spec.target):
        return executable
    try:
        kernel = executable.jit()[ops.SYMBOL]  # loading can fail too (e.g. unresolved symbols)
    except Exception as err:  # noqa: BLE001
        raise RecordError(f"does not build: {_first_line(err)}") from err
    problem = check_kernel(spec, layout, kernel)
    if problem is not None:
        raise RecordError(problem)
    return executable


def _first_line(err: Exception) -> str:
    """``Type: last line of the message``: TVM puts its stack trace first and the reason last."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1][:200] if text else ''}"

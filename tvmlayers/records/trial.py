"""A candidate schedule against the default one on this machine: built for this target, checked against
torch, then both kernels timed in turn (``time_evaluator`` samples, alternating; the median of the rounds'
ratios).

Short by design, since it may run inside a layer's first call: ``TIMING_S`` of timing per candidate (more
when asked for, as ``tvmlayers logs adopt`` does), samples of at least ``SAMPLE_S`` each, at least
``MIN_ROUNDS`` pairs of them.  On this project's loaded 2-core machine (load 4 to 7) the median of 0.6 s of
rounds swung between runs of the same pair (0.72x and 1.47x); of 2 s it held within 7%; a lower-quartile
rule on top only flipped verdicts whose medians agreed.  A candidate must beat the default by
``MIN_SPEEDUP``: a tie is noise, and the default is the schedule every other layer of the machine runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import tvm

from .. import ops, schedules
from ..spec import KernelSpec
from .apply import RecordError, compile_record
from .database import TuningRecord

MIN_SPEEDUP = 1.05
SAMPLE_S = 0.004
TIMING_S = 1.0
MIN_ROUNDS = 5


@dataclass(frozen=True)
class TrialResult:
    speedup: float  # the default's median time over the candidate's; 0.0 when it was not timed
    reason: str  # why it is declined; "" when it wins

    @property
    def wins(self) -> bool:
        return not self.reason


# The kernels the trials of the kernel being built compiled and checked, by (spec, record id, None for the
# default schedule): the build that follows its trials takes the winner, or the default, from here instead of
# compiling it again.  Only the current build's: a new Baseline starts them afresh.
_compiled: dict[tuple[KernelSpec, str | None], tvm.runtime.Executable] = {}


def compiled_in_trial(spec: KernelSpec, record_id: str | None) -> tvm.runtime.Executable | None:
    """The kernel of ``spec`` scheduled by the record ``record_id`` (None: the default rules) that a trial of
    this build compiled (and, a record, checked against torch), if one did."""
    return _compiled.pop((spec, record_id), None)


class Baseline:
    """The default schedule's kernel of a spec, compiled when first needed and then shared by its candidates."""

    def __init__(self, spec: KernelSpec, layout: dict) -> None:
        self.spec, self.layout = spec, layout
        _compiled.clear()  # another kernel's trials begin

    @cached_property
    def executable(self) -> tvm.runtime.Executable:
        sch, _ = schedules.default_schedule(ops.prim_func(self.spec, self.layout), self.spec.target)
        _compiled[self.spec, None] = executable = tvm.compile(sch.mod, target=self.spec.target)
        return executable


def try_record(
    spec: KernelSpec, layout: dict, record: TuningRecord, baseline: Baseline, timing_s: float | None = None
) -> TrialResult:
    """Compile ``record`` for ``spec`` (its target is this machine's), check it against torch, time it against
    ``baseline``, the default schedule of ``spec``, for about ``timing_s`` (None: ``TIMING_S``)."""
    try:
        candidate = compile_record(spec, layout, record)
    except RecordError as wrong:
        return TrialResult(0.0, str(wrong))
    ratios = paired_ratios(spec, layout, baseline.executable, candidate, timing_s)
    speedup = statistics.median(ratios)
    if speedup < MIN_SPEEDUP:
        return TrialResult(speedup, f"{speedup:.2f}x of the default here, not the {MIN_SPEEDUP}x it must beat it by")
    _compiled[spec, record.id] = candidate
    return TrialResult(speedup, "")


def paired_ratios(
    spec: KernelSpec,
    layout: dict,
    baseline: tvm.runtime.Executable,
    candidate: tvm.runtime.Executable,
    timing_s: float | None = None,
) -> list[float]:
    """How many times faster ``candidate`` runs than ``baseline``, once per round: the ratio of their times,
    each round sampling both in turn (the order alternating), on the same random inputs.  A ratio of two
    samples taken a moment apart cancels most of a shared machine's changing load."""
    # random data: uninitialized memory can hold denormals, which slow floating point arithmetic many times
    rng = np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)))
        for p in ops.prim_func(spec, layout).params
    ]
    device = tvm.cpu()
    modules = [executable.jit() for executable in (baseline, candidate)]
    once = min(module.time_evaluator(ops.SYMBOL, device, number=1, repeat=2)(*args).mean for module in modules)
    number = max(1, round(SAMPLE_S / max(once, 1e-9)))
    timers = [module.time_evaluator(ops.SYMBOL, device, number=number, repeat=1) for module in modules]
    ratios = []
    deadline = time.monotonic() + (TIMING_S if timing_s is None else timing_s)
    while len(ratios) < MIN_ROUNDS or time.monotonic() < deadline:
        order = (0, 1) if len(ratios) % 2 == 0 else (1, 0)
        seconds = {index: timers[index](*args).mean for index in order}
        ratios.append(seconds[0] / seconds[1])
    return ratios

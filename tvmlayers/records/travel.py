"""Tuning that travels: what serves a workload that this target's logs have no record of.

The build looks up, in order (:func:`tvmlayers.build.kernel_for`):

1. a record of this target (``<log root>/<target key>/``, the user's root first): used as it is;
2. a record of the same workload tuned on another CPU of the family (:mod:`tvmlayers.records.family`),
   **adopted** where, compiled for this target, it computes what torch computes and beats the default
   schedule here;
3. the record of the nearest tuned **neighbour** of the same op class (:mod:`tvmlayers.records.neighbours`),
   re-fitted to this workload's shape, under the same conditions;
4. the default rules.

Each candidate is tried once per machine and code version and the verdict remembered in the user's log
(:mod:`tvmlayers.records.verdicts`).  Implicitly, during the first build of a kernel, only the best record
of the first family log and the nearest neighbour are tried: a first call then pays at most two compiles and
about a second of timing more (the build takes the winner, or the default, as the trial compiled it), once,
on a machine where it would otherwise run an untuned kernel for good; and a process spends at most
``PROCESS_TRIALS_S`` on trials by itself, so that the first forward of a large untuned model stays bearable
(the layers left over are tried by the next process).  ``tvmlayers logs adopt`` tries every record of the
family's logs ahead of time.

``TVMLAYERS_TUNED`` chooses the steps: unset or ``1`` all of them, ``exact`` only 1, ``adopt`` 1 and 2,
``neighbours`` 1 and 3, ``0`` none (the default rules only).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tvm

from .. import ops, schedules
from ..spec import KernelSpec
from ..targets import runs_here, target_key
from .apply import RecordError
from .database import TuningLog, TuningRecord, log_roots, workload_hash
from .family import family_key, family_logs, log_cpu, log_target
from .neighbours import distance, nearest, refit_trace
from .record_check import trace_problem
from .trial import Baseline, try_record
from .verdicts import BorrowedRecord, Verdict, Verdicts, code_version

ADOPT_TIMING_S = 2.0  # `tvmlayers logs adopt` is asked for: more rounds, a steadier verdict on a busy machine
# Seconds one process spends on trials by itself (a model's first forward): beyond that, its layers wait for
# the next process or `tvmlayers logs adopt`, so that a large untuned model's first call stays bearable.
PROCESS_TRIALS_S = 30.0
_trials_s = 0.0
STEPS = {"0": frozenset(), "exact": frozenset(), "adopt": frozenset({"adopt"}), "neighbours": frozenset({"neighbour"})}
ALL_STEPS = frozenset({"adopt", "neighbour"})


def travel_steps() -> frozenset[str]:
    """The lookup steps after a target's own records that ``TVMLAYERS_TUNED`` allows."""
    return STEPS.get(os.environ.get("TVMLAYERS_TUNED", "1"), ALL_STEPS)


@dataclass(frozen=True)
class Candidate:
    kind: str  # "adopt" or "neighbour"
    log: TuningLog  # where the record is
    record: TuningRecord
    source: KernelSpec | None = None  # a neighbour: the workload the record was tuned for (on the log's target)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.log.key}:{self.record.id}"


def _own_logs(target: tvm.target.Target, log_dir: str | Path | None) -> list[TuningLog]:
    return [TuningLog.for_target(root, target) for root in log_roots(log_dir)]


_tuned: dict[tuple, list[tuple[str, KernelSpec, TuningRecord]]] = {}  # (log folder, stamp) -> its workloads


def tuned_workloads(log: TuningLog) -> list[tuple[str, KernelSpec, TuningRecord]]:
    """(workload hash, spec on the log's own target, best record) of every workload of ``log`` with a usable
    record, read once per version of the log; entries of its ``tvmlayers.json`` that do not make a spec are
    left out (``tvmlayers logs ls`` names them), and so is everything of a log that does not say its target."""
    key = (log.directory, log.stamp())
    if key not in _tuned:
        target = log_target(log)
        found = []
        for shash, spec_json in log.workloads().items() if target is not None else ():
            try:
                op, shape, dtype, params = (spec_json[k] for k in ("op", "input_shape", "dtype", "params"))
                spec = KernelSpec.make(op, tuple(shape), dtype, target, **params)
                distance(spec, spec)  # an entry without the fields a distance reads is malformed
            except (KeyError, TypeError, ValueError, IndexError):
                continue
            if (best := log.best(shash)) is not None:
                found.append((shash, spec, best))
        _tuned[key] = found
    return _tuned[key]


def retarget(spec: KernelSpec, target: tvm.target.Target) -> KernelSpec:
    """The same layer call compiled for ``target``."""
    return KernelSpec.make(spec.op, spec.input_shape, spec.dtype, target, **dict(spec.params))


def candidates(spec: KernelSpec, workload: str, log_dir: str | Path | None = None) -> list[Candidate]:
    """What a build of ``spec`` (workload hash ``workload``) tries by itself after this target's own records,
    in this order: the record of this workload in the first family log that has one, then the nearest
    neighbour's, re-fitted."""
    steps = travel_steps()
    found: list[Candidate] = []
    family = family_logs(spec.target, log_dir)
    if "adopt" in steps:
        found += [Candidate("adopt", log, r) for log in family if (r := log.best(workload)) is not None][:1]
    if "neighbour" in steps:
        near: list[tuple[float, Candidate]] = []
        seen: set[str] = set()
        for log in [*_own_logs(spec.target, log_dir), *family]:
            # the same call under another weight layout is a neighbour too, at distance 0
            tuned = {source: record for shash, source, record in tuned_workloads(log) if shash != workload}
            for dist, source in nearest(spec, iter(tuned)):
                record = tuned[source]
                if record.id not in seen:
                    seen.add(record.id)
                    near.append((dist, Candidate("neighbour", log, record, source)))
        near.sort(key=lambda pair: pair[0])
        found += [c for _, c in near[:1]]
    return found


def borrowed_record(
    spec: KernelSpec, layout: dict, workload: str, trials: bool, log_dir: str | Path | None = None
) -> tuple[Verdicts, BorrowedRecord] | None:
    """The first candidate adopted on this machine, trying those without a verdict when ``trials`` (a build
    of ``spec``'s kernel in this process); None: the default rules."""
    if not travel_steps() or not log_roots(log_dir):
        return None
    verdicts = Verdicts.for_target(spec.target, log_dir)
    baseline = Baseline(spec, layout)
    for candidate in candidates(spec, workload, log_dir):
        verdict = verdicts.get(workload, candidate.id)
        if verdict is None:
            global _trials_s
            if not (trials and runs_here(spec.target)) or _trials_s >= PROCESS_TRIALS_S:
                continue
            start = time.monotonic()
            verdict = judge(spec, layout, workload, candidate, verdicts, baseline)
            _trials_s += time.monotonic() - start
        if verdict.adopted:
            return verdicts, _borrowed(spec, workload, candidate, verdict, verdicts)
    return None


def untried(spec: KernelSpec, workload: str, log_dir: str | Path | None = None) -> bool:
    """Whether the first build of ``spec``'s kernel would try a candidate (so it is not just a cache load)."""
    if not travel_steps() or not runs_here(spec.target):
        return False
    verdicts = Verdicts.for_target(spec.target, log_dir)
    return any(verdicts.get(workload, c.id) is None for c in candidates(spec, workload, log_dir))


def _borrowed(
    spec: KernelSpec, workload: str, candidate: Candidate, verdict: Verdict, verdicts: Verdicts
) -> BorrowedRecord:
    if candidate.kind == "adopt":
        r = candidate.record
        return BorrowedRecord(r.directory, r.line, workload, r.trace, r.seconds, r.target_key, verdict)
    return BorrowedRecord(verdicts.directory, 0, workload, verdict.trace, 0.0, target_key(spec.target), verdict)


def judge(
    spec: KernelSpec,
    layout: dict,
    workload: str,
    candidate: Candidate,
    verdicts: Verdicts,
    baseline: Baseline,
    timing_s: float | None = None,
) -> Verdict:
    """Try ``candidate`` for ``spec`` here (re-fitted first if a neighbour) against ``baseline``, timing both
    for about ``timing_s`` (None: a build's ``trial.TIMING_S``), and remember the verdict."""
    trace = candidate.record.trace
    reason, speedup = "", 0.0
    if candidate.kind == "neighbour":
        try:
            trace = refit_trace(candidate.source, candidate.record, spec, layout)
            refused = trace_problem(trace)
            if refused is not None:
                raise RecordError(f"its re-fitted trace is refused by the allow-list: {refused}")
        except RecordError as wrong:
            reason = str(wrong)
    if not reason:
        record = TuningRecord(candidate.log.directory, 0, workload, trace, 0.0, target_key(spec.target))
        result = try_record(spec, layout, record, baseline, timing_s)
        reason, speedup = result.reason, result.speedup
    verdict = Verdict(
        candidate=candidate.id,
        adopted=not reason,
        source_cpu=log_cpu(candidate.log),
        workload=spec.describe(),
        speedup=round(float(speedup), 3),
        reason=reason,
        code=code_version(),
        neighbour=_label(candidate.source) if candidate.source is not None else "",
        trace=trace if candidate.kind == "neighbour" and not reason else None,
    )
    verdicts.put(workload, verdict)
    return verdict


def _label(spec: KernelSpec) -> str:
    """A workload in a few words: op, input shape and weight shape."""
    weight = spec.get("weight_shape")
    shapes = "x".join(map(str, spec.input_shape)) + (f" w{'x'.join(map(str, weight))}" if weight else "")
    return f"{spec.op} {shapes}"


def adopt_logs(
    target: tvm.target.Target,
    source: str | None = None,
    log_dir: str | Path | None = None,
    on_done: Callable[[KernelSpec, Verdict], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    again: bool = False,
) -> list[tuple[KernelSpec, Verdict]]:
    """Try every record of the family's logs (only the log ``source``, a target key, if given) for this
    target, where this target has no record of its own for that workload and no verdict yet (``again``: even
    where it has one, e.g. after one made on a busy machine); returns every workload's verdict, the earlier
    ones included.  Each candidate is timed for ``ADOPT_TIMING_S``, longer than a build's trials."""
    if not runs_here(target):
        raise ValueError(f"records are adopted on the machine they run on; {target_key(target)} cannot run here")
    logs = family_logs(target, log_dir)
    if source is not None:
        logs = [log for log in logs if log.key == source]
        if not logs:
            family = family_key(target)
            known = ", ".join(log.key for log in family_logs(target, log_dir)) or "none"
            raise ValueError(
                f"no tuning log {source!r} of this machine's family ({family}) in the log roots "
                f"{', '.join(map(str, log_roots(log_dir)))}; the family's logs are: {known}"
            )
    own = _own_logs(target, log_dir)
    verdicts = Verdicts.for_target(target, log_dir)
    todo = []
    for log in logs:
        for tuned_hash, tuned_spec, record in tuned_workloads(log):
            spec = retarget(tuned_spec, target)
            layout = schedules.weight_layout(spec)
            workload = workload_hash(ops.prim_func(spec, layout))
            if not any(o.best(workload) for o in own):
                # another weight layout here makes the same call a workload of its own: re-fitted, as a neighbour
                kind = "adopt" if workload == tuned_hash else "neighbour"
                todo.append((spec, layout, workload, Candidate(kind, log, record, tuned_spec)))
    if on_start is not None:
        on_start(len(todo))
    results = []
    for spec, layout, workload, candidate in todo:
        verdict = None if again else verdicts.get(workload, candidate.id)
        if verdict is None:
            verdict = judge(spec, layout, workload, candidate, verdicts, Baseline(spec, layout), ADOPT_TIMING_S)
        results.append((spec, verdict))
        if on_done is not None:
            on_done(spec, verdict)
    return results

"""Auto-tuning with MetaSchedule: every workload of a file becomes a task, all tasks are tuned together by
the gradient task scheduler with evolutionary search and the XGBoost cost model, and every measured
record is appended to the target's tuning log as it arrives (an interrupt loses nothing; running the
same command again counts the trials already in the log toward the budget)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from .. import ops, schedules
from ..fingerprint import code_fingerprint
from ..locks import file_lock
from ..progress import Progress, ProgressCallback
from ..records.apply import RecordError, schedule_record
from ..records.database import RECORD_FILE, WORKLOAD_FILE, TuningLog, TuningRecord, tune_log_root, workload_hash
from ..spec import KernelSpec
from ..targets import TargetLike, resolve_target, runs_here, target_key
from ..workloads import Workload, load_workloads
from .devices import Device, LocalDevice, RPCDevice
from .fast_import import import_tensor_intrin
from .interrupt import (
    Interrupt,
    InterruptCallback,
    InterruptibleBuilder,
    InterruptibleCostModel,
    InterruptibleRunner,
)
from .pools import ClosingLocalBuilder, close_pool

SPACES = ("generic", "ours")


@dataclass
class TaskResult:
    workload: Workload
    spec: KernelSpec
    workload_hash: str
    trials: int  # records in the log for this workload and target, this run's included
    best: TuningRecord | None  # fastest record that passed the correctness check


@dataclass
class _Task:
    workload: Workload
    spec: KernelSpec
    layout: dict
    func: tvm.tirx.PrimFunc
    hash: str
    done: int

    @property
    def name(self) -> str:
        return f"{self.spec.op}_{'x'.join(map(str, self.spec.input_shape))}"


def _as_workloads(workloads: str | Path | Sequence[Workload | KernelSpec]) -> list[Workload]:
    if isinstance(workloads, str | Path):
        return load_workloads(workloads)[0]
    return [w if isinstance(w, Workload) else Workload.from_spec(w) for w in workloads]


def search_space(name: str, target: tvm.target.Target) -> object:
    """MetaSchedule's space generator of ``--space name`` (one of :data:`SPACES`) for ``target``."""
    if name == "generic":
        return "post-order-apply"  # MetaSchedule's own rules for the target

    def our_rules(sch: tvm.s_tir.Schedule) -> tvm.s_tir.Schedule:
        func = sch.mod["main"]
        for rule in schedules.rules_for(target):
            tuned = rule.apply(func, target, tunable=True)
            if tuned is not None:
                return tuned
        return sch

    return ms.space_generator.ScheduleFn(
        our_rules, sch_rules=[], postprocs=[], mutator_probs={ms.mutator.MutateTileSize(): 1.0}
    )


def _device(target: tvm.target.Target, rpc_tracker: str | None, rpc_key: str | None, timeout: float) -> Device:
    """Where candidates are measured and records checked: here, or the RPC device (which must be registered)."""
    if rpc_tracker is None:
        if rpc_key:
            raise ValueError("--rpc-key needs --rpc-tracker: the HOST:PORT of the tracker the devices registered with")
        if not runs_here(target):
            raise ValueError(
                f"kernels for {target_key(target)} cannot run on this machine, so they cannot be measured here: "
                "tune them on the device over RPC (--rpc-tracker HOST:PORT --rpc-key KEY; see the README)"
            )
        return LocalDevice()
    device = RPCDevice(rpc_tracker, rpc_key, target, timeout)
    device.check_registered()
    return device


def _only_tuner(log: TuningLog) -> contextlib.AbstractContextManager[None]:
    """One tuner per target log at a time: two would interleave lines of the same database files."""
    return file_lock(
        log.directory / ".tuner.lock", busy=f"another tvmlayers tune is already writing {log.directory}; wait for it"
    )


def verified_best(
    log: TuningLog, task: _Task, device: Device, checked: frozenset[str] = frozenset()
) -> TuningRecord | None:
    """The fastest record whose kernel computes what torch computes on ``device``; records that do not are
    rejected in the log.  Records in ``checked`` were verified a moment ago and are not run again."""
    while (record := log.best(task.hash)) is not None:
        try:
            if record.id not in checked:
                _run_record(device, task, record, timed=False)
            return record
        except RecordError as err:
            log.reject(record, str(err))
    return None


def retime_best(log: TuningLog, task: _Task, device: Device, top: int = 5) -> set[str]:
    """Time the ``top`` records MetaSchedule found fastest and the default schedule's record again on
    ``device``, one after the other with one protocol, and store the times in the log: MetaSchedule's own
    measurements come from different moments of a long run and can rank a slower kernel first.  Records
    that do not build or compute the wrong result are rejected on the way; returns the ids of those that
    passed."""
    meta = log.meta()
    usable = [r for r in log.records(task.hash) if r.id not in meta["rejected"]]
    baseline = meta.get("baselines", {}).get(task.hash)
    candidates = usable[:top] + [r for r in usable[top:] if r.id == baseline]
    seconds = {}
    for record in candidates:
        try:
            seconds[record.id] = _run_record(device, task, record, timed=True)
        except RecordError as err:
            log.reject(record, str(err))
    log.set_retimed(task.hash, seconds)
    return set(seconds)


def _run_record(device: Device, task: _Task, record: TuningRecord, timed: bool) -> float:
    """Build ``record``'s kernel, check it against torch on ``device`` and, if ``timed``, time it there
    (else 0.0); a record that does not build or computes something else raises RecordError.  A device that
    fails (a lost connection) raises its own error: that says nothing about the record."""
    executable = schedule_record(task.spec, task.layout, record)
    with device.loaded(executable) as kernel:
        problem = kernel.check(task.spec, task.layout)
        if problem is not None:
            raise RecordError(problem)
        return kernel.time(task.func) if timed else 0.0


def _seed_defaults(tasks: list[_Task], log: TuningLog, target: tvm.target.Target, device: Device) -> set[str]:
    """Put each task's default schedule in the log as a record measured on ``device``, once per version of
    the op and schedule code: the search then starts from it, and a tuned record is never slower than the
    kernel users would get without tuning.  Returns the workload hashes seeded now."""
    # re-seeded whenever the op or schedule code changed: the default schedule may be a new one
    seeded_with = log.meta().get("baseline_code", {})
    todo = [t for t in tasks if seeded_with.get(t.hash) != code_fingerprint()]
    if not todo:
        return set()
    database = ms.database.JSONDatabase(
        path_workload=str(log.directory / WORKLOAD_FILE), path_tuning_record=str(log.directory / RECORD_FILE)
    )
    baselines = {}
    for task in todo:
        sch, _ = schedules.default_schedule(task.func, target)
        with device.loaded(tvm.compile(sch.mod, target=target)) as kernel:
            seconds = kernel.time(task.func)
        workload = database.commit_workload(_normalize_mod(task.func))  # as MetaSchedule files it
        database.commit_tuning_record(
            ms.database.TuningRecord(
                sch.trace, workload, [seconds], target, ms.arg_info.ArgInfo.from_prim_func(task.func)
            )
        )
        baselines[task.hash] = max(log.records(task.hash), key=lambda r: r.line).id  # the line just added
    log.mark_baselines(baselines, code_fingerprint())
    return set(baselines)


def tune(
    workloads: str | Path | Sequence[Workload | KernelSpec],
    target: TargetLike = "host",
    trials: int = 200,
    log_dir: str | Path | None = None,
    *,
    space: str = "generic",
    trials_per_iter: int = 64,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[TaskResult]:
    """Tune every workload to ``trials`` measured candidates (counting those already in the log).

    Records go to ``log_dir`` (default ``$TVMLAYERS_TUNING_LOGS`` or the user log directory), in the
    subdirectory of the target; later layer calls find them without any flag.  Candidates are measured, and
    the best records checked against torch, in this process, or with ``rpc_tracker`` (``HOST:PORT``) and
    ``rpc_key`` on a device registered with that TVM RPC tracker: the only way for a target of another
    architecture, whose kernels are linked here for it (:mod:`tvmlayers.tuning.devices`).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}")
    import_tensor_intrin()
    tgt = resolve_target(target)
    device = _device(tgt, rpc_tracker, rpc_key, timeout)
    log = TuningLog.for_target(tune_log_root(log_dir), tgt)
    tasks = []
    for workload in _as_workloads(workloads):
        spec = workload.spec(tgt)
        layout = schedules.weight_layout(spec)
        func = ops.prim_func(spec, layout)
        tasks.append(
            _Task(workload, spec, layout, func, workload_hash(func), done=0)
        )  # counted under the tuner lock below
    if not tasks:
        raise ValueError("no workloads to tune")
    log.add_workloads({t.hash: t.spec for t in tasks}, tgt)
    with _only_tuner(log):
        log.repair()  # MetaSchedule cannot open a database with a corrupt line
        seeded = _seed_defaults(tasks, log, tgt, device)
        for task in tasks:
            task.done = log.trials(task.hash)
        pending = [t for t in tasks if t.done < trials]
        if pending:
            _run(pending, tgt, log, trials, space, trials_per_iter, device, timeout, progress)
        checked: set[str] = set()
        retimed, changed = log.meta().get("retimed", {}), seeded | {t.hash for t in pending}
        for task in tasks:
            # a task whose records did not change since they were last re-timed keeps those times
            if task.hash in changed or task.hash not in retimed:
                checked |= retime_best(log, task, device)
    results = []
    for task in tasks:
        best = verified_best(log, task, device, frozenset(checked))
        results.append(TaskResult(task.workload, task.spec, task.hash, log.trials(task.hash), best))
    return results


def _run(
    tasks: list[_Task],
    target: tvm.target.Target,
    log: TuningLog,
    trials: int,
    space: str,
    trials_per_iter: int,
    device: Device,
    timeout: float,
    show_progress: bool,
) -> None:
    # builds and the search run on this machine's cores, whichever device measures
    cores = int(resolve_target("host").attrs.get("num-cores", os.cpu_count() or 1))
    remaining = [trials - t.done for t in tasks]
    contexts = [
        ms.TuneContext(
            t.func,
            target=target,
            space_generator=search_space(space, target),
            search_strategy="evolutionary",
            task_name=t.name,
            num_threads=cores,
        )
        for t in tasks
    ]
    database = ms.database.JSONDatabase(
        path_workload=str(log.directory / WORKLOAD_FILE), path_tuning_record=str(log.directory / RECORD_FILE)
    )
    progress = Progress([t.name for t in tasks], sum(remaining), quiet=not show_progress)
    interrupt = Interrupt()
    callbacks = [  # the default ones add each batch to the database first: an interrupt after them loses nothing
        *ms.measure_callback.MeasureCallback.create("default"),
        ProgressCallback(progress),
        InterruptCallback(interrupt),
    ]
    cost_model = InterruptibleCostModel(
        ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores, tree_method="auto"), interrupt
    )
    before = sum(len(log.records(t.hash)) for t in tasks)
    with tempfile.TemporaryDirectory(prefix="tvmlayers-tune-") as work_dir, interrupt.catching():
        # builder, runner and cost model are what MetaSchedule's C++ calls back into: each checks for Ctrl-C
        build = ClosingLocalBuilder(cores, timeout, import_tensor_intrin, device.builder_export(work_dir))
        builder = InterruptibleBuilder(build, interrupt)
        measure = device.runner(timeout)  # its process pool starts now: closed below
        runner = InterruptibleRunner(measure, interrupt)
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=[float(t.workload.count) for t in tasks],
                work_dir=work_dir,
                max_trials_global=sum(remaining),
                max_trials_per_task=max(remaining),
                num_trials_per_iter=min(trials_per_iter, max(remaining)),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=callbacks,
            )
        finally:
            progress.close()
            close_pool(measure.pool)  # however tuning ended: no worker outlives it, none is left to GC
    measured = sum(len(log.records(t.hash)) for t in tasks) - before
    if progress.done and measured == 0:
        # the worst failure of a tuner is to report success having measured nothing; no candidate at all
        # only means the search spaces hold nothing that was not measured before
        raise RuntimeError(
            f"tuning measured no candidate successfully; first error: {progress.first_error or 'unknown'}"
        )

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

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from .. import ops, schedules
from ..build import code_fingerprint
from ..locks import file_lock
from ..spec import KernelSpec
from ..targets import TargetLike, resolve_target
from .apply import RecordError, compile_record
from .database import RECORD_FILE, WORKLOAD_FILE, TuningLog, TuningRecord, tune_log_root, workload_hash
from .fast_import import import_tensor_intrin
from .interrupt import (
    Interrupt,
    InterruptCallback,
    InterruptibleBuilder,
    InterruptibleCostModel,
    InterruptibleRunner,
)
from .pools import ClosingLocalBuilder, close_pool
from .progress import Progress, ProgressCallback
from .workloads import Workload, load_workloads

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


def _space(name: str, target: tvm.target.Target) -> object:
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


def _runner(rpc_tracker: str | None, rpc_key: str | None, timeout: float) -> ms.runner.Runner:
    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout)
    if not rpc_key:
        raise ValueError("--rpc-tracker needs --rpc-key: the key the devices registered with")
    host, _, port = rpc_tracker.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--rpc-tracker must be HOST:PORT, got {rpc_tracker!r}")
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=int(port), tracker_key=rpc_key, session_timeout_sec=max(timeout, 60)
    )
    return ms.runner.RPCRunner(rpc_config=config)


def _only_tuner(log: TuningLog) -> contextlib.AbstractContextManager[None]:
    """One tuner per target log at a time: two would interleave lines of the same database files."""
    return file_lock(
        log.directory / ".tuner.lock", busy=f"another tvmlayers tune is already writing {log.directory}; wait for it"
    )


def verified_best(
    log: TuningLog, spec: KernelSpec, layout: dict, hash_: str, checked: frozenset[str] = frozenset()
) -> TuningRecord | None:
    """The fastest record that computes what torch computes; records that do not are rejected in the log.
    Records in ``checked`` were verified a moment ago and are not compiled again."""
    while (record := log.best(hash_)) is not None:
        problem = None if record.id in checked else check_record(spec, layout, record)
        if problem is None:
            return record
        log.reject(record, problem)
    return None


def retime_best(log: TuningLog, task: _Task, top: int = 5) -> set[str]:
    """Time the ``top`` records MetaSchedule found fastest and the default schedule's record again, one
    after the other with one protocol, and store the times in the log: MetaSchedule's own measurements
    come from different moments of a long run and can rank a slower kernel first.  Records that do not
    build or compute the wrong result are rejected on the way; returns the ids of those that passed."""
    meta = log.meta()
    usable = [r for r in log.records(task.hash) if r.id not in meta["rejected"]]
    baseline = meta.get("baselines", {}).get(task.hash)
    candidates = usable[:top] + [r for r in usable[top:] if r.id == baseline]
    seconds = {}
    for record in candidates:
        try:
            executable = compile_record(task.spec, task.layout, record)
        except RecordError as err:
            log.reject(record, str(err))
            continue
        seconds[record.id] = _time(executable.jit(), task.func)
    log.set_retimed(task.hash, seconds)
    return set(seconds)


def check_record(spec: KernelSpec, layout: dict, record: TuningRecord) -> str | None:
    """None if the record's kernel builds and matches torch on random inputs, else why not."""
    try:
        compile_record(spec, layout, record)
    except RecordError as err:
        return str(err)
    return None


def _time(module: tvm.runtime.Module, func: tvm.tirx.PrimFunc) -> float:
    """Mean run time of a compiled kernel, measured like MetaSchedule's LocalRunner does."""
    device = tvm.cpu()
    # random data, as MetaSchedule's runner uses: uninitialized memory can hold denormals, which make
    # floating-point arithmetic many times slower and the baseline look far worse than it is
    rng = np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)), device)
        for p in func.params
    ]
    config = ms.runner.EvaluatorConfig()
    timer = module.time_evaluator(
        ops.SYMBOL, device, number=config.number, repeat=config.repeat, min_repeat_ms=config.min_repeat_ms
    )
    return float(timer(*args).mean)


def _seed_defaults(tasks: list[_Task], log: TuningLog, target: tvm.target.Target) -> set[str]:
    """Put each task's default schedule in the log as a measured record, once per version of the op and
    schedule code: the search then starts from it, and a tuned record is never slower than the kernel
    users would get without tuning.  Returns the workload hashes seeded now."""
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
        seconds = _time(tvm.compile(sch.mod, target=target).jit(), task.func)
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
    subdirectory of the target; later layer calls find them without any flag.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}")
    import_tensor_intrin()
    tgt = resolve_target(target)
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
        seeded = set()
        if rpc_tracker is None:  # a baseline measured here says nothing about a remote device
            seeded = _seed_defaults(tasks, log, tgt)
        for task in tasks:
            task.done = log.trials(task.hash)
        pending = [t for t in tasks if t.done < trials]
        if pending:
            _run(pending, tgt, log, trials, space, trials_per_iter, rpc_tracker, rpc_key, timeout, progress)
        checked: set[str] = set()
        if rpc_tracker is None:  # re-timing needs the device here
            retimed, changed = log.meta().get("retimed", {}), seeded | {t.hash for t in pending}
            for task in tasks:
                # a task whose records did not change since they were last re-timed keeps those times
                if task.hash in changed or task.hash not in retimed:
                    checked |= retime_best(log, task)
    results = []
    for task in tasks:
        best = verified_best(log, task.spec, task.layout, task.hash, frozenset(checked))
        results.append(TaskResult(task.workload, task.spec, task.hash, log.trials(task.hash), best))
    return results


def _run(
    tasks: list[_Task],
    target: tvm.target.Target,
    log: TuningLog,
    trials: int,
    space: str,
    trials_per_iter: int,
    rpc_tracker: str | None,
    rpc_key: str | None,
    timeout: float,
    show_progress: bool,
) -> None:
    cores = int(target.attrs.get("num-cores", os.cpu_count() or 1))
    remaining = [trials - t.done for t in tasks]
    contexts = [
        ms.TuneContext(
            t.func,
            target=target,
            space_generator=_space(space, target),
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
    # builder, runner and cost model are what MetaSchedule's C++ calls back into: each checks for Ctrl-C
    builder = InterruptibleBuilder(ClosingLocalBuilder(cores, timeout, import_tensor_intrin), interrupt)
    cost_model = InterruptibleCostModel(
        ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores, tree_method="auto"), interrupt
    )
    before = sum(len(log.records(t.hash)) for t in tasks)
    measure = _runner(rpc_tracker, rpc_key, timeout)  # its process pool starts now: closed below
    runner = InterruptibleRunner(measure, interrupt)
    with tempfile.TemporaryDirectory(prefix="tvmlayers-tune-") as work_dir, interrupt.catching():
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

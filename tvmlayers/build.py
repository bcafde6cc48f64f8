"""The build pipeline: KernelSpec -> key -> schedule -> compile -> on-disk cache -> loaded Kernel.

``kernel_for(spec)`` is the only entry point; it memoizes per process, so a layer pays for the cache
lookup once per input shape.  The schedule comes from the best verified tuning record when the tuning
logs have one for the spec's workload and target, otherwise from the default rules; the cache key says
which, so tuning later never leaves a stale default kernel in use.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import tvm

from . import ops, schedules
from .cache import KernelCache
from .fingerprint import code_fingerprint
from .formats import kernel_key
from .kernel import Kernel
from .nvcc import cuda_arch, device_code_id, export_cuda_library
from .records.apply import RecordError, compile_record
from .records.database import TuningLog, TuningRecord, log_roots, workload_hash
from .records.travel import borrowed_record, untried
from .records.trial import compiled_in_trial
from .records.untuned import note_untuned
from .records.verdicts import Verdicts
from .spec import KernelSpec
from .targets import host_arch, missing_features, runs_here, target_arch, target_key

_memo: dict[tuple, Kernel] = {}
_memo_lock = threading.Lock()
_warned_untuned = False
_warned_logs = False


def _tuned_record(
    spec: KernelSpec, layout: dict, trials: bool = False
) -> tuple[TuningLog | Verdicts, TuningRecord] | None:
    """The fastest non-rejected record for this workload and target, searching the user's logs first; else
    a record of another CPU of the family or a neighbour's, adopted on this machine (``trials``: trying
    those not yet judged here, as the first build of a kernel does; see :mod:`tvmlayers.records.travel`)."""
    global _warned_logs
    hash_ = workload_hash(ops.prim_func(spec, layout))
    try:
        for root in log_roots():
            log = TuningLog.for_target(root, spec.target)
            record = log.best(hash_)
            if record is not None:
                return log, record
        return borrowed_record(spec, layout, hash_, trials)
    except Exception as err:  # noqa: BLE001 - a call never fails because of a tuning log
        if not _warned_logs:
            _warned_logs = True
            warnings.warn(
                f"tvmlayers: reading the tuning logs failed ({type(err).__name__}: {err}); using the default schedules",
                stacklevel=5,
            )
    return None


def _compile(spec: KernelSpec, layout: dict, so_path: Path, record: TuningRecord | None, fcompile: Any = None) -> dict:
    """Schedule and compile ``spec``, export the library to ``so_path`` (linked by ``fcompile``, e.g. a cross
    compiler; None: the system's); returns the manifest fields."""
    # the trials of records of other CPUs or neighbours (records.travel) may have compiled this kernel already
    executable = compiled_in_trial(spec, record.id if record is not None else None)
    if record is None:
        sch, rule = schedules.default_schedule(ops.prim_func(spec, layout), spec.target)
        if executable is None:
            executable = tvm.compile(sch.mod, target=spec.target)
        provenance = {"source": "default", "rule": rule}
    else:
        if executable is None:
            executable = compile_record(spec, layout, record)
        provenance = record.provenance()
    return export_kernel(spec, layout, executable, provenance, so_path, fcompile)


def export_kernel(
    spec: KernelSpec, layout: dict, executable: Any, provenance: dict, so_path: Path, fcompile: Any = None
) -> dict:
    """Export a compiled kernel of ``spec`` (``tvm.compile``'s executable) to the library ``so_path`` as the
    kernel cache does (linked by ``fcompile``; a CUDA kernel with its device code compiled by nvcc); returns
    its manifest fields, ``provenance`` among them."""
    fields = {
        "spec": spec.to_json(),
        "layout": layout,
        "provenance": provenance,
        "symbol": ops.SYMBOL,
        "output_shapes": [list(s) for s in ops.output_shapes(spec, layout)],
        "tvm_version": tvm.__version__,
    }
    if spec.target.kind.name == "cuda":  # device code compiled here by nvcc, not left as source (tvmlayers.nvcc)
        fields.update(export_cuda_library(executable, so_path, spec.target, spec.describe(), fcompile))
    else:
        executable.export_library(str(so_path), fcompile=fcompile)
    return fields


def compile_library(spec: KernelSpec, so_path: Path, fcompile: Any = None) -> dict:
    """Compile ``spec`` into the library ``so_path`` outside the kernel cache, linked by ``fcompile`` (bundles
    for other machines: a cross compiler), with the schedule ``kernel_for`` would use (the best usable tuning
    record, else the default rules); returns its manifest fields (layout, provenance, symbol, output shapes)."""
    layout = schedules.weight_layout(spec)
    while True:
        tuned = _tuned_record(spec, layout)
        try:
            return _compile(spec, layout, so_path, tuned[1] if tuned else None, fcompile)
        except RecordError as wrong:
            log, record = tuned
            log.reject(record, str(wrong))
            warnings.warn(
                f"tvmlayers: tuning record {record.id} is unusable for {spec.describe()}: {wrong}; it is marked "
                "rejected and skipped",
                stacklevel=2,
            )


def _warn_untuned(spec: KernelSpec, cache_root: Path) -> None:
    global _warned_untuned
    path = note_untuned(spec, cache_root)  # None when the list could not be updated (it said why)
    if not _warned_untuned:
        _warned_untuned = True
        listed = (
            f" Layers run without a record are listed in {path}; tune them with: tvmlayers tune {path}" if path else ""
        )
        warnings.warn(
            f"tvmlayers: no tuning record for {spec.describe()} on {target_key(spec.target)}; using the default "
            f"schedule.{listed}",
            stacklevel=5,
        )


def kernel_for(spec: KernelSpec, cache_dir: Path | str | None = None) -> Kernel:
    """The compiled kernel of ``spec``: from this process's memo, else the disk cache, else a fresh build."""
    # the memo is keyed by what decides the cache directory, without building Paths on the hot path
    environ = os.environ
    memo_key = (
        spec,
        cache_dir,
        environ.get("TVMLAYERS_CACHE_DIR"),
        environ.get("XDG_CACHE_HOME"),
        environ.get("TVMLAYERS_TUNING_LOGS"),
        environ.get("TVMLAYERS_TUNED"),
    )
    kernel = _memo.get(memo_key)
    if kernel is not None:
        return kernel
    if not runs_here(spec.target):  # loading it here would fail inside dlopen, or worse
        raise RuntimeError(_cannot_run_here(spec))
    kernel_cache = KernelCache(cache_dir)
    with _memo_lock:
        kernel = _memo.get(memo_key)
        if kernel is None:
            kernel = _memo[memo_key] = _build(spec, kernel_cache)
    return kernel


def _cannot_run_here(spec: KernelSpec) -> str:
    """Why ``spec``'s kernel cannot run in this process, and how to run it where it can (a bundle)."""
    target = spec.target
    bundle = (
        "compile its kernels for the device with `tvmlayers compile --target ... -o DIR` (or tl.compile_bundle) "
        "and run the bundle's run.py there"
    )
    if target.kind.name == "cuda":
        arch = cuda_arch(target)
        why = _local_gpu() if target_arch(target) == host_arch() else f"its host code is {target_arch(target)}"
        return (
            f"tvmlayers: {spec.describe()} is for target {target_key(target)}: this machine cannot run kernels for "
            f"{arch} ({why}); {bundle} (compiling needs nvcc, not a GPU); target='cuda' is this machine's own GPU"
        )
    missing = missing_features(target)
    lacking = f" without {', '.join(missing)}" if missing else ""
    return (
        f"tvmlayers: {spec.describe()} is for target {target_key(target)} ({target_arch(target)}), which cannot "
        f"run in this process (this machine is {host_arch()}{lacking}): {bundle}; leave target= out to run on "
        "this machine"
    )


def _local_gpu() -> str:
    import torch  # noqa: PLC0415 - only this message needs it

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU here"
    major, minor = torch.cuda.get_device_capability()
    return f"its GPU, {torch.cuda.get_device_name()}, is sm_{major}{minor}"


def is_cached(spec: KernelSpec, cache_dir: Path | str | None = None) -> bool:
    """Whether ``kernel_for(spec, cache_dir)`` would load its kernel from the disk cache, compiling nothing
    (``tvmlayers.precompile`` sends only the others to its workers)."""
    layout = schedules.weight_layout(spec)
    tuned = _tuned_record(spec, layout)
    if tuned is None and untried(spec, workload_hash(ops.prim_func(spec, layout))):
        return False  # its first build tries a record of another CPU or a neighbour's
    key, expect = _cache_key(spec, layout, tuned[1] if tuned else None)
    return KernelCache(cache_dir).load(key, expect) is not None


def _cache_key(spec: KernelSpec, layout: dict, record: TuningRecord | None) -> tuple[str, dict]:
    """The kernel cache key of ``spec`` scheduled by ``record`` (None: the default rules), and the manifest
    fields its entry must hold."""
    schedule_id = {"source": "tuned", "record": record.id} if record else {"source": "default"}
    schedule_id["code"] = code_fingerprint()
    if spec.target.kind.name == "cuda":  # nvcc's flags make the device code: new flags, new binaries
        schedule_id["device_code"] = device_code_id(spec.target)
    key = kernel_key(spec.to_json(), layout, schedule_id, tvm.__version__)
    return key, {"spec": spec.to_json(), "layout": layout}  # an entry made for another spec is never loaded


def _build(spec: KernelSpec, kernel_cache: KernelCache) -> Kernel:
    layout = schedules.weight_layout(spec)
    while True:
        tuned = _tuned_record(spec, layout, trials=True)
        record = tuned[1] if tuned else None
        key, expect = _cache_key(spec, layout, record)
        try:
            entry, built = kernel_cache.get_or_build(key, lambda so, r=record: _compile(spec, layout, so, r), expect)
        except RecordError as wrong:
            log, record = tuned
            log.reject(record, str(wrong))
            warnings.warn(
                f"tvmlayers: tuning record {record.id} ({record.directory}, line {record.line}) is unusable for "
                f"{spec.describe()}: {wrong}; it is marked rejected and skipped",
                stacklevel=4,
            )
            continue
        if record is None:
            _warn_untuned(spec, kernel_cache.root)
        return Kernel.load(spec, entry, built)

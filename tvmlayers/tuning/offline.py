"""Offline tuning: candidates built here, measured in one batch where the kernels run, imported back as records.

For a device that this machine cannot reach (a GPU machine visited now and then, an air-gapped board)::

    tvmlayers tune resnet18.toml --target sm_90 --export-candidates cand/   # here: build the candidates
    python cand/measure.py --out measured.json                           # on the device: check, then time
    tvmlayers logs import measured.json                                   # here: the winners become records

:func:`export_candidates` takes, for each workload, the default schedule (the baseline) and up to ``count``
other schedules of a search space of the tuner (``space``: ``ours`` by default, tvmlayers' rules with sampled
tile sizes; or ``generic``, MetaSchedule's own rules for the target).  They are random samples of the design
space, each trace replayed with fresh random decisions from its own seed (and MetaSchedule's postprocessors,
which drop e.g. GPU kernels over the thread or shared-memory limits): the initial population of MetaSchedule's
evolutionary search.  The cost model has nothing to rank them by before a single measurement (XGBoost's
untrained ranking is noise), and the search's later rounds need measurements to evolve from, so a first
offline batch is best spent on a diverse random sample; samples whose scheduled program is the same as one
already taken (often: many decisions lead to the same loops) are dropped, so every candidate is a different
kernel.  Each is compiled exactly as the kernel cache compiles a kernel for the target (a CUDA kernel's device
code by nvcc) and written with its reference into a bundle (:mod:`tvmlayers.bundle`): the device's ``run.py``
checks every candidate against torch before timing it.  Each kernel of the folder carries a ``candidate``
field, and the export is also written to a ledger in the target's tuning log on this machine (both described
in :mod:`tvmlayers.formats`).

:func:`import_measurements` reads the device's ``measured.json``, which is untrusted input: only candidates of
an export in the ledger are taken, with the ledger's trace (a measured.json whose trace, workload or target
differs from the ledger's is refused as a whole), each passes the record checks of every log record (the
allow-list, the workload hash re-derived from its spec by the code of this machine), and the correct ones
become records of the target's user log, with their device times as re-timed times and the device's name as
their origin.  Candidates that computed wrong results or failed are counted, not imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from .. import ops, schedules
from ..bundle import LayerCall, compile_bundle
from ..fingerprint import code_fingerprint
from ..formats import MEASURED_FORMAT, OFFLINE_EXPORT_FORMAT, canonical_json
from ..private_dirs import make_private_dirs
from ..published import published_folder
from ..records.database import TuningLog, record_id, tune_log_root, workload_hash
from ..records.neighbours import plain_json
from ..records.record_check import DisallowedRecord, check_trace, trace_problem
from ..spec import KernelSpec
from ..targets import TargetLike, resolve_target, target_json, target_key
from ..workloads import Workload, load_workloads
from .fast_import import import_tensor_intrin
from .tuner import SPACES, search_space

DEFAULT_CANDIDATES = 16
# random samples drawn per candidate wanted before a space counts as exhausted: MetaSchedule's CUDA rules give
# mostly kernels over a GPU's limits (60 of 64 samples of a small conv for sm_90), our rules many duplicates
SAMPLES_PER_CANDIDATE = 32
MEASURE_SCRIPT = Path(__file__).with_name("offline_measure.py")  # copied as measure.py (it imports run.py)
MAX_MEASURED_BYTES = 64 << 20
EXPORT_ID = re.compile(r"[0-9a-f]{32}")
TARGET_KEY = re.compile(r"[A-Za-z0-9_.+-]{1,200}")


@dataclass(frozen=True)
class Candidate:
    """One schedule of one workload, as exported."""

    spec: KernelSpec
    layout: dict
    workload_hash: str
    trace: list
    is_default: bool
    schedule: tvm.s_tir.Schedule

    LEDGER_FIELDS: ClassVar = frozenset({"workload_hash", "spec", "layout", "trace", "trace_sha256", "is_default"})

    @property
    def id(self) -> str:
        """The id of the record it becomes (:func:`tvmlayers.records.database.record_id`)."""
        return record_id(self.workload_hash, self.trace)

    def ledger_entry(self) -> dict:
        return {
            "workload_hash": self.workload_hash,
            "spec": self.spec.to_json(),
            "layout": self.layout,
            "trace": self.trace,
            "trace_sha256": trace_sha256(self.trace),
            "is_default": self.is_default,
        }


def trace_sha256(trace: object) -> str:
    return hashlib.sha256(canonical_json(trace).encode()).hexdigest()


def ledger_path(log_dir: str | Path | None, key: str, export: str) -> Path:
    """Where this machine keeps what an export holds: ``<log root>/<target key>/offline/<export id>.json``."""
    return tune_log_root(log_dir) / key / "offline" / f"{export}.json"


def sample_candidates(
    spec: KernelSpec, count: int, space: str = "ours", seed: int = 0, measured: frozenset[str] = frozenset()
) -> list[Candidate]:
    """The default schedule of ``spec`` and up to ``count`` distinct other schedules sampled from the search
    space (fewer when a small space runs out), none of the records ``measured`` already (their ids): a second
    export after an import brings new candidates."""
    tgt = spec.target
    layout = schedules.weight_layout(spec)
    func = ops.prim_func(spec, layout)
    shash = workload_hash(func)
    default, _ = schedules.default_schedule(func, tgt)
    taken = [Candidate(spec, layout, shash, plain_json(default.trace.as_json()), True, default)]
    programs = {tvm_ffi.structural_hash(default.mod)}
    context = ms.TuneContext(func, target=tgt, space_generator=search_space(space, tgt), num_threads=1)
    designs = context.generate_design_space()
    postprocs = context.space_generator.postprocs
    drawn = 0
    while len(taken) <= count and drawn < (count + len(measured)) * SAMPLES_PER_CANDIDATE:
        design = designs[drawn % len(designs)]
        drawn += 1
        sch = tvm.s_tir.Schedule(context.mod, seed=seed * 100_003 + drawn)
        try:
            # the design's instructions with no decisions: every sampling instruction draws anew from the seed
            tvm.s_tir.Trace(design.trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
            if not all(postproc.apply(sch) for postproc in postprocs):
                continue  # e.g. a GPU kernel over the thread or shared-memory limits
        except Exception:  # noqa: BLE001 - TVM rejects an invalid sample with its own errors
            continue
        program = tvm_ffi.structural_hash(sch.mod)
        trace = plain_json(sch.trace.as_json())
        if program in programs or trace_problem(trace) is not None:
            continue
        programs.add(program)
        candidate = Candidate(spec, layout, shash, trace, False, sch)
        if candidate.id not in measured:
            taken.append(candidate)
    return taken


@dataclass
class ExportReport:
    folder: Path
    export: str
    target_key: str
    candidates: dict[KernelSpec, list[Candidate]]  # per workload: the default first
    seconds: float


def export_candidates(
    workloads: str | Path | Sequence[Workload],
    target: TargetLike,
    out_dir: str | Path,
    *,
    count: int = DEFAULT_CANDIDATES,
    space: str = "ours",
    log_dir: str | Path | None = None,
    seed: int = 0,
    references: bool = True,
    progress: bool = True,
) -> ExportReport:
    """Write the candidates folder ``out_dir`` (replaced if it holds one) for the workloads and ``target``,
    and its ledger in the target's log under ``log_dir`` (default: the user's log root).  ``references=False``:
    no .npz references, torch computes them on the device (a GPU machine: a far smaller folder)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if type(count) is not int or count < 0:
        raise ValueError(f"the number of candidates must be a non-negative integer, got {count!r}")
    out = Path(out_dir)
    if out.exists() and not (out / "measure.py").exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a candidates folder: choose an empty or new folder")
    start = time.monotonic()
    import_tensor_intrin()
    tgt = resolve_target(target)
    key = target_key(tgt)
    if isinstance(workloads, str | Path):
        workloads = load_workloads(workloads)[0]
    specs = list(dict.fromkeys(w.spec(tgt) for w in workloads))
    if not specs:
        raise ValueError("no workloads to export candidates for")
    export = secrets.token_hex(16)
    log = TuningLog.for_target(tune_log_root(log_dir), tgt)
    candidates = {}
    for spec in specs:
        shash = workload_hash(ops.prim_func(spec, schedules.weight_layout(spec)))
        measured = frozenset(record.id for record in log.records(shash))
        candidates[spec] = sample_candidates(spec, count, space, seed, measured)
    calls = [
        LayerCall(
            spec,
            compile=partial(tvm.compile, candidate.schedule.mod, target=tgt),
            provenance={"source": "candidate", "record": candidate.id, "default": candidate.is_default},
            manifest_fields={
                "candidate": {"id": candidate.id, "export": export, "target_key": key, **candidate.ledger_entry()}
            },
        )
        for spec, group in candidates.items()
        for candidate in group
    ]
    with published_folder(out) as folder:
        compile_bundle(calls, tgt, folder, seed=seed, references=references, progress=progress)
        shutil.copyfile(MEASURE_SCRIPT, folder / "measure.py")
        (folder / "measure.py").chmod(0o755)
        _write_ledger(ledger_path(log_dir, key, export), export, tgt, candidates)
    return ExportReport(out, export, key, candidates, time.monotonic() - start)


def _write_ledger(path: Path, export: str, target: tvm.target.Target, candidates: dict) -> None:
    ledger = {
        "format": OFFLINE_EXPORT_FORMAT,
        "export": export,
        "created": time.time(),
        "target": target_json(target),
        "target_key": target_key(target),
        "tvm_version": tvm.__version__,
        "code": code_fingerprint(),
        "candidates": {c.id: c.ledger_entry() for group in candidates.values() for c in group},
    }
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ledger) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- import
class MeasuredFileError(ValueError):
    """A measured.json that is refused as a whole; the message says why and what to do."""


@dataclass
class WorkloadImport:
    spec: KernelSpec
    imported: int = 0  # new records
    already: int = 0  # correct candidates whose record was in the log already
    wrong: int = 0  # ran, computed something else than torch
    failed: int = 0  # did not load, crashed, or were not timed
    default_us: float | None = None
    best_us: float | None = None
    torch_us: float | None = None  # torch's time for the same layer, measured next to the best (GPU bundles)

    @property
    def speedup(self) -> float | None:
        if self.default_us is None or self.best_us is None or self.best_us <= 0:
            return None
        return self.default_us / self.best_us


@dataclass
class ImportReport:
    log: Path
    device: str
    workloads: dict[str, WorkloadImport]  # workload hash -> counts
    skipped: list[str]  # rows skipped with the reason


def _read_measured(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.stat().st_size > MAX_MEASURED_BYTES:
        raise MeasuredFileError(f"{path} is over {MAX_MEASURED_BYTES >> 20} MiB: not a measured.json of ours")
    try:
        measured = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:
        raise MeasuredFileError(f"{path} is not JSON ({str(err)[:200]}): give the file measure.py wrote") from None
    if not isinstance(measured, dict) or measured.get("format") != MEASURED_FORMAT:
        found = measured.get("format") if isinstance(measured, dict) else type(measured).__name__
        raise MeasuredFileError(f"{path}: measured.json format {found!r}, this tvmlayers reads {MEASURED_FORMAT}")
    export, key, device, rows = (measured.get(f) for f in ("export", "target_key", "device", "kernels"))
    if not (isinstance(export, str) and EXPORT_ID.fullmatch(export)):
        raise MeasuredFileError(f"{path}: 'export' is not an export id")
    if not (isinstance(key, str) and TARGET_KEY.fullmatch(key)):
        raise MeasuredFileError(f"{path}: 'target_key' is not a target key")
    if not (isinstance(device, str) and 0 < len(device) <= 200 and device.isprintable()):
        raise MeasuredFileError(f"{path}: 'device' is not a device name (printable text, up to 200 characters)")
    if not (isinstance(rows, list) and all(isinstance(row, dict) for row in rows)):
        raise MeasuredFileError(f"{path}: 'kernels' is not a list of objects")
    return measured


def _read_ledger(path: Path, measured_path: Path, key: str, export: str) -> dict:
    try:
        ledger = json.loads(path.read_text())
    except FileNotFoundError:
        raise MeasuredFileError(
            f"{measured_path} holds measurements of export {export} for {key}, which this machine did not export "
            f"(no {path}): import it where `tvmlayers tune --export-candidates` wrote that folder, with the same "
            "--log-dir"
        ) from None
    except (OSError, ValueError) as err:
        raise MeasuredFileError(f"the export ledger {path} is unreadable ({err}); export the candidates again") from err
    entries = ledger.get("candidates") if isinstance(ledger, dict) else None
    valid = (
        isinstance(ledger, dict)
        and ledger.get("format") == OFFLINE_EXPORT_FORMAT
        and ledger.get("target_key") == key
        and isinstance(ledger.get("target"), dict)
        and isinstance(entries, dict)
        and all(isinstance(e, dict) and e.keys() >= Candidate.LEDGER_FIELDS for e in entries.values())
    )
    if not valid:
        raise MeasuredFileError(f"the export ledger {path} is not one of ours for {key}; export the candidates again")
    return ledger


def _row_time(row: dict) -> float | None:
    """The row's median in seconds if it says the candidate was correct and timed, else None."""
    median = row.get("median_us")
    if row.get("status") != "ok" or type(median) not in (int, float) or not (math.isfinite(median) and median > 0):
        return None
    return median * 1e-6


def import_measurements(path: str | Path, log_dir: str | Path | None = None) -> ImportReport:
    """Turn the correct candidates of a device's ``measured.json`` into records of the target's user log
    (``log_dir``, default: ``$TVMLAYERS_TUNING_LOGS`` or the user's log root).  Raises MeasuredFileError for a
    file refused as a whole; the log is left as it was then, and also when the import is interrupted."""
    path = Path(path)
    measured = _read_measured(path)
    key, export, device = measured["target_key"], measured["export"], measured["device"]
    ledger = _read_ledger(ledger_path(log_dir, key, export), path, key, export)
    exported = ledger["candidates"]
    target = resolve_target(ledger["target"])
    if target_key(target) != key:
        raise MeasuredFileError(f"the export ledger of {export} names another target than {key}")
    workloads: dict[str, WorkloadImport] = {}
    records: list[tuple[str, list, float]] = []  # (workload hash, trace, seconds)
    specs: dict[str, tuple[KernelSpec, tvm.tirx.PrimFunc]] = {}
    skipped, seen = [], set()
    for number, row in enumerate(measured["kernels"], start=1):
        where = f"{path}: kernel {number} ({str(row.get('name'))[:40]})"
        entry = _exported_entry(row, measured, exported, where)
        if row["candidate"]["id"] in seen:
            raise MeasuredFileError(f"{where}: candidate {row['candidate']['id'][:20]} is measured twice; refused")
        seen.add(row["candidate"]["id"])
        shash = entry["workload_hash"]
        if shash not in specs:
            specs[shash] = _workload(entry, target, where)
        counts = workloads.setdefault(shash, WorkloadImport(specs[shash][0]))
        seconds = _row_time(row)
        if seconds is None:
            if row.get("status") == "ok":
                skipped.append(f"{where}: marked ok but without a run time; not imported")
            if row.get("status") == "wrong":
                counts.wrong += 1
            else:
                counts.failed += 1
            continue
        try:
            check_trace(entry["trace"])  # as every record read from a log
        except DisallowedRecord as err:
            skipped.append(f"{where}: refused, not on the allow-list of tuning-record instructions: {err}")
            counts.failed += 1
            continue
        records.append((shash, entry["trace"], seconds))
        if entry["is_default"]:
            counts.default_us = seconds * 1e6
        if seconds * 1e6 < (counts.best_us or math.inf):
            counts.best_us = seconds * 1e6
            torch_us = row.get("torch_us")
            counts.torch_us = torch_us if type(torch_us) is float and math.isfinite(torch_us) else None
    log = TuningLog.for_target(tune_log_root(log_dir), target)
    added = log.import_records(specs, records, f"measured offline on {device}")
    for shash, trace, _ in records:
        if record_id(shash, trace) in added:
            workloads[shash].imported += 1
        else:
            workloads[shash].already += 1
    return ImportReport(log.directory, device, workloads, skipped)


def _exported_entry(row: dict, measured: dict, exported: dict, where: str) -> dict:
    """The ledger's entry of the candidate a row measured; MeasuredFileError unless the row's candidate is one
    that was exported, unchanged, for the file's target and export."""
    candidate, export = row.get("candidate"), measured["export"]
    if not isinstance(candidate, dict) or not isinstance(candidate.get("id"), str):
        raise MeasuredFileError(f"{where} has no candidate id: not a row measure.py writes")
    entry = exported.get(candidate["id"])
    if entry is None:
        raise MeasuredFileError(f"{where}: candidate {candidate['id'][:20]} was not exported in {export}; refused")
    if candidate.get("target_key") != measured["target_key"] or candidate.get("export") != export:
        raise MeasuredFileError(f"{where}: its candidate is of another target or export than the file; refused")
    altered = [f for f in ("workload_hash", "trace_sha256", "is_default") if candidate.get(f) != entry[f]]
    if trace_sha256(candidate.get("trace")) != entry["trace_sha256"]:
        altered.append("trace")
    if altered:
        raise MeasuredFileError(
            f"{where}: its {', '.join(altered)} differ from what was exported; refusing the whole file, as it was "
            "changed after the export"
        )
    return entry


def _workload(entry: dict, target: tvm.target.Target, where: str) -> tuple[KernelSpec, tvm.tirx.PrimFunc]:
    """The spec and PrimFunc of a ledger entry, re-derived here: its workload hash must be the one exported."""
    try:
        spec = KernelSpec.from_json(entry["spec"])
    except Exception as err:  # noqa: BLE001 - a bad target raises TVM's own errors
        raise MeasuredFileError(f"{where}: the ledger's spec is unusable ({type(err).__name__}: {err})") from None
    if target_key(spec.target) != target_key(target):
        raise MeasuredFileError(f"{where}: the ledger's spec is of another target than {target_key(target)}")
    layout = schedules.weight_layout(spec)
    func = ops.prim_func(spec, layout)
    if layout != entry["layout"] or workload_hash(func) != entry["workload_hash"]:
        raise MeasuredFileError(
            f"{where}: {spec.describe()} is another workload for this version of tvmlayers (its op definition or "
            "weight layout changed since the export): export the candidates again and measure them"
        )
    return spec, func

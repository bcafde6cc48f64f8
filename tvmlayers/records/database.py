"""Tuning logs: one MetaSchedule JSON database per target, indexed once per process.

The folder layout and the files in it (format version ``TUNING_LOG_VERSION``) are documented in
:mod:`tvmlayers.formats`, the one home of every on-disk format.

MetaSchedule's database does not key records by target, so tvmlayers keeps one directory per target
and also checks every record's own target before applying it.  A record is code (its trace is compiled
into a library this process loads): every record read from a log passes the allow-list of
:mod:`tvmlayers.records.record_check` first.  A log never breaks a caller: a malformed line (bad JSON,
too deep, over ``MAX_LINE_CHARS``, wrong shape, bad target) or a refused record is reported once per
process with its file and line, and skipped.  Log roots are searched in order:
``log_dir=``/``TVMLAYERS_TUNING_LOGS`` (user), then the ``tuning_logs/`` shipped with the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from ..formats import TUNING_LOG_VERSION, canonical_json
from ..locks import file_lock
from ..private_dirs import make_private_dirs
from ..spec import KernelSpec
from ..targets import target_json, target_key
from .record_check import DisallowedRecord, check_trace

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "tvmlayers.json"
MAX_LINE_CHARS = 8 << 20  # the largest shipped workload line is about 0.2 MB; anything this long is not ours

# tvmlayers.json fields that are maps (keyed by workload hash or record id), and what each value must be
_META_MAPS: dict[str, Callable[[object], bool]] = {
    "workloads": lambda spec: isinstance(spec, dict),
    "rejected": lambda reason: isinstance(reason, str),
    "baselines": lambda record: isinstance(record, str),
    "baseline_code": lambda code: isinstance(code, str),
    "retimed": lambda times: isinstance(times, dict) and all(type(t) in (int, float) for t in times.values()),
    "trials": lambda count: type(count) is int,
    "origins": lambda origin: isinstance(origin, str),
}


def shipped_log_root() -> Path:
    """The ``tuning_logs/`` folder shipped inside the package (``tvmlayers.tuning_logs``)."""
    import tvmlayers.tuning_logs as shipped  # noqa: PLC0415 - a data-only package

    return Path(shipped.__file__).parent


def tune_log_root(log_dir: str | Path | None = None) -> Path:
    """Where the user's tuning logs live: ``log_dir``, else ``$TVMLAYERS_TUNING_LOGS``, else
    ``$XDG_DATA_HOME/tvmlayers/tuning_logs`` (``~/.local/share/...``)."""
    if log_dir is not None:
        return Path(log_dir)
    if os.environ.get("TVMLAYERS_TUNING_LOGS"):
        return Path(os.environ["TVMLAYERS_TUNING_LOGS"])
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "tvmlayers" / "tuning_logs"


def log_roots(log_dir: str | Path | None = None) -> list[Path]:
    """Where lookups search, first match wins: the user's logs, then the shipped ones.

    ``TVMLAYERS_TUNED=0`` turns lookups off: every kernel uses its default schedule (to compare).
    """
    if os.environ.get("TVMLAYERS_TUNED") == "0":
        return []
    return list(dict.fromkeys(r.resolve() for r in (tune_log_root(log_dir), shipped_log_root())))


def workload_hash(func: tvm.tirx.PrimFunc) -> str:
    """The structural hash MetaSchedule files a PrimFunc's workload under."""
    return str(tvm_ffi.structural_hash(_normalize_mod(func)))


def record_id(workload: str, trace: list) -> str:
    return hashlib.sha256(canonical_json([workload, trace]).encode()).hexdigest()[:20]


@lru_cache(maxsize=256)
def _record_target_key(target_text: str) -> str:
    try:
        return target_key(tvm.target.Target(json.loads(target_text)))
    except Exception as err:  # noqa: BLE001 - TVM raises ValueError, InternalError, ... for a bad target
        raise ValueError(f"its target is not a valid TVM target ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _workload_hashes(directory: Path) -> list[str | None]:
    """The structural hash of each line of the workload file, None for a malformed line (a record names its
    workload by position, corrupt lines included)."""
    path = directory / WORKLOAD_FILE
    hashes: list[str | None] = []
    for line, entry in _json_lines(path):
        ok = _is_workload_entry(entry)
        if entry is not None and not ok:
            _warn_corrupt(path, line, ValueError("not a [structural hash, module] line"))
        hashes.append(entry[0] if ok else None)
    return hashes


def _is_workload_entry(entry: object) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)


def _parse_record(entry: object, hashes: list[str | None]) -> tuple[str, list, float, str]:
    """(workload hash, trace, mean run seconds, target key) of a record line; raises ValueError (a malformed
    line) or DisallowedRecord (a trace that is not on the allow-list) saying why not."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list) and len(entry[1]) == 4):
        raise ValueError("not a [workload index, [trace, run seconds, target, arg info]] line")
    workload, (trace, run_secs, target, args) = entry
    if type(workload) is not int or not 0 <= workload < len(hashes):
        raise ValueError(f"workload index {str(workload)[:40]} is not a line of {WORKLOAD_FILE}")
    if hashes[workload] is None:
        raise ValueError(f"its workload (line {workload + 1} of {WORKLOAD_FILE}) is corrupt")
    check_trace(trace)  # before anything else looks at the record
    if not (isinstance(run_secs, list) and run_secs and all(type(s) in (int, float) for s in run_secs)):
        raise ValueError("its run seconds are not a list of numbers")
    seconds = sum(run_secs) / len(run_secs)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"its mean run time {seconds} is not a time")
    if not isinstance(target, dict):
        raise ValueError("its target is not a JSON object")
    valid_args = isinstance(args, list) and all(
        isinstance(a, list) and len(a) == 3 and a[0] == "TENSOR" and isinstance(a[1], str) and _int_list(a[2])
        for a in args
    )
    if not valid_args:
        raise ValueError('its arg info is not [["TENSOR", dtype, shape], ...]')
    return hashes[workload], trace, seconds, _record_target_key(canonical_json(target))


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _records(directory: Path) -> Iterator[tuple[TuningRecord, list]]:
    """Every well-formed, allowed record of a log directory with its line's body; the others are reported
    (once per process) and skipped."""
    hashes = _workload_hashes(directory)
    path = directory / RECORD_FILE
    for line, entry in _json_lines(path):
        if entry is None:
            continue
        try:
            shash, trace, seconds, key = _parse_record(entry, hashes)
        except DisallowedRecord as err:
            _warn(path, line, f"refusing a tuning record that is not on the allow-list: {err}")
            continue
        except ValueError as err:
            _warn_corrupt(path, line, err)
            continue
        yield TuningRecord(directory, line, shash, trace, seconds, key), entry[1]


@dataclass(frozen=True)
class TuningRecord:
    directory: Path
    line: int  # 1-based line in database_tuning_record.json
    workload_hash: str
    trace: list
    seconds: float  # mean measured run time
    target_key: str
    # where it was measured, when not by the tuner ("measured offline on <device>"); keyword-only: subclasses
    # (records.verdicts.BorrowedRecord) add their own fields after the positional ones
    origin: str = dataclasses.field(default="", kw_only=True)

    @property
    def id(self) -> str:
        """Stable across copies and merges of the log: what the record is, not where it is."""
        return record_id(self.workload_hash, self.trace)

    def provenance(self) -> dict:
        provenance = {
            "source": "tuned",
            "record": self.id,
            "log": str(self.directory / RECORD_FILE),
            "line": self.line,
            "tuned_us": round(self.seconds * 1e6, 3),
        }
        return provenance | ({"origin": self.origin} if self.origin else {})


@dataclass
class _Index:
    stamp: tuple
    records: dict[str, list[TuningRecord]]  # workload hash -> records, fastest first
    meta: dict


class TuningLog:
    """The tuning log of one target in one log root."""

    _indexes: dict[Path, _Index] = {}
    _rejected_here: dict[Path, set[str]] = {}  # rejections this process could not write into the log
    _lock = threading.Lock()

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.key = self.directory.name  # the target key: only records of this target are used

    @classmethod
    def for_target(cls, root: str | Path, target: tvm.target.Target) -> TuningLog:
        return cls(Path(root) / target_key(target))

    # ------------------------------------------------------------------------------------------ reading
    def _stamp(self) -> tuple:
        stamp = []
        for name in (WORKLOAD_FILE, RECORD_FILE, META_FILE):
            try:
                st = (self.directory / name).stat()
                stamp.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append(None)
        return tuple(stamp)

    def stamp(self) -> tuple:
        """Changes whenever one of the log's files does: the key of what is cached from reading it."""
        return self._stamp()

    def _index(self) -> _Index:
        """Parsed once per process; parsed again only when one of the files changed."""
        stamp = self._stamp()
        with self._lock:
            index = self._indexes.get(self.directory)
            if index is None or index.stamp != stamp:
                index = self._indexes[self.directory] = _Index(stamp, *self._parse())
            return index

    def _parse(self) -> tuple[dict[str, list[TuningRecord]], dict]:
        records: dict[str, list[TuningRecord]] = {}
        meta = self.meta()
        for record, _ in _records(self.directory):
            origin = meta["origins"].get(record.id, "")
            records.setdefault(record.workload_hash, []).append(replace(record, origin=origin))
        for group in records.values():
            group.sort(key=lambda r: r.seconds)
        return records, meta

    def meta(self) -> dict:
        """``tvmlayers.json``; a malformed file or field is reported once and read as empty."""
        path = self.directory / META_FILE
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except FileNotFoundError:
            meta = {}
        except (ValueError, RecursionError, OSError) as err:
            _warn_corrupt(path, 1, err)
            meta = {}
        for field, value_ok in _META_MAPS.items():
            value = meta.get(field, {})
            if not isinstance(value, dict):
                _warn_corrupt(path, 1, ValueError(f"field {field!r} is not an object; ignored"))
                value = {}
            bad = [k for k, v in value.items() if not value_ok(v)]
            if bad:
                _warn_corrupt(path, 1, ValueError(f"field {field!r} has malformed entries {bad[:3]}; ignored"))
            meta[field] = {k: v for k, v in value.items() if k not in bad}
        meta.setdefault("format", TUNING_LOG_VERSION)
        return meta

    def records(self, workload: str) -> list[TuningRecord]:
        """Every record of this target for a workload hash, fastest first (rejected ones included)."""
        return [r for r in self._index().records.get(workload, []) if r.target_key == self.key]

    def best(self, workload: str) -> TuningRecord | None:
        """The fastest record of this target that was not rejected by a correctness check.

        Fastest as re-timed by the tuner when it did (``retimed``: the same kernels timed one after the
        other with one protocol), else as MetaSchedule measured them while tuning.
        """
        meta = self._index().meta
        rejected_here = self._rejected_here.get(self.directory, set())
        usable = [r for r in self.records(workload) if r.id not in meta["rejected"] and r.id not in rejected_here]
        retimed = meta.get("retimed", {}).get(workload, {})
        timed = [r for r in usable if r.id in retimed]
        if timed:
            return min(timed, key=lambda r: retimed[r.id])
        return usable[0] if usable else None

    def trials(self, workload: str) -> int:
        """Measured candidates behind this workload's records (a merged log keeps only the best record
        but remembers how many trials it came from)."""
        recorded = self._index().meta.get("trials", {}).get(workload, 0)
        return max(len(self.records(workload)), recorded)

    def workloads(self) -> dict[str, dict]:
        """workload hash -> spec JSON, for the workloads tuned through tvmlayers."""
        return dict(self._index().meta["workloads"])

    def all_records(self) -> dict[str, list[TuningRecord]]:
        return {h: [r for r in rs if r.target_key == self.key] for h, rs in self._index().records.items()}

    # ------------------------------------------------------------------------------------------ writing
    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Serializes writers of this log across processes (tuners, rejections, merges)."""
        return file_lock(self.directory / ".lock")

    def _write_file(self, name: str, text: str) -> None:
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.replace(self.directory / name)

    def _write_meta(self, meta: dict) -> None:
        self._write_file(META_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")

    def repair(self) -> int:
        """Move corrupt lines into ``<file>.corrupt`` so that MetaSchedule can open the database (it stops
        at the first bad line); records of a corrupt workload go too, and so do records refused by the
        allow-list (MetaSchedule would replay them as seeds of its search).  Returns how many lines moved."""
        with self.locked():
            workload_lines = _raw_lines(self.directory / WORKLOAD_FILE)
            record_lines = _raw_lines(self.directory / RECORD_FILE)
            keep_workloads, remap, bad = [], {}, []
            hashes: list[str | None] = []
            for index, (number, raw, value) in enumerate(workload_lines):
                if _is_workload_entry(value):
                    remap[index] = len(keep_workloads)
                    keep_workloads.append(raw)
                    hashes.append(value[0])
                else:
                    bad.append((WORKLOAD_FILE, number, raw, "not a [structural hash, module] line"))
                    hashes.append(None)
            keep_records = []
            for number, raw, value in record_lines:
                try:
                    _parse_record(value, hashes)  # a DisallowedRecord is a ValueError too
                except ValueError as err:
                    bad.append((RECORD_FILE, number, raw, str(err)))
                    continue
                keep_records.append(json.dumps([remap[value[0]], value[1]]))
            if not bad:
                return 0
            for name, number, raw, reason in bad:
                _warn_corrupt(self.directory / name, number, ValueError(f"moved to {name}.corrupt: {reason[:200]}"))
                with open(self.directory / f"{name}.corrupt", "a") as f:
                    f.write(raw + "\n")
            for name, lines in ((WORKLOAD_FILE, keep_workloads), (RECORD_FILE, keep_records)):
                tmp = self.directory / f".{name}.{os.getpid()}.tmp"
                tmp.write_text("".join(line + "\n" for line in lines))
                tmp.replace(self.directory / name)
            return len(bad)

    def add_workloads(self, specs: dict[str, KernelSpec], target: tvm.target.Target) -> None:
        with self.locked():
            meta = self.meta()
            meta.update(format=TUNING_LOG_VERSION, tvm_version=tvm.__version__, target=target_json(target))
            for shash, spec in specs.items():
                meta["workloads"][shash] = spec.to_json()
            self._write_meta(meta)

    def mark_baselines(self, baselines: dict[str, str], code: str) -> None:
        """Remember the record of each workload's default schedule (workload hash -> record id) and the
        fingerprint of the op and schedule code that made it."""
        with self.locked():
            meta = self.meta()
            meta.setdefault("baselines", {}).update(baselines)
            meta.setdefault("baseline_code", {}).update(dict.fromkeys(baselines, code))
            self._write_meta(meta)

    def set_retimed(self, workload: str, seconds: dict[str, float]) -> None:
        """Store the re-timed run time of some records of a workload (record id -> seconds)."""
        with self.locked():
            meta = self.meta()
            meta.setdefault("retimed", {})[workload] = seconds
            self._write_meta(meta)

    def import_records(
        self,
        workloads: dict[str, tuple[KernelSpec, tvm.tirx.PrimFunc]],
        records: list[tuple[str, list, float]],
        origin: str,
    ) -> set[str]:
        """Add records measured elsewhere (``records``: workload hash, trace, seconds; ``workloads``: each hash's
        spec and PrimFunc) as MetaSchedule would have filed them, their times as re-timed ones (measured one
        after the other with one protocol) and ``origin`` as where; returns the ids added (those already in
        the log are not added again).  Atomic: the record file, renamed into place last, is the commit; a crash
        before it leaves the records as they were (a workload line or times of records that never came are
        ignored by every reader)."""
        with self.locked():
            present = {record.id for record, _ in _records(self.directory)}
            hashes = _workload_hashes(self.directory)
            workload_lines = [line for _, line in _read_lines(self.directory / WORKLOAD_FILE)]
            record_lines = [line for _, line in _read_lines(self.directory / RECORD_FILE)]
            meta = self.meta()
            added: dict[str, float] = {}
            for shash, trace, seconds in records:
                rid = record_id(shash, trace)
                if rid in present or rid in added:
                    continue
                spec, func = workloads[shash]
                if shash not in hashes:
                    line = [str(part) for part in ms.database.Workload(_normalize_mod(func)).as_json()]
                    if line[0] != shash:
                        raise ValueError(f"{spec.describe()}: its workload hash is not {shash}")
                    hashes.append(shash)
                    workload_lines.append(json.dumps(line))
                args = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(func)]
                body = [trace, [seconds], target_json(spec.target), args]
                record_lines.append(json.dumps([hashes.index(shash), body]))
                meta["workloads"][shash] = spec.to_json()
                meta["retimed"].setdefault(shash, {})[rid] = seconds
                meta["origins"][rid] = origin
                added[rid] = seconds
            if added:
                meta.update(format=TUNING_LOG_VERSION, tvm_version=tvm.__version__, target=target_json(spec.target))
                self._write_file(WORKLOAD_FILE, "".join(line + "\n" for line in workload_lines))
                self._write_meta(meta)
                self._write_file(RECORD_FILE, "".join(line + "\n" for line in record_lines))  # the commit
            return set(added)

    def reject(self, record: TuningRecord, reason: str) -> None:
        """Mark a record that computed wrong results: lookups skip it from now on (in this process only
        where the log cannot be written, e.g. the shipped logs of a read-only install)."""
        self._rejected_here.setdefault(self.directory, set()).add(record.id)
        try:
            with self.locked():
                meta = self.meta()
                meta["rejected"][record.id] = reason
                self._write_meta(meta)
        except OSError as err:
            _warn(self.directory / META_FILE, 0, f"cannot mark record {record.id} rejected ({err}); skipped anyway")


_warned: set[tuple[str, int, str]] = set()
_warned_lock = threading.Lock()


def _warn(path: Path, line: int, message: str) -> None:
    """Warn about a line of a log once per process: logs are read again and again."""
    with _warned_lock:
        if (str(path), line, message) in _warned:
            return
        _warned.add((str(path), line, message))
    warnings.warn(f"{path}:{line}: {message}", stacklevel=4)


def _warn_corrupt(path: Path, line: int, err: Exception) -> None:
    _warn(path, line, f"skipping a corrupt tuning-log line ({type(err).__name__}: {str(err)[:300]})")


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of every non-empty line; an unreadable file is reported and has none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    except OSError as err:
        _warn_corrupt(path, 0, err)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def _load_line(path: Path, number: int, line: str) -> object:
    """The JSON value of a line, or None (reported) for a line too long, too deep or not JSON."""
    if len(line) > MAX_LINE_CHARS:
        _warn_corrupt(path, number, ValueError(f"a line of {len(line)} characters, over {MAX_LINE_CHARS}"))
        return None
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as err:
        _warn_corrupt(path, number, err if isinstance(err, ValueError) else ValueError("JSON nested too deeply"))
        return None


def _raw_lines(path: Path) -> list[tuple[int, str, object]]:
    """(1-based number, text, parsed JSON or None) of every non-empty line."""
    return [(number, line, _load_line(path, number, line)) for number, line in _read_lines(path)]


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed JSON or None) of every non-empty line; corrupt lines are reported."""
    for number, line in _read_lines(path):
        yield number, _load_line(path, number, line)


def merge_logs(sources: list[str | Path], destination: str | Path) -> dict[str, int]:
    """Merge log roots into ``destination``, keeping the best record per workload and target.

    Best in each log is what :meth:`TuningLog.best` picks (never a rejected record; re-timed times
    first); across logs, re-timed records come before those with MetaSchedule's times only, then the
    fastest wins.  The destination's own records take part too; each target directory is rewritten
    atomically (temporary files, then rename) under its lock.  Returns {target key: workloads written}.
    """
    destination = Path(destination)
    roots = [*map(Path, sources), destination]
    keys = sorted({d.name for root in roots if root.is_dir() for d in root.iterdir() if (d / RECORD_FILE).exists()})
    written = {}
    for key in keys:
        workloads: dict[str, str] = {}  # hash -> MetaSchedule workload line
        best: dict[str, tuple[float, bool, list]] = {}  # hash -> (seconds, re-timed?, record body)
        meta = {"format": TUNING_LOG_VERSION, "workloads": {}, "rejected": {}, "trials": {}, "retimed": {}}
        for directory in [root / key for root in roots if (root / key / RECORD_FILE).exists()]:
            entries = {e[0]: e for _, e in _json_lines(directory / WORKLOAD_FILE) if _is_workload_entry(e)}
            bodies: dict[str, list] = {}  # record id -> record body
            # only well-formed records that pass the allow-list are ever copied; the others are reported
            for record, body in _records(directory):
                if record.target_key != key:
                    continue
                shash = record.workload_hash
                workloads[shash] = json.dumps(entries[shash])
                meta["trials"][shash] = meta["trials"].get(shash, 0) + 1
                bodies[record.id] = body
            log = TuningLog(directory)
            source_meta = log.meta()
            for shash in log.all_records():
                record = log.best(shash)
                if record is None:
                    continue
                retimed = source_meta.get("retimed", {}).get(shash, {})
                seconds = retimed.get(record.id, record.seconds)
                # re-timed records compare with each other; MetaSchedule's own times only break no tie
                rank = (record.id not in retimed, seconds)
                if shash not in best or rank < (not best[shash][1], best[shash][0]):
                    best[shash] = (seconds, record.id in retimed, bodies[record.id])
            for field in ("workloads", "rejected"):
                meta[field].update(source_meta[field])
            for shash, count in source_meta.get("trials", {}).items():
                # a merged log remembers the trials behind its best records
                meta["trials"][shash] = max(meta["trials"].get(shash, 0), count)
            meta.update({k: v for k, v in source_meta.items() if k in ("target", "tvm_version")})
        order = sorted(best)
        for shash in order:
            seconds, retimed, body = best[shash]
            if retimed:
                meta["retimed"][shash] = {record_id(shash, body[0]): seconds}
        target_dir = destination / key
        make_private_dirs(target_dir)
        staged = {
            WORKLOAD_FILE: "".join(workloads[h] + "\n" for h in order),
            RECORD_FILE: "".join(json.dumps([i, best[h][2]]) + "\n" for i, h in enumerate(order)),
            META_FILE: json.dumps(meta, indent=1, sort_keys=True) + "\n",
        }
        with TuningLog(target_dir).locked():
            for name, text in staged.items():
                tmp = target_dir / f".{name}.{os.getpid()}.tmp"
                tmp.write_text(text)
                tmp.replace(target_dir / name)
        written[key] = len(order)
    return written

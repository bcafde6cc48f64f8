"""Tuning logs: one MetaSchedule JSON database per target, indexed once per process.

Directory layout (format version ``TUNING_LOG_VERSION``; see also :mod:`tvmlayers.formats`)::

    <log root>/<target key>/              target key: tvmlayers.targets.target_key, e.g.
                                          llvm-x86_64-linux-gnu-icelake-server
        database_workload.json            MetaSchedule: one line per workload [shash, base64 module]
        database_tuning_record.json       MetaSchedule: one line per measured candidate
                                          [workload index, [trace, run seconds, target, arg info]]
        tvmlayers.json                    ours: {"format", "tvm_version", "target", "workloads":
                                          {shash: spec JSON}, "rejected": {record id: reason}}

MetaSchedule's database does not key records by target, so tvmlayers keeps one directory per target
and also checks every record's own target before applying it.  Log roots are searched in order:
``log_dir=``/``TVMLAYERS_TUNING_LOGS`` (user), then the ``tuning_logs/`` shipped with the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from ..formats import TUNING_LOG_VERSION, canonical_json
from ..locks import file_lock
from ..private_dirs import make_private_dirs
from ..spec import KernelSpec
from ..targets import target_json, target_key

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "tvmlayers.json"


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
    return target_key(tvm.target.Target(json.loads(target_text)))


@dataclass(frozen=True)
class TuningRecord:
    directory: Path
    line: int  # 1-based line in database_tuning_record.json
    workload_hash: str
    trace: list
    seconds: float  # mean measured run time
    target_key: str

    @property
    def id(self) -> str:
        """Stable across copies and merges of the log: what the record is, not where it is."""
        return record_id(self.workload_hash, self.trace)

    def provenance(self) -> dict:
        return {
            "source": "tuned",
            "record": self.id,
            "log": str(self.directory / RECORD_FILE),
            "line": self.line,
            "tuned_us": round(self.seconds * 1e6, 3),
        }


@dataclass
class _Index:
    stamp: tuple
    records: dict[str, list[TuningRecord]]  # workload hash -> records, fastest first
    meta: dict


class TuningLog:
    """The tuning log of one target in one log root."""

    _indexes: dict[Path, _Index] = {}
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

    def _index(self) -> _Index:
        """Parsed once per process; parsed again only when one of the files changed."""
        stamp = self._stamp()
        with self._lock:
            index = self._indexes.get(self.directory)
            if index is None or index.stamp != stamp:
                index = self._indexes[self.directory] = _Index(stamp, *self._parse())
            return index

    def _parse(self) -> tuple[dict[str, list[TuningRecord]], dict]:
        # a record names its workload by position in the workload file, corrupt lines included
        hashes = [entry[0] if entry is not None else None for _, entry in _json_lines(self.directory / WORKLOAD_FILE)]
        records: dict[str, list[TuningRecord]] = {}
        for line, entry in _json_lines(self.directory / RECORD_FILE):
            if entry is None:
                continue
            try:
                workload, (trace, run_secs, target, _) = entry
                if hashes[workload] is None:
                    raise ValueError(f"its workload (line {workload + 1} of {WORKLOAD_FILE}) is corrupt")
                seconds = sum(float(s) for s in run_secs) / len(run_secs)
                record = TuningRecord(
                    self.directory, line, hashes[workload], trace, seconds, _record_target_key(canonical_json(target))
                )
            except (ValueError, TypeError, IndexError, ZeroDivisionError, tvm.error.TVMError) as err:
                _warn_corrupt(self.directory / RECORD_FILE, line, err)
                continue
            records.setdefault(record.workload_hash, []).append(record)
        for group in records.values():
            group.sort(key=lambda r: r.seconds)
        return records, self.meta()

    def meta(self) -> dict:
        try:
            meta = json.loads((self.directory / META_FILE).read_text())
        except FileNotFoundError:
            meta = {}
        except ValueError as err:
            _warn_corrupt(self.directory / META_FILE, 1, err)
            meta = {}
        meta.setdefault("format", TUNING_LOG_VERSION)
        meta.setdefault("workloads", {})
        meta.setdefault("rejected", {})
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
        usable = [r for r in self.records(workload) if r.id not in meta["rejected"]]
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

    def _write_meta(self, meta: dict) -> None:
        tmp = self.directory / f".{META_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.directory / META_FILE)

    def repair(self) -> int:
        """Move corrupt lines into ``<file>.corrupt`` so that MetaSchedule can open the database (it stops
        at the first bad line); records of a corrupt workload go too.  Returns how many lines moved."""
        with self.locked():
            workload_lines = _raw_lines(self.directory / WORKLOAD_FILE)
            record_lines = _raw_lines(self.directory / RECORD_FILE)
            keep_workloads, remap, bad = [], {}, []
            for index, (number, raw, value) in enumerate(workload_lines):
                if isinstance(value, list) and len(value) == 2:
                    remap[index] = len(keep_workloads)
                    keep_workloads.append(raw)
                else:
                    bad.append((WORKLOAD_FILE, number, raw))
            keep_records = []
            for number, raw, value in record_lines:
                if isinstance(value, list) and len(value) == 2 and remap.get(value[0]) is not None:
                    keep_records.append(json.dumps([remap[value[0]], value[1]]))
                else:
                    bad.append((RECORD_FILE, number, raw))
            if not bad:
                return 0
            for name, number, raw in bad:
                _warn_corrupt(self.directory / name, number, ValueError("moved to " + name + ".corrupt"))
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

    def reject(self, record: TuningRecord, reason: str) -> None:
        """Mark a record that computed wrong results: lookups skip it from now on."""
        with self.locked():
            meta = self.meta()
            meta["rejected"][record.id] = reason
            self._write_meta(meta)


def _warn_corrupt(path: Path, line: int, err: Exception) -> None:
    warnings.warn(f"{path}:{line}: skipping a corrupt tuning-log line ({type(err).__name__}: {err})", stacklevel=3)


def _raw_lines(path: Path) -> list[tuple[int, str, object]]:
    """(1-based number, text, parsed JSON or None) of every non-empty line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError:
                value = None
            lines.append((number, line, value))
    return lines


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed JSON or None) of every non-empty line; corrupt lines are reported."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError as err:
                _warn_corrupt(path, number, err)
                value = None
            yield number, value


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
            lines = [e for _, e in _json_lines(directory / WORKLOAD_FILE)]
            bodies: dict[str, list] = {}  # record id -> record body
            for _, entry in _json_lines(directory / RECORD_FILE):
                try:
                    index, body = entry
                    shash = lines[index][0]
                except (TypeError, ValueError, IndexError) as err:
                    _warn_corrupt(directory / RECORD_FILE, 0, err)
                    continue
                workloads[shash] = json.dumps(lines[index])
                meta["trials"][shash] = meta["trials"].get(shash, 0) + 1
                bodies[record_id(shash, body[0])] = body
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

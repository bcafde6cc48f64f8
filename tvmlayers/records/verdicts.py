"""What this machine decided about records of other CPUs and re-fitted neighbours: ``travel.json``.

One small JSON file next to the records of this target in the user's log root (format ``TRAVEL_FORMAT``,
documented in :mod:`tvmlayers.formats`), so that a candidate is compiled, checked and timed once per machine
and later processes pay nothing.  It is rewritten atomically (a temporary file, then a rename) under the
log's lock; a malformed file or entry is reported once per process and ignored, never failing a call.  A
verdict holds for the op/schedule code and TVM version it was made with (the default it was timed against
changes with them); under other code it is stale and the candidate is tried again.  The re-fitted trace of
a neighbour is a record like any other: it passes the allow-list before it is used.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import tvm

from ..fingerprint import code_fingerprint
from ..formats import TRAVEL_FORMAT
from ..targets import target_key
from .database import TuningLog, TuningRecord, tune_log_root
from .record_check import trace_problem

TRAVEL_FILE = "travel.json"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one candidate for one workload on this machine."""

    candidate: str  # "adopt:<source log key>:<record id>" or "neighbour:<source log key>:<record id>"
    adopted: bool
    source_cpu: str  # the CPU the source record was tuned on, e.g. emeraldrapids
    workload: str  # the workload it serves here, described (for `tvmlayers logs ls`)
    speedup: float  # the default's time over the candidate's, here; 0.0 when it was not timed
    reason: str  # why it was declined; "" when adopted
    code: str  # the op/schedule code fingerprint and TVM version it was decided under
    neighbour: str = ""  # a neighbour: the tuned workload it was re-fitted from, described
    trace: list | None = None  # a neighbour that won: its trace re-fitted to this workload

    @property
    def kind(self) -> str:
        return self.candidate.split(":", 1)[0]

    def declined(self, reason: str) -> Verdict:
        return replace(self, adopted=False, reason=reason, trace=None)

    def summary(self) -> str:
        """What a kernel's ``schedule`` says about it."""
        if self.kind == "adopt":
            return f"tuned on {self.source_cpu}, adopted here, {self.speedup:.2f}x over the default"
        return f"re-fitted from {self.neighbour} (tuned on {self.source_cpu}), {self.speedup:.2f}x over the default"


_TYPES = {"candidate": str, "adopted": bool, "source_cpu": str, "workload": str, "reason": str, "code": str}


def _parse(entry: object) -> Verdict:
    """A verdict from its JSON; ValueError saying what is wrong with a malformed one."""
    if not isinstance(entry, dict) or set(entry) - {f.name for f in fields(Verdict)}:
        raise ValueError("not an object of verdict fields")
    for name, kind in _TYPES.items():
        if type(entry.get(name)) is not kind:
            raise ValueError(f"field {name!r} is not a {kind.__name__}")
    speedup = entry.get("speedup")
    if type(speedup) not in (int, float) or not math.isfinite(speedup) or speedup < 0:
        raise ValueError("field 'speedup' is not a non-negative number")
    if not isinstance(entry.get("neighbour", ""), str) or entry["candidate"].split(":")[0] not in (
        "adopt",
        "neighbour",
    ):
        raise ValueError("not an adoption or neighbour verdict")
    trace = entry.get("trace")
    if entry["adopted"] and entry["candidate"].startswith("neighbour:") and trace is None:
        raise ValueError("an adopted neighbour without its re-fitted trace")
    if trace is not None and (refused := trace_problem(trace)) is not None:
        raise ValueError(f"its trace is refused by the allow-list of tuning-record instructions: {refused}")
    return Verdict(**{**entry, "speedup": float(speedup)})


def code_version() -> str:
    """What a verdict holds for: the op and schedule code, and TVM."""
    return f"{code_fingerprint()}/tvm-{tvm.__version__}"


class Verdicts:
    """The verdicts of one target in the user's log root."""

    _parsed: dict[Path, tuple[tuple, dict[str, dict[str, Verdict]]]] = {}  # file -> (stamp, verdicts)
    _here: dict[Path, dict[str, dict[str, Verdict]]] = {}  # decided in this process but not written (read-only)
    _reported: set[tuple[str, str]] = set()
    _lock = threading.Lock()

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / TRAVEL_FILE

    @classmethod
    def for_target(cls, target: tvm.target.Target, log_dir: str | Path | None = None) -> Verdicts:
        return cls(tune_log_root(log_dir) / target_key(target))

    def _stamp(self) -> tuple:
        try:
            st = self.path.stat()
        except OSError:
            return ()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _report(self, message: str) -> None:
        with self._lock:
            if (str(self.path), message) in self._reported:
                return
            self._reported.add((str(self.path), message))
        warnings.warn(f"tvmlayers: {self.path}: {message}; ignored", stacklevel=4)

    def _read(self) -> dict[str, dict[str, Verdict]]:
        """workload hash -> candidate -> verdict, every well-formed entry of the file (any code version)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as err:
            self._report(f"unreadable adoption file ({type(err).__name__}: {str(err)[:200]})")
            return {}
        if (
            not isinstance(data, dict)
            or data.get("format") != TRAVEL_FORMAT
            or not isinstance(data.get("verdicts"), dict)
        ):
            self._report(f"not a format-{TRAVEL_FORMAT} adoption file")
            return {}
        verdicts: dict[str, dict[str, Verdict]] = {}
        for workload, entries in data["verdicts"].items():
            for candidate, entry in entries.items() if isinstance(entries, dict) else [("?", entries)]:
                try:
                    verdict = _parse(entry)
                    if verdict.candidate != candidate:
                        raise ValueError(f"filed under {candidate[:80]!r} but is {verdict.candidate[:80]!r}")
                except ValueError as err:
                    self._report(f"corrupt adoption entry for workload {workload[:40]} ({err})")
                    continue
                verdicts.setdefault(workload, {})[candidate] = verdict
        return verdicts

    def all(self) -> dict[str, dict[str, Verdict]]:
        """Every verdict of the current code: workload hash -> candidate -> verdict (parsed once per change)."""
        stamp = self._stamp()
        with self._lock:
            cached = self._parsed.get(self.path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._read())
            with self._lock:
                self._parsed[self.path] = cached
        code = code_version()
        current = {w: {c: v for c, v in vs.items() if v.code == code} for w, vs in cached[1].items()}
        for workload, verdicts in self._here.get(self.path, {}).items():
            current.setdefault(workload, {}).update(verdicts)
        return current

    def get(self, workload: str, candidate: str) -> Verdict | None:
        return self.all().get(workload, {}).get(candidate)

    def put(self, workload: str, verdict: Verdict) -> None:
        """Remember ``verdict`` for ``workload``: written into the file, or for this process only where the log
        root cannot be written (said once)."""
        try:
            with TuningLog(self.directory).locked():
                verdicts = self._read()  # the file as it is now: another process may have added verdicts
                verdicts.setdefault(workload, {})[verdict.candidate] = verdict
                data = {
                    "format": TRAVEL_FORMAT,
                    "target": self.directory.name,
                    "verdicts": {w: {c: _as_json(v) for c, v in vs.items()} for w, vs in sorted(verdicts.items())},
                }
                tmp = self.directory / f".{TRAVEL_FILE}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
                tmp.replace(self.path)
        except OSError as err:
            self._report(f"cannot remember a verdict ({err}); it holds for this process only")
            with self._lock:
                self._here.setdefault(self.path, {}).setdefault(workload, {})[verdict.candidate] = verdict

    def reject(self, record: TuningRecord, reason: str) -> None:
        """A borrowed record that failed when its kernel was built: declined from now on (what
        :meth:`TuningLog.reject` is for a log's own records)."""
        if isinstance(record, BorrowedRecord):
            self.put(record.workload_hash, record.verdict.declined(reason))


def _as_json(verdict: Verdict) -> dict:
    return {k: v for k, v in asdict(verdict).items() if v is not None}


@dataclass(frozen=True)
class BorrowedRecord(TuningRecord):
    """A record that serves a workload it was not tuned for here (another CPU's, or a neighbour's re-fitted
    trace), with the verdict that allows it."""

    verdict: Verdict | None = None

    def provenance(self) -> dict:
        return {
            "source": "adopted" if self.verdict.kind == "adopt" else "neighbour",
            "record": self.id,
            "from": self.verdict.candidate,
            "speedup": self.verdict.speedup,
            "summary": self.verdict.summary(),
        }

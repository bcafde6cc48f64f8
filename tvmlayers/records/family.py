"""Target families: the CPUs whose tuning records serve one another.

A record is a schedule, not machine code: replayed on this target's PrimFunc and compiled by LLVM for this
CPU, it runs anywhere the schedule's vector width fits.  So CPUs of one family (the same kind and triple
and the same vector ISA as the CPU schedule rules see it, :class:`~tvmlayers.schedules.cpu.CpuConfig`)
share records: an Emerald Rapids record is a candidate on an AMD znver4 (both AVX-512), never on a Haswell
(AVX2).  Whether it is worth using there is measured (:mod:`tvmlayers.records.travel`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import tvm

from ..schedules.cpu import cpu_config, is_simd_cpu
from ..targets import target_key
from .database import META_FILE, RECORD_FILE, TuningLog, log_roots

# (CpuConfig.isa, vector bits) -> the family's vector ISA; 256-bit x86 is AVX (the CPU rules treat AVX and
# AVX2 alike: one width, 16 registers)
VECTOR_ISAS = {
    ("x86", 512): "avx512",
    ("x86", 256): "avx2",
    ("x86", 128): "sse",
    ("aarch64", 128): "neon-a64",
    ("arm", 128): "neon-a32",
}


def family_key(target: tvm.target.Target) -> str | None:
    """``kind-triple-ISA``, e.g. ``llvm-x86_64-linux-gnu-avx512``; None for a target without a family (not a
    SIMD CPU the CPU rules serve: its records serve only itself)."""
    if not is_simd_cpu(target):
        return None
    config = cpu_config(target)
    isa = VECTOR_ISAS.get((config.isa, config.vector_bits), f"{config.isa}{config.vector_bits}")
    return f"{target.kind.name}-{target.attrs['mtriple']}-{isa}"


def log_target(log: TuningLog) -> tvm.target.Target | None:
    """The target a log was tuned for (its ``tvmlayers.json``), None when that is missing or malformed."""
    return _log_target(log.directory, _mtime(log.directory / META_FILE))


def log_family(log: TuningLog) -> str | None:
    target = log_target(log)
    return family_key(target) if target is not None and target_key(target) == log.key else None


def log_cpu(log: TuningLog) -> str:
    """The CPU a log was tuned on, in one word (LLVM's name, e.g. ``emeraldrapids``), else its key."""
    target = log_target(log)
    cpu = str(target.attrs.get("mcpu", "")) if target is not None else ""
    return cpu or log.key


def family_logs(target: tvm.target.Target, log_dir: str | Path | None = None) -> list[TuningLog]:
    """The logs of the other CPUs of ``target``'s family, the user's first, then the shipped ones."""
    family = family_key(target)
    if family is None:
        return []
    own = target_key(target)
    logs = []
    for root in log_roots(log_dir):
        for directory in sorted(root.iterdir()) if root.is_dir() else []:
            if directory.name != own and (directory / RECORD_FILE).is_file():
                log = TuningLog(directory)
                if log_family(log) == family:
                    logs.append(log)
    return logs


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@lru_cache(maxsize=64)
def _log_target(directory: Path, stamp: int | None) -> tvm.target.Target | None:
    del stamp  # part of the cache key only: a rewritten tvmlayers.json is read again
    try:
        return tvm.target.Target(TuningLog(directory).meta()["target"])
    except Exception:  # noqa: BLE001 - a missing or malformed target (TVM raises its own types): no family
        return None

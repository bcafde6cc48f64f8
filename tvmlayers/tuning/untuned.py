"""The workload file of layer calls that ran without a tuning record, one per target, kept in the kernel
cache directory so that ``tvmlayers tune <that file>`` tunes exactly what the user ran."""

from __future__ import annotations

import fcntl
from pathlib import Path

from ..spec import KernelSpec
from ..targets import target_key
from .workloads import Workload, format_workloads, load_workloads


def note_untuned(spec: KernelSpec, cache_root: Path) -> Path:
    """Add ``spec`` to ``<cache>/untuned/<target key>.toml`` (once); returns the file's path."""
    path = cache_root / "untuned" / f"{target_key(spec.target)}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        workloads = load_workloads(path)[0] if path.exists() else []
        workload = Workload.from_spec(spec)
        if workload not in workloads:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(format_workloads([*workloads, workload], name="untuned", target=spec.target_str))
            tmp.replace(path)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return path

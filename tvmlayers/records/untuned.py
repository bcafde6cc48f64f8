"""The workload file of layer calls that ran without a tuning record, one per target, kept in the kernel
cache directory so that ``tvmlayers tune <that file>`` tunes exactly what the user ran.

Best effort: the list is a convenience, so a call never fails for it.  A cache the user cannot write (a
read-only, pre-built one) or a list the user broke while editing it is reported once per process and
otherwise ignored; a broken list is left as it is, never overwritten, so the user's edits are not lost.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..locks import file_lock
from ..spec import KernelSpec
from ..targets import target_key
from ..workloads import Workload, format_workloads, load_workloads

_reported: set[Path] = set()  # lists already said to be unusable by this process


def note_untuned(spec: KernelSpec, cache_root: Path) -> Path | None:
    """Add ``spec`` to ``<cache>/untuned/<target key>.toml`` (once); returns the file's path, or None when
    the list could not be read or written (warned once per file)."""
    path = cache_root / "untuned" / f"{target_key(spec.target)}.toml"
    workload = Workload.from_spec(spec)
    try:
        # the list is only ever replaced whole, so it can be read without the lock: a layer listed already
        # needs no write (and so no warning in a read-only cache)
        if path.exists() and workload in load_workloads(path)[0]:
            return path
        with file_lock(path.with_suffix(".lock")):
            workloads = load_workloads(path)[0] if path.exists() else []
            if workload not in workloads:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(format_workloads([*workloads, workload], name="untuned", target=spec.target_str))
                tmp.replace(path)
    except (OSError, ValueError, TypeError) as err:  # an unwritable folder; a malformed file (load_workloads)
        if path not in _reported:
            _reported.add(path)
            kept = "" if isinstance(err, OSError) else "; it is left as it is: fix it or remove it"
            warnings.warn(
                f"tvmlayers: could not add {spec.describe()} to the list of untuned layers {path}: {err}{kept}",
                stacklevel=6,
            )
        return None
    return path

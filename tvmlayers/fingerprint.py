"""The code fingerprint: a hash of the op definitions and schedules.

Kernel cache keys, tuning baselines and travel verdicts carry it, so editing an op or a schedule never
reuses a binary, a baseline or a verdict made with the old code.  It sits below the build and the record
store, which both need it.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from . import ops, schedules


@cache
def code_fingerprint() -> str:
    """Hash of the op definitions and schedules: editing either must never reuse an old binary."""
    digest = hashlib.sha256()
    for package in (ops, schedules):
        root = Path(package.__file__).parent
        for source in sorted(root.rglob("*.py")):
            digest.update(source.relative_to(root).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]

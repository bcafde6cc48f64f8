"""Folders handed to other machines (bundles, runtime packs, candidates, GPU payloads), published whole.

Each is built in a temporary folder beside its destination and renamed into place only when complete: a reader
(a copy to a board, a second process) sees the old folder or the whole new one, and an error or Ctrl-C leaves
nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def published_folder(out: Path) -> Iterator[Path]:
    """A new empty folder to fill; when the block ends without an exception it replaces ``out`` (created with
    its parents if missing), readable by others: ``mkdtemp``'s 0700 would keep it from the user who copies it
    to a device."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

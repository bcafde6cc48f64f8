"""The one inter-process lock every on-disk store uses: an exclusive ``flock`` on a lock file."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder, if missing) for the ``with`` body.

    Waits for another holder, or with ``busy`` does not wait and raises ``RuntimeError(busy)`` instead.
    The kernel dies with its holder, so a crashed process never leaves a store locked.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy is not None else 0))
        except BlockingIOError:
            raise RuntimeError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

"""The one inter-process lock every on-disk store uses: an exclusive ``flock`` on a lock file."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from .private_dirs import make_private_dirs


@contextlib.contextmanager
def file_lock(path: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folders, mode 0700, if missing) for the ``with`` body.

    Waits for another holder, or with ``busy`` does not wait and raises ``RuntimeError(busy)`` instead.
    The kernel dies with its holder, so a crashed process never leaves a store locked.
    """
    make_private_dirs(path.parent)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy is not None else 0))
        except BlockingIOError:
            raise RuntimeError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

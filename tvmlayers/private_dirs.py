"""The ownership and permission policy of tvmlayers' on-disk stores.

Loading a ``kernel.so`` runs its code (its constructors run inside ``dlopen``), so a kernel may only be
loaded from where no one but the user could have put it: like ssh with its keys, every folder and file
on the way is checked to be the user's (or root's) and not writable by group or others, and whatever is
not is refused with a message that says what is wrong, why it matters and how to fix it.  Folders that
tvmlayers creates (kernel cache, lock folders, tuning logs) are created mode 0700; folders that already
exist are never chmod-ed behind the user's back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# root owns system-wide installs (e.g. a pre-built read-only cache) and can replace anything anyway
_TRUSTED_UIDS = frozenset({0})
_SYMLINK = "is a symbolic link (tvmlayers never creates one there)"


class UntrustedPathError(PermissionError):
    """A path that someone other than the user could have written, so nothing is loaded from it."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        self.path = path
        super().__init__(
            f"tvmlayers: refusing to load kernels from {path}: it {problem}. A kernel library runs code when it "
            f"is loaded, so anyone who can write there could make tvmlayers run their code as you. Fix: {fix}, "
            "or point TVMLAYERS_CACHE_DIR at a private folder (tvmlayers creates its folders with mode 0700)."
        )


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and whichever of its parents are missing with mode 0700 (the umask can only narrow it);
    folders that exist already keep their mode."""
    missing = []
    current = Path(path)
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile
            os.mkdir(folder, 0o700)


def check_private(path: Path, st: os.stat_result | None = None) -> os.stat_result:
    """Raise :class:`UntrustedPathError` unless ``path`` (``st``: its ``lstat``/``fstat``, taken here when
    None) is a real file or folder, owned by the user or root, and not writable by group or others.

    Missing paths raise ``FileNotFoundError`` as ``os.lstat`` does.
    """
    if st is None:
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedPathError(path, _SYMLINK, f"rm {path}")
    me = os.geteuid()
    if st.st_uid != me and st.st_uid not in _TRUSTED_UIDS:
        raise UntrustedPathError(
            path,
            f"is owned by uid {st.st_uid}, not by you (uid {me})",
            f"remove it (`rm -r {path}`: tvmlayers rebuilds what it needs), or `chown -R {me} {path}` if it is yours",
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        if st.st_mode & stat.S_ISVTX:  # a shared folder such as /tmp: its mode is not the user's to change
            fix = f"use a folder of your own inside it (`mkdir -m 700 {path}/<name>`)"
        else:
            fix = f"`{'chmod 700' if stat.S_ISDIR(st.st_mode) else 'chmod go-w'} {path}`"
        raise UntrustedPathError(path, f"is writable by group or others (mode {mode:04o})", fix)
    return st


@contextlib.contextmanager
def open_private(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading without following a symbolic link, checked by :func:`check_private` on
    the opened file itself (so a file swapped after a check is never the one read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UntrustedPathError(path, _SYMLINK, f"rm {path}") from None
        raise
    with os.fdopen(fd, "rb") as f:
        check_private(path, os.fstat(fd))
        yield f

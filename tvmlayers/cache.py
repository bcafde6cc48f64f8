"""The on-disk kernel cache: one directory per kernel key, published atomically, verified on every load.

Layout and manifest format: see :mod:`tvmlayers.formats`.  Concurrency: an entry only ever appears by
``rename`` of a fully written temporary directory, so readers never see half an entry; builders of the
same key serialize on an ``flock`` so the kernel is compiled once; a corrupt entry is moved aside (again
by rename) before it is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .formats import KERNEL_CACHE_VERSION
from .locks import file_lock

SO_NAME = "kernel.so"
MANIFEST_NAME = "manifest.json"


def default_cache_dir() -> Path:
    if os.environ.get("TVMLAYERS_CACHE_DIR"):
        return Path(os.environ["TVMLAYERS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tvmlayers"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    key: str
    directory: Path
    manifest: dict

    @property
    def so_path(self) -> Path:
        return self.directory / SO_NAME


class KernelCache:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    @property
    def kernels_dir(self) -> Path:
        return self.root / "kernels" / f"v{KERNEL_CACHE_VERSION}"

    def entry_dir(self, key: str) -> Path:
        return self.kernels_dir / key[:2] / key

    # ---------------------------------------------------------------------------------------- reading
    def _verified(self, directory: Path) -> CacheEntry | None:
        """The entry if its manifest parses and its library matches the recorded size and hash."""
        try:
            manifest = json.loads((directory / MANIFEST_NAME).read_text())
            so = directory / SO_NAME
            if (
                manifest.get("format") == KERNEL_CACHE_VERSION
                and manifest.get("key") == directory.name
                and so.stat().st_size == manifest["so_size"]
                and _sha256(so) == manifest["so_sha256"]
            ):
                return CacheEntry(directory.name, directory, manifest)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return None

    def load(self, key: str) -> CacheEntry | None:
        """A verified entry, or None; a corrupt entry is moved out of the way so that it gets rebuilt."""
        directory = self.entry_dir(key)
        if not directory.exists():
            return None
        entry = self._verified(directory)
        if entry is None:
            self._discard(directory)
        return entry

    def entries(self) -> list[CacheEntry]:
        found = []
        for directory in sorted(self.kernels_dir.glob("??/*")):
            if not directory.name.startswith("."):
                entry = self._verified(directory)
                if entry is not None:
                    found.append(entry)
        return found

    # ---------------------------------------------------------------------------------------- writing
    def _lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root / "locks" / f"{key}.lock")

    def _discard(self, directory: Path) -> None:
        trash = directory.with_name(f".trash-{directory.name}-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(directory, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def get_or_build(self, key: str, build: Callable[[Path], dict]) -> tuple[CacheEntry, bool]:
        """The entry for ``key``, built by ``build(so_path) -> manifest fields`` if missing or corrupt.

        Returns (entry, built_here).
        """
        entry = self.load(key)
        if entry is not None:
            return entry, False
        with self._lock(key):
            entry = self.load(key)  # another process may have built it while we waited
            if entry is not None:
                return entry, False
            final = self.entry_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = final.with_name(f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex}")
            staging.mkdir()
            try:
                so = staging / SO_NAME
                manifest = dict(build(so))
                manifest.update(
                    format=KERNEL_CACHE_VERSION,
                    key=key,
                    created=time.time(),
                    so_size=so.stat().st_size,
                    so_sha256=_sha256(so),
                )
                with open(staging / MANIFEST_NAME, "w") as f:
                    json.dump(manifest, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return CacheEntry(key, final, manifest), True

    def clear(self) -> int:
        """Remove every entry (and leftovers of interrupted builds); returns how many kernels went."""
        count = len(self.entries())
        if self.kernels_dir.exists():
            self._discard(self.kernels_dir)
        return count

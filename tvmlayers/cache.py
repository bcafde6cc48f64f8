"""The on-disk kernel cache: one directory per kernel key, published atomically, verified on every load.

Layout and manifest format: see :mod:`tvmlayers.formats`.  Concurrency: an entry only ever appears by
``rename`` of a fully written temporary directory, so readers never see half an entry; builders of the
same key serialize on an ``flock`` so the kernel is compiled once; a corrupt entry is moved aside (again
by rename) before it is rebuilt, and the staging or trash folders a killed builder left behind are removed
by the next builder of that key.  Trust: nothing is read from a folder or file that someone other than the
user could have written (:mod:`tvmlayers.private_dirs`); such a cache raises ``UntrustedPathError``.
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
from typing import BinaryIO

from .formats import KERNEL_CACHE_VERSION, canonical_json
from .locks import file_lock
from .private_dirs import UntrustedPathError, check_private, make_private_dirs, open_private

SO_NAME = "kernel.so"
MANIFEST_NAME = "manifest.json"


def default_cache_dir() -> Path:
    if os.environ.get("TVMLAYERS_CACHE_DIR"):
        return Path(os.environ["TVMLAYERS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tvmlayers"


def _sha256(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


def _shape_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(shape, list) and all(isinstance(d, int) for d in shape) for shape in value
    )


# what the loader (tvmlayers.kernel.Kernel.load, `tvmlayers cache ls`) reads from a manifest, and its type
_MANIFEST_FIELDS = {
    "format": int,
    "key": str,
    "spec": dict,
    "layout": dict,
    "provenance": dict,
    "symbol": str,
    "output_shapes": list,
    "so_size": int,
    "so_sha256": str,
}
_SPEC_FIELDS = ("op", "params", "input_shape", "dtype", "target")


def _manifest_ok(manifest: object, key: str, expect: dict | None) -> bool:
    """Whether ``manifest`` has every field the loader needs, with its type, belongs to ``key`` and, when
    ``expect`` is given, holds exactly those values (the requested spec and layout)."""
    if not isinstance(manifest, dict):
        return False
    if not all(isinstance(manifest.get(name), kind) for name, kind in _MANIFEST_FIELDS.items()):
        return False
    if not (_shape_list(manifest["output_shapes"]) and isinstance(manifest["provenance"].get("source"), str)):
        return False
    if not all(name in manifest["spec"] for name in _SPEC_FIELDS):
        return False
    if manifest["format"] != KERNEL_CACHE_VERSION or manifest["key"] != key:
        return False
    # canonical JSON: the manifest went through JSON (lists), the requested values may hold tuples
    return all(canonical_json(manifest.get(name)) == canonical_json(value) for name, value in (expect or {}).items())


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
    def _check_folders(self, *inside: Path) -> bool:
        """Check the cache root (followed if it is a link: the user may keep the cache elsewhere), then each
        of ``inside`` (never followed), outermost first; False when one is missing, so there is nothing to
        load.  Raises ``UntrustedPathError`` for one that someone else could have written."""
        try:
            check_private(self.root, os.stat(self.root))
            for folder in inside:
                check_private(folder)
        except FileNotFoundError:
            return False
        return True

    def _verified(self, directory: Path, expect: dict | None = None) -> CacheEntry | None:
        """The entry if its manifest is complete (and matches ``expect``) and its library matches the
        recorded size and hash; None if not.  Its folders have been checked, root first, so no one else can
        swap the files between these checks and the ``dlopen``; the files are checked here, as opened."""
        try:
            with open_private(directory / MANIFEST_NAME) as f:
                manifest = json.loads(f.read())
            with open_private(directory / SO_NAME) as f:
                so_size, so_sha256 = os.fstat(f.fileno()).st_size, _sha256(f)
        except UntrustedPathError:
            raise
        except (OSError, ValueError):
            return None
        if _manifest_ok(manifest, directory.name, expect) and (so_size, so_sha256) == (
            manifest["so_size"],
            manifest["so_sha256"],
        ):
            return CacheEntry(directory.name, directory, manifest)
        return None

    def load(self, key: str, expect: dict | None = None) -> CacheEntry | None:
        """A verified entry, or None; a corrupt entry is moved out of the way so that it gets rebuilt.

        ``expect``: manifest fields the entry must hold exactly (the requested ``spec`` and ``layout``),
        so that an entry made for anything else is never loaded under this key.
        """
        directory = self.entry_dir(key)
        if not self._check_folders(self.root / "kernels", self.kernels_dir, directory.parent, directory):
            return None
        entry = self._verified(directory, expect)
        if entry is None:
            self._discard(directory)
        return entry

    def entries(self) -> list[CacheEntry]:
        """Every verified entry; raises ``UntrustedPathError`` as :meth:`load` does."""
        if not self._check_folders(self.root / "kernels", self.kernels_dir):
            return []
        found = []
        for directory in sorted(self.kernels_dir.glob("??/*")):
            if not directory.name.startswith(".") and self._check_folders(directory.parent, directory):
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

    def _remove_leftovers(self, key: str) -> None:
        """Staging and trash folders of ``key`` that a killed process left; only called under the key's lock,
        when no other builder of the key can own one (a reader's trash folder is its own to remove, but
        removing it here too is harmless)."""
        shard = self.entry_dir(key).parent
        for leftover in [*shard.glob(f".tmp-{key}-*"), *shard.glob(f".trash-{key}-*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def get_or_build(
        self, key: str, build: Callable[[Path], dict], expect: dict | None = None
    ) -> tuple[CacheEntry, bool]:
        """The entry for ``key``, built by ``build(so_path) -> manifest fields`` if missing or corrupt (or not
        holding ``expect``'s values, see :meth:`load`).

        Returns (entry, built_here).
        """
        entry = self.load(key, expect)
        if entry is not None:
            return entry, False
        final = self.entry_dir(key)
        make_private_dirs(final.parent)
        with self._lock(key):
            entry = self.load(key, expect)  # another process may have built it while we waited
            if entry is not None:
                return entry, False
            self._remove_leftovers(key)
            staging = final.with_name(f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex}")
            os.mkdir(staging, 0o700)
            try:
                so = staging / SO_NAME
                manifest = dict(build(so))
                os.chmod(so, 0o600)  # the compiler's mode follows the umask, which may let the group write
                manifest.update(
                    format=KERNEL_CACHE_VERSION,
                    key=key,
                    created=time.time(),
                    so_size=so.stat().st_size,
                    so_sha256=_sha256_file(so),
                )
                with open(os.open(staging / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                    json.dump(manifest, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(staging, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return CacheEntry(key, final, manifest), True

    def clear(self) -> int:
        """Remove every entry (and leftovers of interrupted builds); returns how many kernels went.

        Checks no ownership: removing loads nothing, and clearing is how an untrusted cache is fixed.
        """
        count = sum(1 for d in self.kernels_dir.glob("??/*") if not d.name.startswith("."))
        if self.kernels_dir.exists():
            self._discard(self.kernels_dir)
        return count

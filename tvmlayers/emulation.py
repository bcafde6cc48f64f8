"""The real ARM build, run on this machine: Debian's cross compilers and qemu-user, and an aarch64 Python with
the aarch64 wheels of TVM, tvm-ffi and numpy, run under ``qemu-aarch64``.

``ensure_arm_environment()`` sets everything up once (tests, ``make test`` and CI call it; the Debian packages
need root) and returns an :class:`ArmEnvironment`::

    env = ensure_arm_environment()
    subprocess.run([*env.python_argv(), "bundle/run.py"])                # aarch64 Python 3.11 under qemu
    subprocess.run([*env.qemu_argv("arm"), "./harness", "kernels.so"])  # a 32-bit ARM binary under qemu

The Python is assembled without touching the host's dpkg database: a private apt configuration (own lists,
empty dpkg status, ``APT::Architecture=arm64``) downloads Debian's arm64 python3.11 and the libraries it
needs, ``dpkg-deb -x`` unpacks them into a sysroot, and pip installs the aarch64 wheels into a site folder
(the TVM and tvm-ffi versions are the ones installed here, so both sides run the same TVM).  It is built in
a temporary folder and renamed into place when complete, under a file lock, so concurrent callers wait for one
build and never see half of one.  It lives in ``TVMLAYERS_ARM_ENV`` (default ``$XDG_CACHE_HOME/tvmlayers/arm-env``
or ``~/.cache/tvmlayers/arm-env``), one folder per recipe: changing the recipe below builds a new one.
20 to 75 s (downloads) and 420 MB from a clean machine.  Emulated timings are meaningless; only results are checked.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .formats import canonical_json
from .locks import file_lock
from .targets import CROSS_TOOLCHAINS

# Debian packages: qemu-user runs ARM binaries; the cross gcc links our kernels and the C harness
DEBIAN_PACKAGES = ("qemu-user", *CROSS_TOOLCHAINS["aarch64"][1], *CROSS_TOOLCHAINS["arm"][1])

# the arm64 .debs of the emulated Python (their dependencies, libc6 included, come along)
_PYTHON_DEBS = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "ca-certificates")
_PYTHON = "usr/bin/python3.11"


def _wheels() -> tuple[str, ...]:
    """The aarch64 wheels of the emulated Python: TVM and tvm-ffi at the versions installed here."""
    tvm = importlib.metadata.version("apache-tvm")
    ffi = importlib.metadata.version("apache-tvm-ffi")
    # ml_dtypes and typing_extensions: imported by tvm; psutil and cloudpickle: TVM's RPC server and runner
    return (
        f"apache-tvm=={tvm}",
        f"apache-tvm-ffi=={ffi}",
        "numpy",
        "ml_dtypes",
        "typing_extensions",
        "psutil",
        "cloudpickle",
    )


# qemu-user binary and the sysroot of each emulated architecture's C library (from libc6-dev-*-cross)
_QEMU = {
    "aarch64": ("qemu-aarch64", "/usr/aarch64-linux-gnu"),
    "arm": ("qemu-arm", "/usr/arm-linux-gnueabihf"),
}


@dataclass(frozen=True)
class ArmEnvironment:
    """A ready aarch64 Python (``sysroot`` with Debian's python3.11, ``site`` with the aarch64 wheels)."""

    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python_wrapper(self) -> Path:
        """A shell script that runs the aarch64 Python under qemu with its arguments (for programs that re-exec
        their own interpreter, such as TVM's RPC server: point ``sys.executable`` at it)."""
        return self.root / "bin" / "python3"

    def python_argv(self, runtime_only: bool = True) -> list[str]:
        """The argv prefix that runs the aarch64 Python 3.11 under ``qemu-aarch64``; append a script and its
        arguments.  ``runtime_only`` sets ``TVM_USE_RUNTIME_LIB=1`` (``import tvm`` loads only the runtime:
        4-5 s under qemu instead of 11-17 s)."""
        argv = ["qemu-aarch64", "-L", str(self.sysroot), "-E", f"PYTHONPATH={self.site}", "-E", "PYTHONNOUSERSITE=1"]
        if runtime_only:
            argv += ["-E", "TVM_USE_RUNTIME_LIB=1"]
        return [*argv, str(self.sysroot / _PYTHON)]

    def qemu_argv(self, arch: str) -> list[str]:
        """The argv prefix that runs a dynamically linked Linux binary of ``arch`` (see :func:`qemu_argv`)."""
        return qemu_argv(arch)


def qemu_argv(arch: str) -> list[str]:
    """``qemu-<arch> -L <the cross C library>``: runs a Linux binary of ``arch`` ("aarch64" or "arm" for 32-bit,
    as :func:`tvmlayers.targets.target_arch` names them)."""
    if arch not in _QEMU:
        raise ValueError(f"no emulator for {arch!r}: tvmlayers emulates {sorted(_QEMU)}")
    binary, libc = _QEMU[arch]
    return [binary, "-L", libc]


def environment_root() -> Path:
    """Where the aarch64 Python is cached (``TVMLAYERS_ARM_ENV``, else the user's cache folder)."""
    if os.environ.get("TVMLAYERS_ARM_ENV"):
        return Path(os.environ["TVMLAYERS_ARM_ENV"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "tvmlayers" / "arm-env"


def missing_debian_packages() -> list[str]:
    """The packages of :data:`DEBIAN_PACKAGES` that dpkg does not list as installed."""
    if shutil.which("dpkg-query") is None:
        raise RuntimeError(
            "the ARM environment is set up with Debian's packages (dpkg, apt-get), which this system lacks; "
            f"install the equivalents of {' '.join(DEBIAN_PACKAGES)} by hand"
        )
    missing = []
    for package in DEBIAN_PACKAGES:
        query = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if query.returncode != 0 or not query.stdout.endswith(" installed"):
            missing.append(package)
    return missing


def install_debian_packages(log: bool = True) -> None:
    """``apt-get install`` the missing :data:`DEBIAN_PACKAGES` (apt-get update first); needs root."""
    missing = missing_debian_packages()
    if not missing:
        return
    command = f"apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"
    if os.geteuid() != 0:
        raise RuntimeError(f"the ARM toolchain needs Debian packages that are not installed; run as root: {command}")
    if log:
        print(f"tvmlayers: installing {' '.join(missing)}", file=sys.stderr, flush=True)
    # apt's own lock: wait for another apt/dpkg instead of failing at once; ours: one installer of ours at a time
    wait = ["-o", "DPkg::Lock::Timeout=300"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with file_lock(environment_root() / "apt.lock"):
        missing = missing_debian_packages()  # another process may have installed them while we waited
        if missing:
            _run(["apt-get", *wait, "update", "-q"], env=env)
            _run(["apt-get", *wait, "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def _recipe_name() -> str:
    """Folder name of this recipe: the Debian packages and wheels, hashed (a new recipe is a new build)."""
    recipe = canonical_json({"debs": _PYTHON_DEBS, "wheels": _wheels(), "python": _PYTHON, "layout": 1})
    return "aarch64-py311-" + hashlib.sha256(recipe.encode()).hexdigest()[:12]


def ensure_arm_environment(log: bool = True) -> ArmEnvironment:
    """Install the Debian packages (when missing) and build the aarch64 Python (when not cached); idempotent
    and safe to call from several processes at once.  ``log``: one line per step on stderr."""
    install_debian_packages(log)
    root = environment_root()
    env = ArmEnvironment(root / _recipe_name())
    if (env.root / "READY").exists():
        return env
    with file_lock(root / f"{env.root.name}.lock"):
        if (env.root / "READY").exists():  # built by the process that held the lock before us
            return env
        if env.root.exists():  # a folder without READY was never complete (renamed in whole): impossible, but
            shutil.rmtree(env.root)  # a manual edit could leave one, and a rename onto it would fail
        with tempfile.TemporaryDirectory(prefix=f".tmp-{env.root.name}-", dir=root) as tmp:
            build = Path(tmp) / "env"
            _build_environment(build, log)
            (build / "READY").write_text(canonical_json({"wheels": _wheels(), "debs": _PYTHON_DEBS}) + "\n")
            os.rename(build, env.root)
    return env


def _build_environment(build: Path, log: bool) -> None:
    if log:
        print(
            f"tvmlayers: assembling an aarch64 Python in {build.parent} (20 to 75 s, once)", file=sys.stderr, flush=True
        )
    debs = _download_python_debs(build / "apt")
    sysroot = build / "sysroot"
    for folder in ("bin", "sbin", "lib"):  # Debian's merged /usr: /lib/ld-linux-aarch64.so.1 is usr/lib's
        (sysroot / "usr" / folder).mkdir(parents=True)
        (sysroot / folder).symlink_to(f"usr/{folder}")
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(sysroot)])
    shutil.rmtree(build / "apt")
    _run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(build / "site"),
            "--platform", "manylinux_2_28_aarch64", "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", "--abi", "cp311", *_wheels(),
        ]
    )  # fmt: skip
    bin_dir = build / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(
        '#!/bin/sh\n# the aarch64 Python under qemu (paths are relative to this script)\nroot="$(dirname "$0")/.."\n'
        'exec qemu-aarch64 -L "$root/sysroot" -E PYTHONPATH="$root/site" -E PYTHONNOUSERSITE=1 '
        f'"$root/sysroot/{_PYTHON}" "$@"\n'
    )
    wrapper.chmod(0o755)


def _download_python_debs(apt_dir: Path) -> list[Path]:
    """Download the arm64 .debs of :data:`_PYTHON_DEBS` and their dependencies with a private apt
    configuration: its own package lists and an empty dpkg status, so the host's apt state is untouched."""
    for folder in ("lists/partial", "archives/partial", "state"):
        (apt_dir / folder).mkdir(parents=True)
    (apt_dir / "status").touch()
    options = [
        "-o", f"Dir::State={apt_dir / 'state'}",
        "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o", f"Dir::State::status={apt_dir / 'status'}",
        "-o", f"Dir::Cache={apt_dir}",
        "-o", f"Dir::Cache::Archives={apt_dir / 'archives'}",
        "-o", "APT::Architecture=arm64",
        "-o", "APT::Architectures::=arm64",
        "-o", "Debug::NoLocking=1",  # nothing shared is written: the host's apt may run meanwhile
        "-q",
    ]  # fmt: skip
    _run(["apt-get", *options, "update"])
    _run(["apt-get", *options, "install", "-y", "--download-only", "--no-install-recommends", *_PYTHON_DEBS])
    debs = sorted((apt_dir / "archives").glob("*.deb"))
    if not debs:
        raise RuntimeError(f"apt downloaded no arm64 package into {apt_dir / 'archives'}")
    return debs


def _run(argv: list[str], env: dict | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(
            f"setting up the ARM environment failed: `{' '.join(argv)}` exited {result.returncode}:\n{tail}"
        )


def main() -> int:
    """``python -m tvmlayers.emulation``: set up (Makefile, CI) and print the aarch64 Python's argv."""
    env = ensure_arm_environment()
    print(" ".join(env.python_argv()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

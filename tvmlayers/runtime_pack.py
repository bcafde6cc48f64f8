"""Runtime packs: what a machine without apache-tvm needs to run a bundle (``tvmlayers runtime-pack``).

The apache-tvm wheel is about 100 MB, mostly its compiler; a bundle's kernels need only TVM's runtime
libraries and the apache-tvm-ffi package.  ``make_runtime_pack(out_dir, python="3.12", arch="x86_64",
cuda=True)`` writes a folder (see :mod:`tvmlayers.formats`, runtime packs) holding:

- ``tvm_runtime_libs/libtvm_runtime.so`` (and ``libtvm_runtime_cuda.so`` with ``cuda``) of the TVM version
  installed here, for ``arch``: copied from the installed apache-tvm when ``arch`` is this machine's, else
  taken from apache-tvm's wheel for ``arch``;
- ``tvm_ffi/`` and ``typing_extensions.py`` (which tvm_ffi imports) unpacked from their wheels for that Python
  and ``arch`` (the versions installed here), without tvm_ffi's C++ headers and sources (they build extensions;
  nothing loads them);
- ``runtime-pack.json`` and ``README.txt``.

A bundle's ``run.py`` run with the pack on ``PYTHONPATH`` (or ``TVMLAYERS_RUNTIME`` naming it) imports
``tvm_ffi`` from it and loads the runtime libraries with ctypes when ``import tvm`` fails.  Wheels come from the
configured package index through pip, are checked against the SHA-256 that PyPI's index lists (where PyPI can
be reached) and cached in ``$XDG_CACHE_HOME/tvmlayers/wheels`` (mode 0700, see :mod:`tvmlayers.private_dirs`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from .formats import RUNTIME_PACK_FORMAT
from .private_dirs import make_private_dirs
from .published import published_folder
from .targets import host_arch

__all__ = ["ARCHES", "cached_wheel", "make_runtime_pack", "wheel_cache_dir"]

ARCHES = ("x86_64", "aarch64")
LIBRARY_DIR = "tvm_runtime_libs"
# parts of the tvm_ffi wheel that only build C++ extensions against it (4.6 of its 11 MB unpacked)
_BUILD_ONLY = ("tvm_ffi/include/", "tvm_ffi/3rdparty/", "tvm_ffi/src/")
_PYPI_SIMPLE = "https://pypi.org/simple/{project}/"
# the Python packages of a pack, each at the version installed here: tvm_ffi and what it imports
_PYTHON_PACKAGES = ("apache-tvm-ffi", "typing-extensions")


def wheel_cache_dir() -> Path:
    """Where downloaded wheels are kept: ``$XDG_CACHE_HOME/tvmlayers/wheels`` or ``~/.cache/tvmlayers/wheels``."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "tvmlayers" / "wheels"


def _python_tag(python: str) -> str:
    match = re.fullmatch(r"3\.(\d+)", python)
    if not match:
        raise ValueError(f"python must be a CPython version such as 3.12, not {python!r}")
    return f"cp3{match.group(1)}"


def _pypi_sha256(project: str, filename: str) -> str | None:
    """The SHA-256 PyPI's index lists for one of ``project``'s files; None when PyPI cannot be reached."""
    request = urllib.request.Request(
        _PYPI_SIMPLE.format(project=project), headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            index = json.load(response)
    except (OSError, ValueError):
        return None
    for entry in index.get("files", []):
        if isinstance(entry, dict) and entry.get("filename") == filename:
            digest = entry.get("hashes", {}).get("sha256")
            return digest if isinstance(digest, str) else None
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_wheel(project: str, version: str, python: str, arch: str) -> Path:
    """``project==version``'s wheel for CPython ``python`` on manylinux ``arch``: from the cache, else
    downloaded by pip (no dependencies) and checked against PyPI's SHA-256; a cached wheel whose digest no
    longer matches the one recorded at download is downloaded again."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}, not {arch!r}")
    tag = _python_tag(python)
    folder = wheel_cache_dir() / f"{project}-{version}-{tag}-{arch}"
    recorded = folder / "sha256.json"
    if recorded.exists():
        try:
            entry = json.loads(recorded.read_text())
            wheel = folder / entry["filename"]
            if wheel.parent == folder and _sha256(wheel) == entry["sha256"]:
                return wheel
        except (OSError, ValueError, KeyError, TypeError):
            pass  # damaged: download it again
        shutil.rmtree(folder)
    make_private_dirs(folder.parent)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{folder.name}-", dir=folder.parent) as tmp:
        download = subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                "--python-version", python, "--implementation", "cp", "--abi", tag, "--abi", "none",
                "--platform", f"manylinux_2_28_{arch}", "--dest", tmp, f"{project}=={version}",
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wheels = sorted(Path(tmp).glob("*.whl"))
        if download.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"could not download {project}=={version} for CPython {python} on {arch} (pip download exited "
                f"{download.returncode}): {(download.stdout + download.stderr).strip()[-1500:]}"
            )
        wheel = wheels[0]
        digest, listed = _sha256(wheel), _pypi_sha256(project, wheel.name)
        if listed is not None and listed != digest:
            raise RuntimeError(
                f"{wheel.name}: sha256 {digest} differs from the {listed} PyPI lists; not using it (a proxy or "
                "mirror served another file)"
            )
        record = {"filename": wheel.name, "sha256": digest, "checked_against_pypi": listed is not None}
        (Path(tmp) / "sha256.json").write_text(json.dumps(record) + "\n")
        os.chmod(tmp, 0o700)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process cached it meanwhile: its copy is as good as ours
            if not recorded.exists():
                raise
    return folder / wheel.name


def _wheel_members(wheel: Path, prefix: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The files of ``wheel`` under ``prefix``, refusing names that would land outside the pack."""
    members = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise RuntimeError(f"{wheel.name}: refusing the member {info.filename!r} (outside the wheel's root)")
            if info.filename.startswith(prefix) and not info.is_dir():
                members.append((info, name))
    return members


def _extract(wheel: Path, prefix: str, out: Path, skip: tuple[str, ...] = ()) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for info, name in _wheel_members(wheel, prefix):
            if info.filename.startswith(skip):
                continue
            target = out.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
            if info.external_attr >> 16 & 0o111:
                target.chmod(0o755)


def _runtime_library_names(cuda: bool) -> list[str]:
    return ["libtvm_runtime.so", *(["libtvm_runtime_cuda.so"] if cuda else [])]


def _copy_runtime_libraries(arch: str, cuda: bool, version: str, python: str, libs: Path) -> None:
    """TVM's runtime libraries for ``arch``: the installed apache-tvm's when ``arch`` is this machine's, else its
    wheel's for ``arch`` (the libraries do not depend on the Python version)."""
    names = _runtime_library_names(cuda)
    if arch == host_arch():
        spec = importlib.util.find_spec("tvm")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("apache-tvm is not installed here: pip install apache-tvm")
        installed = Path(next(iter(spec.submodule_search_locations))) / "lib"
        for name in names:
            if not (installed / name).exists():
                raise RuntimeError(f"the installed apache-tvm has no {installed / name}")
            shutil.copyfile(installed / name, libs / name)
        return
    wheel = cached_wheel("apache-tvm", version, python, arch)
    with tempfile.TemporaryDirectory() as tmp:
        _extract(wheel, "tvm/lib/", Path(tmp))
        for name in names:
            if not (Path(tmp) / "tvm" / "lib" / name).exists():
                raise RuntimeError(f"{wheel.name} has no tvm/lib/{name}")
            shutil.copyfile(Path(tmp) / "tvm" / "lib" / name, libs / name)


def _readme(python: str, arch: str, cuda: bool, tvm: str, ffi: str) -> str:
    return (
        f"TVM {tvm} runtime for {arch} (tvm_ffi {ffi} for CPython {python}"
        f"{', with the CUDA runtime' if cuda else ''}), made by `tvmlayers runtime-pack`.\n\n"
        "Run a tvmlayers bundle with it on a machine that has Python, numpy (and torch for CUDA bundles) but not\n"
        "apache-tvm:\n\n"
        "    PYTHONPATH=/path/to/this/folder python3 bundle/run.py\n\n"
        "or TVMLAYERS_RUNTIME=/path/to/this/folder python3 bundle/run.py.  run.py says which runtime it loaded.\n"
    )


def make_runtime_pack(
    out_dir: str | Path, python: str | None = None, arch: str | None = None, cuda: bool = False
) -> Path:
    """Write a runtime pack for CPython ``python`` (default: this one) on ``arch`` (default: this machine's)
    into ``out_dir`` (replaced if it holds a pack); returns the path of its ``runtime-pack.json``."""
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    arch = arch or host_arch()
    _python_tag(python)
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}, not {arch!r}")
    out = Path(out_dir)
    if out.exists() and not (out / "runtime-pack.json").exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a runtime pack: choose an empty or new folder")
    tvm_version = importlib.metadata.version("apache-tvm")
    ffi_version = importlib.metadata.version("apache-tvm-ffi")
    wheels = [cached_wheel(p, importlib.metadata.version(p), python, arch) for p in _PYTHON_PACKAGES]
    with published_folder(out) as staging:
        libs = staging / LIBRARY_DIR
        libs.mkdir()
        _copy_runtime_libraries(arch, cuda, tvm_version, python, libs)
        for wheel in wheels:
            _extract(wheel, "", staging, skip=_BUILD_ONLY)
        (staging / "README.txt").write_text(_readme(python, arch, cuda, tvm_version, ffi_version))
        manifest = {
            "format": RUNTIME_PACK_FORMAT,
            "arch": arch,
            "python": python,
            "cuda": cuda,
            "tvm_version": tvm_version,
            "tvm_ffi_version": ffi_version,
            "wheels": [wheel.name for wheel in wheels],
            "libraries": {
                f"{LIBRARY_DIR}/{name}": _sha256(libs / name) for name in _runtime_library_names(cuda)
            },
        }
        (staging / "runtime-pack.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out / "runtime-pack.json"

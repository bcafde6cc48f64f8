"""Compilation targets: named presets, resolution to ``tvm.target.Target`` and a normalized key."""

from __future__ import annotations

import platform
import re
import shutil
from dataclasses import dataclass
from functools import cache
from typing import Any

import psutil
import tvm

TargetLike = str | dict | tvm.target.Target | None


def host_arch() -> str:
    """This machine's architecture as tvmlayers names it: ``x86_64`` or ``aarch64``."""
    machine = platform.machine().lower()
    arch = _ARCH_ALIASES.get(machine, machine)
    if arch not in ("x86_64", "aarch64"):
        raise RuntimeError(f"tvmlayers runs on x86_64 and aarch64 Linux hosts, not on {machine}")
    return arch


def _host_target() -> dict:
    # "mcpu": "native" is rejected by the wheel's LLVM; ask LLVM which CPU this is instead.
    return {
        "kind": "llvm",
        "mtriple": f"{host_arch()}-linux-gnu",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        "num-cores": psutil.cpu_count(logical=False) or 1,
    }


def _preset(mtriple: str, **attrs: Any) -> Any:
    """The factory of a fixed target dict (``num_cores`` is spelled ``num-cores`` in TVM)."""
    if "num_cores" in attrs:
        attrs["num-cores"] = attrs.pop("num_cores")
    return lambda: {"kind": "llvm", "mtriple": mtriple, **attrs}


_NEON = ["+neon"]  # armv8-a has NEON; naming it keeps the key and the schedules explicit about it

# What every NVIDIA GPU since Volta offers one thread block, as TVM's cuda target kind names it (its tags
# "nvidia/nvidia-a100", "nvidia/nvidia-h100", "nvidia/jetson-agx-orin-64gb" carry the same values):
# MetaSchedule and our GPU rules read these to bound threads, shared memory and registers per block.  48 KiB is
# the limit of *static* shared memory (the kernels TVM writes declare it statically; more needs an opt-in).
_CUDA_BLOCK_LIMITS = {
    "max_threads_per_block": 1024,
    "max_num_threads": 1024,
    "thread_warp_size": 32,
    "max_shared_memory_per_block": 48 << 10,
    "registers_per_block": 64 << 10,
}
# Host code (argument checks, the kernel launches) for a PC or server; no -mcpu: it must load on any x86_64 CPU.
_X86_64_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
# The Jetson AGX Orin's CPU cluster (TVM's tag "nvidia/jetson-agx-orin-64gb": 12 Cortex-A78AE cores)
_ORIN_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": _NEON, "num-cores": 12}


def _cuda_target(arch: str, host: dict, **attrs: Any) -> dict:
    return {"kind": "cuda", "arch": arch, **_CUDA_BLOCK_LIMITS, **attrs, "host": dict(host)}


def _cuda_preset(arch: str, host: dict = _X86_64_HOST, **attrs: Any) -> Any:
    return lambda: _cuda_target(arch, host, **attrs)


def _cuda_arch(target: tvm.target.Target) -> tuple[int, int] | None:
    """The compute capability a CUDA target's ``arch`` names (``sm_90``, ``sm_90a`` -> (9, 0))."""
    match = re.fullmatch(r"sm_(\d+?)(\d)[af]?", str(target.attrs.get("arch", "")))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _local_gpu_capability() -> tuple[int, int] | None:
    """The compute capability of the GPU torch sees (its current device), None without one."""
    try:
        import torch  # noqa: PLC0415 - torch is slow to import and only the cuda preset needs it

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
    except Exception:  # noqa: BLE001 - a broken driver or CUDA build reads as "no GPU", never a crash
        return None
    return int(major), int(minor)


def _local_cuda_target() -> dict:
    """The preset of the local GPU's architecture (``cuda`` on an H100 is ``sm_90``: the same kernels, cache
    keys and tuning logs), with this machine's CPU as host (a Jetson: ``jetson-orin``)."""
    capability = _local_gpu_capability()
    if capability is None:
        raise ValueError(
            "target 'cuda' means the GPU of this machine, and torch sees none (torch.cuda.is_available() is "
            f"False): name the GPU's architecture instead, one of {', '.join(CUDA_PRESETS)} (e.g. "
            "`tvmlayers compile --target sm_90` compiles for an H100 without one)"
        )
    arch, host = f"sm_{capability[0]}{capability[1]}", f"{host_arch()}-linux-gnu"
    for name in CUDA_PRESETS:
        preset = PRESETS[name][1]()
        if preset["arch"] == arch and preset["host"]["mtriple"] == host:
            return preset
    return _cuda_target(arch, {"kind": "llvm", "mtriple": host})


# The presets of named GPU architectures (not "cuda", which stands for one of them or the local GPU's)
CUDA_PRESETS = ("sm_80", "sm_86", "sm_89", "sm_90", "jetson-orin")

# name -> (description, factory of the target dict)
PRESETS: dict[str, tuple[str, Any]] = {
    "host": ("the CPU of this machine (its triple, -mcpu from LLVM's host detection)", _host_target),
    "x86": ("alias of host", _host_target),
    "aarch64": (
        "any 64-bit ARM Linux board: armv8-a + NEON, 4 cores",
        _preset("aarch64-linux-gnu", mattr=_NEON, num_cores=4),
    ),
    "rasp4b": (
        "Raspberry Pi 4 Model B, 64-bit OS: Cortex-A72, 4 cores",
        _preset("aarch64-linux-gnu", mcpu="cortex-a72", mattr=_NEON, num_cores=4),
    ),
    "rasp5": (
        "Raspberry Pi 5, 64-bit OS: Cortex-A76, 4 cores",
        _preset("aarch64-linux-gnu", mcpu="cortex-a76", mattr=_NEON, num_cores=4),
    ),
    "armv7": (
        "32-bit ARM Linux (armhf, e.g. Raspberry Pi OS 32-bit): armv7-a, NEON + VFPv4, hard-float, 4 cores",
        _preset("armv7a-linux-gnueabihf", mattr=["+neon", "+vfp4"], num_cores=4, **{"mfloat-abi": "hard"}),
    ),
    "x86-avx512": (
        "another x86_64 machine with AVX-512 (Skylake-SP and later)",
        _preset("x86_64-linux-gnu", mcpu="skylake-avx512"),
    ),
    "x86-avx2": (
        "another x86_64 machine with AVX2 and FMA (Haswell and later)",
        _preset("x86_64-linux-gnu", mcpu="haswell"),
    ),
    "cuda": ("the NVIDIA GPU of this machine (the sm_XX preset of its compute capability)", _local_cuda_target),
    # L2 sizes from TVM's tags / NVIDIA's data sheets, where one preset names one chip
    "sm_80": ("NVIDIA Ampere A100 (sm_80), x86_64 host", _cuda_preset("sm_80", l2_cache_size_bytes=40 << 20)),
    "sm_86": ("NVIDIA Ampere RTX 30xx, A10, A40 (sm_86), x86_64 host", _cuda_preset("sm_86")),
    "sm_89": ("NVIDIA Ada L4, L40, RTX 40xx (sm_89), x86_64 host", _cuda_preset("sm_89")),
    "sm_90": ("NVIDIA Hopper H100, H200 (sm_90), x86_64 host", _cuda_preset("sm_90", l2_cache_size_bytes=50 << 20)),
    "jetson-orin": (
        "NVIDIA Jetson AGX Orin / Orin NX / Orin Nano (sm_87), aarch64 Cortex-A78 host",
        _cuda_preset("sm_87", _ORIN_HOST, l2_cache_size_bytes=4 << 20),
    ),
}

# platform.machine() and LLVM triple spellings -> our architecture names
_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def target_arch(target: tvm.target.Target) -> str:
    """The CPU architecture a target's code runs on: ``x86_64``, ``aarch64``, ``arm`` (32-bit) or another
    triple's first part; a target without a triple (the LLVM default, a GPU target without a host) is the host's."""
    host = target.host if target.kind.name != "llvm" and target.host is not None else target
    triple = str(host.attrs.get("mtriple", "")) if host.kind.name == "llvm" else ""
    if not triple:
        return host_arch()
    arch = triple.split("-")[0].lower()
    if arch.startswith(("armv", "arm", "thumb")) and arch not in _ARCH_ALIASES:
        return "arm"
    return _ARCH_ALIASES.get(arch, arch)


def runs_here(target: tvm.target.Target) -> bool:
    """Whether this process can load and call kernels compiled for ``target``: the same architecture as this
    host, and no instruction set extension this CPU lacks (``x86-avx512`` on an AVX2 machine would die on an
    illegal instruction); for a CUDA target, a GPU that torch sees whose compute capability is the target's
    ``arch`` (never an error: no GPU, no driver -> False).  Kernels for other targets are checked where they
    run: a board, a GPU machine, an RPC device, or qemu in tests."""
    if target.kind.name == "cuda":
        return target_arch(target) == host_arch() and _cuda_arch(target) == _local_gpu_capability()
    return target_arch(target) == host_arch() and not missing_features(target)


# LLVM's x86 feature names that are instruction set extensions, as opposed to its tuning hints
# ("fast-gather", "slow-3ops-lea", ...), which say how a CPU performs, not what it can execute
_X86_ISA_PREFIXES = ("avx", "sse", "ssse", "fma", "f16c", "bmi", "amx", "vaes", "vpclmul", "gfni", "sha", "popcnt")


def missing_features(target: tvm.target.Target) -> list[str]:
    """The x86 instruction set extensions ``target``'s code may use that this CPU lacks (empty elsewhere)."""
    if target.kind.name != "llvm" or target_arch(target) != "x86_64" or host_arch() != "x86_64":
        return []
    own = _x86_isa(tvm.target.codegen.llvm_get_cpu_features(target))
    host = _x86_isa(tvm.target.codegen.llvm_get_cpu_features(_resolve_name("host")))
    return sorted(own - host)


def _x86_isa(features: Any) -> set[str]:
    return {str(f) for f in features if str(f).startswith(_X86_ISA_PREFIXES)}


@dataclass(frozen=True)
class Toolchain:
    """The C compiler that links a target's kernels into a shared library, and the Debian packages that have it."""

    compiler: str
    packages: tuple[str, ...]

    def installed(self) -> bool:
        return shutil.which(self.compiler) is not None

    def require(self, what: str) -> str:
        """The compiler's path, or a RuntimeError naming the Debian packages to install (``what``: for whom)."""
        path = shutil.which(self.compiler)
        if path is None:
            raise RuntimeError(
                f"{what} needs the C compiler {self.compiler}, which is not on PATH: install it with "
                f"`apt-get install {' '.join(self.packages)}` (Debian/Ubuntu; `python -m tvmlayers.emulation` "
                "as root installs the ARM toolchains)"
            )
        return path


# architecture -> (compiler, Debian cross packages); the libc6-dev-*-cross package has crti.o, without which
# linking fails when apt skips recommended packages
CROSS_TOOLCHAINS = {
    "aarch64": ("aarch64-linux-gnu-gcc", ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")),
    "arm": ("arm-linux-gnueabihf-gcc", ("gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross")),
    "x86_64": ("x86_64-linux-gnu-gcc", ("gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross")),
}


# nvcc compiles a CUDA target's kernels to device code; Debian's (non-free) package of the CUDA toolkit has it
NVCC = Toolchain("nvcc", ("nvidia-cuda-toolkit",))


def toolchains(target: tvm.target.Target) -> list[Toolchain]:
    """Every compiler a target's library needs: the linker of its host code (:func:`toolchain`), and for a CUDA
    target first nvcc."""
    return ([NVCC] if target.kind.name == "cuda" else []) + [toolchain(target)]


def toolchain(target: tvm.target.Target) -> Toolchain:
    """The toolchain that links ``target``'s kernels: Debian's triple-prefixed gcc, native on the same
    architecture (package ``gcc``), a cross compiler otherwise."""
    arch = target_arch(target)
    if arch not in CROSS_TOOLCHAINS:
        raise ValueError(f"no toolchain known for {arch} targets: tvmlayers links for {sorted(CROSS_TOOLCHAINS)}")
    compiler, packages = CROSS_TOOLCHAINS[arch]
    return Toolchain(compiler, ("gcc",) if arch == host_arch() else packages)


@cache
def _resolve_name(name: str) -> tvm.target.Target:
    if name in PRESETS:
        return tvm.target.Target(PRESETS[name][1]())
    try:  # a TVM tag such as "raspberry-pi/4b-aarch64"
        return tvm.target.Target(name)
    except Exception as err:  # TVM raises its own error types here; say what we accept instead
        raise ValueError(
            f"unknown target {name!r}: use one of {sorted(PRESETS)} (see `tvmlayers targets`), "
            "a TVM target tag, a target dict or a tvm.target.Target"
        ) from err


def resolve_target(target: TargetLike) -> tvm.target.Target:
    """``None``/preset name/TVM tag/target dict/``Target`` -> ``tvm.target.Target``."""
    if target is None:
        return _resolve_name("host")
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        return _resolve_name(target)
    if isinstance(target, dict):
        try:
            return tvm.target.Target(target)
        except Exception as err:
            raise ValueError(f"invalid target dict {target!r}: {err}") from err
    raise TypeError(f"target must be a preset name, a dict or a tvm.target.Target, got {type(target).__name__}")


def target_json(target: tvm.target.Target) -> dict:
    """The target as plain JSON data (what goes into specs, keys and manifests)."""
    return _plain(target.export())


def _plain(value: Any) -> Any:
    # export() hands back TVM FFI maps and arrays; turn them into JSON types
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "items"):
        # "keys" is derived from the kind, and an empty "tag" says nothing
        return {str(k): _plain(v) for k, v in value.items() if k != "keys" and (k != "tag" or v)}
    if isinstance(value, bool | int | float) or value is None:
        return value
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def target_key(target: tvm.target.Target) -> str:
    """A short, filesystem-safe name of the code-generation target, e.g. ``llvm-x86_64-linux-gnu-icelake-server``;
    a CUDA target is its architecture, with the host's where that is not x86_64 (``cuda-sm_90``,
    ``cuda-sm_87-aarch64``): the host code is part of the library."""
    attrs = target.attrs
    if target.kind.name == "cuda":
        host = target_arch(target)
        return f"cuda-{attrs.get('arch', 'generic')}" + ("" if host == "x86_64" else f"-{host}")
    parts = [target.kind.name]
    for name in ("mtriple", "mcpu", "arch"):
        if name in attrs and str(attrs[name]):
            parts.append(str(attrs[name]))
    if "mattr" in attrs and len(attrs["mattr"]):
        parts.append("".join(sorted(str(a) for a in attrs["mattr"])))
    return "-".join(parts).replace("/", "_")


def vector_bits(target: tvm.target.Target) -> int:
    """SIMD register width in bits that schedules vectorize for."""
    if target.kind.name == "llvm":
        return int(tvm.target.codegen.llvm_get_vector_width(target))
    return 128


def device_type(target: tvm.target.Target) -> str:
    """The torch device type a target's kernels read and write."""
    return "cuda" if target.kind.name == "cuda" else "cpu"

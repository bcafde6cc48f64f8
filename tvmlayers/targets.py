"""Compilation targets: named presets, resolution to ``tvm.target.Target`` and a normalized key."""

from __future__ import annotations

from functools import cache
from typing import Any

import psutil
import tvm

TargetLike = str | dict | tvm.target.Target | None


def _host_target() -> dict:
    # "mcpu": "native" is rejected by the wheel's LLVM; ask LLVM which CPU this is instead.
    return {
        "kind": "llvm",
        "mtriple": "x86_64-linux-gnu",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
        "num-cores": psutil.cpu_count(logical=False) or 1,
    }


# name -> (description, factory of the target dict)
PRESETS: dict[str, tuple[str, Any]] = {
    "host": ("the CPU of this machine (x86_64, -mcpu from LLVM's host detection)", _host_target),
    "x86": ("alias of host", _host_target),
}


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
    """A short, filesystem-safe name of the code-generation target, e.g. ``llvm-x86_64-linux-gnu-icelake-server``."""
    attrs = target.attrs
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

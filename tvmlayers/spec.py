"""KernelSpec: everything that determines one compiled kernel (op, parameters, input shape, dtype, target)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import tvm

from .formats import canonical_json
from .targets import target_json

OPS = ("conv2d", "max_pool2d", "linear", "relu")
DTYPES = ("float32", "float64")


@lru_cache(maxsize=256)
def _target_str(target: tvm.target.Target) -> str:
    # Targets hash by identity; resolve_target hands out one object per name, so this is a hit per call
    return canonical_json(target_json(target))


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


@dataclass(frozen=True)
class KernelSpec:
    """An immutable, hashable description of one kernel; ``to_json`` is what the cache key hashes."""

    op: str
    params: tuple[tuple[str, Any], ...]
    input_shape: tuple[int, ...]
    dtype: str
    target_str: str  # canonical JSON of the target, so that specs hash and compare by value

    @classmethod
    def make(
        cls, op: str, input_shape: tuple[int, ...], dtype: str, target: tvm.target.Target, **params: Any
    ) -> KernelSpec:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}, expected one of {OPS}")
        if dtype not in DTYPES:
            raise TypeError(f"tvmlayers kernels support {', '.join(DTYPES)}, got {dtype}")
        frozen = tuple(sorted((k, _freeze(v)) for k, v in params.items()))
        return cls(op, frozen, tuple(int(d) for d in input_shape), dtype, _target_str(target))

    def __getitem__(self, name: str) -> Any:
        return dict(self.params)[name]

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @cached_property
    def target(self) -> tvm.target.Target:
        return tvm.target.Target(json.loads(self.target_str))

    def to_json(self) -> dict:
        return {
            "op": self.op,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params},
            "input_shape": list(self.input_shape),
            "dtype": self.dtype,
            "target": json.loads(self.target_str),
        }

    @classmethod
    def from_json(cls, data: dict) -> KernelSpec:
        return cls.make(
            data["op"],
            tuple(data["input_shape"]),
            data["dtype"],
            tvm.target.Target(data["target"]),
            **data["params"],
        )

    def describe(self) -> str:
        """One human-readable line, e.g. ``conv2d 1x64x56x56 float32 stride=(1, 1) ...``."""
        shape = "x".join(str(d) for d in self.input_shape)
        params = " ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.op} {shape} {self.dtype} {params}".rstrip()

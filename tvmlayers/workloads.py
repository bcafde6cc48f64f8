"""Workloads: the layer calls to tune, as a documented TOML file, or extracted from a torch model.

Format (version 1)::

    format = 1                       # required
    name = "resnet18"                # optional
    target = "host"                  # optional: the target to tune for when none is given

    [[layer]]                        # one table per distinct layer call
    op = "conv2d"                    # conv2d | max_pool2d | linear | relu
    input_shape = [1, 64, 56, 56]    # the kernel's input: batched NCHW (conv2d, max_pool2d),
                                     # (rows, in_features) for linear, (numel,) for relu
    dtype = "float32"                # float32 | float64
    count = 4                        # how often the model makes this call (task-scheduler weight)
    # the op's parameters, as in tvmlayers.KernelSpec:
    #   conv2d:     weight_shape = [O, I/groups, kH, kW], stride = [sh, sw],
    #               padding = [top, left, bottom, right], dilation = [dh, dw], groups = 1,
    #               padding_mode = "zeros", bias = true
    #   max_pool2d: kernel_size, stride, padding, dilation (pairs), ceil_mode, return_indices
    #   linear:     weight_shape = [out_features, in_features], bias = true
    #   conv2d and linear may add relu = true (the fused layer), conv2d residual = true (an added input of
    #   the output's shape, ResNet's shortcut: relu?(conv2d + residual)); conv2d and max_pool2d in_block and
    #   out_block = 16 (channel-blocked NCHW16c activations, as a recorded program runs them; a max-pool's
    #   two alike)

Hand-written files use torch's normalized values (e.g. padding 1 becomes [1, 1, 1, 1]);
:func:`tvmlayers.extract.extract_workloads` writes them for any model.  Every parameter is
required, and each layer is checked when the file is read, as torch checks the same call (e.g. a weight
whose input channels times groups differ from the input's channels), by
:func:`tvmlayers.layer_specs.workload_spec`: an error names the file and the layer's number.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm

from . import layer_specs
from .formats import WORKLOAD_FORMAT
from .spec import KernelSpec
from .targets import resolve_target


@dataclass(frozen=True)
class Workload:
    """One distinct layer call: a KernelSpec without its target, and how often the model makes it."""

    op: str
    input_shape: tuple[int, ...]
    dtype: str
    params: tuple[tuple[str, Any], ...]
    count: int = 1

    def spec(self, target: tvm.target.Target) -> KernelSpec:
        return KernelSpec.make(self.op, self.input_shape, self.dtype, target, **dict(self.params))

    @classmethod
    def from_spec(cls, spec: KernelSpec, count: int = 1) -> Workload:
        return cls(spec.op, spec.input_shape, spec.dtype, spec.params, count)

    def describe(self) -> str:
        return KernelSpec(self.op, self.params, self.input_shape, self.dtype, "{}").describe()


def load_workloads(path: str | Path) -> tuple[list[Workload], dict]:
    """The workloads of a TOML file, and its top-level settings (name, target)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"workload file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not a valid TOML workload file: {err}") from None
    if data.get("format") != WORKLOAD_FORMAT:
        raise ValueError(f"{path}: expected 'format = {WORKLOAD_FORMAT}', got {data.get('format')!r}")
    layers = data.get("layer", [])
    if not isinstance(layers, list):
        raise ValueError(f"{path}: 'layer' must be [[layer]] tables, got {layers!r}")
    host = resolve_target("host")
    workloads = []
    for number, layer in enumerate(layers, start=1):
        # each layer goes through the checks of a layer call: a file whose shapes torch would reject fails
        # here, naming the file and the layer, not later inside the compiler or the tuner's verifier
        try:
            if not isinstance(layer, dict):
                raise ValueError("expected a table")  # e.g. `layer = [1]` instead of [[layer]] tables
            missing = [key for key in ("op", "input_shape") if key not in layer]
            if missing:
                raise ValueError(f"{' and '.join(missing)} missing")
            params = dict(layer)
            op, shape, dtype = params.pop("op"), params.pop("input_shape"), params.pop("dtype", "float32")
            count = params.pop("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"count must be a positive integer, got {count!r}")
            spec = layer_specs.workload_spec(op, shape, dtype, params, host)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: [[layer]] number {number} is invalid: {err}") from None
        workloads.append(Workload.from_spec(spec, count))
    settings = {k: v for k, v in data.items() if k not in ("format", "layer")}
    return workloads, settings


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def format_workloads(workloads: Iterable[Workload], name: str | None = None, target: str | None = None) -> str:
    lines = [f"format = {WORKLOAD_FORMAT}"]
    if name:
        lines.append(f"name = {_toml(name)}")
    if target:
        lines.append(f"target = {_toml(target)}")
    for w in workloads:
        lines += [
            "",
            "[[layer]]",
            f"op = {_toml(w.op)}",
            f"input_shape = {_toml(w.input_shape)}",
            f"dtype = {_toml(w.dtype)}",
            f"count = {w.count}",
        ]
        lines += [f"{key} = {_toml(value)}" for key, value in w.params]
    return "\n".join(lines) + "\n"


def save_workloads(
    workloads: Iterable[Workload], path: str | Path, name: str | None = None, target: str | None = None
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(format_workloads(workloads, name, target))
    tmp.replace(path)

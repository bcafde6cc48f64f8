"""Workload extraction: run a torch model once and record every supported layer call, with counts."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import tvm

from . import layer_specs, nn
from .functional import DTYPE_NAMES
from .spec import KernelSpec
from .targets import resolve_target
from .workloads import Workload


def layer_kind(module: torch.nn.Module) -> str | None:
    """The op a torch or tvmlayers module computes (both kinds carry torch's attributes)."""
    kinds = {
        "conv2d": (torch.nn.Conv2d, nn.Conv2d),
        "max_pool2d": (torch.nn.MaxPool2d, nn.MaxPool2d),
        "linear": (torch.nn.Linear, nn.Linear),
        "relu": (torch.nn.ReLU, nn.ReLU),
    }
    return next((op for op, classes in kinds.items() if isinstance(module, classes)), None)


def layer_spec(module: torch.nn.Module, args: tuple, target: tvm.target.Target) -> KernelSpec | None:
    """The spec of the call ``module(*args)``: a fused layer's (relu or relu6, residual) as such, since it runs one
    kernel."""
    x = args[0]
    dtype = DTYPE_NAMES.get(x.dtype)
    kind = layer_kind(module)
    if dtype is None or kind is None:
        return None
    shape = tuple(x.shape)
    bias = None if getattr(module, "bias", None) is None else tuple(module.bias.shape)
    if kind == "conv2d":
        spec, _ = layer_specs.conv2d_spec(
            shape,
            tuple(module.weight.shape),
            bias,
            dtype,
            target,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.padding_mode,
            getattr(module, "_fuse_relu", False),
            residual=tuple(args[1].shape) if isinstance(module, nn.ConvAdd2d) else None,
            relu6=getattr(module, "_fuse_relu6", False),
        )
    elif kind == "max_pool2d":
        spec, _ = layer_specs.max_pool2d_spec(
            shape,
            dtype,
            target,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.ceil_mode,
            module.return_indices,
        )
    elif kind == "linear":
        fused = (getattr(module, "_fuse_relu", False), getattr(module, "_fuse_relu6", False))
        spec, _ = layer_specs.linear_spec(shape, tuple(module.weight.shape), bias, dtype, target, *fused)
    else:
        spec, _ = layer_specs.relu_spec(shape, dtype, target)
    return spec


@contextlib.contextmanager
def recording_layer_calls(model: torch.nn.Module, target: tvm.target.Target) -> Iterator[list[tuple[KernelSpec, Any]]]:
    """While the block runs, every supported layer call of ``model`` is appended to the yielded list, in
    call order: (its spec for ``target``, the module)."""
    calls: list[tuple[KernelSpec, Any]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        spec = layer_spec(module, args, target)
        if spec is not None:
            calls.append((spec, module))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if layer_kind(m) is not None]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def extract_workloads(model: torch.nn.Module, *example_inputs: Any) -> list[Workload]:
    """Run ``model`` once on ``example_inputs`` and record every supported layer call, with counts.

    Works on torch models and on ``tvmlayers.convert``-ed ones.
    """
    with recording_layer_calls(model, resolve_target("host")) as calls, torch.no_grad():
        model(*example_inputs)
    seen = Counter(spec for spec, _ in calls)
    return [Workload.from_spec(spec, count) for spec, count in seen.items()]

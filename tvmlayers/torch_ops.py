"""The tvmlayers layers as torch custom ops, ``torch.ops.tvmlayers.*``, for graphs that torch traces.

``torch.compile`` (dynamo), ``torch.export`` and FX see a tvmlayers call as one op of the graph: each op has
a fake implementation (output shapes, dtypes and memory formats from ``tvmlayers.layer_specs``, nothing
compiled) and, where it is functional, an autograd formula (``tvmlayers.autograd.gradients``: torch's
gradients by recomputation), so a compiled model trains.  ``relu_`` declares that it writes its input.

Eager calls do not come here: the dispatcher costs microseconds per call, a large part of a small layer's.
The nn modules and the public functional ops route through these ops only when ``functional.traced`` says
a tracer is looking (dynamo, or tensors that are not plain: fake, functional, FX proxies).

Non-tensor arguments travel as the schema allows: int lists, a padding name, and the target as a string
(a preset name or tag, or the canonical JSON of a target dict), which :func:`target_arg` makes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import torch
import tvm
from torch import Tensor

from . import functional as F
from . import layer_specs
from .autograd import gradients
from .formats import canonical_json
from .ops import shapes
from .spec import KernelSpec
from .targets import TargetLike, resolve_target, target_json

__all__ = ["conv2d", "linear", "max_pool2d", "recorded_specs", "relu", "target_arg"]


@torch.compiler.assume_constant_result  # dynamo calls it instead of tracing into TVM's target objects
def target_arg(target: TargetLike) -> str:
    """A target as the ops' schema carries it: a name as it is, a dict or ``Target`` as canonical JSON."""
    if target is None:
        return "host"
    if isinstance(target, str):
        return target
    return canonical_json(target_json(resolve_target(target)))


@lru_cache(maxsize=64)
def _target(target: str) -> tvm.target.Target:
    # one Target object per string: the functional plans are memoized by the target's identity
    return resolve_target(json.loads(target) if target.startswith("{") else target)


# Specs the fake implementations saw, for tvmlayers.precompile (a stack: recordings may nest).
_recordings: list[set[KernelSpec]] = []


@contextlib.contextmanager
def recorded_specs() -> Iterator[set[KernelSpec]]:
    """Collect the KernelSpec of every call the fake implementations see inside the block."""
    specs: set[KernelSpec] = set()
    _recordings.append(specs)
    try:
        yield specs
    finally:
        _recordings.remove(specs)


def _spec_and_shape(
    op: str,
    tensors: tuple[Tensor | None, ...],
    target: str,
    *params: Any,
    residual: Tensor | None = None,
    relu6: bool = False,
) -> tuple[KernelSpec | None, tuple[int, ...]]:
    """(spec or None, output shape) of a call, checked with torch's messages; nothing is compiled."""
    facts = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in (*tensors, residual))
    target_ = _target(target)
    dtype = F._check_types(op, facts, target_)
    *shapes_, residual_shape = F._shapes(facts)
    # conv2d's keyword-only arguments, passed only where set (the other ops' spec functions have none)
    extra = {name: value for name, value in (("residual", residual_shape), ("relu6", relu6)) if value}
    spec, out_shape = getattr(layer_specs, f"{op}_spec")(*shapes_, dtype, target_, *params, **extra)
    if spec is not None:
        for specs in _recordings:
            specs.add(spec)
    return spec, out_shape


def _empty(shape: Sequence[int], like: Tensor, channels_last: bool, dtype: torch.dtype | None = None) -> Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


# ---------------------------------------------------------------------------------------------- conv2d


def _conv2d_padding(padding: Sequence[int], padding_name: str) -> str | tuple[int, ...]:
    return padding_name or tuple(padding)


@torch.library.custom_op("tvmlayers::conv2d", mutates_args=())
def _conv2d_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    padding_name: str,
    dilation: Sequence[int],
    groups: int,
    padding_mode: str,
    fuse_relu: bool,
    fuse_relu6: bool,
    target: str,
) -> Tensor:
    """``tvmlayers.functional.conv2d`` (``residual`` added before the relu or relu6); ``padding`` is a pair, or
    empty with ``padding_name`` 'same' or 'valid'."""
    with torch.no_grad():  # the kernel alone: the op's autograd formula is registered below
        out, _ = F.conv2d_with_plan(
            input,
            weight,
            bias,
            tuple(stride),
            _conv2d_padding(padding, padding_name),
            tuple(dilation),
            groups,
            padding_mode,
            _target(target),
            fuse_relu,
            residual,
            fuse_relu6,
        )
    return out


def _conv2d_spec(*args: Any) -> tuple[KernelSpec | None, tuple[int, ...]]:
    """(spec, output shape) from the arguments of ``tvmlayers::conv2d``."""
    input, weight, bias, residual, stride, padding, padding_name, dilation, groups, mode, relu, relu6, target = args
    params = (tuple(stride), _conv2d_padding(padding, padding_name), tuple(dilation), groups, mode, relu)
    return _spec_and_shape("conv2d", (input, weight, bias), target, *params, residual=residual, relu6=relu6)


@_conv2d_op.register_fake
def _(*args: Any) -> Tensor:
    _, out_shape = _conv2d_spec(*args)
    input, padding_mode = args[0], args[9]
    return _empty(out_shape, input, padding_mode != "circular" and F._is_channels_last(input))


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int | Sequence[int],
    padding: str | int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    padding_mode: str,
    fuse_relu: bool,
    fuse_relu6: bool,
    residual: Tensor | None,
    target: TargetLike,
) -> Tensor:
    """``tvmlayers.functional.conv2d``'s arguments, as ``torch.ops.tvmlayers.conv2d`` takes them."""
    named = isinstance(padding, str)
    return _conv2d_op(
        input,
        weight,
        bias,
        residual,
        list(shapes.pair(stride, "stride")),
        [] if named else list(shapes.pair(padding, "padding")),
        padding if named else "",
        list(shapes.pair(dilation, "dilation")),
        groups,
        padding_mode,
        bool(fuse_relu),
        bool(fuse_relu6),
        target_arg(target),
    )


# ------------------------------------------------------------------------------------------ max_pool2d


def _max_pool2d_run(input: Tensor, params: tuple, return_indices: bool, target: str) -> list[Tensor]:
    with torch.no_grad():
        outputs, _ = F.max_pool2d_with_plan(input, *map(tuple, params[:4]), params[4], return_indices, _target(target))
    return outputs


def _max_pool2d_fake(input: Tensor, params: tuple, return_indices: bool, target: str) -> list[Tensor]:
    _, out_shape = _spec_and_shape("max_pool2d", (input,), target, *map(tuple, params[:4]), params[4], return_indices)
    channels_last = F._is_channels_last(input)
    return [_empty(out_shape, input, channels_last), _empty(out_shape, input, channels_last, torch.int64)]


@torch.library.custom_op("tvmlayers::max_pool2d", mutates_args=())
def _max_pool2d_op(
    input: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    target: str,
) -> Tensor:
    """``tvmlayers.functional.max_pool2d`` without indices (``stride`` empty: the kernel size)."""
    return _max_pool2d_run(input, (kernel_size, stride, padding, dilation, ceil_mode), False, target)[0]


@torch.library.custom_op("tvmlayers::max_pool2d_with_indices", mutates_args=())
def _max_pool2d_with_indices_op(
    input: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    target: str,
) -> tuple[Tensor, Tensor]:
    """``tvmlayers.functional.max_pool2d(..., return_indices=True)``: values and int64 indices."""
    values, indices = _max_pool2d_run(input, (kernel_size, stride, padding, dilation, ceil_mode), True, target)
    return values, indices


@_max_pool2d_op.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode, target):
    return _max_pool2d_fake(input, (kernel_size, stride, padding, dilation, ceil_mode), False, target)[0]


@_max_pool2d_with_indices_op.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode, target):
    values, indices = _max_pool2d_fake(input, (kernel_size, stride, padding, dilation, ceil_mode), True, target)
    return values, indices


def max_pool2d(
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    ceil_mode: bool,
    return_indices: bool,
    target: TargetLike,
) -> Tensor | tuple[Tensor, Tensor]:
    """``tvmlayers.functional.max_pool2d``'s arguments, as the ``torch.ops.tvmlayers`` ops take them."""
    op = _max_pool2d_with_indices_op if return_indices else _max_pool2d_op
    return op(
        input,
        list(shapes.pair(kernel_size, "kernel_size")),
        [] if stride is None else list(shapes.pair(stride, "stride")),
        list(shapes.pair(padding, "padding")),
        list(shapes.pair(dilation, "dilation")),
        bool(ceil_mode),
        target_arg(target),
    )


# ---------------------------------------------------------------------------------------------- linear


@torch.library.custom_op("tvmlayers::linear", mutates_args=())
def _linear_op(
    input: Tensor, weight: Tensor, bias: Tensor | None, fuse_relu: bool, fuse_relu6: bool, target: str
) -> Tensor:
    """``tvmlayers.functional.linear`` of a non-empty product."""
    with torch.no_grad():
        plan = F.linear_plan(input, weight, bias, _target(target), fuse_relu, fuse_relu6)
        return F.linear_run(plan, input, weight, bias, fuse_relu, fuse_relu6)


def _linear_spec(input, weight, bias, fuse_relu, fuse_relu6, target):
    return _spec_and_shape("linear", (input, weight, bias), target, fuse_relu, fuse_relu6)


@_linear_op.register_fake
def _(*args):
    _, out_shape = _linear_spec(*args)
    return _empty(out_shape, args[0], False)


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, fuse_relu: bool, fuse_relu6: bool, target: TargetLike
) -> Tensor:
    """``tvmlayers.functional.linear``'s arguments, as ``torch.ops.tvmlayers.linear`` takes them."""
    if isinstance(input, Tensor) and (input.numel() == 0 or weight.numel() == 0):  # (an FX proxy is not)
        # an empty product runs no kernel: torch's op, as tvmlayers.functional does (a broadcast bias has a
        # gradient that the empty-output rule of the autograd formula would miss); checked as a call with a kernel
        _linear_spec(input, weight, bias, fuse_relu, fuse_relu6, target_arg(target))
        return F.torch_activation(torch.nn.functional.linear(input, weight, bias), fuse_relu, fuse_relu6)
    return _linear_op(input, weight, bias, bool(fuse_relu), bool(fuse_relu6), target_arg(target))


# ------------------------------------------------------------------------------------------------ relu


@torch.library.custom_op("tvmlayers::relu", mutates_args=())
def _relu_op(input: Tensor, target: str) -> Tensor:
    """``tvmlayers.functional.relu``."""
    with torch.no_grad():
        return F.relu_run(F.relu_plan(input, _target(target)), input, False)


@_relu_op.register_fake
def _(input, target):
    _spec_and_shape("relu", (input,), target)
    # torch's preserve_format, as the kernel's call gives: a gapless input's strides, else contiguous
    return torch.empty_like(input) if F._memory_order(input) is not None else torch.empty(
        input.shape, dtype=input.dtype, device=input.device
    )


@torch.library.custom_op("tvmlayers::relu_", mutates_args=("input",))
def _relu_inplace_op(input: Tensor, target: str) -> None:
    """``tvmlayers.functional.relu(..., inplace=True)``: writes the relu into ``input``."""
    with torch.no_grad():
        F.relu_run(F.relu_plan(input, _target(target)), input, True)


@_relu_inplace_op.register_fake
def _(input, target):
    _spec_and_shape("relu", (input,), target)


def relu(input: Tensor, inplace: bool, target: TargetLike) -> Tensor:
    """``tvmlayers.functional.relu``'s arguments, as the ``torch.ops.tvmlayers`` ops take them."""
    if not inplace:
        return _relu_op(input, target_arg(target))
    if torch.is_grad_enabled() and isinstance(input, Tensor) and input.requires_grad:  # (an FX proxy is not)
        # autograd formulas are for functional ops only: the in-place write of a tensor autograd tracks is
        # the functional relu copied back, which autograd (and its in-place checks) see as copy_; the relu
        # reads a clone, as its backward needs its input unchanged
        return input.copy_(_relu_op(input.clone(), target_arg(target)))
    _relu_inplace_op(input, target_arg(target))
    return input


# -------------------------------------------------------------------------------------------- autograd


def _autograd(op: Any, spec_of: Any, tensor_count: int) -> None:
    """Register ``op``'s gradients: its first ``tensor_count`` arguments are tensors, the rest parameters;
    ``spec_of(*args)`` gives (spec, output shape) from its arguments."""

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.spec = spec_of(*inputs)[0]  # None: an empty output
        ctx.save_for_backward(*inputs[:tensor_count])

    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple:
        found = gradients(ctx.spec, ctx.saved_tensors, ctx.needs_input_grad[:tensor_count], grad)
        return (*found, *[None] * (len(ctx.needs_input_grad) - tensor_count))

    op.register_autograd(backward, setup_context=setup_context)


def _pool_spec(return_indices: bool) -> Any:
    def spec_of(input, kernel_size, stride, padding, dilation, ceil_mode, target):
        params = (*map(tuple, (kernel_size, stride, padding, dilation)), ceil_mode, return_indices)
        return _spec_and_shape("max_pool2d", (input,), target, *params)

    return spec_of


_autograd(_conv2d_op, _conv2d_spec, 4)
_autograd(_max_pool2d_op, _pool_spec(False), 1)
_autograd(_max_pool2d_with_indices_op, _pool_spec(True), 1)
_autograd(_linear_op, _linear_spec, 3)
_autograd(_relu_op, lambda input, target: _spec_and_shape("relu", (input,), target), 1)

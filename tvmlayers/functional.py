"""torch.nn.functional's conv2d, max_pool2d, linear and relu, running tvmlayers kernels.

Signatures are torch's, plus keyword-only ``target=`` (and ``padding_mode=`` for conv2d, which torch
only offers on the module).  Kernels are inference-only: outputs carry no autograd history.

Each op is split in two.  The *plan* (``_<op>_plan``) takes only hashable facts (shapes, dtypes,
devices, parameters, target), checks them with torch's messages and finds the compiled kernel; it is
memoized, so a layer called again with the same shapes pays a dictionary lookup, not the checks.
The per-call part only touches tensors: make them contiguous, pack the weight, allocate, call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
import tvm

from .build import kernel_for
from .kernel import Kernel
from .layouts import packed_weight
from .ops import shapes
from .spec import DTYPES, KernelSpec
from .targets import TargetLike, device_type, resolve_target

__all__ = ["conv2d", "max_pool2d", "linear", "relu"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
_PLAN_CACHE = 4096


class _Plan(NamedTuple):
    kernel: Kernel | None  # None: the result is empty and no kernel runs
    out_shape: tuple[int, ...]  # of the first output, in the caller's (unbatched or batched) rank


def _facts(op: str, target: TargetLike, **tensors: torch.Tensor | None) -> tuple:
    """The hashable facts a plan needs: per tensor its shape (None if absent), then dtypes, devices,
    and the resolved target.  Raises torch's TypeError for a non-tensor argument."""
    for position, (name, value) in enumerate(tensors.items(), start=1):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{op}(): argument '{name}' (position {position}) must be Tensor, not {type(value).__name__}"
            )
    present = [t for t in tensors.values() if t is not None]
    return (
        tuple(None if t is None else tuple(t.shape) for t in tensors.values()),
        tuple(t.dtype for t in present),
        tuple(t.device for t in present),
        resolve_target(target),
    )


def _check_types(op: str, dtypes: tuple, devices: tuple, target: tvm.target.Target) -> str:
    """Dtypes and devices of an op's tensors; returns the kernel dtype name."""
    if dtypes[0] not in _DTYPE_NAMES:
        raise TypeError(f"tvmlayers {op} supports {' and '.join(DTYPES)} tensors, but got {dtypes[0]}")
    for dtype in dtypes[1:]:
        if dtype != dtypes[0]:
            raise TypeError(f"expected scalar type {_scalar_name(dtypes[0])} but found {_scalar_name(dtype)}")
    distinct = list(dict.fromkeys(str(d) for d in devices))
    if len(distinct) > 1:
        raise ValueError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{distinct[0]} and {distinct[1]}!"
        )
    wanted = device_type(target)
    if devices[0].type != wanted:
        raise ValueError(
            f"{op}: the kernel for target '{target.kind.name}' works on {wanted} tensors, but got tensors on "
            f"{devices[0]}; move them with .to('{wanted}') or pass a target for that device"
        )
    return _DTYPE_NAMES[dtypes[0]]


def _scalar_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double"}.get(dtype, str(dtype).replace("torch.", ""))


def _hashable(value: object) -> object:
    """Lists become tuples so that arguments can key the plan memo."""
    return tuple(value) if isinstance(value, list) else value


def _kernel_input(input: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """``input`` as the kernel sees it: contiguous, batched/flattened to the spec's shape (a view if possible)."""
    return input.detach().contiguous().view(kernel.spec.input_shape)


def _outputs(kernel: Kernel, dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=d) for shape, d in zip(kernel.output_shapes, dtypes, strict=False)]


# ---------------------------------------------------------------------------------------------- conv2d


@lru_cache(maxsize=_PLAN_CACHE)
def _conv2d_plan(
    shapes_: tuple,
    dtypes: tuple,
    devices: tuple,
    target: tvm.target.Target,
    stride: object,
    padding: object,
    dilation: object,
    groups: object,
    padding_mode: str,
) -> _Plan:
    in_shape, w_shape, b_shape = shapes_
    dtype = _check_types("conv2d", dtypes, devices, target)
    if len(in_shape) not in (3, 4):
        raise ValueError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(in_shape)}"
        )
    if len(w_shape) != 4:
        raise ValueError(
            "conv2d expects a 4D weight of shape (out_channels, in_channels/groups, kH, kW), "
            f"but got weight of size {list(w_shape)}"
        )
    stride_, dilation_ = shapes.pair(stride, "stride"), shapes.pair(dilation, "dilation")
    if min(stride_) <= 0:
        raise ValueError("non-positive stride is not supported")
    if min(dilation_) <= 0:
        raise ValueError(f"dilation should be greater than zero, but got {list(dilation_)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
        raise ValueError("non-positive groups is not supported")
    if padding_mode not in shapes.PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {set(shapes.PADDING_MODES)}, but got padding_mode='{padding_mode}'"
        )
    out_channels, in_per_group, kh, kw = w_shape
    if kh <= 0 or kw <= 0:
        raise ValueError(f"kernel size should be greater than zero, but got kernel_height: {kh} kernel_width: {kw}")
    if out_channels <= 0 or in_per_group <= 0:
        raise ValueError(f"conv2d expects a non-empty weight, but got weight of size {list(w_shape)}")
    if out_channels % groups:
        raise ValueError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size [{list(w_shape)}] instead"
        )
    if in_shape[-3] != in_per_group * groups:
        raise ValueError(
            f"Given groups={groups}, weight of size {list(w_shape)}, expected input{list(in_shape)} to have "
            f"{in_per_group * groups} channels, but got {in_shape[-3]} channels instead"
        )
    if b_shape is not None and b_shape != (out_channels,):
        raise ValueError(
            f"Given weight of size {list(w_shape)}, expected bias to be 1-dimensional with {out_channels} "
            f"elements, but got bias of size {list(b_shape)} instead"
        )
    pads = shapes.conv2d_padding(padding, (kh, kw), stride_, dilation_)
    if padding_mode != "zeros":
        shapes.check_conv_padding_mode(in_shape, pads, padding_mode)
    out_hw = shapes.conv2d_output_hw(in_shape[-2:], (kh, kw), stride_, pads, dilation_)
    out_shape = (*in_shape[:-3], out_channels, *out_hw)
    batched = in_shape if len(in_shape) == 4 else (1, *in_shape)
    if batched[0] == 0:
        return _Plan(None, out_shape)
    spec = KernelSpec.make(
        "conv2d",
        batched,
        dtype,
        target,
        stride=stride_,
        padding=pads,
        dilation=dilation_,
        groups=groups,
        padding_mode=padding_mode if any(pads) else "zeros",
        bias=b_shape is not None,
        weight_shape=w_shape,
    )
    return _Plan(kernel_for(spec), out_shape)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    target: TargetLike = None,
) -> torch.Tensor:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``; input (N, C_in, H, W) or (C_in, H, W).

    ``padding_mode`` ('zeros', 'reflect', 'replicate', 'circular') pads like ``nn.Conv2d`` does.
    """
    return conv2d_with_kernel(input, weight, bias, stride, padding, dilation, groups, padding_mode, target)[0]


def conv2d_with_kernel(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: object,
    padding: object,
    dilation: object,
    groups: int,
    padding_mode: str,
    target: TargetLike,
) -> tuple[torch.Tensor, Kernel | None]:
    """``conv2d`` and the kernel that computed it (None when nothing ran)."""
    facts = _facts("conv2d", target, input=input, weight=weight, bias=bias)
    plan = _conv2d_plan(*facts, _hashable(stride), _hashable(padding), _hashable(dilation), groups, padding_mode)
    if plan.kernel is None:
        return input.new_empty(plan.out_shape), None
    (out,) = _outputs(plan.kernel, [input.dtype])
    args = [_kernel_input(input, plan.kernel), packed_weight(weight, plan.kernel.weight_block)]
    if bias is not None:
        args.append(bias.detach().contiguous())
    plan.kernel(*args, out)
    return out.view(plan.out_shape), plan.kernel


# ------------------------------------------------------------------------------------------ max_pool2d


@lru_cache(maxsize=_PLAN_CACHE)
def _max_pool2d_plan(
    shapes_: tuple,
    dtypes: tuple,
    devices: tuple,
    target: tvm.target.Target,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    ceil_mode: bool,
    return_indices: bool,
) -> _Plan:
    (in_shape,) = shapes_
    dtype = _check_types("max_pool2d", dtypes, devices, target)
    if len(in_shape) not in (3, 4) or 0 in in_shape[-3:]:
        raise ValueError("non-empty 3D or 4D (batch mode) tensor expected for input")
    kernel_ = shapes.pair(kernel_size, "kernel_size")
    stride_ = kernel_ if stride is None or stride == () else shapes.pair(stride, "stride")
    padding_, dilation_ = shapes.pair(padding, "padding"), shapes.pair(dilation, "dilation")
    shapes.check_max_pool2d_args(kernel_, stride_, padding_, dilation_)
    out_hw = shapes.max_pool2d_output_hw(in_shape, kernel_, stride_, padding_, dilation_, ceil_mode)
    out_shape = (*in_shape[:-2], *out_hw)
    batched = in_shape if len(in_shape) == 4 else (1, *in_shape)
    if batched[0] == 0:
        return _Plan(None, out_shape)
    spec = KernelSpec.make(
        "max_pool2d",
        batched,
        dtype,
        target,
        kernel_size=kernel_,
        stride=stride_,
        padding=padding_,
        dilation=dilation_,
        ceil_mode=ceil_mode,
        return_indices=return_indices,
    )
    return _Plan(kernel_for(spec), out_shape)


def max_pool2d(
    input: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    *,
    target: TargetLike = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``; input (N, C, H, W) or (C, H, W).

    With ``return_indices`` also returns int64 indices into each flattened H*W input plane.
    """
    outputs, _ = max_pool2d_with_kernel(
        input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, target
    )
    return (outputs[0], outputs[1]) if return_indices else outputs[0]


def max_pool2d_with_kernel(
    input: torch.Tensor,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    ceil_mode: bool,
    return_indices: bool,
    target: TargetLike,
) -> tuple[list[torch.Tensor], Kernel | None]:
    """[values] or [values, indices], and the kernel that computed them (None when nothing ran)."""
    facts = _facts("max_pool2d", target, input=input)
    plan = _max_pool2d_plan(
        *facts,
        _hashable(kernel_size),
        _hashable(stride),
        _hashable(padding),
        _hashable(dilation),
        bool(ceil_mode),
        bool(return_indices),
    )
    if plan.kernel is None:
        outputs = [input.new_empty(plan.out_shape), torch.empty(plan.out_shape, dtype=torch.int64)]
    else:
        outputs = _outputs(plan.kernel, [input.dtype, torch.int64])
        plan.kernel(_kernel_input(input, plan.kernel), *outputs)
        outputs = [o.view(plan.out_shape) for o in outputs]
    return outputs[: 2 if return_indices else 1], plan.kernel


# ---------------------------------------------------------------------------------------------- linear


@lru_cache(maxsize=_PLAN_CACHE)
def _linear_plan(shapes_: tuple, dtypes: tuple, devices: tuple, target: tvm.target.Target) -> _Plan:
    in_shape, w_shape, b_shape = shapes_
    dtype = _check_types("linear", dtypes, devices, target)
    if len(in_shape) < 1 or len(w_shape) < 1:
        raise ValueError(
            f"both arguments to linear need to be at least 1D, but they are {len(in_shape)}D and {len(w_shape)}D"
        )
    if len(w_shape) != 2:
        raise ValueError(f"linear expects a 2D weight of shape (out_features, in_features), but got {list(w_shape)}")
    out_features, in_features = w_shape
    rows = math.prod(in_shape[:-1])
    if in_shape[-1] != in_features:
        raise ValueError(
            f"mat1 and mat2 shapes cannot be multiplied ({rows}x{in_shape[-1]} and {in_features}x{out_features})"
        )
    out_shape = (*in_shape[:-1], out_features)
    if b_shape is not None and b_shape != (out_features,):
        raise ValueError(
            f"The expanded size of the tensor ({out_features}) must match the existing size "
            f"({b_shape[-1] if b_shape else 1}) at non-singleton dimension {len(out_shape) - 1}.  "
            f"Target sizes: {list(out_shape)}.  Tensor sizes: {list(b_shape)}"
        )
    if rows == 0 or in_features == 0 or out_features == 0:
        return _Plan(None, out_shape)
    spec = KernelSpec.make("linear", (rows, in_features), dtype, target, bias=b_shape is not None, weight_shape=w_shape)
    return _Plan(kernel_for(spec), out_shape)


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, target: TargetLike = None
) -> torch.Tensor:
    """y = x W^T + b, as ``torch.nn.functional.linear``; input (*, in_features), weight (out, in)."""
    return linear_with_kernel(input, weight, bias, target)[0]


def linear_with_kernel(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: TargetLike
) -> tuple[torch.Tensor, Kernel | None]:
    """``linear`` and the kernel that computed it (None when nothing ran)."""
    plan = _linear_plan(*_facts("linear", target, input=input, weight=weight, bias=bias))
    if plan.kernel is None:
        # an empty product: torch's result is empty, or just the (broadcast) bias
        out = input.new_zeros(plan.out_shape)
        return (out + bias.detach() if bias is not None else out), None
    (out,) = _outputs(plan.kernel, [input.dtype])
    args = [_kernel_input(input, plan.kernel), packed_weight(weight, plan.kernel.weight_block)]
    if bias is not None:
        args.append(bias.detach().contiguous())
    plan.kernel(*args, out)  # the kernel sees (rows, in_features): the same memory, viewed 2-D
    return out.view(plan.out_shape), plan.kernel


# ------------------------------------------------------------------------------------------------ relu


@lru_cache(maxsize=_PLAN_CACHE)
def _relu_plan(shapes_: tuple, dtypes: tuple, devices: tuple, target: tvm.target.Target) -> _Plan:
    (in_shape,) = shapes_
    dtype = _check_types("relu", dtypes, devices, target)
    numel = math.prod(in_shape)
    if numel == 0:
        return _Plan(None, in_shape)
    return _Plan(kernel_for(KernelSpec.make("relu", (numel,), dtype, target)), in_shape)


def relu(input: torch.Tensor, inplace: bool = False, *, target: TargetLike = None) -> torch.Tensor:
    """max(0, x) elementwise; with ``inplace=True`` the result is written into ``input``, which is returned."""
    return relu_with_kernel(input, inplace, target)[0]


def relu_with_kernel(input: torch.Tensor, inplace: bool, target: TargetLike) -> tuple[torch.Tensor, Kernel | None]:
    """``relu`` and the kernel that computed it (None when nothing ran)."""
    kernel = _relu_plan(*_facts("relu", target, input=input)).kernel
    if kernel is None:
        return (input if inplace else input.clone()), None
    source = input.detach()
    if inplace and source.is_contiguous():
        flat = source.view(-1)
        kernel(flat, flat)  # elementwise, each element read before it is written: aliasing is safe
        return input, kernel
    result = torch.empty(input.shape, dtype=input.dtype)
    kernel(_kernel_input(source, kernel), result.view(-1))
    if inplace:
        source.copy_(result)
        return input, kernel
    return result, kernel

"""torch's rules for each layer call, from shapes and arguments to a KernelSpec and the output shape.

Pure Python over hashable facts (shapes as tuples, the kernel dtype's name, a target): used by the
functional API on every new call signature and by workload extraction for tuning.  Every check raises
``ValueError`` with the message torch gives for the same mistake.
"""

from __future__ import annotations

import math

import tvm

from .ops import shapes
from .spec import KernelSpec

Shape = tuple[int, ...]


def _fused(relu: bool) -> dict:
    # only fused specs carry the flag: the specs (and tuning workloads) of plain layers stay as they were
    return {"relu": True} if relu else {}


def conv2d_spec(
    in_shape: Shape,
    w_shape: Shape,
    b_shape: Shape | None,
    dtype: str,
    target: tvm.target.Target,
    stride: object,
    padding: object,
    dilation: object,
    groups: object,
    padding_mode: str,
    relu: bool = False,
) -> tuple[KernelSpec | None, Shape]:
    """torch.nn.functional.conv2d's checks and output shape; the spec is None for an empty batch."""
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
        return None, out_shape
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
        **_fused(relu),
    )
    return spec, out_shape


def max_pool2d_spec(
    in_shape: Shape,
    dtype: str,
    target: tvm.target.Target,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    ceil_mode: bool,
    return_indices: bool,
) -> tuple[KernelSpec | None, Shape]:
    """torch.nn.functional.max_pool2d's checks and output shape; the spec is None for an empty batch."""
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
        return None, out_shape
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
    return spec, out_shape


def linear_spec(
    in_shape: Shape, w_shape: Shape, b_shape: Shape | None, dtype: str, target: tvm.target.Target, relu: bool = False
) -> tuple[KernelSpec | None, Shape]:
    """torch.nn.functional.linear's checks and output shape; the spec is None for an empty product."""
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
        return None, out_shape
    spec = KernelSpec.make(
        "linear", (rows, in_features), dtype, target, bias=b_shape is not None, weight_shape=w_shape, **_fused(relu)
    )
    return spec, out_shape


def relu_spec(in_shape: Shape, dtype: str, target: tvm.target.Target) -> tuple[KernelSpec | None, Shape]:
    """relu keeps the tensor's shape (a 0-d tensor runs as one element); the spec is None for an empty one."""
    if math.prod(in_shape) == 0:
        return None, in_shape
    return KernelSpec.make("relu", tuple(in_shape) or (1,), dtype, target), in_shape

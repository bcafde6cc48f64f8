"""torch.nn.functional's conv2d, max_pool2d, linear and relu, running tvmlayers kernels.

Signatures are torch's, plus keyword-only ``target=`` (and ``padding_mode=`` for conv2d, which torch
only offers on the module).  Arguments are checked here, before any compilation, with torch's messages.
Kernels are inference-only: outputs carry no autograd history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .build import kernel_for
from .kernel import Kernel
from .layouts import packed_weight
from .ops import shapes
from .spec import DTYPES, KernelSpec
from .targets import TargetLike, device_type, resolve_target

__all__ = ["conv2d", "max_pool2d", "linear", "relu"]

_TORCH_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _check_tensors(op: str, target: TargetLike, **tensors: torch.Tensor | None) -> tuple[str, object]:
    """Types, dtypes and devices of the tensor arguments; returns (dtype name, resolved target)."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for position, (name, value) in enumerate(present.items(), start=1):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{op}(): argument '{name}' (position {position}) must be Tensor, not {type(value).__name__}"
            )
    first = next(iter(present.values()))
    if first.dtype not in _TORCH_DTYPES:
        raise TypeError(f"tvmlayers {op} supports {' and '.join(DTYPES)} tensors, but got {first.dtype}")
    for value in present.values():
        if value.dtype != first.dtype:
            raise TypeError(f"expected scalar type {_scalar_name(first.dtype)} but found {_scalar_name(value.dtype)}")
    devices = list(dict.fromkeys(str(t.device) for t in present.values()))
    if len(devices) > 1:
        raise ValueError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{devices[0]} and {devices[1]}!"
        )
    tgt = resolve_target(target)
    if first.device.type != device_type(tgt):
        raise ValueError(
            f"{op}: the kernel for target '{tgt.kind.name}' works on {device_type(tgt)} tensors, but got tensors on "
            f"{first.device}; move them with .to('{device_type(tgt)}') or pass a target for that device"
        )
    return _TORCH_DTYPES[first.dtype], tgt


def _scalar_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double"}.get(dtype, str(dtype).replace("torch.", ""))


def _run(kernel: Kernel, inputs: Sequence[torch.Tensor], out_dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    outputs = [torch.empty(shape, dtype=d) for shape, d in zip(kernel.output_shapes, out_dtypes, strict=True)]
    kernel(*inputs, *outputs)
    return outputs


def _size(t: torch.Tensor) -> list[int]:
    return list(t.shape)


# ---------------------------------------------------------------------------------------------- conv2d


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
    return conv2d_with_kernel(
        input, weight, bias, stride, padding, dilation, groups, padding_mode=padding_mode, target=target
    )[0]


def conv2d_with_kernel(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
    padding: str | int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    *,
    padding_mode: str,
    target: TargetLike,
) -> tuple[torch.Tensor, Kernel | None]:
    """``conv2d`` and the kernel that computed it (None for an empty batch)."""
    dtype, tgt = _check_tensors("conv2d", target, input=input, weight=weight, bias=bias)
    if input.dim() not in (3, 4):
        raise ValueError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {_size(input)}"
        )
    if weight.dim() != 4:
        raise ValueError(
            "conv2d expects a 4D weight of shape (out_channels, in_channels/groups, kH, kW), "
            f"but got weight of size {_size(weight)}"
        )
    stride_, dilation_ = shapes.pair(stride, "stride"), shapes.pair(dilation, "dilation")
    if min(stride_) <= 0:
        raise ValueError("non-positive stride is not supported")
    if min(dilation_) <= 0:
        raise ValueError(f"dilation should be greater than zero, but got {list(dilation_)}")
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError("non-positive groups is not supported")
    if padding_mode not in shapes.PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {set(shapes.PADDING_MODES)}, but got padding_mode='{padding_mode}'"
        )
    out_channels, in_per_group, kh, kw = weight.shape
    if min(weight.shape) <= 0:
        raise ValueError(f"conv2d expects a non-empty weight, but got weight of size {_size(weight)}")
    if out_channels % groups:
        raise ValueError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size [{_size(weight)}] instead"
        )
    channels = input.shape[-3]
    if channels != in_per_group * groups:
        raise ValueError(
            f"Given groups={groups}, weight of size {_size(weight)}, expected input{_size(input)} to have "
            f"{in_per_group * groups} channels, but got {channels} channels instead"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(
            f"Given weight of size {_size(weight)}, expected bias to be 1-dimensional with {out_channels} "
            f"elements, but got bias of size {_size(bias)} instead"
        )
    pads = shapes.conv2d_padding(padding, (kh, kw), stride_, dilation_)
    if padding_mode != "zeros":
        shapes.check_conv_padding_mode(input.shape, pads, padding_mode)
    out_hw = shapes.conv2d_output_hw(tuple(input.shape[-2:]), (kh, kw), stride_, pads, dilation_)

    batched = input.unsqueeze(0) if input.dim() == 3 else input
    if batched.shape[0] == 0:
        return input.new_empty((0, out_channels, *out_hw)), None
    spec = KernelSpec.make(
        "conv2d",
        tuple(batched.shape),
        dtype,
        tgt,
        stride=stride_,
        padding=pads,
        dilation=dilation_,
        groups=groups,
        padding_mode=padding_mode if any(pads) else "zeros",
        bias=bias is not None,
        weight_shape=tuple(weight.shape),
    )
    kernel = kernel_for(spec)
    args = [batched.detach().contiguous(), packed_weight(weight, kernel.weight_block)]
    if bias is not None:
        args.append(bias.detach().contiguous())
    (out,) = _run(kernel, args, [input.dtype])
    return (out if input.dim() == 4 else out[0]), kernel


# ------------------------------------------------------------------------------------------ max_pool2d


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
        input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, target=target
    )
    return (outputs[0], outputs[1]) if return_indices else outputs[0]


def max_pool2d_with_kernel(
    input: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    ceil_mode: bool,
    return_indices: bool,
    *,
    target: TargetLike,
) -> tuple[list[torch.Tensor], Kernel | None]:
    """[values] or [values, indices], and the kernel that computed them (None for an empty batch)."""
    dtype, tgt = _check_tensors("max_pool2d", target, input=input)
    if input.dim() not in (3, 4) or any(d == 0 for d in input.shape[-3:]):
        raise ValueError("non-empty 3D or 4D (batch mode) tensor expected for input")
    kernel_ = shapes.pair(kernel_size, "kernel_size")
    stride_ = (
        kernel_
        if stride is None or (isinstance(stride, Sequence) and len(stride) == 0)
        else shapes.pair(stride, "stride")
    )
    padding_, dilation_ = shapes.pair(padding, "padding"), shapes.pair(dilation, "dilation")
    shapes.check_max_pool2d_args(kernel_, stride_, padding_, dilation_)
    out_hw = shapes.max_pool2d_output_hw(input.shape, kernel_, stride_, padding_, dilation_, bool(ceil_mode))

    batched = input.unsqueeze(0) if input.dim() == 3 else input
    kernel = None
    if batched.shape[0] == 0:
        values = input.new_empty((0, input.shape[-3], *out_hw))
        outputs = [values, torch.empty(values.shape, dtype=torch.int64)]
    else:
        spec = KernelSpec.make(
            "max_pool2d",
            tuple(batched.shape),
            dtype,
            tgt,
            kernel_size=kernel_,
            stride=stride_,
            padding=padding_,
            dilation=dilation_,
            ceil_mode=bool(ceil_mode),
            return_indices=bool(return_indices),
        )
        kernel = kernel_for(spec)
        outputs = _run(kernel, [batched.detach().contiguous()], [input.dtype, torch.int64][: len(kernel.output_shapes)])
    if input.dim() == 3:
        outputs = [o[0] for o in outputs]
    return outputs, kernel


# ---------------------------------------------------------------------------------------------- linear


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, target: TargetLike = None
) -> torch.Tensor:
    """y = x W^T + b, as ``torch.nn.functional.linear``; input (*, in_features), weight (out, in)."""
    return linear_with_kernel(input, weight, bias, target=target)[0]


def linear_with_kernel(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, target: TargetLike
) -> tuple[torch.Tensor, Kernel | None]:
    """``linear`` and the kernel that computed it (None for empty products)."""
    dtype, tgt = _check_tensors("linear", target, input=input, weight=weight, bias=bias)
    if input.dim() < 1 or weight.dim() < 1:
        raise ValueError(
            f"both arguments to linear need to be at least 1D, but they are {input.dim()}D and {weight.dim()}D"
        )
    if weight.dim() != 2:
        raise ValueError(f"linear expects a 2D weight of shape (out_features, in_features), but got {_size(weight)}")
    out_features, in_features = weight.shape
    rows = math.prod(input.shape[:-1])
    if input.shape[-1] != in_features:
        raise ValueError(
            f"mat1 and mat2 shapes cannot be multiplied ({rows}x{input.shape[-1]} and {in_features}x{out_features})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(
            f"The expanded size of the tensor ({out_features}) must match the existing size "
            f"({bias.shape[-1] if bias.dim() else 1}) at non-singleton dimension {max(input.dim() - 1, 0)}.  "
            f"Target sizes: {[*input.shape[:-1], out_features]}.  Tensor sizes: {_size(bias)}"
        )
    out_shape = (*input.shape[:-1], out_features)
    if rows == 0 or in_features == 0 or out_features == 0:
        # no kernel for empty products: torch's result is empty, or just the bias
        out = input.new_zeros(out_shape)
        return (out + bias.detach() if bias is not None else out), None
    spec = KernelSpec.make(
        "linear",
        (rows, in_features),
        dtype,
        tgt,
        bias=bias is not None,
        weight_shape=(out_features, in_features),
    )
    kernel = kernel_for(spec)
    args = [
        input.detach().reshape(rows, in_features).contiguous(),
        packed_weight(weight, kernel.weight_block),
    ]
    if bias is not None:
        args.append(bias.detach().contiguous())
    (out,) = _run(kernel, args, [input.dtype])
    return out.reshape(out_shape), kernel


# ------------------------------------------------------------------------------------------------ relu


def relu(input: torch.Tensor, inplace: bool = False, *, target: TargetLike = None) -> torch.Tensor:
    """max(0, x) elementwise; with ``inplace=True`` the result is written into ``input``, which is returned."""
    return relu_with_kernel(input, inplace, target=target)[0]


def relu_with_kernel(input: torch.Tensor, inplace: bool, *, target: TargetLike) -> tuple[torch.Tensor, Kernel | None]:
    """``relu`` and the kernel that computed it (None for an empty tensor)."""
    dtype, tgt = _check_tensors("relu", target, input=input)
    if input.numel() == 0:
        return (input if inplace else input.clone()), None
    kernel = kernel_for(KernelSpec.make("relu", (input.numel(),), dtype, tgt))
    source = input.detach()
    if inplace and source.is_contiguous():
        flat = source.view(-1)
        kernel(flat, flat)  # elementwise, each element read before it is written: aliasing is safe
        return input, kernel
    result = torch.empty(input.shape, dtype=input.dtype)
    kernel(source.contiguous().view(-1), result.view(-1))
    if inplace:
        source.copy_(result)
        return input, kernel
    return result, kernel

"""torch's rules for each layer call, from shapes and arguments to a KernelSpec and the output shape.

Pure Python over hashable facts (shapes as tuples, the kernel dtype's name, a target): used by the
functional API on every new call signature, by workload extraction for tuning and by the workload-file
reader (:func:`workload_spec`).  Every check raises ``ValueError`` with the message torch gives for the
same mistake, and with a message of our own for what torch can do and a TVM kernel cannot: more elements
than 32-bit indices reach.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import tvm

from .ops import shapes
from .ops.relu import ACTIVATIONS
from .spec import DTYPES, OPS, KernelSpec

Shape = tuple[int, ...]

# TVM indexes a buffer with int32 arithmetic when each of its dimensions fits in int32, and then a buffer of
# 2**31 elements or more does not compile: "Literal value 2147483648 exceeds range of int32" (FlattenBuffer;
# seen with TVM 0.27 for the input, weight and output of each op here, while 2**31 - 1 elements compile).
# Only a buffer with one dimension of 2**31 or more gets int64 indices, and no tvmlayers kernel is built or
# tested that way, so the limit holds for every tensor of a kernel.
MAX_ELEMENTS = 2**31 - 1


def check_element_counts(op: str, batch: int, along: str, **tensors: Shape) -> None:
    """A ValueError naming the first tensor of a kernel with more than :data:`MAX_ELEMENTS` elements, before
    TVM fails on it deep inside its compiler.  The input and output shrink when the call is split ``along``
    their leading dimension(s), ``batch`` entries long; the weight does not."""
    for name, shape in tensors.items():
        count = math.prod(shape)
        if count <= MAX_ELEMENTS:
            continue
        if name == "weight":
            advice = "split the layer into several with fewer outputs each and concatenate their results"
        else:  # the input or output has elements, so batch > 0
            per_entry = max(math.prod(other) // batch for key, other in tensors.items() if key != "weight")
            if per_entry <= MAX_ELEMENTS:
                advice = (
                    f"split the call along {along} into calls of at most {MAX_ELEMENTS // per_entry:,} (of {batch:,})"
                )
            else:
                advice = f"even one entry of {along} is too large ({per_entry:,} elements): split the work within it"
        raise ValueError(
            f"{op}: the {name} tensor of size {list(shape)} has {count:,} elements, more than the {MAX_ELEMENTS:,} "
            f"(2**31 - 1) that a TVM kernel can index with 32-bit integers; {advice}"
        )


def _fused(op: str, relu: bool, relu6: bool = False, residual: bool = False) -> dict:
    # only fused specs carry the flags: the specs (and tuning workloads) of plain layers stay as they were
    if relu and relu6:
        raise ValueError(f"{op}: fuse_relu and fuse_relu6 cannot both be set: the kernel fuses one activation")
    return {name: True for name, fused in (("relu", relu), ("relu6", relu6), ("residual", residual)) if fused}


def check_residual(op: str, out_shape: Shape, residual_shape: Shape) -> None:
    """The residual added in a kernel's epilogue has the output's shape exactly: torch's message where ``out +
    residual`` fails in torch too, our own where torch would broadcast (the kernel reads it element for
    element; ``residual.expand(...)`` makes the broadcast explicit)."""
    if residual_shape == out_shape:
        return
    for dim in range(1, min(len(out_shape), len(residual_shape)) + 1):
        size, other = out_shape[-dim], residual_shape[-dim]
        if size != other and other != 1 and size != 1:
            raise ValueError(
                f"The size of tensor a ({size}) must match the size of tensor b ({other}) at non-singleton "
                f"dimension {max(len(out_shape), len(residual_shape)) - dim}"
            )
    raise ValueError(
        f"{op}: the residual must have the output's size {list(out_shape)}, but got size {list(residual_shape)}; "
        f"the kernel adds it element for element, without broadcasting: pass "
        f"residual.expand({', '.join(map(str, out_shape))}) to broadcast it"
    )


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
    padding_is_normalized: bool = False,
    residual: Shape | None = None,
    relu6: bool = False,
) -> tuple[KernelSpec | None, Shape]:
    """torch.nn.functional.conv2d's checks and output shape; the spec is None for an empty batch.

    ``padding`` is torch's (an int, a pair, 'same' or 'valid'), or with ``padding_is_normalized`` the
    (top, left, bottom, right) tuple of a KernelSpec, as workload files hold it (checked by the caller).
    ``residual`` is the shape of a tensor added to the output before the activation, ``relu`` or ``relu6``
    (:func:`check_residual`).
    """
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
    pads = tuple(padding) if padding_is_normalized else shapes.conv2d_padding(padding, (kh, kw), stride_, dilation_)
    if padding_mode != "zeros":
        shapes.check_conv_padding_mode(in_shape, pads, padding_mode)
    out_hw = shapes.conv2d_output_hw(in_shape[-2:], (kh, kw), stride_, pads, dilation_)
    out_shape = (*in_shape[:-3], out_channels, *out_hw)
    fused = _fused("conv2d", relu, relu6, residual is not None)
    if residual is not None:
        check_residual("conv2d", out_shape, residual)
    batched = in_shape if len(in_shape) == 4 else (1, *in_shape)
    check_element_counts("conv2d", batched[0], "the batch", input=in_shape, weight=w_shape, output=out_shape)
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
        **fused,
    )
    return spec, out_shape


# A conv2d or max_pool2d spec may take its input and give its output (and a conv's residual) channel-blocked,
# NCHW[x]c (``tvmlayers.ops``): these parameters name the blocks; absent, the activation is torch's NCHW.  A
# max-pool keeps its input's layout: both blocks alike, or neither.
CHANNEL_BLOCKS = ("in_block", "out_block")
BLOCKED_OPS = ("conv2d", "max_pool2d")


def blocked_spec(spec: KernelSpec, in_block: int | None, out_block: int | None) -> KernelSpec:
    """``spec`` (a batched conv2d's or max_pool2d's, NCHW) with its input in blocks of ``in_block`` channels and
    its output (and residual) in blocks of ``out_block`` (None: NCHW); each block must divide its channel count,
    and a max-pool's two are the same (it has no indices: torch's are positions in NCHW planes)."""
    if spec.op not in BLOCKED_OPS or any(spec.get(name) is not None for name in CHANNEL_BLOCKS):
        raise ValueError(f"channel blocks apply to an NCHW conv2d or max_pool2d spec, not to {spec.describe()}")
    if spec.op == "max_pool2d" and (in_block != out_block or spec["return_indices"]):
        raise ValueError(
            f"a channel-blocked max_pool2d keeps its input's blocks and returns no indices, got in_block={in_block!r}, "
            f"out_block={out_block!r}, return_indices={spec['return_indices']}"
        )
    out_channels = spec["weight_shape"][0] if spec.op == "conv2d" else spec.input_shape[1]
    blocks = {}
    for name, block, channels in (("in_block", in_block, spec.input_shape[1]), ("out_block", out_block, out_channels)):
        if block is None:
            continue
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0 or channels % block:
            raise ValueError(f"{name} must be a positive integer dividing the {channels} channels, got {block!r}")
        blocks[name] = block
    return KernelSpec.make(spec.op, spec.input_shape, spec.dtype, spec.target, **dict(spec.params), **blocks)


def unblocked_spec(spec: KernelSpec) -> KernelSpec:
    """``spec`` without channel blocks: the NCHW call whose torch semantics it has."""
    if all(spec.get(name) is None for name in CHANNEL_BLOCKS):
        return spec
    params = {name: value for name, value in spec.params if name not in CHANNEL_BLOCKS}
    return KernelSpec.make(spec.op, spec.input_shape, spec.dtype, spec.target, **params)


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
    # the indices (int64) have the output's shape: the same count
    check_element_counts("max_pool2d", batched[0], "the batch", input=in_shape, output=out_shape)
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
    in_shape: Shape,
    w_shape: Shape,
    b_shape: Shape | None,
    dtype: str,
    target: tvm.target.Target,
    relu: bool = False,
    relu6: bool = False,
) -> tuple[KernelSpec | None, Shape]:
    """torch.nn.functional.linear's checks and output shape; the spec is None for an empty product."""
    fused = _fused("linear", relu, relu6)
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
    check_element_counts(
        "linear", rows, "the input's rows (its leading dimensions)", input=in_shape, weight=w_shape, output=out_shape
    )
    if rows == 0 or in_features == 0 or out_features == 0:
        return None, out_shape
    spec = KernelSpec.make(
        "linear", (rows, in_features), dtype, target, bias=b_shape is not None, weight_shape=w_shape, **fused
    )
    return spec, out_shape


def relu_spec(in_shape: Shape, dtype: str, target: tvm.target.Target) -> tuple[KernelSpec | None, Shape]:
    """relu keeps the tensor's shape (a 0-d tensor runs as one element); the spec is None for an empty one."""
    check_element_counts("relu", in_shape[0] if in_shape else 1, "the first dimension", input=in_shape, output=in_shape)
    if math.prod(in_shape) == 0:
        return None, in_shape
    return KernelSpec.make("relu", tuple(in_shape) or (1,), dtype, target), in_shape


# The parameters of each op in a workload file (KernelSpec's, normalized as conv2d_spec etc. write them);
# "relu" and "relu6" (fused activations, at most one) are optional and false by default, and so is conv2d's
# "residual" (an added output-shaped input); conv2d's and max_pool2d's ``CHANNEL_BLOCKS`` are optional integers.
WORKLOAD_PARAMS = {
    "conv2d": ("weight_shape", "stride", "padding", "dilation", "groups", "padding_mode", "bias"),
    "max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "linear": ("weight_shape", "bias"),
    "relu": (),
}
_FUSABLE = ("conv2d", "linear")


def _ints(name: str, value: object, length: int | None = None) -> Shape:
    """A list of integers from a workload file (TOML gives lists; floats, strings and booleans are mistakes)."""
    if (
        not isinstance(value, list | tuple)
        or (length is not None and len(value) != length)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        size = f"{length} " if length is not None else ""
        raise ValueError(f"{name} must be a list of {size}integers, got {value!r}")
    return tuple(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def workload_spec(
    op: object, input_shape: object, dtype: object, params: Mapping[str, Any], target: tvm.target.Target
) -> KernelSpec:
    """The spec of one layer of a workload file, checked as a layer call is: the file's parameter names and
    types first, then torch's rules through the same functions the functional API uses, so that a file with
    e.g. a weight whose channels disagree with the input's fails when it is read, with torch's message."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}, expected one of {OPS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    fusable = ACTIVATIONS if op in _FUSABLE else ()
    allowed = WORKLOAD_PARAMS[op] + fusable + (("residual",) if op == "conv2d" else ())
    allowed += CHANNEL_BLOCKS if op in BLOCKED_OPS else ()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {op}; expected {', '.join(allowed)}")
    missing = [name for name in WORKLOAD_PARAMS[op] if name not in params]
    if missing:
        raise ValueError(f"missing parameter(s) {', '.join(missing)} for {op}")
    rank = {"conv2d": 4, "max_pool2d": 4, "linear": 2}.get(op)
    shape = _ints("input_shape", input_shape, rank)
    if not shape or min(shape) <= 0:
        raise ValueError(f"input_shape must have at least one dimension, all positive, got {list(shape)}")
    relu, relu6 = (_flag(name, params.get(name, False)) for name in ACTIVATIONS)
    if op == "conv2d":
        weight = _ints("weight_shape", params["weight_shape"], 4)
        padding = _ints("padding", params["padding"], 4)
        if min(padding) < 0:
            raise ValueError("negative padding is not supported")
        bias = (weight[0],) if _flag("bias", params["bias"]) else None
        args = (
            shape,
            weight,
            bias,
            dtype,
            target,
            _ints("stride", params["stride"], 2),
            padding,
            _ints("dilation", params["dilation"], 2),
            params["groups"],
            params["padding_mode"],
            relu,
        )
        spec, out_shape = conv2d_spec(*args, padding_is_normalized=True, relu6=relu6)
        if _flag("residual", params.get("residual", False)):  # a flag in the file: the residual has the output's shape
            spec, _ = conv2d_spec(*args, padding_is_normalized=True, residual=out_shape, relu6=relu6)
    elif op == "max_pool2d":
        spec, _ = max_pool2d_spec(
            shape,
            dtype,
            target,
            *(_ints(name, params[name], 2) for name in ("kernel_size", "stride", "padding", "dilation")),
            _flag("ceil_mode", params["ceil_mode"]),
            _flag("return_indices", params["return_indices"]),
        )
    elif op == "linear":
        weight = _ints("weight_shape", params["weight_shape"], 2)
        if min(weight) <= 0:  # torch allows an empty product; a workload of one makes no kernel to tune
            raise ValueError(f"weight_shape must be positive, got {list(weight)}")
        bias = (weight[0],) if _flag("bias", params["bias"]) else None
        spec, _ = linear_spec(shape, weight, bias, dtype, target, relu, relu6)
    else:
        spec, _ = relu_spec(shape, dtype, target)
    if any(name in params for name in CHANNEL_BLOCKS):
        spec = blocked_spec(spec, params.get("in_block"), params.get("out_block"))
    return spec

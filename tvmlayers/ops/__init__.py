"""Op definitions: pure tensor expressions with torch's semantics, and the PrimFunc of a KernelSpec.

``prim_func(spec, layout)`` is the single place where a spec becomes TVM IR; its argument order is the
calling convention of the compiled kernel: inputs, then outputs.
"""

from __future__ import annotations

import tvm
from tvm import te

from ..spec import KernelSpec
from .conv2d import conv2d_compute
from .linear import linear_compute
from .max_pool2d import max_pool2d_compute
from .relu import relu_compute, spec_activation
from .shapes import conv2d_output_hw, max_pool2d_output_hw

__all__ = [
    "conv2d_compute", "linear_compute", "max_pool2d_compute", "relu_compute", "prim_func", "blocked_shape", "SYMBOL",
]  # fmt: skip

# The name of the kernel function inside every compiled library.
SYMBOL = "tvmlayers_kernel"


def _tensors(spec: KernelSpec, layout: dict) -> tuple[list[te.Tensor], list[te.Tensor]]:
    dtype = spec.dtype
    data = te.placeholder(blocked_shape(spec.input_shape, spec.get("in_block")), dtype, name="data")
    if spec.op == "conv2d":
        out_channels, in_per_group, kh, kw = spec["weight_shape"]
        block = layout["weight_block"]
        out_blocks = -(-out_channels // block)  # the last block padded where block does not divide out_channels
        weight = te.placeholder((out_blocks, in_per_group, kh, kw, block), dtype, name="weight")
        bias = te.placeholder((out_channels,), dtype, name="bias") if spec["bias"] else None
        out_hw = conv2d_output_hw(spec.input_shape[-2:], (kh, kw), spec["stride"], spec["padding"], spec["dilation"])
        out_shape = blocked_shape((spec.input_shape[0], out_channels, *out_hw), spec.get("out_block"))
        residual = te.placeholder(out_shape, dtype, name="residual") if spec.get("residual", False) else None
        out = conv2d_compute(
            data,
            weight,
            bias,
            spec["stride"],
            spec["padding"],
            spec["dilation"],
            spec["groups"],
            spec["padding_mode"],
            out_hw,
            out_channels,
            residual=residual,
            activation=spec_activation(dict(spec.params)),
            out_block=spec.get("out_block"),
        )
        return [data, weight] + [t for t in (bias, residual) if t is not None], [out]
    if spec.op == "max_pool2d":
        args = (spec["kernel_size"], spec["stride"], spec["padding"], spec["dilation"])
        out_hw = max_pool2d_output_hw(spec.input_shape, *args, spec["ceil_mode"])
        return [data], max_pool2d_compute(data, *args, out_hw, spec["return_indices"])
    if spec.op == "linear":
        out_features, in_features = spec["weight_shape"]
        block = layout["weight_block"]
        weight = te.placeholder((out_features // block, in_features, block), dtype, name="weight")
        bias = te.placeholder((out_features,), dtype, name="bias") if spec["bias"] else None
        return [data, weight] + ([bias] if bias is not None else []), [
            linear_compute(data, weight, bias, spec_activation(dict(spec.params)))
        ]
    if spec.op == "relu":
        return [data], [relu_compute(data)]
    raise ValueError(f"unknown op {spec.op!r}")


def blocked_shape(shape: tuple[int, ...], block: int | None) -> tuple[int, ...]:
    """An NCHW shape as its channel-blocked NCHW[block]c tensor has it (``block`` None: as it is)."""
    if block is None:
        return tuple(shape)
    n, c, h, w = shape
    return (n, c // block, h, w, block)


def prim_func(spec: KernelSpec, layout: dict) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of ``spec``, tagged with the op name for the schedule rules."""
    inputs, outputs = _tensors(spec, layout)
    func = te.create_prim_func(inputs + outputs)
    return func.with_attr("global_symbol", SYMBOL).with_attr("tvmlayers.op", spec.op)


def output_shapes(spec: KernelSpec, layout: dict) -> list[tuple[int, ...]]:
    """Shapes of the kernel's outputs, in calling-convention order."""
    _, outputs = _tensors(spec, layout)
    return [tuple(int(d) for d in t.shape) for t in outputs]

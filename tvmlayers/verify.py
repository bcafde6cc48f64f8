"""Check a compiled kernel against torch on random inputs: a fast but wrong schedule must never be used."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .layer_specs import unblocked_spec
from .ops import output_shapes
from .reference import kernel_arguments, layer_outputs, random_layer_inputs, unblock_channels
from .spec import KernelSpec

TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def random_inputs(
    spec: KernelSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(input, weight in torch's layout or None, bias or None, residual or None) for one call of ``spec``, in
    torch's layouts (a channel-blocked conv2d's too)."""
    output_shape = output_shapes(unblocked_spec(spec), {"weight_block": 1})[0] if spec.get("residual", False) else None
    return random_layer_inputs(spec.op, dict(spec.params), spec.input_shape, spec.dtype, output_shape, generator)


def torch_reference(
    spec: KernelSpec,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """What torch computes for ``spec``, the way a torch user computes it (a fused spec: the layer, then
    ``+ residual``, then relu or relu6): the oracle of the correctness checks and the torch side of the benchmark."""
    return layer_outputs(spec.op, dict(spec.params), x, weight, bias, residual)


def kernel_inputs(
    spec: KernelSpec,
    layout: dict,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The kernel's input arguments: the input as its spec shapes it, the weight blocked, the bias, the
    residual (as the spec's batched output); input and residual channel-blocked where the spec says so."""
    output_shape = output_shapes(unblocked_spec(spec), layout)[0] if residual is not None else None
    blocks = spec.get("in_block"), spec.get("out_block")
    block = layout.get("weight_block", 1)
    return kernel_arguments(spec.input_shape, block, x, weight, bias, residual, output_shape, *blocks)


def check_kernel(spec: KernelSpec, layout: dict, kernel: Callable[..., None], seed: int = 0) -> str | None:
    """Run ``kernel`` (inputs, then outputs) on random data; None if it matches torch, else what differs."""
    x, weight, bias, residual = random_inputs(spec, torch.Generator().manual_seed(seed))
    expected = torch_reference(spec, x, weight, bias, residual)
    shapes = output_shapes(spec, layout)  # the kernel's: a channel-blocked output is unblocked to compare
    outputs = [torch.empty(shape, dtype=e.dtype) for shape, e in zip(shapes, expected, strict=True)]
    kernel(*kernel_inputs(spec, layout, x, weight, bias, residual), *outputs)
    if spec.get("out_block") is not None:
        outputs = [unblock_channels(outputs[0])]
    for index, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        if got.dtype == torch.int64:
            mismatched = int((got != want).sum())
            error = f"{mismatched} of {got.numel()} indices differ"
        else:
            difference = (got - want).abs().max().item() if got.numel() else 0.0
            limit = TOLERANCE[spec.dtype] * (1 + want.abs().max().item() if want.numel() else 1)
            mismatched = int(not difference <= limit)  # NaN differences count as mismatches
            error = f"max abs error {difference:.3g} > {limit:.3g}"
        if mismatched:
            return f"output {index} differs from torch: {error}"
    return None

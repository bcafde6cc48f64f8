"""Check a compiled kernel against torch on random inputs: a fast but wrong schedule must never be used."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layouts import block_out_channels
from .ops import output_shapes
from .ops.relu import spec_activation
from .spec import KernelSpec

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def random_inputs(
    spec: KernelSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(input, weight in torch's layout or None, bias or None, residual or None) for one call of ``spec``."""
    dtype = _TORCH_DTYPES[spec.dtype]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    x = rand(*spec.input_shape)
    weight = rand(*spec["weight_shape"]) if spec.op in ("conv2d", "linear") else None
    bias = rand(spec["weight_shape"][0]) if weight is not None and spec["bias"] else None
    residual = rand(*output_shapes(spec, {"weight_block": 1})[0]) if spec.get("residual", False) else None
    return x, weight, bias, residual


def _activation(out: torch.Tensor, params: dict) -> torch.Tensor:
    """The activation a fused conv2d/linear spec applies, as torch's own op."""
    activation = spec_activation(params)
    return {"relu": F.relu, "relu6": F.relu6}[activation](out) if activation is not None else out


def torch_reference(
    spec: KernelSpec,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """What torch computes for ``spec``, the way a torch user computes it (a fused spec: the layer, then
    ``+ residual``, then relu or relu6): the oracle of the correctness checks and the torch side of the benchmark."""
    p = dict(spec.params)
    if spec.op == "conv2d":
        top, left, bottom, right = p["padding"]
        if p["padding_mode"] == "zeros" and (top, left) == (bottom, right):
            out = F.conv2d(x, weight, bias, p["stride"], (top, left), p["dilation"], p["groups"])
        else:  # uneven ('same' with an even kernel) or non-zero padding: nn.Conv2d pads first, too
            mode = {"zeros": "constant"}.get(p["padding_mode"], p["padding_mode"])
            padded = F.pad(x, (left, right, top, bottom), mode=mode)
            out = F.conv2d(padded, weight, bias, p["stride"], 0, p["dilation"], p["groups"])
        out = out + residual if residual is not None else out
        return [_activation(out, p)]
    if spec.op == "max_pool2d":
        out = F.max_pool2d(
            x,
            p["kernel_size"],
            p["stride"],
            p["padding"],
            p["dilation"],
            p["ceil_mode"],
            return_indices=p["return_indices"],
        )
        return list(out) if p["return_indices"] else [out]
    if spec.op == "linear":
        return [_activation(F.linear(x, weight, bias), p)]
    return [F.relu(x)]


def kernel_inputs(
    spec: KernelSpec,
    layout: dict,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The kernel's input arguments: the input as its spec shapes it, the weight blocked, the bias, the
    residual (as the spec's batched output)."""
    args = [x.contiguous().view(spec.input_shape)]
    if weight is not None:
        args.append(block_out_channels(weight, layout["weight_block"]))
    if bias is not None:
        args.append(bias)
    if residual is not None:
        args.append(residual.contiguous().view(output_shapes(spec, layout)[0]))
    return args


def check_kernel(spec: KernelSpec, layout: dict, kernel: Callable[..., None], seed: int = 0) -> str | None:
    """Run ``kernel`` (inputs, then outputs) on random data; None if it matches torch, else what differs."""
    x, weight, bias, residual = random_inputs(spec, torch.Generator().manual_seed(seed))
    expected = torch_reference(spec, x, weight, bias, residual)
    outputs = [torch.empty_like(e) for e in expected]
    kernel(*kernel_inputs(spec, layout, x, weight, bias, residual), *outputs)
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

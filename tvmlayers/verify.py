"""Check a compiled kernel against torch on random inputs: a fast but wrong schedule must never be used."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layouts import block_out_channels
from .spec import KernelSpec

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def _reference(spec: KernelSpec, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> list:
    outputs = _unfused_reference(spec, x, weight, bias)
    return [F.relu(outputs[0])] if spec.get("relu", False) else outputs


def _unfused_reference(
    spec: KernelSpec, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> list:
    p = dict(spec.params)
    if spec.op == "conv2d":
        top, left, bottom, right = p["padding"]
        mode = {"zeros": "constant"}.get(p["padding_mode"], p["padding_mode"])
        padded = F.pad(x, (left, right, top, bottom), mode=mode) if any(p["padding"]) else x
        return [F.conv2d(padded, weight, bias, p["stride"], 0, p["dilation"], p["groups"])]
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
        return [F.linear(x, weight, bias)]
    return [F.relu(x)]


def check_kernel(spec: KernelSpec, layout: dict, kernel: Callable[..., None], seed: int = 0) -> str | None:
    """Run ``kernel`` (inputs, then outputs) on random data; None if it matches torch, else what differs."""
    generator = torch.Generator().manual_seed(seed)
    dtype = _TORCH_DTYPES[spec.dtype]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    x = rand(*spec.input_shape)
    weight = rand(*spec["weight_shape"]) if spec.op in ("conv2d", "linear") else None
    bias = rand(spec["weight_shape"][0]) if weight is not None and spec["bias"] else None
    expected = _reference(spec, x, weight, bias)
    outputs = [torch.empty_like(e) for e in expected]
    args = [x]
    if weight is not None:
        args.append(block_out_channels(weight, layout["weight_block"]))
    if bias is not None:
        args.append(bias)
    kernel(*args, *outputs)
    for index, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        if got.dtype == torch.int64:
            mismatched = int((got != want).sum())
            error = f"{mismatched} of {got.numel()} indices differ"
        else:
            difference = (got - want).abs().max().item() if got.numel() else 0.0
            limit = _TOLERANCE[spec.dtype] * (1 + want.abs().max().item() if want.numel() else 1)
            mismatched = int(not difference <= limit)  # NaN differences count as mismatches
            error = f"max abs error {difference:.3g} > {limit:.3g}"
        if mismatched:
            return f"output {index} differs from torch: {error}"
    return None

"""torch's answer for a kernel, from its spec's plain JSON: the oracle of every correctness check.

Standalone on purpose (torch only, no TVM, no other tvmlayers module): every bundle carries a copy next to its
``run.py``, which computes references on the device where a bundle ships none (CUDA bundles: torch on the GPU),
so the host's checks (:mod:`tvmlayers.verify`) and the device's run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# the activations a conv2d/linear spec may fuse (at most one flag is set), as torch applies them
_ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6}


def layer_outputs(
    op: str,
    params: dict,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """What torch computes for a spec (``op``, its ``params``), the way a torch user computes it (a fused spec:
    the layer, then ``+ residual``, then relu or relu6); ``weight`` in torch's layout."""
    if op == "conv2d":
        top, left, bottom, right = params["padding"]
        stride, dilation, groups = params["stride"], params["dilation"], params["groups"]
        if params["padding_mode"] == "zeros" and (top, left) == (bottom, right):
            out = F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
        else:  # uneven ('same' with an even kernel) or non-zero padding: nn.Conv2d pads first, too
            mode = {"zeros": "constant"}.get(params["padding_mode"], params["padding_mode"])
            padded = F.pad(x, (left, right, top, bottom), mode=mode)
            out = F.conv2d(padded, weight, bias, stride, 0, dilation, groups)
        return [_activation(out + residual if residual is not None else out, params)]
    if op == "max_pool2d":
        out = F.max_pool2d(
            x,
            params["kernel_size"],
            params["stride"],
            params["padding"],
            params["dilation"],
            params["ceil_mode"],
            return_indices=params["return_indices"],
        )
        return list(out) if params["return_indices"] else [out]
    if op == "linear":
        return [_activation(F.linear(x, weight, bias), params)]
    if op == "relu":
        return [F.relu(x)]
    raise ValueError(f"no torch reference for op {op!r}: expected conv2d, max_pool2d, linear or relu")


def _activation(out: torch.Tensor, params: dict) -> torch.Tensor:
    name = next((name for name in _ACTIVATIONS if params.get(name, False)), None)
    return _ACTIVATIONS[name](out) if name is not None else out


def random_layer_inputs(
    op: str,
    params: dict,
    input_shape: Sequence[int],
    dtype: str,
    output_shape: Sequence[int] | None,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(input, weight in torch's layout or None, bias or None, residual of ``output_shape`` or None), standard
    normal, for one call of a spec (``output_shape``: the layer's, needed only by a spec that adds a residual);
    ``generator`` lives on ``device``."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=TORCH_DTYPES[dtype], device=device)

    x = rand(*input_shape)
    weight = rand(*params["weight_shape"]) if op in ("conv2d", "linear") else None
    bias = rand(params["weight_shape"][0]) if weight is not None and params["bias"] else None
    residual = rand(*output_shape) if params.get("residual", False) else None
    return x, weight, bias, residual


def block_out_channels(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(O, *rest) -> (ceil(O / block), *rest, block): output channels blocked for one SIMD register, the
    last block padded with zeros where ``block`` does not divide O (the kernel never writes those channels
    out)."""
    weight = weight.detach()
    if block == 1:
        return weight.contiguous().unsqueeze(-1)
    if weight.shape[0] % block:
        weight = torch.cat([weight, weight.new_zeros(-weight.shape[0] % block, *weight.shape[1:])])
    blocked = weight.reshape(weight.shape[0] // block, block, *weight.shape[1:])
    return blocked.movedim(1, -1).contiguous()


def block_channels(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """(N, C, H, W) -> (N, C / block, H, W, block): an NCHW activation channel-blocked (NCHW[block]c), as a
    conv2d kernel with ``in_block``/``out_block`` takes it; ``x`` itself where ``block`` is None."""
    if block is None:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, c // block, block, h, w).permute(0, 1, 3, 4, 2).contiguous()


def unblock_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, C / block, H, W, block) -> (N, C, H, W): a channel-blocked activation back in torch's layout."""
    n, blocks, h, w, block = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(n, blocks * block, h, w)


def kernel_arguments(
    input_shape: Sequence[int],
    weight_block: int,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    output_shape: Sequence[int] | None = None,
    in_block: int | None = None,
    out_block: int | None = None,
) -> list[torch.Tensor]:
    """The kernel's input arguments: the input as its spec shapes it (channel-blocked by ``in_block``), the
    weight blocked by ``weight_block``, the bias, the residual as the (batched, NCHW) output of ``output_shape``
    (channel-blocked by ``out_block``)."""
    args = [block_channels(x.contiguous().view(*input_shape), in_block)]
    if weight is not None:
        args.append(block_out_channels(weight, weight_block))
    if bias is not None:
        args.append(bias)
    if residual is not None:
        args.append(block_channels(residual.contiguous().view(*output_shape), out_block))
    return args

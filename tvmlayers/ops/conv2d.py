"""conv2d as a tensor expression, with torch's semantics (cross-correlation, groups, dilation, padding modes).

The weight comes with its output channels blocked: shape ``(ceil(C_out / block), C_in // groups, kH, kW, block)``
(block 1 is torch's OIHW layout reshaped).  The blocked accumulator ``conv_blocked`` lets CPU schedules keep
``block`` output channels in one SIMD register; the final stage writes torch's NCHW output and adds the bias,
the residual (ResNet's shortcut: an NCHW tensor of the output's shape) and the activation (relu or relu6), in one
pass over the output.  A block that does not divide ``C_out`` (ungrouped convs only) pads the last block with
zero weights: ``conv_blocked`` computes those channels too, the final stage reads only the real ones.

Activations may come and go channel-blocked too (NCHW[x]c, as TOPI's x86 conv and ONNX Runtime's NCHWc
kernels keep them between layers): a 5-D ``data`` of shape ``(N, C_in / x, H, W, x)``, and with ``out_block``
the output (and the residual) as ``(N, C_out / block, H_out, W_out, block)``, written straight from the
accumulator's layout.  A depthwise conv then vectorizes over a block of channels, each reading its own.
"""

from __future__ import annotations

from tvm import te

from .pad import pad2d_compute
from .relu import activation_value


def conv2d_compute(
    data: te.Tensor,
    weight: te.Tensor,
    bias: te.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    padding_mode: str,
    out_hw: tuple[int, int],
    out_channels: int,
    residual: te.Tensor | None = None,
    activation: str | None = None,
    out_block: int | None = None,
) -> te.Tensor:
    """out[n, o, y, x] = bias[o] + sum_{c, i, j} pad(data)[n, g(o)*Cg + c, y*sh + i*dh, x*sw + j*dw] * w[o, c, i, j]
    (+ residual[n, o, y, x], then the ``activation`` (``ACTIVATIONS``), where asked); with a 5-D ``data`` or an
    ``out_block`` (the weight's block), the input or the output and residual channel-blocked (module docstring)."""
    n = int(data.shape[0])
    out_blocks, in_per_group, kh, kw, block = (int(d) for d in weight.shape)
    if out_blocks * block != out_channels and (groups != 1 or out_block is not None):
        raise ValueError(f"padded output channel blocks need groups=1 and an NCHW output, not groups={groups}")
    if out_block is not None and out_block != block:
        raise ValueError(f"a blocked output takes the weight's block {block}, not {out_block}")
    out_per_group = out_blocks * block // groups
    padded = pad2d_compute(data, padding, padding_mode)
    (sh, sw), (dh, dw) = stride, dilation
    c = te.reduce_axis((0, in_per_group), name="c")
    i = te.reduce_axis((0, kh), name="i")
    j = te.reduce_axis((0, kw), name="j")

    in_block = int(data.shape[4]) if len(data.shape) == 5 else None

    def accumulate(b, ob, y, x, oi):
        if block <= out_per_group:
            # a whole block lies in one group: block divides out_per_group, or the padded channels of an ungrouped conv
            first_in = (ob * block) // out_per_group * in_per_group
        else:  # a blocked depthwise (or narrow-group) conv: each channel of the block reads its own group
            first_in = (ob * block + oi) // out_per_group * in_per_group
        y_in, x_in = y * sh + i * dh, x * sw + j * dw
        if in_block is None:
            value = padded[b, first_in + c, y_in, x_in]
        else:
            value = padded[b, (first_in + c) // in_block, y_in, x_in, (first_in + c) % in_block]
        return te.sum(value * weight[ob, c, i, j, oi], axis=[c, i, j])

    conv = te.compute((n, out_blocks, out_hw[0], out_hw[1], block), accumulate, name="conv_blocked")

    if out_block is not None:

        def epilogue(b, ob, y, x, oi):
            value = conv[b, ob, y, x, oi]
            value = value + bias[ob * block + oi] if bias is not None else value
            value = value + residual[b, ob, y, x, oi] if residual is not None else value
            return activation_value(value, data.dtype, activation)

        return te.compute((n, out_blocks, out_hw[0], out_hw[1], block), epilogue, name="conv2d")

    def unblock(b, o, y, x):
        value = conv[b, o // block, y, x, o % block]
        value = value + bias[o] if bias is not None else value
        # torch's order: (conv + bias) + residual; absent, the expression (and so the workload hash) is unchanged
        value = value + residual[b, o, y, x] if residual is not None else value
        return activation_value(value, data.dtype, activation)  # fused: no second pass over the output

    return te.compute((n, out_channels, out_hw[0], out_hw[1]), unblock, name="conv2d")

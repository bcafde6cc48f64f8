"""linear (y = x W^T + b) as a tensor expression on a 2-D input.

Leading dimensions ``(*, in_features)`` are flattened by the caller (a view).  As for conv2d, the weight's
output features come blocked: ``(out_features // block, in_features, block)``.
"""

from __future__ import annotations

from tvm import te

from .relu import activation_value


def linear_compute(
    data: te.Tensor, weight: te.Tensor, bias: te.Tensor | None, activation: str | None = None
) -> te.Tensor:
    m, k = (int(d) for d in data.shape)
    out_blocks, _, block = (int(d) for d in weight.shape)
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (m, out_blocks, block),
        lambda i, ob, oi: te.sum(data[i, r] * weight[ob, r, oi], axis=r),
        name="linear_blocked",
    )

    def unblock(i, o):
        value = acc[i, o // block, o % block]
        value = value + bias[o] if bias is not None else value
        return activation_value(value, data.dtype, activation)  # fused: no second pass over the output

    return te.compute((m, out_blocks * block), unblock, name="linear")

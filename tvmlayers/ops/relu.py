"""relu as a tensor expression, on a tensor of any rank (the kernel takes torch's tensor without a reshape),
and the activations that conv2d and linear apply in their epilogue."""

from __future__ import annotations

from tvm import te, tirx

# The activations a conv2d/linear kernel can apply to its output; a spec names the one it fuses as a flag
# (``relu=True``, ``relu6=True``), so specs without one are unchanged.
ACTIVATIONS = ("relu", "relu6")


def relu_value(value: tirx.Expr, dtype: str) -> tirx.Expr:
    """max(0, x) as torch computes it."""
    zero = tirx.const(0, dtype)
    # Select, not max(): max lowers to maxnum, which turns NaN into 0; torch keeps the NaN.
    return tirx.Select(value < zero, zero, value)


def activation_value(value: tirx.Expr, dtype: str, activation: str | None) -> tirx.Expr:
    """``activation`` (one of :data:`ACTIVATIONS`, None: none) of ``value``: the fused epilogue of conv2d and
    linear.  relu6 is torch's ``hardtanh(x, 0, 6)``, ``min(max(x, 0), 6)`` keeping NaN (and -0.0), as relu does:
    both comparisons are false on NaN, so it passes through the Selects."""
    if activation is None:
        return value
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}, expected one of {ACTIVATIONS}")
    clamped = relu_value(value, dtype)  # relu's exact expression: relu-fused workload hashes stay what they were
    if activation == "relu6":
        six = tirx.const(6, dtype)
        clamped = tirx.Select(value > six, six, clamped)
    return clamped


def spec_activation(params: dict) -> str | None:
    """The activation a spec's parameters fuse (at most one flag of :data:`ACTIVATIONS` is set)."""
    return next((name for name in ACTIVATIONS if params.get(name, False)), None)


def relu_compute(data: te.Tensor) -> te.Tensor:
    return te.compute(data.shape, lambda *index: relu_value(data(*index), data.dtype), name="relu")

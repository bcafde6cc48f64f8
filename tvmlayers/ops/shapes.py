"""Torch's argument rules and output-shape formulas for the four layers, in plain Python.

Every check raises ``ValueError``/``TypeError`` with the wording torch uses for the same mistake, so that
a user sees the message they would see from torch, never a TVM error from deep inside the compiler.
"""

from __future__ import annotations

from collections.abc import Sequence

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# torch prints these as Python sets (built in this order), so its messages list them in set order
_PADDING_STRINGS = ("same", "valid")


def _invalid_padding_string(padding: str) -> ValueError:
    return ValueError(f"Invalid padding string {padding!r}, should be one of {set(_PADDING_STRINGS)}")


Pair = tuple[int, int]


def pair(value: int | Sequence[int], name: str) -> Pair:
    """torch's ``_pair``: an int is used for both dimensions, a sequence must have two ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of two ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) == 1:
            items = items * 2
        if len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return (int(items[0]), int(items[1]))
        raise ValueError(
            f"expected {name} to be a single integer value or a list of 2 values to match the "
            f"convolution dimensions, but got {name}={list(items)}"
        )
    raise TypeError(f"{name} must be an int or a tuple of two ints, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- conv2d


def check_conv_module_args(
    in_channels: int, out_channels: int, groups: int, padding: str | Pair, stride: Pair, padding_mode: str
) -> None:
    """The checks ``torch.nn.Conv2d.__init__`` makes, with its messages."""
    if groups <= 0:
        raise ValueError("groups must be a positive integer")
    if in_channels % groups != 0:
        raise ValueError("in_channels must be divisible by groups")
    if out_channels % groups != 0:
        raise ValueError("out_channels must be divisible by groups")
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise _invalid_padding_string(padding)
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {set(PADDING_MODES)}, but got padding_mode='{padding_mode}'")


def conv2d_padding(
    padding: str | int | Sequence[int], kernel_size: Pair, stride: Pair, dilation: Pair
) -> tuple[int, int, int, int]:
    """Padding as (top, left, bottom, right).

    'same' pads ``dilation * (kernel - 1)`` in total per dimension; when that is odd, torch puts the
    extra element at the bottom/right.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise _invalid_padding_string(padding)
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
        return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError("negative padding is not supported")
    return (ph, pw, ph, pw)


def conv2d_output_hw(
    in_hw: Pair, kernel_size: Pair, stride: Pair, padding: tuple[int, int, int, int], dilation: Pair
) -> Pair:
    """torch's H_out/W_out formula (padding given per side), with its error for a too-large kernel."""
    top, left, bottom, right = padding
    padded = (in_hw[0] + top + bottom, in_hw[1] + left + right)
    effective = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel_size, strict=True))
    if padded[0] < effective[0] or padded[1] < effective[1]:
        raise ValueError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). "
            f"Kernel size: ({effective[0]} x {effective[1]}). "
            "Kernel size can't be greater than actual input size"
        )
    return ((padded[0] - effective[0]) // stride[0] + 1, (padded[1] - effective[1]) // stride[1] + 1)


def check_conv_padding_mode(in_shape: Sequence[int], padding: tuple[int, int, int, int], padding_mode: str) -> None:
    """torch's ``F.pad`` limits for the non-zero padding modes."""
    top, left, bottom, right = padding
    height, width = in_shape[-2], in_shape[-1]
    if padding_mode == "reflect":
        for dim, size, pads in (
            (len(in_shape) - 1, width, (left, right)),
            (len(in_shape) - 2, height, (top, bottom)),
        ):
            if max(pads) >= size:
                raise ValueError(
                    "Argument #4: Padding size should be less than the corresponding input dimension, "
                    f"but got: padding ({pads[0]}, {pads[1]}) at dimension {dim} of input {list(in_shape)}"
                )
    elif padding_mode == "circular":
        if max(top, bottom) > height or max(left, right) > width:
            raise ValueError("Padding value causes wrapping around more than once.")


# ------------------------------------------------------------------------------------------- max_pool2d


def pool_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """torch's ``pooling_output_shape``: with ceil_mode a last window starting in the right padding is dropped."""
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def check_max_pool2d_args(kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    if kernel[0] <= 0 or kernel[1] <= 0:
        raise ValueError(f"max_pool2d: kernel_size must be greater than zero, but got kH: {kernel[0]} kW: {kernel[1]}")
    if stride[0] <= 0 or stride[1] <= 0:
        if 0 in stride:
            raise ValueError("stride should not be zero")
        raise ValueError(f"stride should be greater than zero, but got dH: {stride[0]} dW: {stride[1]}")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"pad must be non-negative, but got pad: {min(padding)}")
    if dilation[0] <= 0 or dilation[1] <= 0:
        raise ValueError(
            f"dilation should be greater than zero, but got dilationH: {dilation[0]} dilationW: {dilation[1]}"
        )
    for k, p, d in zip(kernel, padding, dilation, strict=True):
        if p > ((k - 1) * d + 1) // 2:
            raise ValueError(
                f"pad should be at most half of effective kernel size, but got pad={p}, "
                f"kernel_size={k} and dilation={d}"
            )
    if kernel[1] // 2 < padding[1] or kernel[0] // 2 < padding[0]:
        raise ValueError(
            "pad should be smaller than or equal to half of kernel size, but got "
            f"padW = {padding[1]}, padH = {padding[0]}, kW = {kernel[1]}, kH = {kernel[0]}"
        )


def max_pool2d_output_hw(
    in_shape: Sequence[int], kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, ceil_mode: bool
) -> Pair:
    out = tuple(
        pool_output_size(in_shape[-2 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode) for i in range(2)
    )
    if out[0] < 1 or out[1] < 1:
        channels = in_shape[-3]
        raise ValueError(
            f"Given input size: ({channels}x{in_shape[-2]}x{in_shape[-1]}). "
            f"Calculated output size: ({channels}x{out[0]}x{out[1]}). Output size is too small"
        )
    return out

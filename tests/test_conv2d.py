"""conv2d against torch over a generated parameter space and the edge cases torch documents."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import tvmlayers as tl
import tvmlayers.functional as tf
from conftest import assert_matches_torch


def _random_cases(count: int, seed: int = 2026) -> list[dict]:
    """Random but valid conv configurations: odd sizes, strides, dilations, groups, padding forms."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        groups = rng.choice([1, 1, 1, 2, 3, 4])
        in_channels = groups * rng.randint(1, 6)
        out_channels = groups * rng.randint(1, 6)
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 3), rng.randint(1, 2))
        padding = rng.choice([0, 1, (rng.randint(0, 3), rng.randint(0, 3)), "valid"])
        if rng.random() < 0.2:
            stride, padding = (1, 1), "same"
        batch = rng.choice([None, 1, 2, 3])  # None: unbatched (C, H, W)
        h, w = rng.randint(5, 19), rng.randint(5, 19)
        eff = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
        pad = (
            (0, 0)
            if padding == "valid" or padding == "same"
            else (padding if isinstance(padding, tuple) else (padding,) * 2)
        )
        if h + 2 * pad[0] < eff[0] or w + 2 * pad[1] < eff[1]:
            continue
        shape = (in_channels, h, w) if batch is None else (batch, in_channels, h, w)
        cases.append(
            dict(
                shape=shape,
                out_channels=out_channels,
                kernel=kernel,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=rng.random() < 0.7,
            )
        )
    return cases


EDGE_CASES = [
    # the torch docs' examples
    dict(shape=(2, 16, 20, 30), out_channels=33, kernel=3, stride=2, padding=0, dilation=1, groups=1, bias=True),
    dict(
        shape=(2, 16, 20, 30),
        out_channels=33,
        kernel=(3, 5),
        stride=(2, 1),
        padding=(4, 2),
        dilation=(3, 1),
        groups=1,
        bias=True,
    ),
    # blocked layout (out channels a multiple of the SIMD width), 1x1, strided, batch 1
    dict(shape=(1, 32, 14, 14), out_channels=64, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=True),
    dict(shape=(1, 32, 14, 14), out_channels=64, kernel=1, stride=2, padding=0, dilation=1, groups=1, bias=False),
    dict(shape=(3, 24, 17, 13), out_channels=48, kernel=3, stride=2, padding=1, dilation=2, groups=1, bias=True),
    # 'same' with even kernels and dilations: torch pads the extra element at the bottom/right
    dict(shape=(1, 4, 9, 10), out_channels=6, kernel=(4, 2), stride=1, padding="same", dilation=1, groups=1, bias=True),
    dict(
        shape=(1, 4, 9, 10),
        out_channels=6,
        kernel=(2, 3),
        stride=1,
        padding="same",
        dilation=(3, 2),
        groups=1,
        bias=True,
    ),
    dict(shape=(4, 11, 12), out_channels=32, kernel=4, stride=1, padding="same", dilation=1, groups=1, bias=False),
    # depthwise, depthwise with channel multiplier, grouped with blocked groups
    dict(shape=(2, 32, 15, 15), out_channels=32, kernel=3, stride=1, padding=1, dilation=1, groups=32, bias=True),
    dict(shape=(1, 8, 12, 12), out_channels=24, kernel=3, stride=2, padding=1, dilation=1, groups=8, bias=True),
    # strided depthwise (its rows are padded next to their use), with dilation and a ragged row
    dict(shape=(2, 16, 17, 23), out_channels=16, kernel=3, stride=2, padding=2, dilation=2, groups=16, bias=True),
    dict(shape=(1, 32, 10, 10), out_channels=64, kernel=3, stride=1, padding=1, dilation=1, groups=2, bias=True),
    # kernel as large as the padded input: a 1x1 output
    dict(shape=(1, 3, 5, 5), out_channels=4, kernel=5, stride=1, padding=0, dilation=1, groups=1, bias=True),
    dict(shape=(1, 3, 3, 3), out_channels=4, kernel=5, stride=1, padding=1, dilation=1, groups=1, bias=True),
    # a padded input larger than L2 (2.2 MB): padded one row at a time, all channel blocks over it
    dict(shape=(1, 32, 130, 130), out_channels=32, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=True),
    # prime-sized output rows
    dict(shape=(1, 16, 31, 53), out_channels=16, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=True),
]

CASES = EDGE_CASES + _random_cases(30)


def _weights(case: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    kernel = case["kernel"] if isinstance(case["kernel"], tuple) else (case["kernel"],) * 2
    in_channels = case["shape"][-3]
    weight = torch.randn(case["out_channels"], in_channels // case["groups"], *kernel, dtype=dtype)
    bias = torch.randn(case["out_channels"], dtype=dtype) if case["bias"] else None
    return weight, bias


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"{c['shape']}-k{c['kernel']}-s{c['stride']}-p{c['padding']}-d{c['dilation']}-g{c['groups']}",
)
def test_conv2d_matches_torch(case: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(case["shape"])
    weight, bias = _weights(case, torch.float32)
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    assert_matches_torch(tf.conv2d(x, weight, bias, *args), F.conv2d(x, weight, bias, *args))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "kernel, padding, stride, dilation, shape",
    [
        (3, 1, 1, 1, (2, 5, 9, 11)),
        ((3, 4), "same", 1, (1, 2), (1, 3, 8, 9)),
        (3, (2, 3), 2, 1, (4, 7, 6)),
        (5, 4, 1, 1, (1, 2, 5, 6)),  # padding = size - 1: the widest reflect torch allows
    ],
)
def test_padding_modes_match_torch_module(padding_mode, kernel, padding, stride, dilation, shape) -> None:
    torch.manual_seed(1)
    reference = torch.nn.Conv2d(shape[-3], 4, kernel, stride, padding, dilation, padding_mode=padding_mode)
    ours = tl.Conv2d.from_torch(reference)
    x = torch.randn(shape)
    with torch.no_grad():
        assert_matches_torch(ours(x), reference(x))


def test_float64() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    weight = torch.randn(16, 3, 3, 3, dtype=torch.float64)
    bias = torch.randn(16, dtype=torch.float64)
    assert_matches_torch(tf.conv2d(x, weight, bias, 1, 1, 1, 2), F.conv2d(x, weight, bias, 1, 1, 1, 2))


def test_non_contiguous_input_and_weight() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 9, 12, 8).permute(0, 1, 3, 2)[:, ::2]  # strided and transposed
    weight = torch.randn(5, 8, 3, 3).transpose(0, 1)  # (8, 5, 3, 3), not contiguous
    assert not x.is_contiguous() and not weight.is_contiguous()
    assert_matches_torch(tf.conv2d(x, weight, padding=1), F.conv2d(x, weight, padding=1))


def test_empty_batch() -> None:
    x, weight = torch.randn(0, 3, 8, 8), torch.randn(4, 3, 3, 3)
    assert_matches_torch(tf.conv2d(x, weight), F.conv2d(x, weight))


def test_weight_update_is_seen() -> None:
    """The packed weight is memoized per tensor version: an in-place update must not be missed."""
    torch.manual_seed(4)
    conv = tl.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2.0)
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert_matches_torch(conv(x), expected)

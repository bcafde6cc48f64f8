"""max_pool2d against torch: values and indices, ceil_mode's edge rule, dilation, ties, NaN and -inf."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import tvmlayers as tl
import tvmlayers.functional as tf
from conftest import assert_matches_torch


def _random_cases(count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        kernel = (rng.randint(1, 4), rng.randint(1, 4))
        stride = rng.choice([None, (rng.randint(1, 3), rng.randint(1, 3))])
        dilation = (rng.randint(1, 2), rng.randint(1, 3))
        padding = tuple(rng.randint(0, ((k - 1) * d + 1) // 2) for k, d in zip(kernel, dilation, strict=True))
        padding = tuple(min(p, k // 2) for p, k in zip(padding, kernel, strict=True))
        batch = rng.choice([None, 1, 2])
        shape = (rng.randint(1, 3), rng.randint(3, 14), rng.randint(3, 14))
        shape = shape if batch is None else (batch, *shape)
        case = dict(
            shape=shape, kernel=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=rng.random() < 0.5
        )
        try:  # keep only configurations torch accepts
            F.max_pool2d(torch.zeros(shape), kernel, stride, padding, dilation, case["ceil_mode"])
        except RuntimeError:
            continue
        cases.append(case)
    return cases


EDGE_CASES = [
    # ceil_mode: the last window would start inside the right padding and is dropped (5 -> 3, not 4)
    dict(shape=(1, 1, 5, 5), kernel=2, stride=2, padding=1, dilation=1, ceil_mode=True),
    # ceil_mode: a partial last window that starts inside the input is kept
    dict(shape=(1, 2, 6, 7), kernel=3, stride=2, padding=0, dilation=1, ceil_mode=True),
    dict(shape=(2, 3, 9, 11), kernel=3, stride=2, padding=1, dilation=1, ceil_mode=True),
    dict(shape=(1, 1, 8, 8), kernel=3, stride=3, padding=1, dilation=2, ceil_mode=True),
    # the ResNet stem pool, stride defaulting to kernel_size, an unbatched input
    dict(shape=(1, 8, 28, 28), kernel=3, stride=2, padding=1, dilation=1, ceil_mode=False),
    dict(shape=(2, 4, 10, 9), kernel=(2, 3), stride=None, padding=0, dilation=1, ceil_mode=False),
    dict(shape=(4, 7, 7), kernel=2, stride=1, padding=1, dilation=1, ceil_mode=False),
]

CASES = EDGE_CASES + _random_cases(24)


def _ids(case: dict) -> str:
    return "-".join(f"{key[0]}{case[key]}" for key in ("shape", "kernel", "stride", "padding", "dilation", "ceil_mode"))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_values_and_indices_match_torch(case: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(case["shape"])
    args = (case["kernel"], case["stride"], case["padding"], case["dilation"], case["ceil_mode"])
    values, indices = tf.max_pool2d(x, *args, return_indices=True)
    expected_values, expected_indices = F.max_pool2d(x, *args, return_indices=True)
    assert_matches_torch(values, expected_values)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices)
    assert_matches_torch(tf.max_pool2d(x, *args), expected_values)


def test_ties_take_the_first_maximum_like_torch() -> None:
    torch.manual_seed(1)
    x = torch.randint(0, 3, (2, 3, 12, 12)).float()  # many equal maxima per window
    values, indices = tf.max_pool2d(x, 3, 2, 1, return_indices=True)
    expected_values, expected_indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)


def test_nan_propagates_and_minus_inf_is_a_value() -> None:
    x = torch.randn(1, 2, 8, 8)
    x[0, 0, 1, 1] = float("nan")
    x[0, 0, 5, 6] = float("nan")
    x[0, 1] = float("-inf")  # a whole plane of -inf: indices still point into the window
    x[0, 1, 3, 3] = 1.0
    values, indices = tf.max_pool2d(x, 3, 2, 1, return_indices=True)
    expected_values, expected_indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    torch.testing.assert_close(values, expected_values, equal_nan=True)
    assert torch.equal(indices, expected_indices)


def test_float64() -> None:
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    assert_matches_torch(tf.max_pool2d(x, 2, ceil_mode=True), F.max_pool2d(x, 2, ceil_mode=True))


def test_module_returns_indices_usable_by_max_unpool() -> None:
    x = torch.randn(1, 3, 8, 8)
    values, indices = tl.MaxPool2d(2, return_indices=True)(x)
    expected = F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2)
    assert torch.equal(F.max_unpool2d(values, indices, 2), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("return_indices", [False, True])
def test_a_window_of_minus_inf_gives_minus_inf(dtype: torch.dtype, return_indices: bool) -> None:
    # the reduction once started from the lowest finite value: -3.4e38 (float64: -1.8e308) came out
    x = torch.randn(1, 2, 7, 7, dtype=dtype)
    x[0, 0] = float("-inf")  # every window of this plane, padded ones included
    x[0, 1, :3, :3] = float("-inf")  # only the first window
    args = (3, 2, 1, 1, True)
    expected = F.max_pool2d(x, *args, return_indices=return_indices)
    actual = tf.max_pool2d(x, *args, return_indices=return_indices)
    if return_indices:
        assert torch.equal(actual[1], expected[1])
        actual, expected = actual[0], expected[0]
    assert torch.equal(actual, expected)
    assert actual[0, 0].eq(float("-inf")).all() and actual[0, 1, 0, 0] == float("-inf")

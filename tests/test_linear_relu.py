"""linear and relu against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tvmlayers as tl
import tvmlayers.functional as tf
from conftest import assert_matches_torch


@pytest.mark.parametrize(
    "input_shape, out_features, bias",
    [
        ((4, 20), 30, True),
        ((20,), 30, True),  # 1-D input
        ((2, 3, 5, 20), 7, False),  # any number of leading dimensions
        ((1, 512), 1000, True),  # a classifier head: one row
        ((33, 64), 48, True),  # odd row count, blocked features
        ((3, 17), 1, True),  # one output feature
        ((1, 2048), 10, True),  # few outputs: dot products along in_features (cpu.linear_dot)
        ((300, 1024), 13, False),  # the same, rows in parallel, 13 outputs one at a time
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_torch(input_shape, out_features, bias, dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(input_shape, dtype=dtype)
    weight = torch.randn(out_features, input_shape[-1], dtype=dtype)
    b = torch.randn(out_features, dtype=dtype) if bias else None
    assert_matches_torch(tf.linear(x, weight, b), F.linear(x, weight, b))


def test_linear_non_contiguous_and_empty() -> None:
    x = torch.randn(16, 6).t()  # (6, 16), not contiguous
    weight, bias = torch.randn(5, 16), torch.randn(5)
    assert_matches_torch(tf.linear(x, weight, bias), F.linear(x, weight, bias))
    assert_matches_torch(tf.linear(torch.randn(0, 16), weight, bias), F.linear(torch.randn(0, 16), weight, bias))
    empty_weight = torch.randn(5, 0)
    assert_matches_torch(
        tf.linear(torch.randn(3, 0), empty_weight, bias), F.linear(torch.randn(3, 0), empty_weight, bias)
    )


@pytest.mark.parametrize("shape", [(7,), (1, 16, 8, 8), (3, 5, 7), (2, 64, 56, 56)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_matches_torch(shape, dtype) -> None:
    x = torch.randn(shape, dtype=dtype)
    assert_matches_torch(tf.relu(x), F.relu(x))


def test_relu_of_odd_tensors() -> None:
    # a 0-d tensor, strided views and a tensor that requires grad: torch's values (gradients: test_autograd.py)
    for x in (torch.tensor(-3.0), torch.tensor(2.5), torch.randn(8, 6).t(), torch.randn(2, 9)[:, ::3]):
        assert_matches_torch(tf.relu(x), F.relu(x))
    leaf = torch.randn(3, 16, requires_grad=True)
    out = tf.relu(leaf)
    assert out.requires_grad
    assert torch.equal(out.detach(), F.relu(leaf.detach()))


def test_relu_keeps_nan() -> None:
    x = torch.tensor([float("nan"), -1.0, 2.0, float("-inf"), float("inf")] * 4)
    torch.testing.assert_close(tf.relu(x), F.relu(x), equal_nan=True)


def test_relu_inplace_writes_into_the_input() -> None:
    x = torch.randn(2, 3, 4, 5)
    expected = F.relu(x)
    pointer = x.data_ptr()
    result = tf.relu(x, inplace=True)
    assert result is x and x.data_ptr() == pointer
    assert torch.equal(x, expected)


def test_relu_inplace_on_a_non_contiguous_view_updates_the_base() -> None:
    base = torch.randn(6, 8)
    view = base.t()[::2]  # every other column of base, not contiguous
    expected_base = base.clone()
    expected_base.t()[::2].relu_()
    assert tl.ReLU(inplace=True)(view) is view
    assert torch.equal(base, expected_base)


def test_relu_module_out_of_place_leaves_input() -> None:
    x = torch.randn(4, 4)
    before = x.clone()
    out = tl.ReLU()(x)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
    assert torch.equal(out, F.relu(x))

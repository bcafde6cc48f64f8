"""Bad input: a ValueError/TypeError with torch's message where torch has one, before any compilation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tvmlayers as tl
import tvmlayers.functional as tf

x4 = torch.randn(1, 4, 8, 8)
w4 = torch.randn(4, 4, 3, 3)

# (id, our call, torch's call): both must fail, ours with a ValueError/TypeError and the same message
SAME_MESSAGE = [
    ("conv rank", lambda m: m.conv2d(torch.randn(2, 3), torch.randn(4, 3, 3, 3))),
    ("conv channels", lambda m: m.conv2d(x4, torch.randn(4, 3, 3, 3))),
    ("conv groups weight", lambda m: m.conv2d(x4, torch.randn(4, 2, 3, 3), groups=3)),
    ("conv kernel too big", lambda m: m.conv2d(torch.randn(1, 4, 2, 2), w4)),
    ("conv kernel too big dilated", lambda m: m.conv2d(torch.randn(1, 4, 6, 6), w4, dilation=3)),
    ("conv kernel size 0", lambda m: m.conv2d(x4, torch.randn(4, 4, 0, 2))),
    ("conv negative padding", lambda m: m.conv2d(x4, w4, padding=-1)),
    ("conv stride 0", lambda m: m.conv2d(x4, w4, stride=0)),
    ("conv dilation 0", lambda m: m.conv2d(x4, w4, dilation=0)),
    ("conv bias shape", lambda m: m.conv2d(x4, w4, torch.randn(5))),
    ("conv mixed dtypes", lambda m: m.conv2d(x4.double(), w4)),
    ("pool pad > half kernel", lambda m: m.max_pool2d(x4, 3, padding=2)),
    ("pool pad > half kernel dilated", lambda m: m.max_pool2d(x4, 3, padding=2, dilation=2)),
    ("pool stride 0", lambda m: m.max_pool2d(x4, 2, stride=0)),
    ("pool negative stride", lambda m: m.max_pool2d(x4, 2, stride=-1)),
    ("pool dilation 0", lambda m: m.max_pool2d(x4, 2, dilation=0)),
    ("pool negative padding", lambda m: m.max_pool2d(x4, 2, padding=-1)),
    ("pool output too small", lambda m: m.max_pool2d(torch.randn(1, 4, 2, 2), 3)),
    ("pool output negative", lambda m: m.max_pool2d(torch.randn(1, 4, 1, 1), 3, stride=1, padding=1, dilation=2)),
    ("pool rank", lambda m: m.max_pool2d(torch.randn(4, 4), 2)),
    ("linear shapes", lambda m: m.linear(torch.randn(2, 3), torch.randn(5, 4))),
    ("linear 0-d", lambda m: m.linear(torch.tensor(1.0), torch.randn(5, 1))),
    ("linear bias", lambda m: m.linear(torch.randn(2, 3), torch.randn(5, 3), torch.randn(4))),
    ("module groups in", lambda m: (tl if m is tf else torch.nn).Conv2d(3, 6, 3, groups=2)),
    ("module groups out", lambda m: (tl if m is tf else torch.nn).Conv2d(4, 6, 3, groups=4)),
    ("module groups 0", lambda m: (tl if m is tf else torch.nn).Conv2d(4, 6, 3, groups=0)),
    ("module same strided", lambda m: (tl if m is tf else torch.nn).Conv2d(4, 6, 3, stride=2, padding="same")),
    ("module bad padding", lambda m: (tl if m is tf else torch.nn).Conv2d(4, 6, 3, padding="full")),
    (
        "reflect padding too wide",
        lambda m: (tl if m is tf else torch.nn).Conv2d(4, 4, 3, padding=8, padding_mode="reflect")(x4),
    ),
    (
        "circular wraps twice",
        lambda m: (tl if m is tf else torch.nn).Conv2d(4, 4, 3, padding=9, padding_mode="circular")(x4),
    ),
]


@pytest.mark.parametrize("call", [c for _, c in SAME_MESSAGE], ids=[name for name, _ in SAME_MESSAGE])
def test_same_message_as_torch(call) -> None:
    with pytest.raises(Exception) as torch_error:  # noqa: PT011 - torch raises RuntimeError or ValueError
        call(F)
    with pytest.raises((ValueError, TypeError)) as our_error:
        call(tf)
    assert str(our_error.value) == str(torch_error.value).splitlines()[0]


def test_unknown_padding_mode() -> None:
    with pytest.raises(ValueError, match=r"padding_mode must be one of .* but got padding_mode='wrap'"):
        tl.Conv2d(4, 4, 3, padding_mode="wrap")
    with pytest.raises(ValueError, match="padding_mode='wrap'"):
        tf.conv2d(x4, w4, padding_mode="wrap")


def test_unknown_padding_string_in_functional() -> None:
    with pytest.raises(ValueError, match="Invalid padding string 'full'"):
        tf.conv2d(x4, w4, padding="full")
    with pytest.raises(ValueError, match="not supported for strided convolutions"):
        tf.conv2d(x4, w4, stride=2, padding="same")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16])
def test_unsupported_dtype(dtype) -> None:
    with pytest.raises(TypeError, match=f"supports float32 and float64 tensors, but got {dtype}"):
        tf.conv2d(x4.to(dtype), w4.to(dtype))
    with pytest.raises(TypeError, match="supports float32 and float64"):
        tf.relu(torch.ones(3, dtype=dtype))
    with pytest.raises(TypeError, match="supports float32 and float64"):
        tl.MaxPool2d(2)(x4.to(dtype))


def test_tensors_on_different_devices() -> None:
    with pytest.raises(
        ValueError, match="Expected all tensors to be on the same device, but found at least two devices, cpu and meta!"
    ):
        tf.conv2d(x4, w4.to("meta"))


def test_tensors_on_a_device_the_target_does_not_run_on() -> None:
    with pytest.raises(ValueError, match=r"works on cpu tensors, but got tensors on meta; move them with .to\('cpu'\)"):
        tf.linear(torch.randn(2, 3, device="meta"), torch.randn(4, 3, device="meta"))


def test_not_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"conv2d\(\): argument 'weight' \(position 2\) must be Tensor, not list"):
        tf.conv2d(x4, [[1.0]])


def test_weight_of_the_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"4D weight .* but got weight of size \[4, 4, 3\]"):
        tf.conv2d(x4, torch.randn(4, 4, 3))
    with pytest.raises(ValueError, match=r"2D weight .* but got \[3\]"):
        tf.linear(torch.randn(2, 3), torch.randn(3))


def test_kernel_size_tuple_of_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"kernel_size to be a single integer value or a list of 2 values"):
        tl.Conv2d(4, 4, (3, 3, 3))


def test_unknown_target() -> None:
    with pytest.raises(ValueError, match="unknown target 'pdp11'.*tvmlayers targets"):
        tf.relu(torch.randn(3), target="pdp11")
    with pytest.raises(TypeError, match="target must be"):
        tf.relu(torch.randn(3), target=42)


def test_errors_are_raised_again_on_every_call() -> None:
    """The plan memo must not swallow a failure the second time round."""
    for _ in range(2):
        with pytest.raises(ValueError, match="Output size is too small"):
            tf.max_pool2d(torch.randn(1, 4, 2, 2), 3)

"""Autograd: gradients against torch's (gradcheck in float64, training a converted model), relu's in-place
checks and version bumps, and channels_last outputs.  Small shapes: every shape compiles a kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import tvmlayers as tl
import tvmlayers.functional as tf
from conftest import assert_matches_torch, torch_conv2d

DOUBLE = torch.float64


def rand(*shape: int, requires_grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, dtype=DOUBLE, requires_grad=requires_grad)


def fresh(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a new tensor each call.  gradcheck perturbs its inputs through ``.data``, which bumps no
    version, so the packed copy of the weight (memoized per version) would not see the perturbation."""
    return weight.clone()


def assert_same_gradients(out: torch.Tensor, expected: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> None:
    """The gradients of ``out`` and of torch's ``expected`` with respect to ``tensors``, for one random grad."""
    grad = torch.randn_like(expected)
    ours, theirs = torch.autograd.grad(out, tensors, grad), torch.autograd.grad(expected, tensors, grad)
    for got, want in zip(ours, theirs, strict=True):
        assert_matches_torch(got, want)


# (input shape, weight shape, keyword arguments of tl.functional.conv2d); one kernel each
CONV_CASES = {
    "stride and padding ints, bias": ((2, 3, 7, 6), (4, 3, 3, 3), dict(stride=2, padding=1)),
    "tuples, dilation, groups, no bias": (
        (1, 4, 7, 8),
        (6, 2, 3, 2),
        dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2),
    ),
    "same, even kernel, zeros, fused relu": ((2, 2, 5, 6), (3, 2, 2, 4), dict(padding="same", fuse_relu=True)),
    "same, even kernel, reflect": ((1, 2, 6, 5), (3, 2, 4, 3), dict(padding="same", padding_mode="reflect")),
    "replicate, depthwise, fused relu": (
        (2, 3, 5, 5),
        (3, 1, 3, 3),
        dict(padding=1, groups=3, padding_mode="replicate", fuse_relu=True),
    ),
    "circular, unbatched": ((2, 5, 6), (3, 2, 3, 3), dict(padding=(1, 2), padding_mode="circular")),
}


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_gradients_match_torch(case: str) -> None:
    in_shape, w_shape, kwargs = CONV_CASES[case]
    torch.manual_seed(0)
    x, w = rand(*in_shape), rand(*w_shape)
    bias = None if "no bias" in case else rand(w_shape[0])
    tensors = (x, w) if bias is None else (x, w, bias)

    def conv(x, w, *bias):
        return tf.conv2d(x, fresh(w), *bias, **kwargs)

    assert gradcheck(conv, tensors)
    out = conv(*tensors)
    assert out.grad_fn is not None
    expected = torch_conv2d(x, w, bias, **kwargs)
    assert_matches_torch(out, expected)
    assert_same_gradients(out, expected, tensors)


def test_conv2d_double_backward() -> None:
    torch.manual_seed(1)
    in_shape, w_shape, kwargs = CONV_CASES["stride and padding ints, bias"]
    tensors = (rand(*in_shape), rand(*w_shape), rand(w_shape[0]))
    assert gradgradcheck(lambda x, w, b: tf.conv2d(x, fresh(w), b, **kwargs), tensors)


POOL_CASES = {
    "ceil_mode, padding": ((2, 3, 7, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    "dilation, return_indices": (
        (1, 2, 8, 7),
        dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), return_indices=True),
    ),
    "unbatched, default stride": ((2, 6, 6), dict(kernel_size=2)),
}


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool2d_gradients_match_torch(case: str) -> None:
    in_shape, kwargs = POOL_CASES[case]
    torch.manual_seed(2)
    x = rand(*in_shape)  # random doubles: no ties, so the gradient of every window is well defined
    assert gradcheck(lambda x: tf.max_pool2d(x, **kwargs), (x,))
    out = tf.max_pool2d(x, **kwargs)
    expected = F.max_pool2d(x, **kwargs)
    if kwargs.get("return_indices"):
        (out, indices), (expected, expected_indices) = out, expected
        assert not indices.requires_grad and torch.equal(indices, expected_indices)
    assert_same_gradients(out, expected, (x,))
    assert gradgradcheck(lambda x: tf.max_pool2d(x, **kwargs), (x,))


@pytest.mark.parametrize(
    "in_shape, bias, fuse_relu",
    [((2, 3, 5), True, False), ((5,), False, False), ((4, 5), True, True)],
    ids=["batched, bias", "1-D input, no bias", "fused relu"],
)
def test_linear_gradients_match_torch(in_shape: tuple[int, ...], bias: bool, fuse_relu: bool) -> None:
    torch.manual_seed(3)
    x, w = rand(*in_shape), rand(6, 5)
    tensors = (x, w, rand(6)) if bias else (x, w)

    def linear(x, w, *bias):
        return tf.linear(x, fresh(w), *bias, fuse_relu=fuse_relu)

    assert gradcheck(linear, tensors)
    assert gradgradcheck(linear, tensors)
    out, expected = linear(*tensors), F.linear(*tensors)
    expected = F.relu(expected) if fuse_relu else expected
    assert_same_gradients(out, expected, tensors)


# Non-leaf inputs for in-place relu: contiguous, dense but transposed, a view with gaps, a 0-d tensor
RELU_VIEWS = {
    "contiguous": lambda t: t * 1,
    "transposed": lambda t: (t * 1).t(),
    "sliced": lambda t: (t * 1)[:, ::2],
    "0-d": lambda t: (t * 1)[1, 2],
}


@pytest.mark.parametrize("view", RELU_VIEWS, ids=str)
def test_relu_gradients_match_torch(view: str) -> None:
    torch.manual_seed(4)
    x = rand(4, 6)
    make = RELU_VIEWS[view]
    assert gradcheck(lambda x: tf.relu(make(x)), (x,))
    assert gradcheck(lambda x: tf.relu(make(x), inplace=True), (x,))
    assert gradgradcheck(lambda x: tf.relu(make(x), inplace=True), (x,))
    assert gradcheck(lambda x: tl.ReLU(inplace=True)(make(x)) * 2, (x,))


def test_relu_inplace_on_a_view_rewrites_the_base_history() -> None:
    # as torch: the base's gradient flows through the relu where the view is, unchanged elsewhere
    torch.manual_seed(5)
    data, grads = torch.randn(4, 6, dtype=DOUBLE), []
    for relu in (tf.relu, F.relu):
        x = data.clone().requires_grad_()
        base = x * 1
        out = relu(base.t()[::2], inplace=True)
        assert out.grad_fn is not None
        (base * torch.arange(24, dtype=DOUBLE).view(4, 6)).sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


def test_no_history_without_grad() -> None:
    # the fast path: no autograd without grad mode, or with nothing requiring grad (as torch)
    in_shape, w_shape, kwargs = CONV_CASES["stride and padding ints, bias"]
    x, w, b = rand(*in_shape), rand(*w_shape), rand(w_shape[0])
    with torch.no_grad():
        assert not tf.conv2d(x, w, b, **kwargs).requires_grad
    x_linear, w_linear, b_linear = rand(4, 5), rand(6, 5), rand(6)
    with torch.inference_mode():
        assert not tf.linear(x_linear, w_linear, b_linear, fuse_relu=True).requires_grad
    plain = x.detach()
    assert tf.max_pool2d(plain, **POOL_CASES["ceil_mode, padding"][1]).grad_fn is None
    assert tf.relu(plain).grad_fn is None


def test_empty_outputs_have_torch_gradients() -> None:
    # no kernel runs; gradients as torch's: zeros, and the bias-only output of an empty product
    w, b = rand(3, 2, 3, 3), rand(3)
    out = tf.conv2d(rand(0, 2, 5, 5), w, b)
    out.sum().backward()
    assert (
        out.shape == (0, 3, 3, 3) and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros(3))
    )
    x = rand(0, 2, 4, 4)
    values, _ = tf.max_pool2d(x, 2, return_indices=True)
    (grad,) = torch.autograd.grad(tf.relu(values).sum(), x)
    assert grad.shape == x.shape
    x, w, b = rand(3, 0), rand(4, 0), rand(4)
    out, expected = tf.linear(x, w, b, fuse_relu=True), F.relu(F.linear(x, w, b))
    assert_same_gradients(out, expected, (b,))


# ------------------------------------------------------------------------------------ in-place relu checks


def raised(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as error:
        return str(error)
    return None


def _leaf() -> torch.Tensor:
    return torch.randn(3, 4, requires_grad=True)


def _no_grad_view() -> torch.Tensor:
    base = torch.randn(3, 4, requires_grad=True) * 1
    with torch.no_grad():
        return base[1:]


REFUSED = {
    "leaf requiring grad": _leaf,
    "view of such a leaf": lambda: _leaf()[:, 1:],
    "transposed leaf": lambda: _leaf().t(),
    "output of unbind": lambda: (_leaf() * 1).unbind()[0],
    "view made under no_grad": _no_grad_view,
}


@pytest.mark.parametrize("case", REFUSED, ids=str)
def test_relu_inplace_refuses_what_torch_refuses(case: str) -> None:
    tensor = REFUSED[case]()
    before, version = tensor.detach().clone(), tensor._version
    expected = raised(F.relu, REFUSED[case](), inplace=True)  # a tensor made alike, for torch
    assert expected is not None
    assert raised(tf.relu, tensor, inplace=True) == expected
    assert raised(tl.ReLU(inplace=True), tensor) == expected
    assert torch.equal(tensor.detach(), before) and tensor._version == version, "nothing written, as torch"


def test_relu_inplace_on_inference_tensors() -> None:
    with torch.inference_mode():
        inference = torch.randn(3, 4)
    expected = raised(F.relu, inference, inplace=True)
    assert expected and expected.startswith("Inplace update to inference tensor outside InferenceMode")
    before = inference.clone()
    assert raised(tf.relu, inference, inplace=True) == expected
    with torch.no_grad():
        assert raised(tf.relu, inference, inplace=True) == expected
    assert torch.equal(inference, before)
    with torch.inference_mode():
        assert tf.relu(inference, inplace=True) is inference  # allowed there (no version counter to bump)
    assert torch.equal(inference, F.relu(before))
    normal = torch.randn(3, 4)
    with torch.inference_mode():
        tf.relu(normal, inplace=True)  # a normal tensor written in inference mode: its version counts it
    assert normal._version == 1


@pytest.mark.parametrize(
    "make", [lambda: torch.randn(3, 4), lambda: torch.randn(4, 3).t(), lambda: torch.randn(3, 8)[:, ::2]]
)
def test_relu_inplace_bumps_the_version(make) -> None:
    tensor = make()
    version = tensor._version
    tf.relu(tensor, inplace=True)
    assert tensor._version > version
    leaf = torch.randn(3, requires_grad=True)
    with torch.no_grad():  # a leaf requiring grad may be written under no_grad, as with torch
        tf.relu(leaf, inplace=True)
    assert leaf._version == 1


@pytest.mark.parametrize("mode", [torch.no_grad, torch.enable_grad])
def test_backward_sees_an_inplace_relu_of_a_saved_tensor(mode) -> None:
    # mul saved b for its backward; writing b afterwards must make that backward fail, as torch's relu_ does
    messages = []
    for relu in (F.relu, tf.relu):
        b = torch.randn(5, requires_grad=True).sin()
        c = b * b
        with mode():
            relu(b, inplace=True)
        messages.append(raised(c.sum().backward))
    assert messages[0] is not None and "modified by an inplace operation" in messages[0]
    assert messages[1] == messages[0].replace("output 0 of Relu,", "output 0 of ReLUInPlace,")


# ------------------------------------------------------------------------------------------------ training


def small_cnn() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),  # fused into the conv by convert
        torch.nn.MaxPool2d(2),
        torch.nn.ReLU(inplace=True),  # an in-place relu on a tvmlayers output
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect", bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 2 * 2, 8),
        torch.nn.ReLU(),  # fused into the linear
        torch.nn.Linear(8, 3),
    ).to(DOUBLE)


def test_training_a_converted_model_tracks_torch() -> None:
    torch.manual_seed(6)
    reference = small_cnn().train()
    converted = tl.convert(reference)
    assert sum(type(m).__module__.startswith("tvmlayers.") for m in converted.modules()) == 6
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, converted)]
    for _ in range(3):
        x, target = torch.randn(4, 3, 8, 8, dtype=DOUBLE), torch.randint(0, 3, (4,))
        for model, optimizer in zip((reference, converted), optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), target).backward()
        for (name, ours), theirs in zip(converted.named_parameters(), reference.parameters(), strict=True):
            assert ours.grad is not None, name
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12, msg=name)
        for optimizer in optimizers:
            optimizer.step()
    for ours, theirs in zip(converted.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_identity_shortcut_gradients_match_torch() -> None:
    """ResNet's stride-1 block: the fused conv's residual is the first conv's input.  Backward once recomputed
    through both layers (the residual's history), which ran the first conv's backward twice and failed."""
    torch.manual_seed(7)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(x * 2)
            return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)

    reference = Block().double().eval()
    converted = tl.convert(reference)
    assert converted.tvmlayers_report.fused_residual == ["conv2 + relu"]
    x = rand(2, 4, 6, 6)
    out, expected = converted(x), reference(x)
    grad = torch.randn_like(expected)
    ours = torch.autograd.grad(out, (x, *converted.parameters()), grad)
    theirs = torch.autograd.grad(expected, (x, *reference.parameters()), grad)
    for got, want in zip(ours, theirs, strict=True):
        assert_matches_torch(got, want)


# ------------------------------------------------------------------------------------------ channels_last


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


def assert_like_torch(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same values in the same memory layout."""
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    assert ours.stride() == theirs.stride()


@pytest.mark.parametrize(
    "case",
    [
        "stride and padding ints, bias",
        "same, even kernel, reflect",
        "replicate, depthwise, fused relu",
        "tuples, dilation, groups, no bias",
    ],
)
def test_conv2d_channels_last(case: str) -> None:
    in_shape, w_shape, kwargs = CONV_CASES[case]
    torch.manual_seed(7)
    x, w = channels_last(rand(*in_shape, requires_grad=False)), rand(*w_shape, requires_grad=False)
    bias = None if "no bias" in case else rand(w_shape[0], requires_grad=False)
    expected = torch_conv2d(x, w, bias, **kwargs)
    assert not expected.is_contiguous()
    assert_like_torch(tf.conv2d(x, w, bias, **kwargs), expected)
    # with autograd too
    out = tf.conv2d(x.requires_grad_(), w, bias, **kwargs)
    assert out.grad_fn is not None
    assert_like_torch(out, expected)


def test_conv2d_circular_channels_last_input_is_contiguous_like_torch() -> None:
    # nn.Conv2d pads circularly into a contiguous copy first, so its output is NCHW
    x, w = channels_last(rand(1, 2, 5, 6, requires_grad=False)), rand(3, 2, 3, 3, requires_grad=False)
    expected = torch_conv2d(x, w, None, padding=(1, 2), padding_mode="circular")
    assert_like_torch(tf.conv2d(x, w, padding=(1, 2), padding_mode="circular"), expected)


@pytest.mark.parametrize("case", ["ceil_mode, padding", "dilation, return_indices"])
def test_max_pool2d_channels_last(case: str) -> None:
    in_shape, kwargs = POOL_CASES[case]
    x = channels_last(rand(*in_shape, requires_grad=False))
    ours, expected = tf.max_pool2d(x, **kwargs), F.max_pool2d(x, **kwargs)
    if not kwargs.get("return_indices"):
        ours, expected = [ours], [expected]
    for got, want in zip(ours, expected, strict=True):
        assert want.is_contiguous(memory_format=torch.channels_last) and not want.is_contiguous()
        assert_like_torch(got, want)


def test_relu_channels_last_in_place_and_not() -> None:
    x = channels_last(torch.randn(2, 4, 3, 5))
    out = tf.relu(x)
    assert out.stride() == F.relu(x).stride() == x.stride()
    assert torch.equal(out, F.relu(x))
    transposed = torch.randn(5, 7).t()
    assert tf.relu(transposed).stride() == F.relu(transposed).stride()
    expected = F.relu(x)
    pointer = x.data_ptr()
    assert tf.relu(x, inplace=True) is x and x.data_ptr() == pointer
    assert torch.equal(x, expected) and x.stride() == expected.stride()
    grad_input = channels_last(rand(2, 4, 3, 5, requires_grad=False)).requires_grad_()
    assert tf.relu(grad_input).stride() == grad_input.stride()


# ------------------------------------------------------------------------------------------ kernel buffers


def test_views_off_the_kernels_alignment() -> None:
    # a view that starts a few elements into its storage: the kernels may assume aligned buffers (this
    # crashed the process), so it is copied; an in-place relu still writes into the view
    storage = torch.randn(4 * 6 + 1, dtype=DOUBLE)
    view = storage[1:].view(4, 6)
    assert view.data_ptr() % 64
    expected = F.relu(view)
    assert_matches_torch(tf.relu(view), expected)
    x, w, b = storage[1:21].view(4, 5), rand(6, 5, requires_grad=False), storage[:7][1:]
    assert_matches_torch(tf.linear(x, w, b, fuse_relu=True), F.relu(F.linear(x, w, b)))
    in_shape, w_shape, kwargs = CONV_CASES["stride and padding ints, bias"]
    image = torch.randn(torch.Size(in_shape).numel() + 3, dtype=DOUBLE)[3:].view(in_shape)
    weight, bias = rand(*w_shape, requires_grad=False), rand(w_shape[0], requires_grad=False)
    assert_matches_torch(tf.conv2d(image, weight, bias, **kwargs), torch_conv2d(image, weight, bias, **kwargs))
    assert tf.relu(view, inplace=True) is view
    assert torch.equal(view, expected) and torch.equal(storage[1:], expected.flatten())

"""Module state beyond the call: ``.data`` writes reach the packed weights, modules survive deepcopy, pickle
and ``torch.save`` after running, and torch.jit is refused with a message that says what works."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch

import tvmlayers as tl
from conftest import assert_matches_torch

# (tvmlayers module, its torch twin, an input)
LAYERS = {
    "conv2d": (lambda: tl.Conv2d(3, 16, 3), lambda: torch.nn.Conv2d(3, 16, 3), (2, 3, 8, 8)),
    "linear": (lambda: tl.Linear(12, 32), lambda: torch.nn.Linear(12, 32), (4, 12)),  # 32: packed, not a view
}

# .data writes: torch gives ``p.data`` a version counter of its own, so none of these bump p._version
DATA_WRITES: dict[str, Callable[[torch.nn.Parameter], object]] = {
    "zero_": lambda p: p.data.zero_(),
    "mul_": lambda p: p.data.mul_(-2.0),
    "copy_": lambda p: p.data.copy_(torch.randn_like(p)),
}


def _torch_twin(ours: torch.nn.Module, make_reference: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    reference = make_reference()
    reference.load_state_dict(ours.state_dict())
    return reference


def _assert_computes_like_torch(ours: torch.nn.Module, make_reference: Callable[[], torch.nn.Module], x: torch.Tensor):
    with torch.no_grad():
        assert_matches_torch(ours(x), _torch_twin(ours, make_reference)(x))


@pytest.mark.parametrize("write", sorted(DATA_WRITES))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_data_writes_reach_the_next_call(layer: str, write: str) -> None:
    make, make_reference, shape = LAYERS[layer]
    torch.manual_seed(0)
    ours, x = make(), torch.randn(shape)
    _assert_computes_like_torch(ours, make_reference, x)  # packs the weight
    DATA_WRITES[write](ours.weight)
    _assert_computes_like_torch(ours, make_reference, x)
    DATA_WRITES[write](ours.bias)
    _assert_computes_like_torch(ours, make_reference, x)


def test_zeroed_conv_weight_leaves_the_bias() -> None:
    # the example: after weight.data.zero_() the output is the bias, not the old convolution
    conv = tl.Conv2d(3, 16, 3)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.weight.data.zero_()
        torch.testing.assert_close(conv(x), conv.bias.detach().view(1, 16, 1, 1).expand(1, 16, 6, 6))


def test_data_writes_are_seen_however_the_weight_got_in() -> None:
    make, make_reference, shape = LAYERS["linear"]
    ours, x = make(), torch.randn(shape)
    # a plain Parameter assigned by the user keeps its identity (weight tying) and is tracked
    shared = torch.nn.Parameter(torch.randn(32, 12))
    ours.weight = shared
    assert ours.weight is shared and isinstance(shared, torch.nn.Parameter)
    _assert_computes_like_torch(ours, make_reference, x)
    shared.data.mul_(3.0)
    _assert_computes_like_torch(ours, make_reference, x)
    # load_state_dict(assign=True) puts a new Parameter in
    ours.load_state_dict(make_reference().state_dict(), assign=True)
    _assert_computes_like_torch(ours, make_reference, x)
    ours.weight.data.zero_()
    _assert_computes_like_torch(ours, make_reference, x)
    # .double() sets param.data; with torch.__future__'s overwrite option it puts a new Parameter in
    for overwrite in (False, True):
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        try:
            ours.double()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)
        x = x.double()
        _assert_computes_like_torch(ours, lambda: make_reference().double(), x)
        ours.weight.data.copy_(torch.randn(32, 12))
        _assert_computes_like_torch(ours, lambda: make_reference().double(), x)
        ours.float()
        x = x.float()
    # assigning .data a new tensor
    ours.weight.data = torch.randn(32, 12)
    _assert_computes_like_torch(ours, make_reference, x)


def test_weight_prints_and_saves_as_torch_s() -> None:
    torch.manual_seed(0)
    ours = tl.Linear(3, 2)
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 2)
    assert repr(ours.weight) == repr(reference.weight)
    assert all(type(value) is torch.Tensor for value in ours.state_dict().values())


def test_data_write_after_a_saving_forward_fails_at_backward_like_an_in_place_write() -> None:
    # the documented price of tracking: torch's own rule for in-place writes to saved tensors
    linear = tl.Linear(3, 2)
    loss = (linear.weight**2).sum()  # saves the weight for backward
    linear.weight.data.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_refresh_weights_after_writes_torch_cannot_see() -> None:
    make, make_reference, shape = LAYERS["conv2d"]
    ours, x = make(), torch.randn(shape)
    model = torch.nn.Sequential(ours)
    _assert_computes_like_torch(ours, make_reference, x)
    ours.weight.detach().numpy()[:] = 0.5  # a numpy view: no version counter is bumped
    tl.refresh_weights(model)
    _assert_computes_like_torch(ours, make_reference, x)

    # the functional API with a plain tensor: its .data has a version counter of its own
    weight = torch.randn(32, 12)
    x = torch.randn(4, 12)
    torch.testing.assert_close(tl.functional.linear(x, weight), x @ weight.T)
    weight.data.mul_(-1.0)
    tl.functional.refresh_weights(weight)
    torch.testing.assert_close(tl.functional.linear(x, weight), x @ weight.T)


def test_a_model_made_under_inference_mode() -> None:
    # inference tensors have no version counter: reading it raised on every conv/linear call
    with torch.inference_mode():
        make, make_reference, shape = LAYERS["conv2d"]
        ours, x = make(), torch.randn(shape)
        _assert_computes_like_torch(ours, make_reference, x)
        ours.weight.zero_()  # allowed on an inference tensor, and invisible to the packed copy
        tl.refresh_weights(ours)
        expected = ours.bias.view(1, -1, 1, 1).expand_as(ours(x))
        torch.testing.assert_close(ours(x), expected)


# ------------------------------------------------------------------------------ deepcopy, pickle, save


def _torch_save_load(module: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda module: pickle.loads(pickle.dumps(module)),
    "torch.save": _torch_save_load,
}


def _small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
        torch.nn.ReLU(inplace=True),
    )


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copies_after_the_first_call(how: str) -> None:
    torch.manual_seed(0)
    reference = _small_cnn()
    model = tl.convert(reference, target=tl.resolve_target("host"))  # a Target object must copy too
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        twin = COPIES[how](model)
        assert twin.get_submodule("0").kernels == {}  # kernels are reloaded on demand, not copied
        torch.testing.assert_close(twin(x), before, rtol=0, atol=0)
        assert list(twin.get_submodule("0").kernels) == [x.shape]
        assert_matches_torch(twin(x), reference(x))
        # the copy's weights are its own and still tracked
        twin.get_submodule("0").weight.data.mul_(2.0)
        reference[0].weight.data.mul_(2.0)
        assert_matches_torch(twin(x), reference(x))
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    for layer in (tl.ReLU(), tl.MaxPool2d(2)):  # the modules without parameters
        layer(x)
        assert torch.equal(COPIES[how](layer)(x), layer(x))


def test_convert_a_model_that_has_run() -> None:
    torch.manual_seed(0)
    reference = _small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = reference(x)
        converted = tl.convert(reference)
        converted(x)
        assert_matches_torch(tl.convert(converted)(x), expected)  # deep-copies the converted model
        assert_matches_torch(tl.convert(reference)(x), expected)


# --------------------------------------------------------------------------------------------- torch.jit


def test_torch_jit_is_refused_with_what_works() -> None:
    model = tl.convert(_small_cnn())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)  # a traced call must not find this call's memoized plan
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.compile.*ONNX export is not supported"):
        torch.jit.trace(model, x)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.compile"):
        torch.jit.trace(lambda t: tl.functional.relu(t), x)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.compile.*ONNX export is not supported"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script"):
        torch.jit.script(tl.Linear(3, 2))


def test_torch_compile_sees_data_writes() -> None:
    torch.manual_seed(0)
    reference = _small_cnn()
    converted = tl.convert(reference)
    compiled = torch.compile(converted, backend="eager")  # dynamo over the tracked weights
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_matches_torch(compiled(x), reference(x))
        for model in (converted, reference):
            model.get_submodule("0").weight.data.mul_(-1.0)
        assert_matches_torch(compiled(x), reference(x))

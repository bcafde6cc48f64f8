"""The modules' per-call memo of their last plan (``CompiledLayer._memo``) never serves a call it was not made
for: the same module called alternately with other shapes, strides, dtypes and grad modes, and after every
kind of change to its state, gives torch's results (torch is the oracle)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

import tvmlayers as tl
from conftest import assert_matches_torch
from tvmlayers import omp_pool

# ------------------------------------------------------------------------------------------------ ReLU


def _inputs() -> list[torch.Tensor]:
    """Same module, one call each: batched, unbatched, channels_last, a sliced view, another dtype, and the
    first one again (the memo holds the last call's plan, so every call here differs from the one before)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    return [
        x,
        torch.randn(4, 6, 6),
        x.contiguous(memory_format=torch.channels_last),
        x[:, ::2],
        x.double(),
        x,
    ]


def test_relu_alternating_shapes_strides_and_dtypes_match_torch() -> None:
    relu = tl.ReLU()
    with torch.no_grad():
        for _ in range(2):
            for x in _inputs():
                out = relu(x)
                assert_matches_torch(out, torch.relu(x))
                assert out.stride() == torch.relu(x).stride()
    assert {tuple(shape) for shape in relu.kernels} >= {(2, 4, 6, 6), (4, 6, 6), (2, 2, 6, 6)}


def test_relu_alternating_grad_modes_match_torch() -> None:
    relu = tl.ReLU()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for requires_grad, grad_enabled in [(True, True), (False, True), (True, False), (True, True)]:
        leaf = x.clone().requires_grad_(requires_grad)
        with torch.set_grad_enabled(grad_enabled):
            out = relu(leaf)
        assert out.requires_grad == (requires_grad and grad_enabled)
        assert_matches_torch(out.detach(), torch.relu(x))
        if out.requires_grad:
            out.sum().backward()
            assert_matches_torch(leaf.grad, (x > 0).to(x.dtype))


def test_relu_inplace_set_after_calls_writes_the_input() -> None:
    relu = tl.ReLU()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert relu(x) is not x
        relu.inplace = True
        expected = torch.relu(x)
        assert relu(x) is x
    assert_matches_torch(x, expected)


def test_relu_target_set_after_calls_is_used() -> None:
    relu = tl.ReLU()
    x = torch.randn(2, 4, 6, 6)
    relu(x)
    relu.target = "sm_90"  # a CUDA target: the plan refuses CPU tensors (no kernel is compiled)
    with pytest.raises(ValueError, match="works on cuda tensors"):
        relu(x)
    relu.target = None
    assert_matches_torch(relu(x), torch.relu(x))


def test_relu_under_jit_trace_after_calls_is_refused() -> None:
    relu, x = tl.ReLU(), torch.randn(2, 4, 6, 6)
    relu(x)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace"):
        torch.jit.trace(relu, x)


# ---------------------------------------------------------------------------------------------- Linear


def _linear_pair(bias: bool = True) -> tuple[tl.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    reference = torch.nn.Linear(12, 20, bias=bias)
    return tl.Linear.from_torch(reference), reference


def test_linear_alternating_shapes_and_grad_modes_match_torch() -> None:
    ours, reference = _linear_pair()
    torch.manual_seed(1)
    # batched, unbatched, 3-D, and a transposed (non-contiguous) view
    inputs = [torch.randn(3, 12), torch.randn(12), torch.randn(2, 5, 12), torch.randn(12, 3).t()]
    for _ in range(2):
        for x in inputs:
            with torch.no_grad():
                assert_matches_torch(ours(x), reference(x))
            leaf = x.detach().clone().requires_grad_()
            ours(leaf).sum().backward()
            expected = leaf.detach().clone().requires_grad_()
            reference(expected).sum().backward()
            assert_matches_torch(leaf.grad, expected.grad)


def test_linear_load_state_dict_uses_the_new_weights() -> None:
    ours, reference = _linear_pair()
    x = torch.randn(3, 12)
    with torch.no_grad():
        ours(x)
        other = torch.nn.Linear(12, 20)
        ours.load_state_dict(other.state_dict())
        assert_matches_torch(ours(x), other(x))
        # assign=True puts the loaded tensors themselves into the module, float64 here
        double = torch.nn.Linear(12, 20).double()
        ours.load_state_dict(double.state_dict(), assign=True)
        assert_matches_torch(ours(x.double()), double(x.double()))
        with pytest.raises(TypeError, match="expected scalar type"):
            ours(x)  # the float32 call of before no longer fits the float64 weight


def test_linear_weight_replacement_and_data_assignment_are_seen() -> None:
    ours, _ = _linear_pair()
    x = torch.randn(3, 12)
    with torch.no_grad():
        ours(x)
        ours.weight = torch.nn.Parameter(torch.randn(7, 12))
        ours.bias = torch.nn.Parameter(torch.randn(7))
        assert_matches_torch(ours(x), torch.nn.functional.linear(x, ours.weight, ours.bias))
        ours.weight.data = torch.randn(5, 12)  # same Parameter, new shape: only the .data setter knows
        with pytest.raises(ValueError, match="must match the existing size"):
            ours(x)  # torch's bias check, as torch.nn.functional.linear gives it
        ours.bias.data = torch.randn(5)
        assert_matches_torch(ours(x), torch.nn.functional.linear(x, ours.weight, ours.bias))
        ours.bias = None
        assert_matches_torch(ours(x), torch.nn.functional.linear(x, ours.weight))


def test_linear_to_another_dtype_after_calls() -> None:
    ours, reference = _linear_pair()
    x = torch.randn(3, 12)
    with torch.no_grad():
        ours(x)
        ours.double(), reference.double()
        assert_matches_torch(ours(x.double()), reference(x.double()))
        ours.float(), reference.float()
        assert_matches_torch(ours(x), reference(x))


def test_linear_functional_call_uses_the_given_parameters() -> None:
    # torch.func.functional_call swaps the tensors in _parameters without an attribute set
    ours, reference = _linear_pair()
    x = torch.randn(3, 12)
    weight, bias = torch.randn(20, 12), torch.randn(20)
    with torch.no_grad():
        ours(x)
        assert_matches_torch(
            torch.func.functional_call(ours, {"weight": weight, "bias": bias}, (x,)),
            torch.nn.functional.linear(x, weight, bias),
        )
        assert_matches_torch(ours(x), reference(x))
        double = {"weight": weight.double(), "bias": bias.double()}
        assert_matches_torch(
            torch.func.functional_call(ours, double, (x.double(),)),
            torch.nn.functional.linear(x.double(), double["weight"], double["bias"]),
        )
        assert_matches_torch(ours(x), reference(x))
        for name in ("weight", "bias"):  # one tensor swapped, the input as before: checked like any other call
            with pytest.raises(TypeError, match="expected scalar type"):
                torch.func.functional_call(ours, {name: dict(ours.named_parameters())[name].double()}, (x,))


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = 2.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale


def test_linear_parametrized_weight_is_recomputed() -> None:
    ours, reference = _linear_pair()
    x = torch.randn(3, 12)
    with torch.no_grad():
        ours(x)
        parametrize.register_parametrization(ours, "weight", _Scaled())
        assert_matches_torch(ours(x), torch.nn.functional.linear(x, 2 * reference.weight, reference.bias))
        ours.parametrizations.weight[0].scale = -1.0  # the module's own state does not change: its weight does
        assert_matches_torch(ours(x), torch.nn.functional.linear(x, -reference.weight, reference.bias))


# ------------------------------------------------------------------------------------------- threads


@torch.no_grad()
def test_memoized_calls_follow_torch_set_num_threads() -> None:
    # a plan holds no thread count: each call's parallel loop takes the team torch.set_num_threads gives
    if omp_pool.get_thread_pool() != "torch":
        pytest.skip("kernels run on TVM's pool here")
    relu, x = tl.ReLU(), torch.randn(1, 64, 32, 32)  # above the grain size: a parallel kernel
    before = torch.get_num_threads()
    try:
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            assert_matches_torch(relu(x), torch.relu(x))
            assert omp_pool.last_team_size() == count
    finally:
        torch.set_num_threads(before)

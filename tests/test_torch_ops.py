"""tvmlayers layers as torch custom ops: fake shapes, torch.compile in one graph, torch.export, gradients, opcheck."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tvmlayers as tl
from tvmlayers import torch_ops
from tvmlayers.targets import target_json

ops = torch.ops.tvmlayers
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message="tvmlayers: no tuning record")


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding="same", bias=False),
        torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )


def convert(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """The small CNN with tvmlayers layers, the first conv fused with its relu (as ``tl.convert`` makes it; built
    here layer by layer so that these tests do not depend on how convert finds the layers)."""
    twins = {nn.Conv2d: tl.Conv2d, nn.ReLU: tl.ReLU, nn.MaxPool2d: tl.MaxPool2d, nn.Linear: tl.Linear}
    layers = [twins[type(m)].from_torch(m) if type(m) in twins else m for m in model]
    layers[:2] = [tl.nn.ConvReLU2d.from_torch(model[0]), torch.nn.Identity()]
    return torch.nn.Sequential(*layers)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


# one case per op and mode: (op, its arguments), built lazily so each test gets fresh tensors
def _cases() -> list[tuple[str, object, tuple]]:
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    return [
        ("conv2d fused relu", ops.conv2d.default, (x, w, b, None, [1, 1], [1, 1], "", [1, 1], 1, "zeros", True, False, "host")),  # noqa: E501
        ("conv2d same residual", ops.conv2d.default, (x, w, None, residual, [1, 1], [], "same", [1, 1], 1, "reflect", False, False, "host")),  # noqa: E501
        ("conv2d unbatched", ops.conv2d.default, (x[0], w, b, None, [2, 1], [0, 1], "", [1, 2], 1, "zeros", False, False, "host")),  # noqa: E501
        ("conv2d channels_last", ops.conv2d.default, (x_cl, w, b, None, [1, 1], [1, 1], "", [1, 1], 1, "zeros", False, False, "host")),  # noqa: E501
        ("conv2d circular", ops.conv2d.default, (x_cl, w, b, None, [1, 1], [1, 1], "", [1, 1], 1, "circular", False, False, "host")),  # noqa: E501
        ("max_pool2d ceil", ops.max_pool2d.default, (x, [2, 2], [], [1, 1], [1, 1], True, "host")),
        ("max_pool2d indices", ops.max_pool2d_with_indices.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False, "host")),
        ("max_pool2d indices unbatched", ops.max_pool2d_with_indices.default, (x[0], [2, 2], [], [0, 0], [1, 1], True, "host")),  # noqa: E501
        ("max_pool2d channels_last", ops.max_pool2d_with_indices.default, (x_cl, [2, 2], [], [0, 0], [1, 1], False, "host")),  # noqa: E501
        ("linear", ops.linear.default, (torch.randn(5, 7, dtype=torch.float64, requires_grad=True), torch.randn(3, 7, dtype=torch.float64, requires_grad=True), None, False, False, "host")),  # noqa: E501
        ("linear 3-d fused", ops.linear.default, (torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64), True, False, "host")),  # noqa: E501
        ("relu", ops.relu.default, (x, "host")),
        ("relu channels_last", ops.relu.default, (x_cl, "host")),
        ("relu 0-d", ops.relu.default, (torch.tensor(-1.5, dtype=torch.float64), "host")),
        ("relu_", ops.relu_.default, (torch.randn(3, 4, dtype=torch.float64), "host")),
    ]


_NAMES = [name for name, _, _ in _cases()]


@pytest.mark.parametrize("index", range(len(_NAMES)), ids=_NAMES)
def test_opcheck(index: int) -> None:
    """torch's own checks of a custom op: schema, fake tensor vs real (shapes, strides), autograd registration,
    AOT dispatch."""
    _, op, args = _cases()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("index", range(len(_NAMES)), ids=_NAMES)
def test_fake_matches_real(index: int) -> None:
    _, op, args = _cases()[index]
    real = op(*[a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
    with torch._subclasses.FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for got, want in zip(fake, real, strict=True):
        if want is None:  # relu_ returns nothing
            assert got is None
            continue
        assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())


def test_compile_one_graph_matches_torch() -> None:
    model = small_cnn().eval()
    converted = convert(model)
    x = _x()
    with torch.no_grad():
        explained = torch._dynamo.explain(converted)(x)
        assert (explained.graph_break_count, explained.graph_count) == (0, 1)
        compiled = torch.compile(converted, fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))


def test_compile_functional_calls() -> None:
    weight, bias = torch.randn(4, 3, 3, 3), torch.randn(4)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = tl.functional.conv2d(x, weight, bias, padding=1, fuse_relu=True, residual=torch.ones(2, 4, 8, 8))
        values, indices = tl.functional.max_pool2d(y, 2, return_indices=True)
        return tl.functional.relu(values - 1, inplace=True) + indices

    def reference(x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1) + 1)
        values, indices = torch.nn.functional.max_pool2d(y, 2, return_indices=True)
        return torch.relu(values - 1) + indices

    x = _x()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), reference(x))


def test_compiled_training_gets_torch_gradients() -> None:
    model = small_cnn()
    converted = convert(model)
    compiled = torch.compile(converted, fullgraph=True)
    x = _x().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    compiled(x).square().sum().backward()
    model(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for got, want in zip(converted.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_export_holds_tvmlayers_ops_and_runs() -> None:
    model = small_cnn().eval()
    converted = convert(model)
    x = _x()
    exported = torch.export.export(converted, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"tvmlayers.conv2d.default", "tvmlayers.max_pool2d.default", "tvmlayers.linear.default"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_fx_symbolic_trace_sees_ops() -> None:
    converted = convert(small_cnn().eval())
    # tvmlayers modules are not leaves, so FX traces into their forward and records the op
    graph = torch.fx.symbolic_trace(converted)
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    tvm_ops = [t for t in targets if t.startswith("tvmlayers.")]
    assert tvm_ops == ["tvmlayers.conv2d.default", "tvmlayers.max_pool2d.default", "tvmlayers.conv2d.default",
                       "tvmlayers.relu_.default", "tvmlayers.linear.default"]  # fmt: skip
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(graph(x), converted(x))


def test_target_dict_travels_as_json() -> None:
    target = tl.resolve_target("host")
    as_string = torch_ops.target_arg(target)
    assert as_string.startswith("{")
    relu = tl.ReLU(target=target_json(target))
    x = torch.randn(3, 5)
    torch.testing.assert_close(torch.compile(relu, fullgraph=True)(x), torch.relu(x))


def test_relu_inplace_is_a_mutation_in_the_graph() -> None:
    exported = torch.export.export(tl.ReLU(inplace=True), (torch.randn(4, 4),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert targets & {"tvmlayers.relu_.default", "tvmlayers.relu.default"}
    x = torch.randn(4, 4)
    expected = torch.relu(x)
    out = torch.compile(tl.ReLU(inplace=True), fullgraph=True)(x)
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(out, expected)

"""The recorded-program forward of converted models (tvmlayers/executor.py): the same numbers as torch while the
program runs, and torch's numbers again after anything it relied on changes; torch is the oracle throughout."""

from __future__ import annotations

import copy
import pickle
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import tvmlayers as tl
from conftest import assert_close_scaled
from tvmlayers import executor
from tvmlayers.model_bench import randomize_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "models"))
import resnet18  # noqa: E402


class Net(nn.Module):
    """A stem, a ResNet block (residual fused), a max-pool, a head, and a second output read by torch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.block = resnet18.BasicBlock(8, 8, stride=1)
        self.head = nn.Linear(8, 5)

    # annotated under ``from __future__ import annotations``: strings, which fx once wrote into the code it pickles
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.block(self.pool(self.stem(x)))
        return self.head(features.mean((2, 3))), features


def make_net(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = randomize_batchnorm(Net()).eval()
    return model, tl.convert(model)


def program_of(converted: nn.Module, x: torch.Tensor) -> executor.Program:
    return executor._programs[converted].by_signature[executor._signature((x,))]


def assert_outputs(actual: tuple, expected: tuple) -> None:
    for got, want in zip(actual, expected, strict=True):
        assert_close_scaled(got, want)


def converted_thrice(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` (in eval mode) converted and called three times without grad (recorded, then its program twice),
    each time against torch."""
    converted = tl.convert(model.eval())
    with torch.no_grad():
        for _ in range(3):
            assert_close_scaled(converted(x), model(x))
    return converted


def test_program_runs_kernels_into_reused_buffers_with_torchs_numbers() -> None:
    model, converted = make_net()
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        first = converted(x1)  # recorded while it runs
        program = program_of(converted, x1)
        kernel_paths = [path for path, *_ in program.kernel_modules]
        assert kernel_paths == ["stem.0", "pool", "block.conv1", "block.conv2", "head"]
        # pool and conv1 outputs are read only by kernels: two arena buffers; the block's output is returned
        assert len(program.arena) == 2
        second = converted(x2)  # the program
        third = converted(x1)
        assert_outputs(first, model(x1))
        assert_outputs(second, model(x2))
        assert_outputs(third, model(x1))
    # what a call returned is the caller's: later calls never write into it
    assert first[1].data_ptr() != third[1].data_ptr()
    assert_outputs(first, third)


def test_program_off_where_it_must_be() -> None:
    model, converted = make_net(1)
    x = torch.randn(1, 3, 12, 12)
    out = converted(x)  # grad enabled and parameters requiring it: autograd, no program
    assert out[0].grad_fn is not None and converted not in executor._programs
    out[0].sum().backward()
    assert converted.stem[0].weight.grad is not None
    # under a tracer the graph's code runs: torch.fx records the layers as tvmlayers ops
    with torch.no_grad():
        traced = torch.fx.symbolic_trace(converted)
    ops = [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    assert sum(op.startswith("tvmlayers.") for op in ops) == 5, ops


def test_changes_after_recording_are_seen() -> None:
    model, converted = make_net(2)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        converted(x)
        converted(x)
        # an in-place weight write (the version counter); conv1's BatchNorm is folded into its weight, which
        # scales per output channel: scaling both weights alike keeps the two models equal
        converted.block.conv1.weight.mul_(-1.5)
        model.block.conv1.weight.mul_(-1.5)
        assert_outputs(converted(x), model(x))
        # a new parameter object
        converted.head.weight = nn.Parameter(torch.randn(5, 8))
        model.head.weight = nn.Parameter(converted.head.weight.detach().clone())
        assert_outputs(converted(x), model(x))
        # .data assigned
        converted.head.bias.data = torch.randn(5)
        model.head.bias.data = converted.head.bias.detach().clone()
        assert_outputs(converted(x), model(x))
        # a layer replaced by a torch module
        converted.pool = model.pool = nn.AvgPool2d(2)
        assert_outputs(converted(x), model(x))
        assert_outputs(converted(x), model(x))


def test_hooks_added_after_recording_run_and_see_torchs_values() -> None:
    model, converted = make_net(3)
    x = torch.randn(1, 3, 16, 16)
    seen = []
    with torch.no_grad():
        converted(x)
        converted(x)
        (program,) = executor.programs(converted)
        handle = converted.block.conv1.register_forward_hook(lambda m, args, out: seen.append(out.clone()) or out * 0)
        got = converted(x)
        converted(x)
        assert executor.programs(converted) == [program]  # not recorded again while the hook is there
        # conv1's output zeroed by the hook: the block computes relu(bn2(conv2(0)) + identity)
        want = model.block.relu(
            model.block.bn2(model.block.conv2(torch.zeros_like(seen[0]))) + model.pool(model.stem(x))
        )
        assert_close_scaled(got[1], want)
        assert_close_scaled(seen[0], model.block.relu(model.block.bn1(model.block.conv1(model.pool(model.stem(x))))))
        handle.remove()
        assert_outputs(converted(x), model(x))
        assert len(seen) == 2  # the hook ran on every call it was registered for
        # a global forward hook
        calls = []
        handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
        try:
            converted(x)
        finally:
            handle.remove()
        assert "ConvReLU2d" in calls and "Linear" in calls


def test_input_signatures_each_get_a_program() -> None:
    model, converted = make_net(4)
    shapes = [(1, 3, 16, 16), (2, 3, 8, 8), (1, 3, 16, 16)]
    with torch.inference_mode():
        for shape in shapes * 2:
            x = torch.randn(shape)
            assert_outputs(converted(x), model(x))
        # a channels_last input: a signature of its own; the stem's kernel cannot take it as it is
        x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        assert_outputs(converted(x), model(x))
        assert_outputs(converted(x), model(x))
    assert len(executor._programs[converted].by_signature) == 3


def test_threads_share_a_model() -> None:
    model, converted = make_net(5)
    inputs = [torch.randn(1, 3, 16, 16) for _ in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        converted(inputs[0])
    failures = []

    def work(k: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                try:
                    assert_outputs(converted(inputs[k]), expected[k])
                except AssertionError as error:
                    failures.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_copies_and_pickles_keep_the_program() -> None:
    model, converted = make_net(6)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        converted(x)
        for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
            assert hasattr(type(copied).forward, "__wrapped__")
            assert_outputs(copied(x), model(x))
            assert_outputs(copied(x), model(x))
            assert copied in executor._programs


def test_edited_graph_runs_as_written() -> None:
    model, converted = make_net(7)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        converted(x)
        output = next(n for n in converted.graph.nodes if n.op == "output")
        logits = output.args[0][0]
        with converted.graph.inserting_before(output):
            negated = converted.graph.call_function(torch.neg, (logits,))
        output.args = ((negated, output.args[0][1]),)
        converted.recompile()
        got = converted(x)
    assert_close_scaled(got[0], -model(x)[0])


_misaligned_calls = [0]


@torch.fx.wrap
def misaligned_on_odd_calls(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied, off the kernels' alignment on odd calls: kernel steps reading it must call their modules."""
    _misaligned_calls[0] += 1
    if _misaligned_calls[0] % 2 == 0:
        return x.clone()
    storage = torch.empty(x.numel() + 1)
    return storage[1:].view(x.shape).copy_(x)


class DropoutNet(nn.Module):
    """A ResNet block (its residual fused: a conv fetched by get_attr) fed by a torch function, then a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = resnet18.BasicBlock(8, 8, stride=1)
        self.drop = nn.Dropout(p=1.0)  # all zeros while training: easy to see
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.block(misaligned_on_odd_calls(self.stem(x))).mean((2, 3))))


def test_skipped_steps_come_back_when_needed() -> None:
    torch.manual_seed(8)
    model = randomize_batchnorm(DropoutNet()).eval()
    converted = tl.convert(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        converted(x)
        program = program_of(converted, x)
        # the residual's conv fetched by no step, the eval-mode dropout an alias of its input
        fetched = [n for n in converted.graph.nodes if n.op == "get_attr"]
        assert fetched and len(program.steps) == len(list(converted.graph.nodes)) - 2 - len(fetched)
        assert [path for path, *_ in program.skipped_modules] == ["drop"]
        for _ in range(4):  # the block's input misaligned on every other call: its layers call their modules
            assert_close_scaled(converted(x), want)
        assert executor.programs(converted) == [program]
        # a dropout training again drops (p=1: everything), as torch's does
        converted.drop.train()
        model.drop.train()
        assert program.obstacle(converted) == "changed"
        assert_close_scaled(converted(x), model(x))
        assert torch.equal(converted(x), converted.head.bias.expand(1, 5))


class PoolHead(nn.Module):
    """A conv, a global average pool in one of torch's spellings, flatten, a dropout and a linear head."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.spelling == "module":
            x = torch.flatten(self.pool(x), 1)
        elif self.spelling == "function":
            x = torch.nn.functional.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        else:
            x = x.mean((2, 3))
        return self.head(self.drop(x))


@pytest.mark.parametrize("spelling", ["module", "function", "mean"])
def test_global_average_pools_run_as_kernels(spelling: str) -> None:
    torch.manual_seed(9)
    model, x = PoolHead(spelling), torch.randn(2, 3, 9, 7)
    converted = converted_thrice(model, x)
    with torch.no_grad():
        program = program_of(converted, x)
        # conv, pool and head call kernels; flatten is a fixed view of the pool's arena buffer, the dropout its alias
        assert program.kernel_calls == 3 and len(program.steps) == (3 if spelling == "mean" else 4) + 1
        assert len(program.arena) == 2
        if spelling == "module":  # a pool that is no longer global: torch's again
            converted.pool.output_size = model.pool.output_size = 2
            assert program.obstacle(converted) == "changed"
            with pytest.raises(RuntimeError, match="cannot be multiplied"):
                model(x)  # 16 * 2 * 2 features for a head of 16: torch refuses, and so does the converted model
            with pytest.raises(ValueError, match="cannot be multiplied"):
                converted(x)
            converted.pool.output_size = model.pool.output_size = 1
            assert_close_scaled(converted(x), model(x))


def test_a_pool_of_a_returned_value_stays_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conv's output is also returned: it is the caller's, not an arena buffer, and the pool runs as written
    (no linear kernel is built for it)."""

    class Both(PoolHead):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.conv(x)
            return self.head(torch.flatten(self.pool(features), 1)), features

    planned = []
    linear_plan = tl.functional.linear_plan

    def noted(input: torch.Tensor, *rest: object) -> object:
        planned.append(tuple(input.shape))
        return linear_plan(input, *rest)

    monkeypatch.setattr(tl.functional, "linear_plan", noted)
    torch.manual_seed(10)
    model = Both("module").eval()
    converted = tl.convert(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = converted(x)
        second = converted(x)
        assert_outputs(second, model(x))
        assert program_of(converted, x).kernel_calls == 2
    assert first[1].data_ptr() != second[1].data_ptr()
    assert planned and (16, 8 * 8) not in planned  # the head's plans, none for the pool's 16 planes of 8x8


def test_arena_buffers_outlive_their_views() -> None:
    """The first pool's buffer is read through a flatten view after the second pool ran: reusing it for the second
    pool's output (the same size) would give the first head the second pool's means."""

    class TwoPools(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 16, 3), nn.Conv2d(3, 16, 5)
            self.head1, self.head2 = nn.Linear(16, 4), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.conv1(x), 1), 1)
            second = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.conv2(x), 1), 1)
            return self.head1(first) - self.head2(second)

    torch.manual_seed(11)
    x = torch.randn(1, 3, 12, 12)
    assert program_of(converted_thrice(TwoPools(), x), x).kernel_calls == 6


def test_a_pool_to_the_inputs_own_size_is_skipped() -> None:
    """VGG's adaptive pool to 7x7 of 7x7 features: each bin one element, the input's values; skipped until its
    output size changes."""

    class Vgg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
            self.classifier = nn.Sequential(nn.Linear(8 * 16, 10), nn.ReLU(), nn.Dropout(), nn.Linear(10, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    torch.manual_seed(12)
    model, x = Vgg(), torch.randn(2, 3, 8, 8)
    converted = converted_thrice(model, x)
    with torch.no_grad():
        program = program_of(converted, x)
        assert program.kernel_calls == 4
        assert [path for path, *_ in program.skipped_modules] == ["avgpool", "classifier.2"]
        converted.avgpool.output_size = model.avgpool.output_size = (2, 8)  # pools now: 8 x 2 x 8 = 128 features
        assert program.obstacle(converted) == "changed"
        assert_close_scaled(converted(x), model(x))
        assert_close_scaled(converted(x), model(x))


def test_a_model_returning_a_dict_records_a_program() -> None:
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            features = self.conv(x)
            return {"features": features, "means": features.mean((2, 3))}

    torch.manual_seed(13)
    model, x = Named().eval(), torch.randn(1, 3, 9, 9)
    converted = tl.convert(model)
    with torch.no_grad():
        for _ in range(3):
            got, want = converted(x), model(x)
            assert got.keys() == want.keys()
            for key in want:
                assert_close_scaled(got[key], want[key])
        assert program_of(converted, x).kernel_calls == 1  # the conv's output is returned: the mean is torch's


def test_replacements_anywhere_on_a_layers_path_are_seen() -> None:
    """Assignments deep in the tree (an attribute of a block, an item of a Sequential) and functional_call's swapped
    parameters record the program anew; a module built elsewhere leaves it alone."""
    model, converted = make_net(14)
    x = torch.randn(1, 3, 16, 16)
    paths = ("block.conv2", "stem.0")
    # copies with their weights scaled, made before the program is recorded (building modules touches counters of
    # its own); the torch model's weights get scaled alike when they go in (BatchNorm folding is linear in them)
    replacements = [copy.deepcopy(converted.get_submodule(path)) for path in paths]
    with torch.no_grad():
        for replacement in replacements:
            replacement.weight.mul_(-1.5)
        converted(x)
        (program,) = executor.programs(converted)
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())  # registrations under modules no program relies on
        assert program.obstacle(converted) is None
        for path, replacement in zip(paths, replacements, strict=True):
            parent, name = path.rsplit(".", 1)
            model.get_submodule(path).weight.mul_(-1.5)
            if name.isdigit():
                converted.get_submodule(parent)[int(name)] = replacement
            else:
                setattr(converted.get_submodule(parent), name, replacement)
            assert program.obstacle(converted) == "changed"
            assert_outputs(converted(x), model(x))
            assert_outputs(converted(x), model(x))
            program = executor.programs(converted)[-1]
        swapped = {name: torch.randn_like(p) for name, p in model.head.named_parameters(prefix="head")}
        assert_outputs(
            torch.func.functional_call(converted, swapped, (x,)), torch.func.functional_call(model, swapped, (x,))
        )

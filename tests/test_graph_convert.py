"""tl.convert's graph passes (tvmlayers/graph.py): BatchNorm folding, relu and residual fusion, functional calls,
shared modules, hooks, the untraceable fallback, training mode; torch is the oracle for every number."""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tvmlayers as tl
from conftest import assert_close_scaled, assert_matches_torch
from tvmlayers.convert import convert_modules
from tvmlayers.model_bench import randomize_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "models"))
import mobilenetv2  # noqa: E402
import resnet18  # noqa: E402


def names(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


def test_resnet_basic_block_folds_bn_and_fuses_relu_and_residual() -> None:
    torch.manual_seed(0)
    block = randomize_batchnorm(resnet18.BasicBlock(16, 32, stride=2)).eval()
    converted = tl.convert(block)
    report = converted.tvmlayers_report
    assert sorted(report.folded) == ["bn1 <- conv1", "bn2 <- conv2", "downsample.1 <- downsample.0"]
    assert report.fused_relu == ["conv1"] and report.fused_residual == ["conv2 + relu"]
    assert "BatchNorm2d" not in names(converted)
    assert type(converted.conv1) is tl.nn.ConvReLU2d and type(converted.conv2) is tl.nn.ConvAddReLU2d
    # state_dict: the model's keys, less the folded BatchNorms', and the folded convs' biases
    assert list(converted.state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "downsample.0.weight", "downsample.0.bias"
    ]  # fmt: skip
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        assert_close_scaled(converted(x), block(x))
        # every leaf's output: the folded conv1 computes relu(bn1(conv1(x)))
        assert_close_scaled(converted.conv1(x), F.relu(block.bn1(block.conv1(x))))
    (kernel,) = converted.conv2.kernels.values()
    assert kernel.spec["residual"] is True and kernel.spec["relu"] is True


def test_mobilenet_inverted_residual_block() -> None:
    torch.manual_seed(1)
    block = randomize_batchnorm(mobilenetv2.InvertedResidual(16, 16, stride=1, expansion=2)).eval()
    converted = tl.convert(block)
    report = converted.tvmlayers_report
    assert len(report.folded) == 3 and report.fused_residual == ["block.6"]  # x + block(x), no relu after
    assert report.fused_relu == [] and report.fused_relu6 == ["block.0", "block.3"]  # conv -> BN -> ReLU6
    assert names(converted).count("ReLU6") == 0 and names(converted).count("Conv2dReLU6") == 2
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        assert_close_scaled(converted(x), block(x))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 16, 3, 3) * 0.1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        x = F.conv2d(x, self.weight, None, 1, 1).relu()
        x = F.relu(F.max_pool2d(x, 2, return_indices=True)[0] - 0.1)
        return F.linear(torch.flatten(x, 1), self.fc.weight, self.fc.bias)


def test_functional_calls_are_converted_and_fused() -> None:
    torch.manual_seed(2)
    model = Functional().eval()
    converted = tl.convert(model)
    report = converted.tvmlayers_report
    assert report.fused_relu == ["conv", "conv2d"]  # the module's relu and the functional conv's
    assert len(report.functional) == 7  # 2 max_pool2d, conv2d, linear, 3 relus (two then fused)
    code = converted.code
    assert "torch.relu" not in code and "torch.nn.functional" not in code and "tvmlayers_functional" in code
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_matches_torch(converted(x), model(x))


class Shared(nn.Module):
    """One conv called twice: once followed by a relu, once not."""

    def __init__(self, relu_both: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu_both = relu_both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        z = self.conv(y)
        return self.relu(z) if self.relu_both else z + 1


@pytest.mark.parametrize("relu_both", [False, True])
def test_a_shared_module_stays_one_and_is_fused_only_where_every_call_allows(relu_both: bool) -> None:
    torch.manual_seed(3)
    model = Shared(relu_both).eval()
    converted = tl.convert(model)
    assert converted.code.count("self.conv(") == 2
    assert type(converted.conv) is (tl.nn.ConvReLU2d if relu_both else tl.Conv2d)
    assert converted.tvmlayers_report.fused_relu == (["conv"] if relu_both else [])
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert_matches_torch(converted(x), model(x))


def test_hooked_modules_are_not_fused_and_see_torchs_values() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    randomize_batchnorm(model)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    converted = tl.convert(model)
    assert converted.tvmlayers_report.folded == [] and converted.tvmlayers_report.fused_relu == []
    assert type(converted.get_submodule("0")) is tl.Conv2d  # the twin carries the hook
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_matches_torch(converted(x), model(x))
    ours, theirs = seen
    assert_matches_torch(ours, theirs)  # the conv's output, before the BatchNorm and relu
    assert ours.min() < 0


def test_sequential_subclass_with_its_own_forward_gives_torchs_result() -> None:
    class P(nn.Sequential):
        forward = lambda s, x: s[1](s[0](x)) + s[0](x)  # noqa: E731

    torch.manual_seed(5)
    model = P(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert_matches_torch(tl.convert(model)(x), expected)
        # the module-by-module fallback no longer fuses there either
        fallback = copy.deepcopy(model)
        convert_modules(fallback, None, fuse=True)
        assert type(fallback[0]) is tl.Conv2d
        assert_matches_torch(fallback(x), expected)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.other = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.other(x) if x.sum() > 0 else x


def test_an_untraceable_model_falls_back_with_a_warning() -> None:
    torch.manual_seed(6)
    model = Untraceable().eval()
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace Untraceable: TraceError: .*control flow"):
        converted = tl.convert(model)
    assert type(converted) is Untraceable
    assert "cannot trace" in converted.tvmlayers_report.fallback
    assert [type(m).__name__ for m in converted.features] == ["ConvReLU2d", "Identity"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_matches_torch(converted(x), model(x))


def test_training_mode_does_not_fold_and_gradients_match() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    ).double()
    converted = tl.convert(model)
    assert converted.tvmlayers_report.folded == [] and converted.tvmlayers_report.fused_relu == ["3"]
    assert "BatchNorm2d" in names(converted) and converted.training
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for net in (model, converted):
        net(x).square().sum().backward()
    for (name, ours), theirs in zip(converted.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(converted.get_submodule("1").running_mean, model[1].running_mean)


def test_linear_batch_norm_folds_only_on_2d_inputs() -> None:
    torch.manual_seed(8)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.BatchNorm1d(32), nn.ReLU()).eval()
    # on (N, L, F) a BatchNorm1d normalizes L, not the linear's features: not folded
    seq = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32)).eval()
    for model, x, folded in ((flat, torch.randn(4, 3, 4, 4), 1), (seq, torch.randn(4, 32, 32), 0)):
        randomize_batchnorm(model)
        converted = tl.convert(model)
        assert len(converted.tvmlayers_report.folded) == folded
        with torch.no_grad():
            assert_close_scaled(converted(x), model(x))
    assert type(tl.convert(flat).get_submodule("1")) is tl.nn.LinearReLU


def test_residual_of_another_shape_falls_back_to_torchs_add() -> None:
    class Broadcast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.relu(self.conv(x) + y)

    torch.manual_seed(9)
    model = Broadcast().eval()
    converted = tl.convert(model)
    assert converted.tvmlayers_report.fused_residual == ["conv + relu"]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for y in (torch.randn(2, 16, 6, 6), torch.randn(1, 16, 1, 1), torch.randn(2, 16, 6, 6, dtype=torch.float64)):
            assert_close_scaled(converted(x, y), model(x, y))  # float32 convs, a float64 sum in the last case


def test_fuse_false_inplace_copies_and_pickle() -> None:
    torch.manual_seed(10)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())).eval()
    plain = tl.convert(model, fuse=False)
    assert names(plain)[1:] == ["Conv2d", "BatchNorm2d", "ReLU"] and plain.tvmlayers_report.summary().startswith("0")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert_matches_torch(plain(x), expected)
        converted = tl.convert(model)
        assert copy.deepcopy(converted).tvmlayers_report.folded == ["1 <- 0"]
        for twin in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
            assert_close_scaled(twin(x), expected)
        same = copy.deepcopy(model)
        tl.convert(same, inplace=True)  # the model's own modules: folded and swapped, and it still computes torch's
        assert names(same)[1:] == ["ConvReLU2d", "Identity", "Identity"]
        assert_close_scaled(same(x), expected)


@pytest.mark.parametrize("module", [resnet18, mobilenetv2], ids=["resnet18", "mobilenetv2"])
def test_example_models_fold_fuse_and_match_torch(module) -> None:
    torch.manual_seed(11)
    model = randomize_batchnorm(module.model())
    converted = tl.convert(model)
    report = converted.tvmlayers_report
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(report.folded) == norms and "BatchNorm2d" not in names(converted)
    if module is resnet18:  # the stem and every block's first conv + relu; every block's second conv + add + relu
        assert len(report.fused_relu) == 9 and len(report.fused_residual) == 8
    else:  # all 35 ReLU6 fused; the 10 blocks with a shortcut add it in their projection's kernel
        assert report.fused_relu == [] and len(report.fused_relu6) == 35 and len(report.fused_residual) == 10
    print(report.summary())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_scaled(converted(x), model(x))

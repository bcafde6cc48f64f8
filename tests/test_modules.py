"""The torch-facing modules: torch's constructor, initialization, state_dict, repr; from_torch; convert."""

from __future__ import annotations

import pytest
import torch

import tvmlayers as tl
from conftest import assert_matches_torch

CONV_CONFIGS = [
    dict(in_channels=16, out_channels=33, kernel_size=3, stride=2),
    dict(in_channels=16, out_channels=33, kernel_size=(3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1)),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding="same", groups=8, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=4, padding="valid", padding_mode="circular"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect", groups=2),
]


@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_conv2d_is_torch_compatible(config: dict) -> None:
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(**config)
    torch.manual_seed(0)
    ours = tl.Conv2d(**config)
    assert repr(ours) == repr(reference)
    # same seed, same initialization calls: the same parameters
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(2, config["in_channels"], 11, 12)
    with torch.no_grad():
        assert_matches_torch(ours(x), reference(x))
        assert_matches_torch(ours(x[0]), reference(x[0]))  # unbatched


def test_state_dict_round_trip() -> None:
    reference = torch.nn.Conv2d(3, 8, 3)
    ours = tl.Conv2d(3, 8, 3)
    ours.load_state_dict(reference.state_dict())
    back = torch.nn.Conv2d(3, 8, 3)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, reference.weight) and torch.equal(back.bias, reference.bias)
    linear = tl.Linear(5, 2, bias=False)
    linear.load_state_dict(torch.nn.Linear(5, 2, bias=False).state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        linear.load_state_dict(torch.nn.Linear(5, 2).state_dict())


def test_linear_is_torch_compatible() -> None:
    torch.manual_seed(1)
    reference = torch.nn.Linear(20, 30)
    torch.manual_seed(1)
    ours = tl.Linear(20, 30)
    assert repr(ours) == repr(reference)
    assert torch.equal(ours.weight, reference.weight) and torch.equal(ours.bias, reference.bias)
    x = torch.randn(128, 20)
    with torch.no_grad():
        assert_matches_torch(ours(x), reference(x))


def test_float64_module() -> None:
    ours = tl.Linear(6, 4, dtype=torch.float64)
    reference = torch.nn.Linear(6, 4, dtype=torch.float64)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        assert_matches_torch(ours(x), reference(x))


@pytest.mark.parametrize(
    "reference",
    [
        torch.nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True),
        torch.nn.MaxPool2d((3, 2), stride=(2, 1)),
        torch.nn.ReLU(),
        torch.nn.ReLU(inplace=True),
    ],
    ids=repr,
)
def test_parameterless_modules_repr_and_output(reference: torch.nn.Module) -> None:
    ours = tl.convert(reference)
    assert type(ours).__module__.startswith("tvmlayers.")
    assert repr(ours) == repr(reference)
    x = torch.randn(2, 3, 10, 9)
    assert_matches_torch(ours(x.clone()), reference(x.clone()))


def test_target_shows_in_repr_and_is_used() -> None:
    conv = tl.Conv2d(3, 4, 3, target="host")
    assert repr(conv).endswith("stride=(1, 1), target='host')")
    assert repr(tl.ReLU(target="host")) == "ReLU(target='host')"
    conv(torch.randn(1, 3, 8, 8))
    (kernel,) = conv.kernels.values()
    assert kernel.spec.target.kind.name == "llvm"


def test_kernels_record_provenance_per_input_shape() -> None:
    conv = tl.Conv2d(16, 32, 3, padding=1)
    conv(torch.randn(1, 16, 8, 8))
    conv(torch.randn(2, 16, 6, 6))
    conv(torch.randn(16, 8, 8))  # unbatched: the batch-1 kernel again, recorded under its own shape
    conv(torch.randn(1, 16, 8, 8))
    assert set(conv.kernels) == {(1, 16, 8, 8), (2, 16, 6, 6), (16, 8, 8)}
    assert conv.kernels[(16, 8, 8)] is conv.kernels[(1, 16, 8, 8)]
    for kernel in conv.kernels.values():
        assert kernel.provenance == {"source": "default", "rule": "cpu.conv2d_blocked"}
        assert kernel.spec.op == "conv2d" and kernel.path.exists()
    depthwise = tl.Conv2d(8, 8, 3, groups=8)
    depthwise(torch.randn(1, 8, 6, 6))
    assert next(iter(depthwise.kernels.values())).provenance["rule"] == "cpu.conv2d_spatial"


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(inplace=True),
            torch.nn.MaxPool2d(2),
            torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), torch.nn.ReLU()),
            torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),
            torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        )
        self.head = torch.nn.Linear(32 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def test_convert_small_cnn_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    converted = tl.convert(model)
    replaced = [m for m in converted.modules() if type(m).__module__.startswith("tvmlayers.")]
    # conv+relu pairs are fused: 2 ConvReLU2d, then 1 Conv2d, 2 MaxPool2d, 1 Linear
    assert sorted(type(m).__name__ for m in replaced) == [
        "Conv2d",
        "ConvReLU2d",
        "ConvReLU2d",
        "Linear",
        "MaxPool2d",
        "MaxPool2d",
    ]
    assert not any(type(m).__module__.startswith("tvmlayers.") for m in model.modules()), "original untouched"
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_matches_torch(converted(x), model(x))


def test_convert_inplace_and_subclasses() -> None:
    class MyConv(torch.nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyConv(3, 3, 1), torch.nn.ReLU())
    result = tl.convert(model, inplace=True)  # a GraphModule holding model's own (converted) children
    assert result.get_submodule("0") is model[0] and result.get_submodule("1") is model[1]
    assert type(model[0]) is MyConv, "a subclass may change forward: it is left alone"
    assert isinstance(model[1], tl.ReLU)


def test_convert_fuses_conv_and_linear_with_the_following_relu() -> None:
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(inplace=True),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    ).eval()
    fused = tl.convert(model)
    assert [type(m).__name__ for m in fused.children()] == [
        "ConvReLU2d",
        "Identity",
        "MaxPool2d",
        "ConvReLU2d",
        "Identity",
        "Flatten",
        "LinearReLU",
        "Identity",
        "Linear",
    ]
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_matches_torch(fused(x), model(x))
        assert_matches_torch(tl.convert(model, fuse=False)(x), model(x))
    assert all(k.spec.get("relu") for k in fused.get_submodule("0").kernels.values())
    assert [type(m).__name__ for m in tl.convert(model, fuse=False).children()][:2] == ["Conv2d", "ReLU"]


def test_fused_functional_matches_torch() -> None:
    torch.manual_seed(6)
    x, w, b = torch.randn(1, 8, 9, 9), torch.randn(32, 8, 3, 3), torch.randn(32)
    expected = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))
    assert_matches_torch(tl.functional.conv2d(x, w, b, padding=1, fuse_relu=True), expected)
    x, w = torch.randn(5, 24), torch.randn(40, 24)
    assert_matches_torch(tl.functional.linear(x, w, fuse_relu=True), torch.relu(x @ w.T))
    x, w, b = torch.randn(3, 64), torch.randn(6, 64), torch.randn(6)  # few outputs: the dot-product rule
    assert_matches_torch(tl.functional.linear(x, w, b, fuse_relu=True), torch.relu(x @ w.T + b))

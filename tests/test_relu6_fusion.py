"""relu6 (``min(max(x, 0), 6)``, MobileNet's activation) as the epilogue of conv2d and linear kernels: values
against torch (NaN and values above 6 included), gradients, the custom op, modules, the graph pass on MobileNetV2,
workload files, the benchmark label, and unchanged plain/relu workloads.  Small shapes: every shape compiles."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

import tvmlayers as tl
import tvmlayers.functional as tf
from conftest import HOST, assert_close_scaled, torch_conv2d
from tvmlayers import ops, schedules
from tvmlayers.benchmark import _label
from tvmlayers.convert import convert_modules
from tvmlayers.extract import extract_workloads
from tvmlayers.layer_specs import conv2d_spec, workload_spec
from tvmlayers.model_bench import randomize_batchnorm
from tvmlayers.records.database import shipped_log_root, workload_hash
from tvmlayers.spec import KernelSpec
from tvmlayers.workloads import format_workloads, load_workloads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "models"))
import mobilenetv2  # noqa: E402

TOLERANCES = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}

# (input shape, weight shape, keyword arguments): the convs of MobileNetV2 (stem, expansion 1x1, depthwise 3x3
# with and without stride) and a residual one
CASES = {
    "stem 3x3 stride 2": ((1, 3, 12, 14), (16, 3, 3, 3), dict(stride=2, padding=1)),
    "pointwise 1x1": ((2, 16, 7, 9), (32, 16, 1, 1), dict()),
    "depthwise 3x3": ((1, 32, 9, 10), (32, 1, 3, 3), dict(padding=1, groups=32)),
    "depthwise 3x3 stride 2": ((2, 16, 9, 10), (16, 1, 3, 3), dict(stride=2, padding=1, groups=16)),
    "odd channels, no bias": ((1, 5, 6, 7), (7, 5, 3, 3), dict(padding=1)),
}


def assert_equal_nan_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCES[expected.dtype])


def conv_tensors(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs large enough that many outputs exceed 6 and many are negative, with NaNs in the input."""
    in_shape, w_shape, _ = CASES[case]
    generator = torch.Generator().manual_seed(len(case))
    x = torch.randn(*in_shape, generator=generator, dtype=dtype) * 4
    x.view(-1)[:: max(1, x.numel() // 5)] = float("nan")
    w = torch.randn(*w_shape, generator=generator, dtype=dtype)
    bias = None if "no bias" in case else torch.randn(w_shape[0], generator=generator, dtype=dtype)
    return x, w, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv2d_relu6_matches_torch(case: str, dtype: torch.dtype) -> None:
    x, w, bias = conv_tensors(case, dtype)
    kwargs = CASES[case][2]
    expected = F.relu6(torch_conv2d(x, w, bias, **kwargs))
    assert (expected > 5.9).any() and (expected == 0).any() and expected.isnan().any()  # every branch, NaN kept
    with torch.no_grad():
        assert_equal_nan_close(tf.conv2d(x, w, bias, fuse_relu6=True, **kwargs), expected)
    # the module does the same, with Conv2d's constructor and parameters
    module = tl.nn.Conv2dReLU6(x.shape[1], w.shape[0], w.shape[2:], bias=bias is not None, dtype=dtype, **kwargs)
    module.load_state_dict({"weight": w, **({"bias": bias} if bias is not None else {})})
    with torch.no_grad():
        assert_equal_nan_close(module(x), expected)
    assert module.kernels[x.shape].spec["relu6"] is True and "relu" not in dict(module.kernels[x.shape].spec.params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linear_relu6_matches_torch(dtype: torch.dtype) -> None:
    x, w, b = (torch.randn(*shape, dtype=dtype) * 3 for shape in ((2, 5, 24), (40, 24), (40,)))
    x[0, 0, 0] = float("nan")
    expected = F.relu6(F.linear(x, w, b))
    assert (expected == 6).any() and expected.isnan().any()
    with torch.no_grad():
        assert_equal_nan_close(tf.linear(x, w, b, fuse_relu6=True), expected)
        module = tl.nn.LinearReLU6(24, 40, dtype=dtype)
        module.load_state_dict({"weight": w, "bias": b})
        assert_equal_nan_close(module(x), expected)
        # an empty product runs no kernel: torch's relu6 of the broadcast bias
        empty = tf.linear(x[:, :, :0], w[:, :0], b, fuse_relu6=True)
        assert_equal_nan_close(empty, F.relu6(F.linear(x[:, :, :0], w[:, :0], b)))


def test_relu6_composes_with_the_residual() -> None:
    x, w, bias = conv_tensors("depthwise 3x3", torch.float32)
    residual = torch.randn(1, 32, 9, 10) * 4
    expected = F.relu6(torch_conv2d(x, w, bias, padding=1, groups=32) + residual)
    with torch.no_grad():
        out = tf.conv2d(x, w, bias, padding=1, groups=32, residual=residual, fuse_relu6=True)
    assert_equal_nan_close(out, expected)


def test_one_activation_at_most() -> None:
    x, w, bias = conv_tensors("pointwise 1x1", torch.float32)
    with pytest.raises(ValueError, match="conv2d: fuse_relu and fuse_relu6 cannot both be set"):
        tf.conv2d(x, w, bias, fuse_relu=True, fuse_relu6=True)
    with pytest.raises(ValueError, match="linear: fuse_relu and fuse_relu6 cannot both be set"):
        tf.linear(torch.randn(2, 3), torch.randn(4, 3), fuse_relu=True, fuse_relu6=True)


def test_gradients_match_torch() -> None:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 3.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()

    x, w, b, r = rand(1, 4, 5, 6), rand(4, 1, 3, 3), rand(4), rand(1, 4, 5, 6)
    # a new weight tensor per call: gradcheck perturbs through .data, which the packed-weight memo cannot see
    assert gradcheck(lambda x, w, b: tf.conv2d(x, w.clone(), b, padding=1, groups=4, fuse_relu6=True), (x, w, b))
    assert gradcheck(
        lambda x, w, r: tf.conv2d(x, w.clone(), padding=1, groups=4, residual=r, fuse_relu6=True), (x, w, r)
    )
    xl, wl, bl = rand(3, 6), rand(5, 6), rand(5)
    assert gradcheck(lambda x, w, b: tf.linear(x, w.clone(), b, fuse_relu6=True), (xl, wl, bl))


def _op_cases() -> list[tuple[object, tuple]]:
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True) * 3
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    conv = torch.ops.tvmlayers.conv2d.default
    return [
        (conv, (x, w, b, None, [1, 1], [1, 1], "", [1, 1], 4, "zeros", False, True, "host")),
        (conv, (x.detach().to(memory_format=torch.channels_last), w, None, None, [2, 2], [1, 1], "", [1, 1], 4,
                "zeros", False, True, "host")),
        (torch.ops.tvmlayers.linear.default, (torch.randn(3, 5, 7, dtype=torch.float64) * 3,
                                              torch.randn(6, 7, dtype=torch.float64), None, False, True, "host")),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(3), ids=["conv2d depthwise", "conv2d channels_last stride 2", "linear 3-d"])
def test_custom_op_opcheck_and_fake_shapes(index: int) -> None:
    op, args = _op_cases()[index]
    torch.library.opcheck(op, args)
    real = op(*[a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
    with torch._subclasses.FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    tensors = [a.detach() for a in args if isinstance(a, torch.Tensor)]
    if op is torch.ops.tvmlayers.linear.default:
        expected = F.relu6(F.linear(tensors[0], tensors[1]))
    else:
        stride = args[4]
        expected = F.relu6(F.conv2d(tensors[0], tensors[1], *tensors[2:3] or [None], stride, 1, 1, 4))
    torch.testing.assert_close(real, expected)


def test_compiled_functional_relu6_is_one_graph() -> None:
    x, w, bias = (torch.randn(1, 8, 6, 6) * 4, torch.randn(8, 1, 3, 3), torch.randn(8))
    fn = torch.compile(lambda x: tf.conv2d(x, w, bias, padding=1, groups=8, fuse_relu6=True), fullgraph=True)
    torch.testing.assert_close(fn(x), F.relu6(F.conv2d(x, w, bias, padding=1, groups=8)), rtol=1e-4, atol=1e-4)






def test_inverted_residual_block_fuses_relu6() -> None:
    torch.manual_seed(1)
    block = randomize_batchnorm(mobilenetv2.InvertedResidual(16, 16, stride=1, expansion=2)).eval()
    converted = tl.convert(block)
    report = converted.tvmlayers_report
    assert report.fused_relu6 == ["block.0", "block.3"] and report.fused_relu == []
    assert report.fused_residual == ["block.6"] and "2 relu6 fused" in report.summary()
    kinds = [type(m).__name__ for m in converted.block]
    assert kinds == ["Conv2dReLU6", "Identity", "Identity", "Conv2dReLU6", "Identity", "Identity", "ConvAdd2d",
                     "Identity"]  # fmt: skip
    x = torch.randn(2, 16, 12, 12) * 4
    with torch.no_grad():
        assert_close_scaled(converted(x), block(x))
        (kernel,) = converted.block[3].kernels.values()
        assert kernel.spec["relu6"] is True and kernel.spec["groups"] == 32


def test_mobilenetv2_fuses_every_relu6_and_matches_torch() -> None:
    torch.manual_seed(11)
    model = randomize_batchnorm(mobilenetv2.model())
    relu6s = sum(type(m) is nn.ReLU6 for m in model.modules())
    converted = tl.convert(model)
    report = converted.tvmlayers_report
    assert relu6s == 35 and len(report.fused_relu6) == relu6s and report.fused_relu == []
    assert len(report.fused_residual) == 10
    assert not any(type(m) is nn.ReLU6 for m in converted.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_scaled(converted(x), model(x))


class Spellings(nn.Module):
    """relu6 as torch users write it, each after its own conv; then bounds that are not relu6's."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(9))
        self.hardtanh = nn.Hardtanh(0, 6)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        x = F.relu6(c[0](x))
        x = F.hardtanh(c[1](x), 0.0, 6.0)
        x = self.hardtanh(c[2](x))
        x = torch.clamp(c[3](x), 0, 6)
        x = c[4](x).clamp(min=0, max=6)
        x = F.relu6(F.conv2d(x, self.weight, None, 1, 1), inplace=True)
        x = F.hardtanh(c[5](x))  # (-1, 1): not relu6
        x = torch.clamp(c[6](x), 0, 5)
        x = c[7](x).clamp(min=0)
        return c[8](x).clamp(0, 6) + x  # one relu6, then an add: fused as well


def test_relu6_spellings_are_fused_and_others_are_not() -> None:
    torch.manual_seed(3)
    model = Spellings().eval()
    converted = tl.convert(model)
    report = converted.tvmlayers_report
    assert report.fused_relu6 == ["convs.0", "convs.1", "convs.2", "convs.3", "convs.4", "conv2d", "convs.8"]
    assert type(converted.hardtanh) is nn.Identity
    assert [type(m).__name__ for m in converted.convs[5:8]] == ["Conv2d"] * 3
    x = torch.randn(2, 4, 8, 8) * 4
    with torch.no_grad():
        assert_close_scaled(converted(x), model(x))


def test_shared_module_fuses_only_where_every_call_has_relu6() -> None:
    class Twice(nn.Module):
        def __init__(self, relu6_both: bool) -> None:
            super().__init__()
            self.conv, self.relu6_both = nn.Conv2d(4, 4, 3, padding=1), relu6_both

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu6(self.conv(x))
            return F.relu6(self.conv(y)) if self.relu6_both else F.relu(self.conv(y))

    x = torch.randn(1, 4, 6, 6) * 4
    for both, fused in ((True, ["conv"]), (False, [])):
        model = Twice(both).eval()
        converted = tl.convert(model)
        assert converted.tvmlayers_report.fused_relu6 == fused and converted.tvmlayers_report.fused_relu == []
        with torch.no_grad():
            assert_close_scaled(converted(x), model(x))


def test_module_by_module_fallback_fuses_relu6_in_a_sequential() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.ReLU6()).eval()
    converted = copy.deepcopy(model)
    convert_modules(converted, None, fuse=True)
    assert [type(m).__name__ for m in converted] == ["Conv2dReLU6", "Identity", "Flatten", "LinearReLU6", "Identity"]
    x = torch.randn(2, 3, 6, 6) * 4
    with torch.no_grad():
        assert_close_scaled(converted(x), model(x))


def _shipped_specs() -> dict[str, KernelSpec]:
    meta = json.loads((shipped_log_root() / "llvm-x86_64-linux-gnu-emeraldrapids" / "tvmlayers.json").read_text())
    return {h: KernelSpec.from_json(s) for h, s in meta["workloads"].items() if s["op"] in ("conv2d", "linear")}


def test_plain_and_relu_workload_hashes_are_unchanged() -> None:
    """Every shipped conv2d/linear record, plain or relu-fused, still finds its layer; a relu6 spec is another."""
    specs = _shipped_specs()
    assert any(spec.get("relu") for spec in specs.values())
    for recorded, spec in specs.items():
        assert "relu6" not in dict(spec.params)
        assert workload_hash(ops.prim_func(spec, schedules.weight_layout(spec))) == recorded, spec.describe()
    relu = next(spec for spec in specs.values() if spec.get("relu"))
    params = {k: v for k, v in relu.params if k != "relu"}
    relu6 = KernelSpec.make(relu.op, relu.input_shape, relu.dtype, relu.target, **params, relu6=True)
    assert workload_hash(ops.prim_func(relu6, schedules.weight_layout(relu6))) not in specs


def test_workloads_record_relu6_and_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(tl.nn.Conv2dReLU6(4, 8, 3, padding=1), nn.Flatten(), tl.nn.LinearReLU6(8 * 5 * 5, 3))
    workloads = extract_workloads(model, torch.randn(1, 4, 5, 5))
    assert [dict(w.params).get("relu6") for w in workloads] == [True, True]
    path = tmp_path / "relu6.toml"
    path.write_text(format_workloads(workloads))
    assert path.read_text().count("relu6 = true") == 2
    assert load_workloads(path)[0] == workloads
    params = dict(workloads[0].params)
    with pytest.raises(ValueError, match="relu6 must be true or false"):
        workload_spec("conv2d", [1, 4, 5, 5], "float32", {**params, "relu6": 1}, HOST)
    with pytest.raises(ValueError, match="fuse_relu and fuse_relu6 cannot both be set"):
        workload_spec("conv2d", [1, 4, 5, 5], "float32", {**params, "relu": True}, HOST)


def test_benchmark_labels_relu6() -> None:
    spec, _ = conv2d_spec((1, 8, 6, 6), (8, 1, 3, 3), None, "float32", HOST, 1, 1, 1, 8, "zeros", relu6=True)
    assert _label(spec) == "conv2d+relu6 1x8x6x6 8->8 k3x3 s1 p1 g8"

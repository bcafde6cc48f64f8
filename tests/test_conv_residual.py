"""conv2d with a residual added in its epilogue (``relu?(conv2d(x) + residual)``, ResNet's shortcut): against
torch, torch-like errors, gradients, unchanged plain workloads, the x86 write-back, modules, tuning and the
benchmark.  Small shapes: every shape compiles a kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import tvm
from torch.autograd import gradcheck, gradgradcheck

import tvmlayers as tl
import tvmlayers.functional as tf
from conftest import HOST, assert_matches_torch, torch_conv2d
from tvmlayers import ops, schedules
from tvmlayers.benchmark import bench_spec
from tvmlayers.extract import extract_workloads
from tvmlayers.records.database import shipped_log_root, workload_hash
from tvmlayers.schedules.cpu import CpuConv2dBlocked, CpuConv2dSpatial
from tvmlayers.schedules.generic import GenericParallel
from tvmlayers.spec import KernelSpec
from tvmlayers.tuning.tuner import tune
from tvmlayers.verify import check_kernel
from tvmlayers.workloads import format_workloads, load_workloads

# (input shape, weight shape, keyword arguments of tl.functional.conv2d); "no bias" in the name drops the bias,
# "shortcut" makes the residual ResNet's downsampling 1x1 stride-2 conv of the input, as a block's is
CASES = {
    "3x3, bias, relu": ((2, 8, 10, 14), (16, 8, 3, 3), dict(padding=1, fuse_relu=True)),
    "3x3, no bias, no relu": ((1, 8, 9, 14), (16, 8, 3, 3), dict(padding=1)),
    "stride 2, shortcut, relu": ((2, 8, 10, 12), (16, 8, 3, 3), dict(stride=2, padding=1, fuse_relu=True)),
    "1x1 stride 2, shortcut, no bias": ((1, 8, 10, 12), (16, 8, 1, 1), dict(stride=2)),
    "groups 2, relu": ((1, 8, 7, 9), (16, 4, 3, 3), dict(padding=1, groups=2, fuse_relu=True)),
    "depthwise stride 2, relu": ((2, 8, 9, 10), (8, 1, 3, 3), dict(stride=2, padding=1, groups=8, fuse_relu=True)),
    "depthwise, no bias": ((1, 8, 9, 10), (8, 1, 3, 3), dict(padding=1, groups=8)),
    "odd channels": ((1, 3, 6, 7), (5, 3, 3, 3), dict(padding=1)),
    "reflect, same, relu": ((1, 4, 7, 8), (8, 4, 3, 3), dict(padding="same", padding_mode="reflect", fuse_relu=True)),
    "replicate": ((1, 4, 7, 8), (8, 4, 3, 3), dict(padding=1, padding_mode="replicate")),
    "circular, relu": ((1, 4, 7, 8), (8, 4, 3, 3), dict(padding=(1, 2), padding_mode="circular", fuse_relu=True)),
    "unbatched, relu": ((8, 6, 7), (16, 8, 3, 3), dict(padding=1, fuse_relu=True)),
}
# gradcheck perturbs every element in turn: smaller shapes
GRAD_CASES = {
    "bias, relu": ((1, 4, 5, 6), (8, 4, 3, 3), dict(padding=1, fuse_relu=True)),
    "depthwise stride 2, relu": ((1, 4, 5, 6), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4, fuse_relu=True)),
    "unbatched, no bias, replicate": ((4, 5, 6), (8, 4, 3, 3), dict(padding=1, padding_mode="replicate")),
}


def case_tensors(
    case: str, dtype: torch.dtype, requires_grad: bool = False, cases: dict = CASES
) -> tuple[torch.Tensor, ...]:
    """(input, weight, bias or None, residual) of a case, seeded."""
    in_shape, w_shape, kwargs = cases[case]
    generator = torch.Generator().manual_seed(len(case))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(requires_grad)

    x, w = rand(*in_shape), rand(*w_shape)
    bias = None if "no bias" in case else rand(w_shape[0])
    if "shortcut" in case:
        shortcut = torch.randn(w_shape[0], in_shape[-3], 1, 1, generator=generator, dtype=dtype)
        residual = F.conv2d(x.detach(), shortcut, stride=2).requires_grad_(requires_grad)
    else:
        without = {k: v for k, v in kwargs.items() if k != "fuse_relu"}
        residual = rand(*torch_conv2d(x.detach(), w.detach(), None, residual=0, **without).shape)
    return x, w, bias, residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch(case: str, dtype: torch.dtype) -> None:
    x, w, bias, residual = case_tensors(case, dtype)
    kwargs = CASES[case][2]
    with torch.no_grad():
        out = tf.conv2d(x, w, bias, residual=residual, **kwargs)
    assert_matches_torch(out, torch_conv2d(x, w, bias, residual=residual, **kwargs))


def test_channels_last_and_unaligned_residuals() -> None:
    x, w, bias, residual = case_tensors("3x3, bias, relu", torch.float32)
    expected = torch_conv2d(x, w, bias, residual=residual, padding=1, fuse_relu=True)
    x_cl, r_cl = x.contiguous(memory_format=torch.channels_last), residual.contiguous(memory_format=torch.channels_last)
    both = tf.conv2d(x_cl, w, bias, padding=1, fuse_relu=True, residual=r_cl)
    assert_matches_torch(both, expected)
    # channels_last in, channels_last out, as torch's relu(conv(x) + r) gives
    assert both.is_contiguous(memory_format=torch.channels_last)
    assert torch.relu(F.conv2d(x_cl, w, bias, padding=1) + r_cl).is_contiguous(memory_format=torch.channels_last)
    assert_matches_torch(tf.conv2d(x, w, bias, padding=1, fuse_relu=True, residual=r_cl), expected)
    # a view that starts off the kernels' alignment, and a transposed one, are copied first
    storage = torch.cat([torch.zeros(1), residual.flatten()])
    unaligned = storage[1:].view(residual.shape)
    assert unaligned.data_ptr() % 64
    assert_matches_torch(tf.conv2d(x, w, bias, padding=1, fuse_relu=True, residual=unaligned), expected)
    transposed = residual.transpose(2, 3).contiguous().transpose(2, 3)
    assert_matches_torch(tf.conv2d(x, w, bias, padding=1, fuse_relu=True, residual=transposed), expected)
    assert torch.equal(unaligned, residual)  # read, never written


def test_residual_is_part_of_the_plan() -> None:
    x, w, bias, residual = case_tensors("3x3, bias, relu", torch.float32)
    plain = tf.conv2d_with_plan(x, w, bias, 1, 1, 1, 1, "zeros", None, True)[1]
    fused = tf.conv2d_with_plan(x, w, bias, 1, 1, 1, 1, "zeros", None, True, residual)[1]
    assert plain is not fused
    assert "residual" not in dict(plain.kernel.spec.params) and fused.kernel.spec["residual"] is True
    assert tf.conv2d_with_plan(x, w, bias, 1, 1, 1, 1, "zeros", None, True, residual.clone())[1] is fused


def test_wrong_residuals_raise_torch_like_errors() -> None:
    x, w, bias, residual = case_tensors("3x3, bias, relu", torch.float32)  # output (2, 16, 10, 14)

    def call(r, x=x):
        return tf.conv2d(x, w, bias, padding=1, fuse_relu=True, residual=r)

    # a shape torch cannot add either: torch's own message
    wrong = torch.randn(2, 16, 5, 7)
    with pytest.raises(RuntimeError) as torch_error:
        F.conv2d(x, w, bias, padding=1) + wrong
    with pytest.raises(ValueError) as ours:
        call(wrong)
    assert str(ours.value) == str(torch_error.value)
    # shapes torch would broadcast: the kernel does not, and says how to
    for shape in [(1, 16, 1, 1), (16, 10, 14), (1, 2, 16, 10, 14)]:
        with pytest.raises(ValueError, match=r"must have the output's size \[2, 16, 10, 14\].*without broadcasting"):
            call(torch.randn(shape))
    with pytest.raises(ValueError, match=r"output's size \[16, 10, 14\], but got size \[1, 16, 10, 14\]"):
        call(residual[:1], x=x[0])
    with pytest.raises(TypeError, match="expected scalar type Float but found Double for argument 'residual'"):
        call(residual.double())
    with pytest.raises(ValueError, match="Expected all tensors to be on the same device.* cpu and meta"):
        call(residual.to("meta"))
    with pytest.raises(TypeError, match=r"^conv2d\(\): argument 'residual' must be Tensor, not int$"):
        call(3)


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradients_include_the_residual(case: str) -> None:
    x, w, bias, residual = case_tensors(case, torch.float64, requires_grad=True, cases=GRAD_CASES)
    kwargs = GRAD_CASES[case][2]
    tensors = tuple(t for t in (x, w, bias, residual) if t is not None)

    def block(x, w, *rest):
        *bias, residual = rest
        # a new weight tensor per call: gradcheck perturbs through .data, which the packed-weight memo cannot see
        return tf.conv2d(x, w.clone(), *bias, residual=residual, **kwargs)

    assert gradcheck(block, tensors)
    out, expected = block(*tensors), torch_conv2d(x, w, bias, residual=residual, **kwargs)
    assert out.grad_fn is not None
    grad = torch.randn_like(expected)
    for got, want in zip(
        torch.autograd.grad(out, tensors, grad), torch.autograd.grad(expected, tensors, grad), strict=True
    ):
        assert_matches_torch(got, want)
    if case == "bias, relu":
        assert gradgradcheck(block, tensors)


def test_only_the_residual_requires_grad() -> None:
    x, w, bias, residual = case_tensors("3x3, bias, relu", torch.float64)
    residual.requires_grad_()
    out = tf.conv2d(x, w, bias, padding=1, fuse_relu=True, residual=residual)
    out.sum().backward()
    expected = torch_conv2d(x, w, bias, residual=residual, padding=1, fuse_relu=True)
    assert torch.equal(residual.grad, (expected > 0).double())


def test_modules_take_input_and_residual() -> None:
    assert {"ConvAdd2d", "ConvAddReLU2d"} <= set(tl.__all__) & set(tl.nn.__all__)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x, residual = torch.randn(2, 8, 10, 14), torch.randn(2, 16, 10, 14)
    for cls, relu in [(tl.ConvAdd2d, False), (tl.ConvAddReLU2d, True)]:
        module = cls.from_torch(conv)
        assert isinstance(module, tl.Conv2d) and module.state_dict().keys() == conv.state_dict().keys()
        with torch.no_grad():
            expected = conv(x) + residual
            assert_matches_torch(module(x, residual), F.relu(expected) if relu else expected)
        assert module.kernels[x.shape].spec["residual"] is True
        assert module.kernels[x.shape].spec.get("relu", False) is relu


def test_plain_workloads_are_unchanged() -> None:
    """A plain conv's spec and PrimFunc are what they were: every shipped tuning record still finds its layer."""
    meta = json.loads((shipped_log_root() / "llvm-x86_64-linux-gnu-emeraldrapids" / "tvmlayers.json").read_text())
    convs = {h: KernelSpec.from_json(s) for h, s in meta["workloads"].items() if s["op"] == "conv2d"}
    assert convs
    for recorded, spec in convs.items():
        assert "residual" not in dict(spec.params)
        assert workload_hash(ops.prim_func(spec, schedules.weight_layout(spec))) == recorded, spec.describe()
    spec = next(iter(convs.values()))
    fused = KernelSpec.make(spec.op, spec.input_shape, spec.dtype, spec.target, **dict(spec.params), residual=True)
    assert workload_hash(ops.prim_func(fused, schedules.weight_layout(fused))) not in convs


def _residual_spec(in_shape: tuple[int, ...], w_shape: tuple[int, ...], groups: int = 1, stride: int = 1) -> KernelSpec:
    """A 3x3 conv + bias + residual + relu, padding 1."""
    params = dict(weight_shape=w_shape, stride=(stride, stride), padding=(1, 1, 1, 1), dilation=(1, 1), groups=groups)
    return KernelSpec.make(
        "conv2d", in_shape, "float32", HOST, **params, padding_mode="zeros", bias=True, relu=True, residual=True
    )


BLOCKED = _residual_spec((1, 16, 10, 14), (32, 16, 3, 3))
DEPTHWISE = _residual_spec((1, 16, 10, 14), (16, 1, 3, 3), groups=16, stride=2)


@pytest.mark.parametrize(
    "spec, rule", [(BLOCKED, CpuConv2dBlocked()), (DEPTHWISE, CpuConv2dSpatial())], ids=["blocked", "depthwise"]
)
def test_x86_write_back_adds_the_residual_vectorized(spec: KernelSpec, rule) -> None:
    layout = schedules.weight_layout(spec)
    func = ops.prim_func(spec, layout)
    assert schedules.default_schedule(func, HOST)[1] == rule.name
    sch = rule.apply(func, HOST, tunable=False)
    stages = [sch.get(block) for block in sch.get_child_blocks(sch.get_sblock("root"))]

    def touching(buffer: str, regions: str) -> list[str]:
        return [s.name_hint for s in stages if any(str(r.source) == buffer for r in getattr(s, regions))]

    # one stage reads the residual, the only one writing the output: no second pass over it ...
    assert touching("residual", "reads") == touching("conv2d", "writes") == ["conv2d"]
    # ... its innermost loop a SIMD vector along the output row
    write_back = sch.get_loops(sch.get_sblock("conv2d"))
    assert sch.get(write_back[-1]).kind == tvm.tirx.ForKind.VECTORIZED
    kernel = tvm.compile(sch.mod, target=HOST)[ops.SYMBOL]
    assert check_kernel(spec, layout, kernel) is None
    tunable = rule.apply(func, HOST, tunable=True)
    assert "sample_perfect_tile" in str(tunable.trace)
    assert check_kernel(spec, layout, tvm.compile(tunable.mod, target=HOST)[ops.SYMBOL]) is None


def test_generic_fallback_adds_the_residual() -> None:
    layout = schedules.weight_layout(BLOCKED)
    sch = GenericParallel().apply(ops.prim_func(BLOCKED, layout), HOST, tunable=False)
    assert check_kernel(BLOCKED, layout, tvm.compile(sch.mod, target=HOST)[ops.SYMBOL]) is None


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = tl.ConvAddReLU2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, x)


def test_workloads_record_fused_calls_and_round_trip(tmp_path: Path) -> None:
    (workload,) = extract_workloads(_Block(), torch.randn(1, 4, 6, 6))
    params = dict(workload.params)
    assert params["residual"] is True and params["relu"] is True
    path = tmp_path / "block.toml"
    path.write_text(format_workloads([workload]))
    assert "residual = true" in path.read_text()
    assert load_workloads(path)[0] == [workload]
    path.write_text(path.read_text().replace("residual = true", "residual = 1"))
    with pytest.raises(ValueError, match="residual must be true or false"):
        load_workloads(path)


def test_tuning_accepts_a_residual_conv(tmp_path: Path) -> None:
    (result,) = tune([BLOCKED], HOST, trials=2, log_dir=tmp_path, space="ours", trials_per_iter=2, progress=False)
    assert result.best is not None
    meta = json.loads(next(tmp_path.glob("*/tvmlayers.json")).read_text())
    assert meta["workloads"][result.workload_hash]["params"]["residual"] is True


def test_benchmark_labels_and_checks_the_fused_row() -> None:
    row = bench_spec(BLOCKED, HOST, repeat=2, warmup=1, peak=(1.0, 1.0))
    assert row.layer.startswith("conv2d+add+relu 1x16x10x14") and row.correct

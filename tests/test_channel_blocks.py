"""Channel-blocked activations (NCHW[x]c): conv2d kernels that take their input and give their output in blocks of
channels, checked against torch on this machine, scheduled under named targets without their hardware, and the
recorded programs of converted models that keep activations blocked between convs (tvmlayers/executor.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import tvm
from torch import nn

import tvmlayers as tl
from conftest import HOST, assert_close_scaled
from tvmlayers import executor, layer_specs, ops, schedules, verify
from tvmlayers.build import kernel_for
from tvmlayers.model_bench import randomize_batchnorm
from tvmlayers.reference import block_channels, unblock_channels
from tvmlayers.schedules.cpu import cpu_config
from tvmlayers.targets import resolve_target

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "models"))
import mobilenetv2  # noqa: E402
import test_executor  # noqa: E402
from test_executor import misaligned_on_odd_calls, program_of  # noqa: E402

torch.fx.wrap("misaligned_on_odd_calls")  # a torch function to the converted graph here too

LANES = cpu_config(HOST).vector_lanes("float32")  # the block the executor picks here


def _blocked(input_shape, weight_shape, in_block, out_block, dtype="float32", target=HOST, **arguments):
    """A conv2d spec made by torch's rules (stride 1, padding 1, unless given), then channel-blocked."""
    options = dict(stride=1, padding=1, dilation=1, groups=1, padding_mode="zeros") | arguments
    residual, relu, relu6 = (options.pop(name, False) for name in ("residual", "relu", "relu6"))
    args = [options[name] for name in ("stride", "padding", "dilation", "groups", "padding_mode")]
    spec, out_shape = layer_specs.conv2d_spec(
        input_shape, weight_shape, weight_shape[:1], dtype, target, *args, relu=relu, relu6=relu6
    )
    if residual:
        spec, _ = layer_specs.conv2d_spec(
            input_shape, weight_shape, weight_shape[:1], dtype, target, *args, relu=relu, relu6=relu6,
            residual=out_shape,
        )  # fmt: skip
    return layer_specs.blocked_spec(spec, in_block, out_block)


KERNEL_CASES = {
    "pointwise": ((1, 32, 10, 10), (48, 32, 1, 1), 16, 16, {"padding": 0}),
    "strided_reflect_relu_two_blocks": (
        (2, 16, 11, 9), (32, 16, 3, 3), 8, 16, {"stride": 2, "padding_mode": "reflect", "relu": True}
    ),
    "depthwise_strided_relu6": ((1, 32, 13, 13), (32, 1, 3, 3), 16, 16, {"stride": 2, "groups": 32, "relu6": True}),
    "depthwise_dilated": ((1, 16, 12, 12), (16, 1, 3, 3), 8, 8, {"dilation": 2, "padding": 2, "groups": 16}),
    "residual_relu": ((1, 16, 9, 9), (16, 16, 3, 3), 16, 16, {"residual": True, "relu": True}),
    "nchw_in_blocked_out": ((1, 3, 23, 23), (32, 3, 7, 7), None, 16, {"stride": 2, "padding": 3}),
    "blocked_in_nchw_out": ((1, 32, 7, 7), (24, 32, 1, 1), 16, None, {"padding": 0}),
    "blocked_in_nchw_out_residual": ((1, 16, 6, 6), (24, 16, 3, 3), 8, None, {"residual": True}),
    "float64": ((1, 16, 8, 8), (16, 16, 3, 3), 8, 8, {"dtype": "float64"}),
}  # fmt: skip


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_blocked_kernels_compute_torchs_numbers(case: str) -> None:
    input_shape, weight_shape, in_block, out_block, arguments = KERNEL_CASES[case]
    spec = _blocked(input_shape, weight_shape, in_block, out_block, **arguments)
    kernel = kernel_for(spec)
    out_shape = ops.output_shapes(layer_specs.unblocked_spec(spec), kernel.layout)[0]
    assert kernel.output_shapes[0] == ops.blocked_shape(out_shape, out_block)
    assert verify.check_kernel(spec, kernel.layout, kernel.function) is None
    assert verify.check_kernel(spec, kernel.layout, kernel.function, seed=1) is None


def test_block_layout_round_trips_and_matches_the_kernels_indexing() -> None:
    x = torch.randn(2, 32, 5, 7)
    blocked = block_channels(x, 16)
    assert blocked.shape == (2, 2, 5, 7, 16)
    assert torch.equal(blocked[1, 1, 3, 4, 5], x[1, 21, 3, 4])  # channel 1 * 16 + 5
    assert torch.equal(unblock_channels(blocked), x)
    assert block_channels(x, None) is x


def test_channel_blocks_are_checked() -> None:
    spec = _blocked((1, 24, 8, 8), (32, 24, 3, 3), None, None)
    with pytest.raises(ValueError, match="in_block must be a positive integer dividing the 24 channels, got 16"):
        layer_specs.blocked_spec(spec, 16, 16)
    with pytest.raises(ValueError, match="out_block must be a positive integer dividing the 32 channels, got 0"):
        layer_specs.blocked_spec(spec, 8, 0)
    blocked = layer_specs.blocked_spec(spec, 8, 16)
    with pytest.raises(ValueError, match="channel blocks apply to an NCHW conv2d or max_pool2d spec"):
        layer_specs.blocked_spec(blocked, 8, 16)
    assert layer_specs.unblocked_spec(blocked) == spec
    # a workload file names the blocks as parameters: the same spec comes back, and bad ones fail as calls do
    params = dict(blocked.params)
    assert layer_specs.workload_spec("conv2d", list(spec.input_shape), "float32", params, HOST) == blocked
    with pytest.raises(ValueError, match="out_block must be a positive integer dividing the 32 channels"):
        layer_specs.workload_spec("conv2d", list(spec.input_shape), "float32", params | {"out_block": 24}, HOST)



def _blocked_pool(input_shape, kernel_size, stride, padding, dilation=1, ceil_mode=False, block=16, dtype="float32",
                  target=HOST):  # fmt: skip
    spec, _ = layer_specs.max_pool2d_spec(
        input_shape, dtype, target, kernel_size, stride, padding, dilation, ceil_mode, False
    )
    return layer_specs.blocked_spec(spec, block, block)


POOL_CASES = {
    "resnet_3x3_stride2_padded": ((1, 32, 13, 13), 3, 2, 1, 1, False, "float32"),
    "vgg_2x2": ((2, 32, 10, 12), 2, 2, 0, 1, False, "float32"),
    "ceil_mode_partial_window": ((1, 32, 10, 11), 3, 2, 1, 1, True, "float32"),
    "dilated": ((1, 32, 12, 12), 3, 1, 1, 2, False, "float32"),
    "float64": ((1, 16, 9, 9), 3, 2, 1, 1, True, "float64"),
}


@pytest.mark.parametrize("case", POOL_CASES)
def test_blocked_max_pools_compute_torchs_numbers(case: str) -> None:
    """Windows over an NCHW[x]c input, blocked alike out: torch's maxima, a NaN in a window giving NaN, a window of
    -inf inputs (padded or not) -inf, and padding never winning."""
    shape, kernel_size, stride, padding, dilation, ceil_mode, dtype = POOL_CASES[case]
    block = 8 if dtype == "float64" else 16
    spec = _blocked_pool(shape, kernel_size, stride, padding, dilation, ceil_mode, block, dtype)
    x = torch.randn(shape, dtype=getattr(torch, dtype), generator=torch.Generator().manual_seed(3)) - 10
    x[0, 0, 0, :3] = float("nan")
    x[0, 1, :5, :5] = float("-inf")
    x[0, block + 1, 4, 4] = float("nan")  # in the second block
    kernel = kernel_for(spec)
    out = torch.empty(kernel.output_shapes[0], dtype=x.dtype)
    kernel.function(block_channels(x, block), out)
    want = torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    assert out.shape == (want.shape[0], want.shape[1] // block, *want.shape[2:], block)
    torch.testing.assert_close(unblock_channels(out), want, rtol=0, atol=0, equal_nan=True)
    assert unblock_channels(out).isnan().sum() == want.isnan().sum() > 0
    assert (unblock_channels(out) == float("-inf")).sum() == (want == float("-inf")).sum() > 0


def test_blocked_max_pool_specs_are_checked() -> None:
    spec, _ = layer_specs.max_pool2d_spec((1, 32, 8, 8), "float32", HOST, 2, 2, 0, 1, False, False)
    with pytest.raises(ValueError, match="returns no indices, got in_block=16, out_block=None"):
        layer_specs.blocked_spec(spec, 16, None)
    with pytest.raises(ValueError, match="in_block must be a positive integer dividing the 32 channels, got 12"):
        layer_specs.blocked_spec(spec, 12, 12)
    indices, _ = layer_specs.max_pool2d_spec((1, 32, 8, 8), "float32", HOST, 2, 2, 0, 1, False, True)
    with pytest.raises(ValueError, match="return_indices=True"):
        layer_specs.blocked_spec(indices, 16, 16)
    blocked = layer_specs.blocked_spec(spec, 16, 16)
    assert layer_specs.unblocked_spec(blocked) == spec
    params = dict(blocked.params)
    assert layer_specs.workload_spec("max_pool2d", [1, 32, 8, 8], "float32", params, HOST) == blocked
    with pytest.raises(ValueError, match="unknown parameter"):
        layer_specs.workload_spec("relu", [1, 32, 8, 8], "float32", {"in_block": 16}, HOST)

TARGETS = {
    "znver4": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"},
    "avx2": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
    "armv7": {
        "kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mcpu": "cortex-a72", "mattr": ["+neon", "+vfp4"],
        "mfloat-abi": "hard",
    },
}  # fmt: skip


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("depthwise", [False, True])
def test_blocked_convs_vectorize_over_the_block_on_every_cpu(target_name: str, depthwise: bool) -> None:
    """Under each named CPU (no hardware needed): the blocked micro-kernel takes the conv, reads the input's channel
    blocks whole (the reduction over input channels split by the block) where they lie (the padding inlined), and
    stores each output block as one vector (the epilogue's innermost loop, vectorized, is the block)."""
    target = resolve_target(TARGETS[target_name])
    block = cpu_config(target).vector_lanes("float32")
    channels = 4 * block
    weight = (channels, 1 if depthwise else channels, 3 if depthwise else 1, 3 if depthwise else 1)
    arguments = {"groups": channels, "stride": 2} if depthwise else {"padding": 0}
    spec = _blocked((1, channels, 14, 14), weight, block, block, target=target, **arguments)
    sch, rule = schedules.default_schedule(ops.prim_func(spec, schedules.weight_layout(spec)), target)
    assert rule == "cpu.conv2d_blocked"
    script = sch.mod.script()
    assert re.search(rf"for \w+ in T\.vectorized\({block}\):\n\s+with T\.sblock\(\"conv2d\"\)", script), script
    assert 'T.sblock("pad")' not in script  # a blocked input is read in place, bounds tested: no padded copy
    if not depthwise:  # input channels in blocks, then each block's lanes
        assert re.search(rf"T\.axis\.reduce\({channels}, \w+_0 \* {block} \+ \w+_1\)", script), script
    tvm.compile(sch.mod, target=target)



@pytest.mark.parametrize("target_name", TARGETS)
def test_blocked_max_pools_vectorize_over_the_block_on_every_cpu(target_name: str) -> None:
    """Under each named CPU: one pass over the windows, each output the block's channels as one vector, with no
    ``isnan`` call left (TVM's vectorizer does not vectorize it: the whole kernel ran scalar, 4x slower)."""
    target = resolve_target(TARGETS[target_name])
    block = cpu_config(target).vector_lanes("float32")
    spec = _blocked_pool((1, 4 * block, 14, 14), 3, 2, 1, block=block, target=target)
    sch, rule = schedules.default_schedule(ops.prim_func(spec, schedules.weight_layout(spec)), target)
    assert rule == "cpu.max_pool2d"
    script = sch.mod.script()
    assert re.search(rf"for \w+ in T\.vectorized\({block}\):\n\s+with T\.sblock\(\"max_pool2d\"\)", script), script
    assert "max_pool2d_rows" not in script and "isnan" not in script and "T.axis.reduce" not in script
    tvm.compile(sch.mod, target=target)

class BlockNet(nn.Module):
    """A stem, two MobileNetV2 inverted residuals (one adding its input), a 1x1 conv whose output goes to a pool and
    to the caller, and a head: activations blocked from the stem to the 1x1 conv's input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*mobilenetv2._conv_bn(3, 32, 3, 2))
        self.expand = mobilenetv2.InvertedResidual(32, 32, 1, 2)  # adds its input: the residual tie
        self.reduce = mobilenetv2.InvertedResidual(32, 64, 2, 2)
        self.last = nn.Conv2d(64, 32, 1)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.last(self.reduce(self.expand(self.stem(x))))
        return self.head(features.mean((2, 3))), features


def _recorded(model: nn.Module, x: torch.Tensor, calls: int = 3) -> tuple[nn.Module, executor.Program]:
    """``model`` converted, called ``calls`` times without grad against torch, and its program."""
    model = model.eval()
    converted = tl.convert(model)
    with torch.no_grad():
        want = model(x)
        for _ in range(calls):
            got = converted(x)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                            strict=True):  # fmt: skip
                assert_close_scaled(a, b)
    return converted, program_of(converted, x)


def test_a_programs_convs_pass_blocked_activations_with_torchs_numbers() -> None:
    torch.manual_seed(0)
    converted, program = _recorded(randomize_batchnorm(BlockNet()), torch.randn(2, 3, 32, 32))
    # every conv output read only by convs is blocked (the stem's, the expansions', the depthwise ones', the
    # projections'); the last conv's, pooled and returned, is not
    assert program.blocked_layers == [
        "stem.0", "expand.block.0", "expand.block.3", "expand.block.6", "reduce.block.0", "reduce.block.3",
        "reduce.block.6",
    ]  # fmt: skip
    assert "7 channel-blocked" in program.summary()


class Tied(nn.Module):
    """Convs whose outputs only convs read, blocked or not by the layouts tied to theirs: a residual's and the
    output of a depthwise conv reading them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 1)
        self.e = nn.Conv2d(32, 32, 3, padding=1)
        self.f = nn.Conv2d(32, 32, 1)
        self.dw_in = nn.Conv2d(32, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = torch.relu(self.a(x))
        b = self.b(a) + a  # a is b's input and residual, b read by c only: both blocked
        c = self.c(b)  # returned: NCHW
        e = self.e(c) + c  # read by f only, but its residual is c: NCHW
        d = self.dw(self.dw_in(c))  # returned: NCHW, and so is the depthwise conv's input, dw_in's output
        return c, self.f(e), d


class Fallback(nn.Module):
    """A conv whose input comes from a torch function (misaligned on odd calls: its kernel step calls its module),
    writing a blocked buffer, and a conv reading that buffer with a residual from the same function."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.c1 = nn.Conv2d(32, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = misaligned_on_odd_calls(self.stem(x))
        return self.head((self.c2(torch.relu(self.c1(m))) + m).mean((2, 3)))


def test_steps_that_call_their_modules_see_and_leave_blocked_buffers_right() -> None:
    """On odd calls c1's input is misaligned: its module runs on it and its result goes into the blocked buffer
    blocked; c2's residual is misaligned too: its module runs on the blocked buffer unblocked."""
    torch.manual_seed(2)
    test_executor._misaligned_calls[0] = 0  # torch's forward is call 1, the recording (aligned) call 2
    converted, program = _recorded(Fallback(), torch.randn(1, 3, 10, 10), calls=5)
    assert program.blocked_layers == ["c1"]


def test_layouts_tied_to_a_value_torch_reads_stay_nchw() -> None:
    torch.manual_seed(1)
    converted, program = _recorded(Tied(), torch.randn(1, 3, 12, 12))
    assert program.blocked_layers == ["a", "b"]



class PoolNet(nn.Module):
    """VGG's and ResNet's stems: convs and max-pools; a pool whose output a residual reads, one with indices, and a
    last one whose output torch reads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.body = nn.Conv2d(32, 32, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, ceil_mode=True)
        self.c = nn.Conv2d(32, 32, 1)
        self.with_indices = nn.MaxPool2d(2, return_indices=True)
        self.d = nn.Conv2d(32, 32, 1)
        self.last = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pool(torch.relu(self.stem(x)))
        b = self.pool2(torch.relu(self.body(p) + p))  # p: body's input and residual
        values, indices = self.with_indices(self.c(b))
        return self.last(self.d(values)).flatten(1), indices


def test_max_pools_pass_blocked_activations_on() -> None:
    """The stem writes blocked, its pool pools blocked into the residual block; the pool with indices, and the last
    pool (flattened for torch), stay NCHW, and so do the convs writing them."""
    torch.manual_seed(4)
    converted, program = _recorded(PoolNet(), torch.randn(2, 3, 21, 21))
    assert program.blocked_layers == ["stem", "pool", "body", "pool2"]
    # the pool with indices runs as the graph calls it (two outputs), not as a kernel step
    assert [s.get("in_block") for s in program.kernel_specs] == [None, LANES, LANES, LANES, LANES, None, None]

"""Schedule rules: which rule takes which kernel, search-space (tunable) variants, the fallback."""

from __future__ import annotations

import pytest
import torch
import tvm

from conftest import conv3x3_spec
from tvmlayers import ops
from tvmlayers.layouts import block_out_channels
from tvmlayers.schedules import default_schedule, rules_for, weight_layout
from tvmlayers.schedules.cpu import CpuConv2dBlocked, CpuConv2dSpatial, CpuFamily, CpuLinearBlocked
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target

HOST = resolve_target("host")
AARCH64 = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4})
AVX512 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
ZNVER4 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
AVX2 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
ARMV7 = resolve_target({"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mattr": ["+neon", "+vfp4"]})
# 32-bit ARM without NEON: no SIMD for the CPU rules to use
ARMV6 = resolve_target({"kind": "llvm", "mtriple": "armv6-linux-gnueabihf"})


def _conv_spec(out_channels: int, groups: int = 1, target=HOST) -> KernelSpec:
    return conv3x3_spec((1, 16, 10, 12), out_channels, groups, target)


def test_weight_layout_follows_the_vector_width() -> None:
    # float32 lanes of one SIMD register: AVX-512 16, AVX2 8, NEON 4
    for target, lanes in [(AVX512, 16), (AVX2, 8), (AARCH64, 4), (ARMV7, 4)]:
        assert weight_layout(_conv_spec(64, target=target)) == {"weight_block": lanes}, target
    # odd channel counts: zero-padded blocks of a whole register, of half a one on Zen 4's 256-bit FMA units
    for target, block in [(AVX512, 16), (ZNVER4, 8), (AVX2, 8), (AARCH64, 4)]:
        assert weight_layout(_conv_spec(33, target=target)) == {"weight_block": block}, target
    assert weight_layout(_conv_spec(100, target=AVX512)) == {"weight_block": 16}  # not blocks of 4
    assert weight_layout(_conv_spec(24, target=AVX512)) == {"weight_block": 8}  # half a register: unchanged
    assert weight_layout(_conv_spec(66, groups=2)) == {"weight_block": 1}  # padding stays within one group
    assert weight_layout(_conv_spec(16, groups=16)) == {"weight_block": 1}
    assert weight_layout(KernelSpec.make("relu", (8,), "float32", HOST)) == {}
    float64 = KernelSpec.make("linear", (1, 64), "float64", AARCH64, bias=True, weight_shape=(64, 64))
    assert weight_layout(float64) == {"weight_block": 2}
    # armv7 NEON computes no float64 (the scalar VFP unit does), and no SIMD rule reads blocks without NEON
    assert weight_layout(KernelSpec.make("linear", (1, 64), "float64", ARMV7, **dict(float64.params))) == {
        "weight_block": 1
    }
    assert weight_layout(_conv_spec(64, target=ARMV6)) == {"weight_block": 1}


def test_a_linear_with_few_outputs_is_dot_products_in_torchs_layout() -> None:
    head = KernelSpec.make("linear", (1, 2048), "float32", HOST, bias=True, weight_shape=(10, 2048))
    assert weight_layout(head) == {"weight_block": 1}  # 10 features would fill 2 of the 16 lanes
    assert default_schedule(ops.prim_func(head, weight_layout(head)), HOST)[1] == "cpu.linear_dot"
    fc = KernelSpec.make("linear", (1, 512), "float32", HOST, bias=True, weight_shape=(1000, 512))
    assert weight_layout(fc)["weight_block"] > 1  # 1000 = 125 blocks of 8: blocks stay
    odd = KernelSpec.make("linear", (2, 20), "float32", HOST, bias=True, weight_shape=(10, 20))
    assert default_schedule(ops.prim_func(odd, weight_layout(odd)), HOST)[1] == "cpu.linear_blocked"


@pytest.mark.parametrize("rule", [CpuConv2dBlocked(), CpuConv2dSpatial()], ids=lambda r: r.name)
def test_tunable_conv_rule_is_a_valid_search_space(rule) -> None:
    spec = _conv_spec(32)
    layout = {"weight_block": 8}
    sch = rule.apply(ops.prim_func(spec, layout), HOST, tunable=True)
    assert "sample_perfect_tile" in str(sch.trace)
    kernel = tvm.compile(sch.mod, target=HOST)[ops.SYMBOL]
    x, w, b = torch.randn(1, 16, 10, 12), torch.randn(32, 16, 3, 3), torch.randn(32)
    out = torch.empty(1, 32, 10, 12)
    kernel(x, block_out_channels(w, 8), b, out)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)


def test_tunable_linear_rule_is_a_valid_search_space() -> None:
    spec = KernelSpec.make("linear", (6, 40), "float32", HOST, bias=False, weight_shape=(48, 40))
    sch = CpuLinearBlocked().apply(ops.prim_func(spec, {"weight_block": 16}), HOST, tunable=True)
    assert "sample_perfect_tile" in str(sch.trace)
    kernel = tvm.compile(sch.mod, target=HOST)[ops.SYMBOL]
    x, w, out = torch.randn(6, 40), torch.randn(48, 40), torch.empty(6, 48)
    kernel(x, block_out_channels(w, 16), out)
    torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)


def test_families_serve_the_targets_they_declare() -> None:
    cpu_rules = [rule.name for rule in CpuFamily.rules]
    for target in (HOST, AVX512, AVX2, AARCH64, ARMV7):
        assert [rule.name for rule in rules_for(target)] == [*cpu_rules, "generic.parallel"], target
    assert [rule.name for rule in rules_for(ARMV6)] == ["generic.parallel"]


def test_a_cpu_without_simd_rules_gets_the_generic_rule_and_compiles() -> None:
    for spec in [
        _conv_spec(8, target=ARMV6),
        KernelSpec.make(
            "max_pool2d",
            (1, 3, 9, 9),
            "float32",
            ARMV6,
            kernel_size=(3, 3),
            stride=(2, 2),
            padding=(1, 1),
            dilation=(1, 1),
            ceil_mode=True,
            return_indices=True,
        ),
        KernelSpec.make("relu", (100,), "float32", ARMV6),
    ]:
        layout = weight_layout(spec)
        sch, rule = default_schedule(ops.prim_func(spec, layout), ARMV6)
        assert rule == "generic.parallel"
        tvm.compile(sch.mod, target=ARMV6)  # cross-compiles


def test_no_rule_for_a_target_without_one() -> None:
    spec = KernelSpec.make("relu", (64,), "float32", HOST)
    opencl = tvm.target.Target({"kind": "opencl", "host": {"kind": "llvm"}})  # CUDA has the GPU family
    with pytest.raises(ValueError, match="no schedule rule applies"):
        default_schedule(ops.prim_func(spec, {}), opencl)


@pytest.mark.parametrize("width", [40, 150])
def test_strided_depthwise_pads_rows_on_the_stack(width: int) -> None:
    """A strided depthwise conv pads the input rows next to their use: a whole row's strip where it fits
    TVM's stack allocation (1 KiB), else a column tile's, never a workspace allocation per row."""
    spec = KernelSpec.make(
        "conv2d", (1, 8, 9, width), "float32", HOST, weight_shape=(8, 1, 3, 3), stride=(2, 2),
        padding=(1, 1, 1, 1), dilation=(1, 1), groups=8, padding_mode="zeros", bias=True,
    )  # fmt: skip
    sch, rule = default_schedule(ops.prim_func(spec, weight_layout(spec)), HOST)
    assert rule == "cpu.conv2d_spatial"
    module = tvm.compile(sch.mod, target=HOST)
    assert "TVMBackendAllocWorkspace" not in module.mod.inspect_source("ll")
    x, w, b = torch.randn(1, 8, 9, width), torch.randn(8, 1, 3, 3), torch.randn(8)
    out = torch.empty(1, 8, 5, (width + 1) // 2)
    module[ops.SYMBOL](x, block_out_channels(w, 1), b, out)
    expected = torch.nn.functional.conv2d(x, w, b, stride=2, padding=1, groups=8)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

"""The CPU schedule family on ARM, checked on this x86 machine without ARM hardware: every op and mode is
scheduled by the CPU rules for an aarch64 and an armv7 target and compiled to an ARM object, and the
conv2d and linear micro-kernels are disassembled (LLVM's own assembly output, no cross toolchain) to find
NEON vector FMAs, and no scalar ones, in their innermost loops.  Also the per-target constants."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import tvm

import tvmlayers as tl
from conftest import HOST, assert_matches_torch, conv3x3_spec
from tvmlayers import ops, schedules
from tvmlayers.layouts import block_out_channels
from tvmlayers.schedules.cpu import CpuConv2dBlocked, CpuConv2dSpatial, CpuLinearBlocked, cpu_config
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target

AARCH64 = resolve_target(
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}
)
ARMV7 = resolve_target(
    {
        "kind": "llvm",
        "mtriple": "armv7a-linux-gnueabihf",
        "mcpu": "cortex-a72",
        "mattr": ["+neon", "+vfp4"],
        "mfloat-abi": "hard",
        "num-cores": 4,
    }
)
AVX512 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
ZNVER4 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
AVX2 = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
ARM_TARGETS = {"aarch64": AARCH64, "armv7": ARMV7}
ELF_MACHINE = {"aarch64": 183, "armv7": 40}  # e_machine of the ELF header: EM_AARCH64, EM_ARM


def _conv(shape, out, kernel=3, stride=1, padding=1, dilation=1, groups=1, dtype="float32", **params) -> tuple:
    params = {"bias": True, "padding_mode": "zeros", **params}
    weight = (out, shape[1] // groups, kernel, kernel)
    return "conv2d", shape, dtype, dict(weight_shape=weight, stride=(stride,) * 2, padding=(padding,) * 4,
                                        dilation=(dilation,) * 2, groups=groups, **params)  # fmt: skip


def _linear(shape, out, dtype="float32", **params) -> tuple:
    return "linear", shape, dtype, {"weight_shape": (out, shape[-1]), "bias": True, **params}


def _pool(shape, ceil_mode=False, return_indices=False, dtype="float32") -> tuple:
    params = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    return "max_pool2d", shape, dtype, dict(params, ceil_mode=ceil_mode, return_indices=return_indices)


# (name, spec without target, the CPU rule that must take it): every op and mode the core supports
CASES = [
    ("conv3x3", _conv((1, 16, 12, 14), 32), "cpu.conv2d_blocked"),
    ("conv_bias_free_strided_dilated", _conv((2, 8, 17, 19), 16, 5, 2, 2, 2, bias=False), "cpu.conv2d_blocked"),
    ("conv_groups", _conv((1, 16, 10, 10), 32, groups=2), "cpu.conv2d_blocked"),
    ("conv_1x1", _conv((1, 32, 7, 7), 64, kernel=1, padding=0), "cpu.conv2d_blocked"),
    ("conv_reflect", _conv((1, 8, 9, 9), 8, padding_mode="reflect"), "cpu.conv2d_blocked"),
    ("conv_circular", _conv((1, 8, 9, 9), 8, padding_mode="circular"), "cpu.conv2d_blocked"),
    ("conv_replicate", _conv((1, 8, 9, 9), 8, padding_mode="replicate"), "cpu.conv2d_blocked"),
    ("conv_relu", _conv((1, 16, 8, 8), 16, relu=True), "cpu.conv2d_blocked"),
    ("conv_relu6", _conv((1, 16, 8, 8), 16, relu6=True), "cpu.conv2d_blocked"),
    ("conv_residual_relu", _conv((1, 16, 8, 8), 16, residual=True, relu=True), "cpu.conv2d_blocked"),
    ("conv_padded_beyond_l2", _conv((1, 16, 160, 160), 16), "cpu.conv2d_blocked"),
    ("conv_odd_channels", _conv((1, 3, 11, 13), 7), "cpu.conv2d_blocked"),  # one block, zero-padded
    ("conv_groups_odd_channels", _conv((1, 6, 11, 13), 14, groups=2), "cpu.conv2d_spatial"),
    ("depthwise", _conv((1, 16, 14, 14), 16, groups=16), "cpu.conv2d_spatial"),
    ("depthwise_strided", _conv((1, 16, 15, 15), 16, stride=2, groups=16), "cpu.conv2d_spatial"),
    ("depthwise_multiplier_residual", _conv((1, 8, 10, 10), 16, groups=8, residual=True), "cpu.conv2d_spatial"),
    ("linear", _linear((3, 64), 48), "cpu.linear_blocked"),
    ("linear_head", _linear((1, 256), 5), "cpu.linear_dot"),  # 5 outputs would fill a fraction of a vector
    ("linear_no_bias_relu", _linear((2, 20), 10, bias=False, relu=True), "cpu.linear_blocked"),
    ("linear_relu6", _linear((4, 32), 16, relu6=True), "cpu.linear_blocked"),
    ("max_pool2d", _pool((1, 8, 15, 15)), "cpu.max_pool2d"),
    ("max_pool2d_indices_ceil", _pool((2, 3, 9, 9), ceil_mode=True, return_indices=True), "cpu.max_pool2d"),
    ("relu_vector", ("relu", (100,), "float32", {}), "cpu.relu"),
    ("relu_planes", ("relu", (1, 16, 28, 28), "float32", {}), "cpu.relu"),
    ("relu_narrow_rows", ("relu", (1, 32, 3, 3), "float32", {}), "cpu.relu"),
    ("conv_float64", _conv((1, 8, 9, 9), 8, dtype="float64"), None),  # armv7: no float64 SIMD, so no blocks
    ("depthwise_float64", _conv((1, 8, 9, 9), 8, groups=8, dtype="float64"), "cpu.conv2d_spatial"),
    ("linear_float64", _linear((2, 16), 8, dtype="float64"), None),
    ("max_pool2d_float64", _pool((1, 4, 9, 9), return_indices=True, dtype="float64"), "cpu.max_pool2d"),
    ("relu_float64", ("relu", (1, 4, 10, 10), "float64", {}), "cpu.relu"),
]


def _spec(case: tuple, target: tvm.target.Target) -> KernelSpec:
    op, shape, dtype, params = case
    return KernelSpec.make(op, shape, dtype, target, **params)


def _compile(spec: KernelSpec, tunable: bool = False) -> tuple[tvm.runtime.Module, str]:
    """The kernel of ``spec`` under its default rule (or that rule's search space), compiled; and the rule."""
    func = ops.prim_func(spec, schedules.weight_layout(spec))
    sch, rule = schedules.default_schedule(func, spec.target)
    if tunable:
        rule_object = next(r for r in schedules.rules_for(spec.target) if r.name == rule)
        sch = rule_object.apply(func, spec.target, tunable=True)
    return tvm.compile(sch.mod, target=spec.target).mod, rule


@pytest.mark.parametrize("arch", ARM_TARGETS)
@pytest.mark.parametrize("name, case, rule", CASES, ids=[c[0] for c in CASES])
def test_every_op_is_scheduled_by_the_cpu_rules_and_compiles_for_arm(
    arch: str, name: str, case: tuple, rule: str | None, tmp_path: Path
) -> None:
    spec = _spec(case, ARM_TARGETS[arch])
    module, chosen = _compile(spec)
    if rule is None:  # float64 conv/linear: blocked where the SIMD unit computes float64
        block = schedules.weight_layout(spec)["weight_block"]
        assert block == (2 if arch == "aarch64" else 1)  # two float64 lanes in a 128-bit NEON register
        assert chosen.startswith("cpu.") and ("blocked" in chosen) == (block > 1)
    else:
        assert chosen == rule
    obj = tmp_path / "kernel.o"
    module.write_to_file(str(obj))  # LLVM emits the ARM object itself: no cross toolchain involved
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == ELF_MACHINE[arch]


@pytest.mark.parametrize("arch", ARM_TARGETS)
@pytest.mark.parametrize("name", ["conv3x3", "depthwise_strided", "linear", "linear_head", "relu_planes"])
def test_search_spaces_compile_for_arm(arch: str, name: str) -> None:
    """``tvmlayers tune --space ours`` for a board samples these spaces: they must hold for ARM targets too."""
    case = next(c for n, c, _ in CASES if n == name)
    module, _ = _compile(_spec(case, ARM_TARGETS[arch]), tunable=True)
    assert module.inspect_source("asm")


# One loop of assembly ends in a branch back to a label above it (LLVM lays loops out as one run of blocks).
_LABEL = re.compile(r"^(\.?L\w+):")
_BRANCH = re.compile(r"^\s+(?:b(?:\.\w+)?|b\w\w|cbn?z|tbn?z)\s+(?:[^,\s]+,\s*)*(\.?L\w+)\s*$")
# NEON vector FMAs: A64 `fmla v0.4s, ...` (2s, 2d too); armv7 `vfma.f32 q0, ...` (or the 2-lane d form)
_VECTOR_FMA = re.compile(r"^\s+(fmla\s+v\d+\.\d[sd]\b|v(fma|mla)\.f32\s+[qd]\d+)")
# scalar FMAs: A64 `fmadd s0` / `fmla s0, s1, v2.s[0]`; armv7 VFP `vfma.f32 s0`, `vmla.f32 s0`, any .f64
_SCALAR_FMA = re.compile(r"^\s+(fmadd\s+[sd]\d+|fmla\s+[sd]\d+,|v(fma|mla)\.f32\s+s\d+|v(fma|mla)\.f64\s)")


def innermost_loops(asm: str) -> list[list[str]]:
    """The bodies of the loops of an assembly listing that hold no other loop."""
    lines = asm.splitlines()
    labels: dict[str, int] = {}
    loops = []
    for number, line in enumerate(lines):
        if label := _LABEL.match(line):
            labels[label.group(1)] = number
        if (branch := _BRANCH.match(line)) and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], number))
    inner = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    return [lines[start : end + 1] for start, end in inner]


def fma_counts(asm: str) -> list[tuple[int, int]]:
    """(vector FMAs, scalar FMAs) of each innermost loop that has either."""
    counts = []
    for body in innermost_loops(asm):
        vector = sum(bool(_VECTOR_FMA.match(line)) for line in body)
        scalar = sum(bool(_SCALAR_FMA.match(line)) for line in body)
        if vector or scalar:
            counts.append((vector, scalar))
    return counts


def test_the_loop_finder_sees_scalar_and_vector_fmas() -> None:
    """The pattern check itself: an unscheduled PrimFunc compiles to scalar FMAs (the notes' observation),
    which must be found, and must not count as vector ones."""
    spec = _spec(_conv((1, 8, 6, 6), 8), AARCH64)
    func = ops.prim_func(spec, schedules.weight_layout(spec))
    asm = tvm.compile(func, target=AARCH64).mod.inspect_source("asm")
    counts = fma_counts(asm)
    assert counts and all(scalar > 0 and vector == 0 for vector, scalar in counts), counts


# The report's kernels: ResNet's conv 64->64 3x3 at 56x56, MobileNet's depthwise 3x3, ResNet's classifier
MICRO_KERNELS = {
    "conv2d": (_conv((1, 64, 56, 56), 64), CpuConv2dBlocked.name),
    "conv2d_odd_channels": (_conv((1, 16, 28, 28), 33), CpuConv2dBlocked.name),  # the last block zero-padded
    "conv2d_odd_groups": (_conv((1, 30, 28, 28), 42, groups=6), CpuConv2dSpatial.name),  # 7 channels a tile
    "depthwise": (_conv((1, 32, 56, 56), 32, groups=32), CpuConv2dSpatial.name),
    "linear": (_linear((1, 512), 1000), CpuLinearBlocked.name),
}


@pytest.mark.parametrize("arch", ARM_TARGETS)
@pytest.mark.parametrize("kernel", MICRO_KERNELS)
def test_arm_micro_kernels_are_neon_fmas_in_the_innermost_loop(arch: str, kernel: str) -> None:
    case, rule = MICRO_KERNELS[kernel]
    module, chosen = _compile(_spec(case, ARM_TARGETS[arch]))
    assert chosen == rule
    counts = fma_counts(module.inspect_source("asm"))
    assert counts, "no innermost loop with an FMA"
    for vector, scalar in counts:
        assert vector > 0 and scalar == 0, f"innermost loops (vector FMAs, scalar FMAs): {counts}"


_STACK = re.compile(r"\bsp\b")


@pytest.mark.parametrize("kernel", ["conv2d", "conv2d_odd_channels", "linear"])
def test_armv7_micro_kernels_keep_their_operands_in_registers(kernel: str) -> None:
    """armv7 has 16 NEON registers: the conv's taps outside its input channels (``taps_outer``) keep the
    innermost loop free of spills, as the linear's register tile is."""
    case, _ = MICRO_KERNELS[kernel]
    module, _ = _compile(_spec(case, ARMV7))
    loops = [body for body in innermost_loops(module.inspect_source("asm")) if fma_counts("\n".join(body))]
    spills = [line.strip() for body in loops for line in body if _STACK.search(line.split("@")[0])]
    assert loops and not spills, spills[:10]


@pytest.mark.parametrize(
    "target, width, tile",
    [(AVX2, 7, "1 vector x 7 columns"), (AVX2, 14, "1 vector x 7 columns"), (AVX512, 13, "1 vector x 13 columns")],
)
def test_rows_two_vectors_would_cut_to_a_sliver_take_one_vector(target, width: int, tile: str) -> None:
    """Two channel vectors under AVX2's 8 accumulators leave a 7-wide row one column (2 FMA chains), a
    13-wide row under AVX-512's 16 the same: one vector of the whole row is the tile (measured here on
    znver4: 512->512 3x3 at 7x7 for haswell 3.4x faster, 64->64 3x3 at 13x13 2.2x), and it computes torch's conv."""
    if not all(tvm.target.codegen.target_has_features(f, HOST) for f in ("avx2", "fma")):
        pytest.skip("runs the x86 kernels: needs a host with AVX2 and FMA")
    if target is AVX512 and not tvm.target.codegen.target_has_features("avx512f", HOST):
        pytest.skip("runs an AVX-512 kernel: needs a host with AVX-512")
    spec = conv3x3_spec((1, 32, width, width), 64, target=target)
    layout = schedules.weight_layout(spec)
    sch, rule = schedules.default_schedule(ops.prim_func(spec, layout), target)
    assert rule == "cpu.conv2d_blocked"
    columns = int(tile.split(" x ")[1].split()[0])
    splits = [[int(f) for f in i.inputs[1:] if f is not None] for i in sch.trace.insts if i.kind.name == "Split"]
    assert [1] in splits and [columns] in splits, splits  # one vector of output channels, the row's columns
    kernel = tvm.compile(sch.mod, target=target)[ops.SYMBOL]
    x, w, b = torch.randn(1, 32, width, width), torch.randn(64, 32, 3, 3), torch.randn(64)
    out = torch.empty(1, 64, width, width)
    kernel(x, block_out_channels(w, layout["weight_block"]), b, out)
    assert_matches_torch(out, torch.nn.functional.conv2d(x, w, b, padding=1))


def test_per_target_constants() -> None:
    # accumulator registers: 32 on AVX-512 and A64 NEON, 16 on AVX2 and armv7 NEON
    for target, registers, bits in [(AVX512, 32, 512), (ZNVER4, 32, 512), (AVX2, 16, 256), (AARCH64, 32, 128),
                                    (ARMV7, 16, 128)]:  # fmt: skip
        config = cpu_config(target)
        assert (config.vector_registers, config.vector_bits) == (registers, bits), target
        assert config.vector_lanes("float32") == bits // 32
        assert 0 < config.conv_accumulator_limit < config.register_tile_limit < registers
    assert cpu_config(AARCH64).vector_lanes("float64") == 2
    assert cpu_config(ARMV7).vector_lanes("float64") == 1  # armv7 NEON has no float64 lanes
    assert cpu_config(AARCH64).l2_bytes == 1 << 20  # the Raspberry Pi 4's Cortex-A72 cluster
    # Zen 4 runs 512-bit FMAs as two 256-bit halves; the others a whole register at once
    for target, lanes in [(ZNVER4, 8), (AVX512, 16), (AVX2, 8), (AARCH64, 4)]:
        assert cpu_config(target).fma_lanes("float32") == lanes, target
    assert cpu_config(ZNVER4).fma_lanes("float64") == 4


@pytest.mark.parametrize(
    "shape, out, stride, rows",
    [
        ((1, 16, 112, 112), 96, 1, True),  # MobileNetV2's expansion at 112x112
        ((1, 144, 56, 56), 24, 1, True),  # its projection at 56x56
        ((1, 64, 28, 28), 128, 1, False),  # 784 pixels: below 56 x 56
        ((1, 64, 56, 56), 128, 2, False),  # strided (ResNet's downsample): rows would gather
        ((1, 16, 56, 56), 97, 1, False),  # 97 channels: no tile of 4 or more, padded blocks instead
    ],
)
def test_large_pointwise_convs_run_row_vectorized_on_zen4(shape, out, stride, rows: bool) -> None:
    """Stride-1 1x1 convs of at least 56x56 outputs take torch's weight layout and the row-vectorized rule on
    znver4 (CpuConfig.pointwise_rows_min_pixels); other x86 CPUs and ARM keep the blocked rule."""
    for target in (ZNVER4, AVX512, AARCH64):
        spec = _spec(_conv(shape, out, kernel=1, stride=stride, padding=0), target)
        func = ops.prim_func(spec, schedules.weight_layout(spec))
        _, rule = schedules.default_schedule(func, target)
        expected = rows and target is ZNVER4
        assert (schedules.weight_layout(spec)["weight_block"] == 1) == expected, target
        assert (rule == "cpu.conv2d_spatial") == expected, target


def test_row_vectorized_pointwise_convs_compute_torchs_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row-vectorized 1x1 conv with relu6 and with a residual, on this machine's CPU (made to take it)."""
    from tvmlayers.schedules.cpu import config  # noqa: PLC0415

    monkeypatch.setitem(config.X86_POINTWISE_ROWS_MIN_PIXELS, str(HOST.attrs.get("mcpu", "")), 8 * 8)
    monkeypatch.setattr(config, "_configs", {})
    x, residual = torch.randn(2, 12, 8, 10), torch.randn(2, 20, 8, 10)
    weight, bias = torch.randn(20, 12, 1, 1), torch.randn(20)
    expected = torch.nn.functional.conv2d(x, weight, bias)
    with torch.no_grad():
        got, plan = tl.functional.conv2d_with_plan(x, weight, bias, 1, 0, 1, 1, "zeros", None, fuse_relu6=True)
        added = tl.functional.conv2d(x, weight, bias, residual=residual)
    assert (plan.kernel.weight_block, plan.kernel.provenance["rule"]) == (1, "cpu.conv2d_spatial")
    assert_matches_torch(got, expected.clamp(0, 6))
    assert_matches_torch(added, expected + residual)


@pytest.mark.parametrize(
    "target",
    [
        {"kind": "llvm", "mtriple": "armv6-linux-gnueabihf"},
        {"kind": "llvm", "mtriple": "riscv64-linux-gnu"},
        {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}},
    ],
    ids=["armv6", "riscv64", "cuda"],
)
def test_the_cpu_family_does_not_serve_targets_without_its_simd(target: dict) -> None:
    target = resolve_target(target)
    assert not any(rule.name.startswith("cpu.") for rule in schedules.rules_for(target))
    with pytest.raises(ValueError, match="CPU schedule rules serve"):
        cpu_config(target)


def _parallel_extents(sch) -> list[int]:
    return [int(e) for e in re.findall(r"T\.parallel\((\d+)\)", sch.mod.script())]


@pytest.mark.parametrize(
    "shape, stride, planes",
    [
        ((2, 24, 7, 7), 1, True),  # MobileNetV2's last depthwise size
        ((1, 16, 14, 14), 1, True),
        ((1, 16, 15, 15), 1, False),  # 225 output pixels: rows
        ((1, 16, 28, 28), 2, False),  # strided: rows padded one at a time
    ],
)
def test_small_depthwise_planes_run_a_plane_per_iteration(shape, stride: int, planes: bool) -> None:
    """Stride-1 depthwise convs of up to 14x14 outputs run one parallel loop over planes, each padding its input
    plane (PLANE_MAX_PIXELS); larger ones a parallel loop over output rows after one padding the input."""
    n, c, h, _ = shape
    for target in (ZNVER4, AVX512, AARCH64, ARMV7):
        spec = _spec(_conv(shape, c, stride=stride, groups=c), target)
        sch, rule = schedules.default_schedule(ops.prim_func(spec, schedules.weight_layout(spec)), target)
        assert rule == "cpu.conv2d_spatial"
        if planes:
            assert _parallel_extents(sch) == [n * c], target
        else:
            assert n * c * ((h - 1) // stride + 1) in _parallel_extents(sch), target


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_depthwise_planes_compute_torchs_numbers(padding_mode: str) -> None:
    x, residual = torch.randn(2, 24, 7, 9), torch.randn(2, 24, 7, 9)
    weight, bias = torch.randn(24, 1, 3, 3), torch.randn(24)
    conv = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24, padding_mode=padding_mode)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        expected = conv(x)
        got, plan = tl.functional.conv2d_with_plan(x, weight, bias, 1, 1, 1, 24, padding_mode, None, fuse_relu6=True)
        added = tl.functional.conv2d(
            x, weight, bias, padding=1, groups=24, padding_mode=padding_mode, residual=residual
        )
    assert plan.kernel.provenance["rule"] == "cpu.conv2d_spatial"
    assert_matches_torch(got, expected.clamp(0, 6))
    assert_matches_torch(added, expected + residual)

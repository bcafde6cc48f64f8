"""The GPU schedule family, checked without a GPU: under every CUDA preset each op and mode gets a schedule
from our rules (the rule is named), TVM compiles it to CUDA (``tvm.compile`` rejects a loop bound to no block or
thread), threads per block and shared memory stay within the preset's limits, the fused epilogue runs in the same
kernel, and nvcc compiles the source for the preset's architecture without spilling registers.  The search spaces
(``tunable=True``) sample schedules that hold the same, and whose traces pass the tuning-record allow-list.
The numbers are checked on a GPU (the GPU check script)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import tvm
import tvm.support.nvcc
from cuda_emulation import run_emulated
from test_cpu_schedules import CASES, _conv, _linear, _pool
from test_cuda_build import _cuobjdump
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import Trace

from conftest import TOLERANCES
from tvmlayers import ops, reference, schedules
from tvmlayers.records.neighbours import plain_json
from tvmlayers.records.record_check import check_trace
from tvmlayers.schedules.gpu import gpu_config
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import CUDA_PRESETS, resolve_target
from tvmlayers.workloads import load_workloads

RESNET18 = Path(__file__).resolve().parent.parent / "examples" / "workloads" / "resnet18.toml"

# The GPU rule that must take each of the CPU tests' cases (every op and mode the core supports)
GPU_RULES = {
    **{name: "gpu.conv2d_tiled" for name, case, _ in CASES if case[0] == "conv2d" and case[3]["groups"] == 1},
    "conv_groups": "gpu.conv2d_tiled",
    "conv_groups_odd_channels": "gpu.conv2d_tiled",
    "depthwise": "gpu.conv2d_depthwise",
    "depthwise_strided": "gpu.conv2d_depthwise",
    "depthwise_multiplier_residual": "gpu.conv2d_depthwise",
    "depthwise_float64": "gpu.conv2d_depthwise",
    "linear": "gpu.linear_tiled",
    "linear_head": "gpu.linear_gemv",  # one row: a GEMV
    "linear_no_bias_relu": "gpu.linear_tiled",
    "linear_relu6": "gpu.linear_tiled",
    "linear_float64": "gpu.linear_tiled",
    **{name: "gpu.max_pool2d" for name, case, _ in CASES if case[0] == "max_pool2d"},
    **{name: "gpu.relu" for name, case, _ in CASES if case[0] == "relu"},
}
GPU_CASES = {name: case for name, case, _ in CASES} | {
    "conv_7x7_stride2": _conv((2, 3, 30, 30), 16, kernel=7, stride=2, padding=3),  # ResNet's stem, small
    "conv_5x5_dilated_grouped": _conv((1, 12, 20, 20), 12, kernel=5, padding=4, dilation=2, groups=3),
    "linear_batch16": _linear((16, 96), 40),
    "max_pool2d_indices": _pool((1, 8, 15, 15), return_indices=True),
    # the mode whose argmax an H100 got wrong when the window was reduced in the outputs (see test below)
    "max_pool2d_indices_dilated": (
        "max_pool2d",
        (1, 4, 12, 12),
        "float32",
        dict(kernel_size=(3, 3), stride=(2, 2), padding=(0, 0), dilation=(2, 2), ceil_mode=False, return_indices=True),
    ),
    "relu_odd_count": ("relu", (1, 3, 5, 7), "float32", {}),  # 105 elements: no 4-float vectors
}
GPU_RULES |= {
    "conv_7x7_stride2": "gpu.conv2d_tiled",
    "conv_5x5_dilated_grouped": "gpu.conv2d_tiled",
    "linear_batch16": "gpu.linear_tiled",
    "max_pool2d_indices": "gpu.max_pool2d",
    "max_pool2d_indices_dilated": "gpu.max_pool2d",
    "relu_odd_count": "gpu.relu",
}
SHARED_MEMORY_RULES = ("gpu.conv2d_tiled", "gpu.linear_tiled")


def _spec(case: tuple, target: tvm.target.Target) -> KernelSpec:
    op, shape, dtype, params = case
    return KernelSpec.make(op, shape, dtype, target, **params)


def _func(spec: KernelSpec) -> tvm.tirx.PrimFunc:
    return ops.prim_func(spec, schedules.weight_layout(spec))


def _cuda_source(sch: Schedule, target: tvm.target.Target) -> str:
    return tvm.compile(sch.mod, target=target).mod.imports[0].inspect_source("cuda")


_BINDING = re.compile(r'T\.thread_binding\((\d+), thread="(blockIdx|threadIdx)\.([xyz])"')
_SHARED = re.compile(r"__shared__ alignas\((\d+)\) (float|double) \w+\[(\d+)\];")
# TVM writes no __launch_bounds__ for a kernel of one thread per block
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?\w+\([^)]*\) \{')


def assert_within_limits(sch: Schedule, source: str, target: tvm.target.Target) -> dict:
    """Threads per block (from the schedule's bindings and the kernel's __launch_bounds__) and static shared
    memory within the target's limits, one kernel (epilogue fused); returns {threads, blocks, shared bytes}."""
    extents: dict[str, int] = {}
    for extent, kind, axis in _BINDING.findall(sch.mod.script()):
        previous = extents.setdefault(f"{kind}.{axis}", int(extent))
        assert previous == int(extent), f"{kind}.{axis} bound with extents {previous} and {extent}"
    threads = 1
    for axis, extent in extents.items():
        threads *= extent if axis.startswith("threadIdx") else 1
    blocks = extents.get("blockIdx.x", 1) * extents.get("blockIdx.y", 1) * extents.get("blockIdx.z", 1)
    kernels = _KERNEL.findall(source)
    assert len(kernels) == 1, f"{len(kernels)} kernels: the epilogue must run in the conv's/linear's kernel"
    assert int(kernels[0] or 1) == threads
    shared = 0
    for align, dtype, count in _SHARED.findall(source):  # each array starts at its alignment
        shared = -(-shared // int(align)) * int(align) + int(count) * (4 if dtype == "float" else 8)
    config = gpu_config(target)
    assert threads <= config.max_threads and blocks >= 1
    assert shared <= config.shared_bytes, f"{shared} bytes of shared memory, the limit is {config.shared_bytes}"
    return {"threads": threads, "blocks": blocks, "shared": shared}


@pytest.mark.parametrize("preset", CUDA_PRESETS)
@pytest.mark.parametrize("name", GPU_CASES)
def test_every_op_and_mode_gets_our_rule_and_compiles_within_the_limits(preset: str, name: str) -> None:
    target = resolve_target(preset)
    spec = _spec(GPU_CASES[name], target)
    if spec.op in ("conv2d", "linear"):
        assert schedules.weight_layout(spec) == {"weight_block": 1}  # torch's layout on GPUs
    sch, rule = schedules.default_schedule(_func(spec), target)
    assert rule == GPU_RULES[name]
    source = _cuda_source(sch, target)
    usage = assert_within_limits(sch, source, target)
    assert (usage["shared"] > 0) == (rule in SHARED_MEMORY_RULES)


def _resnet18_specs(target: tvm.target.Target) -> list[KernelSpec]:
    return [w.spec(target) for w in load_workloads(RESNET18)[0]]


def _cubin_usage(source: str, target: tvm.target.Target, tmp_path: Path) -> list[dict]:
    """nvcc's cubin of ``source`` for the target's architecture, and each kernel's resources (cuobjdump)."""
    with target:
        cubin = tvm.support.nvcc.compile_cuda(
            source, target_format="cubin", arch=str(target.attrs["arch"]), compiler="nvcc"
        )
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    found = re.findall(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump.stdout)
    assert found, dump.stdout + dump.stderr
    return [dict(zip(("registers", "stack", "shared", "local"), map(int, f), strict=True)) for f in found]


@pytest.mark.parametrize("index", range(len(load_workloads(RESNET18)[0])))
def test_resnet18_kernels_compile_with_nvcc_for_sm_90_without_spilling(index: int, tmp_path: Path) -> None:
    target = resolve_target("sm_90")
    spec = _resnet18_specs(target)[index]
    sch, rule = schedules.default_schedule(_func(spec), target)
    assert rule.startswith("gpu.") and rule != "gpu.dlight"
    source = _cuda_source(sch, target)
    usage = assert_within_limits(sch, source, target)
    if spec.op == "conv2d" and spec.input_shape[1] >= 64:
        # the channel and pixel tiles leave enough blocks to give every SM of an H100 SXM (132) work
        assert usage["blocks"] >= gpu_config(target).sm_count, usage
    for kernel in _cubin_usage(source, target, tmp_path):
        assert kernel["local"] == 0 and kernel["stack"] == 0, f"{rule} spills registers: {kernel}"
        assert usage["shared"] <= kernel["shared"] <= gpu_config(target).shared_bytes


@pytest.mark.parametrize("preset", [p for p in CUDA_PRESETS if p != "sm_90"])
@pytest.mark.parametrize("name", ["conv3x3", "depthwise_strided", "linear_head", "max_pool2d_indices_ceil"])
def test_kernels_compile_with_nvcc_for_each_preset(preset: str, name: str, tmp_path: Path) -> None:
    target = resolve_target(preset)
    sch, _ = schedules.default_schedule(_func(_spec(GPU_CASES[name], target)), target)
    for kernel in _cubin_usage(_cuda_source(sch, target), target, tmp_path):
        assert kernel["local"] == 0, kernel


def _samples(spec: KernelSpec, seeds: range) -> list[Schedule]:
    """The default rule's search space, sampled once per seed (its trace replayed without decisions)."""
    func, target = _func(spec), spec.target
    _, name = schedules.default_schedule(func, target)
    rule = next(r for r in schedules.rules_for(target) if r.name == name)
    space = rule.apply(func, target, tunable=True)
    samples = []
    for seed in seeds:
        sch = Schedule(func, seed=seed)
        Trace(space.trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        samples.append(sch)
    return samples


SPACE_CASES = [
    *("conv3x3", "conv_7x7_stride2", "conv_5x5_dilated_grouped", "conv_bias_free_strided_dilated"),
    *("depthwise_strided", "linear_batch16", "linear_head", "max_pool2d_indices_ceil", "relu_planes"),
]


@pytest.mark.parametrize("preset", ["sm_90", "jetson-orin"])
@pytest.mark.parametrize("name", SPACE_CASES)
def test_search_spaces_sample_valid_schedules_that_the_record_allow_list_accepts(preset: str, name: str) -> None:
    target = resolve_target(preset)
    samples = _samples(_spec(GPU_CASES[name], target), range(1, 4))
    for sch in samples:
        check_trace(plain_json(sch.trace.as_json()))  # a tuned GPU record of this space is accepted
        assert_within_limits(sch, _cuda_source(sch, target), target)
    decisions = {str(sorted((str(k), str(v)) for k, v in sch.trace.decisions.items())) for sch in samples}
    assert len(decisions) > 1, "three seeds sampled the same schedule: the space has no choices"


def test_the_search_spaces_largest_conv_tiles_fit_shared_memory() -> None:
    """The bound of each sampled tile shrinks for a large window at a large stride: with the bounds the 7x7
    stride-2 stem starts from, the input tile alone would exceed 48 KiB; every sample here fits."""
    target = resolve_target("sm_90")
    spec = _spec(_conv((1, 3, 224, 224), 64, kernel=7, stride=2, padding=3), target)
    for sch in _samples(spec, range(1, 9)):
        assert_within_limits(sch, _cuda_source(sch, target), target)


def test_small_gpus_get_smaller_tiles_only_where_an_h100_needs_more_blocks() -> None:
    """The SM count (per architecture) decides how far register tiles shrink to give every SM a block: the
    Jetson's 16 SMs keep larger tiles than an H100's 132 on ResNet's 7x7 layers."""
    sizes = {}
    for preset in ("sm_90", "jetson-orin"):
        target = resolve_target(preset)
        spec = _spec(_conv((1, 512, 7, 7), 512), target)
        sch, _ = schedules.default_schedule(_func(spec), target)
        sizes[preset] = assert_within_limits(sch, _cuda_source(sch, target), target)["blocks"]
    assert gpu_config(resolve_target("jetson-orin")).sm_count == 16
    assert sizes["jetson-orin"] < sizes["sm_90"]


def test_a_cuda_target_allowing_fewer_threads_per_block_gets_smaller_blocks() -> None:
    """A target dict may allow fewer threads than the presets' 1024: defaults and samples stay within it."""
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80", "max_threads_per_block": 128})
    for name in ("conv3x3", "conv_7x7_stride2", "depthwise_strided", "linear_batch16", "linear_head", "relu_planes"):
        spec = _spec(GPU_CASES[name], target)
        sch, rule = schedules.default_schedule(_func(spec), target)
        assert rule == GPU_RULES[name]
        for sample in [sch, *_samples(spec, range(1, 4))]:
            assert assert_within_limits(sample, _cuda_source(sample, target), target)["threads"] <= 128


def _emulated_outputs(spec: KernelSpec, sch: Schedule, tmp_path: Path) -> tuple[list, list]:
    """The kernel's outputs (emulated on the CPU, :mod:`cuda_emulation`) and torch's, for random inputs."""
    params, func = dict(spec.params), sch.mod["main"]
    output_shapes = ops.output_shapes(spec, schedules.weight_layout(spec))
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, residual = reference.random_layer_inputs(
        spec.op, params, spec.input_shape, spec.dtype, output_shapes[0], generator
    )
    inputs = reference.kernel_arguments(spec.input_shape, 1, x, weight, bias, residual, output_shapes[0])
    names = [str(p.name) for p in func.params]
    dtypes = [str(p.dtype) for p in func.params[len(inputs) :]]
    # NaN (or -7 for indices) where the kernel writes nothing
    outputs = [
        torch.full(shape, float("nan") if dtype.startswith("float") else -7, dtype=getattr(torch, dtype))
        for shape, dtype in zip(output_shapes, dtypes, strict=True)
    ]
    arguments = dict(zip(names, inputs + outputs, strict=True))
    run_emulated(_cuda_source(sch, spec.target), sch.mod.script(), arguments, tmp_path)
    expected = reference.layer_outputs(spec.op, params, x, weight, bias, residual)
    return outputs, expected


EMULATED_CASES = [
    *("conv3x3", "conv_bias_free_strided_dilated", "conv_groups", "conv_reflect", "conv_residual_relu"),
    *("conv_odd_channels", "conv_5x5_dilated_grouped", "depthwise_strided", "depthwise_multiplier_residual"),
    *("linear_batch16", "linear_head", "max_pool2d_indices_ceil", "relu_planes", "conv_float64"),
    *("max_pool2d_indices_dilated", "relu_odd_count", "relu_float64"),
]


@pytest.mark.parametrize("name", EMULATED_CASES)
def test_kernels_compute_torchs_numbers_in_a_cpu_emulation_of_cuda(name: str, tmp_path: Path) -> None:
    """The default schedule and a sample of its search space, TVM's CUDA run on CPU threads (sm_90)."""
    target = resolve_target("sm_90")
    spec = _spec(GPU_CASES[name], target)
    sch, _ = schedules.default_schedule(_func(spec), target)
    for index, sample in enumerate([sch, *_samples(spec, range(1, 2))]):
        outputs, expected = _emulated_outputs(spec, sample, tmp_path / str(index))
        for out, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(out.view(want.shape), want, **TOLERANCES.get(want.dtype, {}))


@pytest.mark.parametrize("preset", ["sm_90", "jetson-orin"])
def test_resnet18s_3x3_conv_computes_torchs_numbers_in_the_cpu_emulation(preset: str, tmp_path: Path) -> None:
    """A full-size layer (64 -> 64 at 56x56, a 576-deep reduction staged in steps): 224 blocks of 224 threads
    for the H100's 132 SMs, 56 blocks with 4x larger register tiles for the Jetson's 16."""
    target = resolve_target(preset)
    spec = _spec(_conv((1, 64, 56, 56), 64, bias=False), target)
    sch, rule = schedules.default_schedule(_func(spec), target)
    assert rule == "gpu.conv2d_tiled"
    (out,), (want,) = _emulated_outputs(spec, sch, tmp_path)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["max_pool2d_indices_dilated", "max_pool2d_indices_ceil"])
def test_max_pool2d_reduces_in_registers_and_only_writes_its_outputs(name: str) -> None:
    """Reduced in the output arrays, the H100 run got 25 of 64 indices wrong: nvcc loaded "the input or the
    accumulator just stored" through the read-only cache (``ld.global.nc``), which misses the thread's own store.
    The emulation cannot see that, so the source must never read an output: each is stored once, at the end."""
    target = resolve_target("sm_90")
    spec = _spec(GPU_CASES[name], target)
    for sch in [schedules.default_schedule(_func(spec), target)[0], *_samples(spec, range(1, 3))]:
        source = _cuda_source(sch, target)
        for output in ("max_pool2d_v0_ptr", "max_pool2d_v1_ptr"):
            uses = re.findall(rf"{output}\[[^\]]*\]( =(?!=))?", source)
            assert len(uses) == 1 and uses[0], f"{output} is read or written more than once: {uses}"


def test_relu_moves_16_byte_vectors_several_per_thread_on_a_grid_that_fills_the_gpu() -> None:
    """ResNet's first relu at batch 16 (51 MB each way) is bandwidth: scalar loads were 1.22x slower than torch on
    an H100.  Each thread moves float4s, several per thread, with 4 waves of 8 resident blocks per SM left."""
    target = resolve_target("sm_90")
    spec = _spec(("relu", (16, 64, 112, 112), "float32", {}), target)
    sch, _ = schedules.default_schedule(_func(spec), target)
    source = _cuda_source(sch, target)
    usage = assert_within_limits(sch, source, target)
    per_thread = 16 * 64 * 112 * 112 // (usage["blocks"] * usage["threads"])
    assert re.search(r"\*\(float4\*\)\(relu_ptr", source) and re.search(r"\*\(float4\*\)\(data_ptr", source)
    assert per_thread >= 8 and usage["blocks"] >= 4 * 8 * gpu_config(target).sm_count, usage


@pytest.mark.parametrize("layer", [((16, 64, 56, 56), 64, 1), ((16, 128, 28, 28), 256, 2), ((16, 512, 7, 7), 512, 1)])
def test_the_conv_search_space_samples_blocks_that_keep_a_gpu_busy(layer: tuple) -> None:
    """Independent divisors up to a bound sampled blocks of 2 to 8 threads (offline tuning on an H100 found
    nothing better than the default for 9 of 11 convs); the samples now have 64 to 512 threads."""
    (shape, out_channels, stride), target = layer, resolve_target("sm_90")
    spec = _spec(_conv(shape, out_channels, stride=stride), target)
    for sch in _samples(spec, range(1, 7)):
        threads = assert_within_limits(sch, _cuda_source(sch, target), target)["threads"]
        assert 64 <= threads <= 512, threads


@pytest.mark.parametrize("small, large, stride", [(1, 4, 1), (4, 8, 2)])
def test_large_convs_take_twice_the_accumulators_and_compute_torchs_numbers(
    small: int, large: int, stride: int, tmp_path: Path
) -> None:
    """A conv whose grid keeps 2 blocks per SM with 8 channel accumulators per thread takes them (the Jetson's 16
    SMs make these small layers large): each thread computes twice what it does at the smaller batch (which
    keeps 4), and the result stays torch's in the CPU emulation of its CUDA."""
    target = resolve_target("jetson-orin")
    blocks = {}
    for n in (small, large):
        spec = _spec(_conv((n, 32, 28, 28), 64, stride=stride), target)
        sch, _ = schedules.default_schedule(_func(spec), target)
        blocks[n] = assert_within_limits(sch, _cuda_source(sch, target), target)["blocks"]
    assert blocks[large] * 2 * small == blocks[small] * large, blocks
    (out,), (want,) = _emulated_outputs(spec, sch, tmp_path)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float32])

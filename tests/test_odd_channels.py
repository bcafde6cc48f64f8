"""Convs whose output channels are not a multiple of the SIMD block: the weight's last block is zero-padded
(``schedules.weight_layout``, ``layouts.block_out_channels``) and the kernel writes only the real channels.
The layers of ``examples/workloads/odd_channels.toml`` against torch through ``tl.Conv2d`` and
``tl.functional``, in float32 and float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import tvm

import tvmlayers as tl
import tvmlayers.functional as tf
from conftest import HOST, assert_matches_torch
from tvmlayers import ops
from tvmlayers.layouts import block_out_channels
from tvmlayers.schedules import weight_layout
from tvmlayers.schedules.cpu import CpuConv2dBlocked, is_simd_cpu
from tvmlayers.spec import KernelSpec
from tvmlayers.workloads import load_workloads

WORKLOADS = Path(__file__).resolve().parent.parent / "examples" / "workloads" / "odd_channels.toml"
DTYPES = [torch.float32, torch.float64]
needs_simd = pytest.mark.skipif(not is_simd_cpu(HOST), reason="the CPU rules block weights only on SIMD CPUs")


def _odd_layers() -> list[dict]:
    """The workload file's convs as torch.nn.Conv2d arguments, with their input shapes."""
    layers = []
    for workload in load_workloads(WORKLOADS)[0]:
        p = dict(workload.params)
        out_channels, in_per_group, kh, kw = p["weight_shape"]
        top, left, bottom, right = p["padding"]
        assert (top, left) == (bottom, right) and p["padding_mode"] == "zeros"
        layers.append(
            dict(
                shape=workload.input_shape,
                in_channels=in_per_group * p["groups"],
                out_channels=out_channels,
                kernel_size=(kh, kw),
                stride=p["stride"],
                padding=(top, left),
                dilation=p["dilation"],
                groups=p["groups"],
                bias=p["bias"],
            )
        )
    return layers


ODD_LAYERS = _odd_layers()


def _describe(layer: dict) -> str:
    return f"{layer['in_channels']}to{layer['out_channels']}g{layer['groups']}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", ODD_LAYERS, ids=_describe)
def test_odd_channel_convs_of_the_workload_file_match_torch(layer: dict, dtype: torch.dtype) -> None:
    arguments = {k: v for k, v in layer.items() if k != "shape"}
    torch.manual_seed(0)
    ours = tl.Conv2d(**arguments).to(dtype)
    reference = torch.nn.Conv2d(**arguments).to(dtype)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(layer["shape"], dtype=dtype)
    with torch.no_grad():
        assert_matches_torch(ours(x), reference(x))
    (kernel,) = ours.kernels.values()
    if is_simd_cpu(HOST) and layer["groups"] == 1:
        # vectors of output channels; with an odd count (33, 65) the last block holds zero-padded channels
        assert kernel.weight_block > 1, kernel.layout
        assert kernel.schedule == "cpu.conv2d_blocked"


@needs_simd
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_channels", [1, 3, 17, 33])
def test_padded_blocks_with_every_epilogue_through_functional(out_channels: int, dtype: torch.dtype) -> None:
    """bias or none, the residual and relu/relu6 read and write only the real channels; the padded weight
    is repacked after an in-place write."""
    torch.manual_seed(out_channels)
    x = torch.randn(2, 5, 9, 13, dtype=dtype)
    weight = torch.randn(out_channels, 5, 3, 3, dtype=dtype)
    bias = torch.randn(out_channels, dtype=dtype)
    residual = torch.randn(2, out_channels, 5, 13, dtype=dtype)
    arguments = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    plain = tf.conv2d(x, weight, None, **arguments)
    assert_matches_torch(plain, F.conv2d(x, weight, None, **arguments))
    fused = tf.conv2d(x, weight, bias, **arguments, residual=residual, fuse_relu=True)
    assert_matches_torch(fused, F.relu(F.conv2d(x, weight, bias, **arguments) + residual))
    relu6 = tf.conv2d(x, weight, bias, **arguments, fuse_relu6=True)
    assert_matches_torch(relu6, F.relu6(F.conv2d(x, weight, bias, **arguments)))
    weight.mul_(-2)  # a new version: packed again, padding included
    assert_matches_torch(tf.conv2d(x, weight, bias, **arguments), F.conv2d(x, weight, bias, **arguments))


@needs_simd
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_channels_per_group_keep_torchs_layout_and_match_torch(dtype: torch.dtype) -> None:
    """A padded block would cross a group: 7 channels per group stay in torch's layout, row-vectorized with
    the group's 7 channels in one tile."""
    torch.manual_seed(1)
    ours = tl.Conv2d(6, 14, 3, padding=1, groups=2).to(dtype)
    reference = torch.nn.Conv2d(6, 14, 3, padding=1, groups=2).to(dtype)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 6, 11, 13, dtype=dtype)
    with torch.no_grad():
        assert_matches_torch(ours(x), reference(x))
    (kernel,) = ours.kernels.values()
    assert kernel.weight_block == 1 and kernel.schedule == "cpu.conv2d_spatial"


def test_block_out_channels_pads_the_last_block_with_zeros() -> None:
    weight = torch.randn(5, 2, 3, 3)
    packed = block_out_channels(weight, 4)
    assert packed.shape == (2, 2, 3, 3, 4)
    assert torch.equal(packed.movedim(-1, 1).reshape(8, 2, 3, 3)[:5], weight)
    assert not packed[1, ..., 1:].any()  # channels 5, 6, 7
    assert block_out_channels(weight, 1).shape == (5, 2, 3, 3, 1)


@needs_simd
def test_the_tuning_search_space_of_a_padded_layout_matches_torch() -> None:
    """``tvmlayers tune`` samples the blocked rule's space over padded blocks (the last one partly zeros)."""
    spec = KernelSpec.make(
        "conv2d", (1, 6, 10, 12), "float32", HOST, weight_shape=(33, 6, 3, 3), stride=(1, 1),
        padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, padding_mode="zeros", bias=True,
    )  # fmt: skip
    layout = weight_layout(spec)
    sch = CpuConv2dBlocked().apply(ops.prim_func(spec, layout), HOST, tunable=True)
    assert "sample_perfect_tile" in str(sch.trace)
    kernel = tvm.compile(sch.mod, target=HOST)[ops.SYMBOL]
    x, w, b = torch.randn(1, 6, 10, 12), torch.randn(33, 6, 3, 3), torch.randn(33)
    out = torch.empty(1, 33, 10, 12)
    kernel(x, block_out_channels(w, layout["weight_block"]), b, out)
    assert_matches_torch(out, F.conv2d(x, w, b, padding=1))

"""Per-target constants of the GPU schedules, in one object (as dlight's ``gpu/matmul.py`` ``get_configs``).

The limits come from the target (the presets carry TVM's tag values); the tile shapes are chosen for any NVIDIA
GPU since Ampere, and the number of SMs (which the cuda target kind does not carry) from the architecture.
Nothing here is measured yet: the comments say why each value, the GPU check says how fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm

# Streaming multiprocessors by architecture: A100 108, A10 72 (RTX 3060: 28; one preset covers both, 28 would
# starve an A10 less than 72 starves a 3060 of nothing), L4 58, Jetson AGX Orin 16 (Orin Nano: 8), H100 SXM 132
# (what torch reported on the H100 the GPU check ran on; a PCIe H100 has 114, and a grid that fills 132 fills it).
SM_COUNTS = {"sm_80": 108, "sm_86": 72, "sm_87": 16, "sm_89": 58, "sm_90": 132}
DEFAULT_SM_COUNT = 64  # an architecture without an entry: a mid-size GPU


@dataclass(frozen=True)
class GpuConfig:
    """What the GPU rules need to know about a target, and the tile shapes they start from."""

    max_threads: int  # threads per block (the target's max_threads_per_block)
    shared_bytes: int  # static shared memory per block (max_shared_memory_per_block)
    warp: int  # thread_warp_size
    sm_count: int
    # Threads of one conv/GEMM block.  256 (8 warps): two or more blocks stay resident per SM, so one block's
    # __syncthreads() around a shared-memory refill leaves the others computing, and 256 threads times a
    # 16-accumulator register tile stays far below the 64K registers per SM.
    gemm_threads: int = 256
    # Accumulators per thread along output channels and along output pixels (or GEMM columns).  4 x 4: each
    # value read from shared memory feeds 4 FMAs, and 16 accumulators plus their operands leave registers for
    # two or more resident blocks.
    reg_channels: int = 4
    reg_pixels: int = 4
    # Input channels (GEMM's K) staged in shared memory per refill: 8 channels x a 3x3 window is 72 reduction
    # steps per __syncthreads() pair, which amortizes the barrier; larger kernels take fewer channels so the
    # tiles fit ``shared_bytes`` (the rules shrink it until they do).
    reduce_tile: int = 8
    # Large problems (batch 16: a grid of the 8 x 4 tiles still has ``large_blocks_per_sm`` blocks for every SM)
    # take 8 channel accumulators: 12 shared-memory reads feed 32 FMAs instead of 8 reads 16 (torch was 1.4 to 2x
    # faster on ResNet's batch-16 3x3 layers with 4 x 4), and 16 input channels per refill halve the barriers
    # (16 channels of a 3x3 window and their weights stay within 48 KiB).
    large_reg_channels: int = 8
    large_reduce_tile: int = 16
    large_blocks_per_sm: int = 2
    # Threads of the memory-bound kernels (relu, max_pool2d, depthwise conv): 256, whole warps, and 8 resident
    # blocks fill an SM's 2048 threads; one element (or register tile) per thread keeps every load independent.
    elementwise_threads: int = 256
    # Threads of one GEMV output (batch-1 linear): a warp per output reduces ``in_features`` across its lanes
    # (coalesced loads of the weight row), 4 outputs per block so a block is 128 threads.
    gemv_lanes: int = 32
    gemv_outputs: int = 4
    # Bounds of the tunable spaces: threads per block dimension (channels, rows, columns) that keep the product
    # within 1024 by construction, and accumulators per dimension (each one a virtual thread: a copy of the
    # inner loop's code) that keep a thread's register tile within 4 x 2 x 4 = 32.
    max_thread_channels: int = 16
    max_thread_rows: int = 4
    max_thread_columns: int = 16
    max_regs: int = 4
    max_regs_rows: int = 2

    @property
    def max_tunable_threads(self) -> int:
        """The most threads per block a search space samples (the linear spaces' channels x columns fewer)."""
        return self.max_thread_channels * self.max_thread_rows * self.max_thread_columns


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def gpu_config(target: tvm.target.Target) -> GpuConfig:
    """The constants of ``target``'s GPU (a CUDA target; the limits default to TVM's for its cuda kind)."""
    if not is_cuda(target):
        raise ValueError(f"the GPU schedule rules serve CUDA targets, not {target.kind.name}")
    attrs = target.attrs
    max_threads = int(attrs.get("max_threads_per_block", attrs.get("max_num_threads", 1024)))
    config = GpuConfig(
        max_threads=max_threads,
        shared_bytes=int(attrs.get("max_shared_memory_per_block", 48 << 10)),
        warp=int(attrs.get("thread_warp_size", 32)),
        sm_count=SM_COUNTS.get(str(attrs.get("arch", "")).rstrip("af"), DEFAULT_SM_COUNT),
    )
    # a target dict that allows fewer threads per block: fewer channel threads, then smaller blocks
    while config.max_tunable_threads > max_threads and config.max_thread_channels > 1:
        config = replace(config, max_thread_channels=config.max_thread_channels // 2)
    threads = min(config.gemm_threads, max_threads)
    return replace(config, gemm_threads=threads, elementwise_threads=min(config.elementwise_threads, max_threads))

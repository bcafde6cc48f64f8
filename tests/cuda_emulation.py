"""Run the CUDA source TVM writes for one of our kernels on the CPU, to check its numbers without a GPU.

The kernel's C++ is compiled with g++ against a small emulation of what it uses of CUDA: each block runs as
one OS thread per CUDA thread (the blocks one after another), ``__syncthreads()`` is a barrier of the block's
threads, ``__shared__`` arrays are the function's static arrays (one block at a time uses them), and the warp
shuffles of a cross-thread reduction exchange values through an array between two barriers (TVM's reductions
call them from every thread of the block alike).  This is not a GPU: it finds a wrong index, a missing barrier
whose race the OS threads hit, a thread writing outputs that are another's; timings and memory-model subtleties
(warp-synchronous code without barriers) stay for the GPU check.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import torch

PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
using std::max; using std::min; using std::isnan;
#define CUDART_INF_F INFINITY  // math_constants.h's, which TVM's kernels include
#define CUDART_INF ((double)INFINITY)
#define CUDART_NAN_F NAN
#define CUDART_NAN ((double)NAN)
#define uint unsigned int
#define uchar unsigned char
#define ushort unsigned short
#define __global__
#define __launch_bounds__(n)
struct emulated_dim3 { unsigned x, y, z; };
static thread_local emulated_dim3 threadIdx, blockIdx;
static thread_local int linear_thread;
static std::barrier<>* block_barrier;
#define __syncthreads() block_barrier->arrive_and_wait()
static uint64_t exchange_slots[1024];
template <class T> static T exchange(T value, int source) {
  std::memcpy(&exchange_slots[linear_thread], &value, sizeof value);
  __syncthreads();
  T result;
  std::memcpy(&result, &exchange_slots[source], sizeof result);
  __syncthreads();
  return result;
}
// CUDA's vector types that TVM writes for vectorized loads and stores (float4, double2) and their lane masks;
// alignas as CUDA's, so that a misaligned vector access is as wrong here as on a GPU
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct ushort4 { unsigned short x, y, z, w; };
struct ushort2 { unsigned short x, y; };
static float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static double2 make_double2(double x, double y) { return {x, y}; }
static unsigned __activemask() { return 0xffffffffu; }
template <class T> static T __shfl_down_sync(unsigned, T value, int delta, int width = 32) {
  int lane = linear_thread % width;
  return exchange(value, lane + delta < width ? linear_thread + delta : linear_thread);
}
template <class T> static T __shfl_sync(unsigned, T value, int lane, int width = 32) {
  return exchange(value, linear_thread - linear_thread % width + lane % width);
}
"""

LAUNCHER = r"""
extern "C" void emulated_launch(int blocks, int bx, int by, int bz, void** args) {
  int threads = bx * by * bz;
  for (int block = 0; block < blocks; ++block) {
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        blockIdx = {unsigned(block), 0, 0};
        threadIdx = {unsigned(t % bx), unsigned(t / bx % by), unsigned(t / (bx * by))};
        linear_thread = t;
        CALL;
      });
    }
    for (auto& thread : pool) thread.join();
  }
}
"""

_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\) \{')
_PARAM = re.compile(r"(\w+)\* __restrict__ (\w+)_ptr")
_BINDING = re.compile(r'T\.thread_binding\((\d+), thread="(blockIdx|threadIdx)\.([xyz])"')


def launch_shape(script: str) -> tuple[int, tuple[int, int, int]]:
    """(blocks, (threads x, y, z)) of a scheduled module's TVMScript; only blockIdx.x grids are emulated."""
    extents = {f"{kind}.{axis}": int(extent) for extent, kind, axis in _BINDING.findall(script)}
    if any(axis in extents for axis in ("blockIdx.y", "blockIdx.z")):
        raise NotImplementedError("the emulation launches one-dimensional grids only")
    threads = tuple(extents.get(f"threadIdx.{axis}", 1) for axis in "xyz")
    return extents.get("blockIdx.x", 1), threads


def run_emulated(source: str, script: str, arguments: dict[str, torch.Tensor], work_dir: Path) -> None:
    """Compile ``source`` (TVM's CUDA for one kernel) for the CPU and run it on ``arguments`` (buffer name ->
    contiguous CPU tensor, outputs included), launched as the schedule ``script`` binds its loops."""
    body = source[source.index('extern "C" __global__') :]
    # a block's shared arrays: static arrays of the function (C++ wants the alignment before "static")
    body = re.sub(r"__shared__ (alignas\(\d+\) )?", r"\1static ", body)
    signature = _SIGNATURE.search(body)
    if signature is None:
        raise ValueError("no kernel definition in the CUDA source")
    name, params = signature.group(1), _PARAM.findall(signature.group(2))
    call = f"{name}(" + ", ".join(f"({ctype}*)args[{i}]" for i, (ctype, _) in enumerate(params)) + ")"
    work_dir.mkdir(parents=True, exist_ok=True)
    cpp = work_dir / "kernel.cpp"
    cpp.write_text(PRELUDE + body + LAUNCHER.replace("CALL", call))
    library = work_dir / "kernel.so"
    compiled = subprocess.run(
        ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(library), str(cpp)],
        capture_output=True,
        text=True,
    )
    if compiled.returncode:
        raise RuntimeError(f"g++ failed on the emulated kernel:\n{compiled.stderr[-3000:]}")
    blocks, (bx, by, bz) = launch_shape(script)
    by_name = {name.replace(".", "_"): tensor for name, tensor in arguments.items()}  # as CUDA spells them
    pointers = (ctypes.c_void_p * len(params))(*(by_name[buffer].data_ptr() for _, buffer in params))
    ctypes.CDLL(str(library)).emulated_launch(blocks, bx, by, bz, pointers)

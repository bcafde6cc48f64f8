"""Kernels share torch's OpenMP thread pool: the launcher really is the one kernels call, the team follows
torch.set_num_threads, TVM's pool stays an option, and kernels that synchronize inside a parallel
region get a working barrier."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm.script import tirx as T

import tvmlayers as tl
from conftest import assert_matches_torch
from tvmlayers import omp_pool


def _launch_pointer(kernel: tl.Kernel, symbol: str = "__TVMBackendParallelLaunch") -> int:
    return ctypes.c_void_p.in_dll(ctypes.CDLL(str(kernel.path)), symbol).value


def _launcher_address(name: str = "tvmlayers_parallel_launch") -> int:
    return ctypes.cast(getattr(omp_pool._ensure_launcher(), name), ctypes.c_void_p).value


@pytest.fixture
def threads() -> Iterator[None]:
    """Restores torch's thread count and the pool after a test that changes them."""
    count, pool = torch.get_num_threads(), omp_pool.get_thread_pool()
    yield
    torch.set_num_threads(count)
    omp_pool.set_thread_pool(pool)


def _conv() -> tuple[tl.Conv2d, torch.nn.Conv2d, torch.Tensor]:
    torch.manual_seed(0)
    ours = tl.Conv2d(8, 16, 3, padding=1)
    reference = torch.nn.Conv2d(8, 16, 3, padding=1)
    reference.load_state_dict(ours.state_dict())
    return ours, reference, torch.randn(1, 8, 40, 40)


@torch.no_grad()
def test_kernels_run_on_torchs_openmp_pool(threads: None) -> None:
    assert omp_pool.get_thread_pool() == "torch"
    ours, reference, x = _conv()
    torch.set_num_threads(2)
    assert_matches_torch(ours(x), reference(x))
    (kernel,) = ours.kernels.values()
    assert _launch_pointer(kernel) == _launcher_address()
    assert omp_pool.last_team_size() == 2


@torch.no_grad()
def test_team_follows_torch_set_num_threads(threads: None) -> None:
    ours, reference, x = _conv()
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        assert_matches_torch(ours(x), reference(x))
        assert omp_pool.last_team_size() == count


@torch.no_grad()
def test_tvm_pool_is_an_option_for_loaded_kernels_too(threads: None) -> None:
    ours, reference, x = _conv()
    ours(x)
    (kernel,) = ours.kernels.values()
    omp_pool.set_thread_pool("tvm")
    tvm_launcher = _launch_pointer(kernel)
    assert tvm_launcher != _launcher_address()
    assert_matches_torch(ours(x), reference(x))
    omp_pool.set_thread_pool("torch")
    assert _launch_pointer(kernel) == _launcher_address()
    assert_matches_torch(ours(x), reference(x))
    with pytest.raises(ValueError, match="'torch' or 'tvm'"):
        omp_pool.set_thread_pool("openmp")  # type: ignore[arg-type]


def test_environment_selects_tvms_pool() -> None:
    child = "import tvmlayers.omp_pool as p; print(p.get_thread_pool())"
    env = {**os.environ, "TVMLAYERS_THREAD_POOL": "tvm"}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "tvm"


@torch.no_grad()
def test_calls_from_several_python_threads(threads: None) -> None:
    # each calling thread gets its own OpenMP team; results stay torch's
    torch.set_num_threads(2)
    x = torch.randn(4, 8, 30, 30)
    weight = torch.randn(16, 8, 3, 3)
    expected = F.conv2d(x, weight, padding=1)
    tl.functional.conv2d(x, weight, padding=1)  # compile once, before the threads race
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: tl.functional.conv2d(x, weight, padding=1), range(16)))
    for result in results:
        assert_matches_torch(result, expected)


@T.prim_func
def _two_phases(
    a: T.Buffer((2, 4096), "float32"), b: T.Buffer((2, 4096), "float32"), c: T.Buffer((2, 4096), "float32")
) -> None:
    # phase 2 of each row reads the other row's phase 1: only a real barrier between them makes it right
    T.func_attr({"global_symbol": "main"})
    with T.attr(0, "pragma_parallel_launch_point", 1):
        for t in T.parallel(2, annotations={"pragma_parallel_barrier_when_finish": 1}):
            for i in range(4096):
                b[t, i] = a[t, i] * T.float32(2)
        for t in T.parallel(2):
            for i in range(4096):
                c[t, i] = b[t, i] + b[1 - t, i] * T.float32(10)


def test_parallel_barrier_runs_on_torchs_pool(tmp_path: Path, threads: None) -> None:
    library = tmp_path / "barrier.so"
    tvm.compile(_two_phases, target="llvm").export_library(str(library))
    function = tvm.runtime.load_module(str(library))["main"]
    omp_pool.attach(library)
    kernel = ctypes.CDLL(str(library))
    assert ctypes.c_void_p.in_dll(kernel, "__TVMBackendParallelBarrier").value == _launcher_address(
        "tvmlayers_parallel_barrier"
    )
    torch.set_num_threads(2)
    a = torch.randn(2, 4096)
    expected = a * 2 + a.flip(0) * 20
    for _ in range(50):
        b, c = torch.empty_like(a), torch.empty_like(a)
        function(a, b, c)
        assert omp_pool.last_team_size() == 2
        assert_matches_torch(c, expected)


def test_read_only_cache_still_gets_torchs_pool(tmp_path: Path) -> None:
    # a pre-built cache on a read-only folder: the launcher is built in a private temporary folder instead
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / "runtime").write_text("not a folder")  # nothing can be written where the launcher would go
    child = "import tvmlayers.omp_pool as p; print(p.get_thread_pool(), p._launcher is not None)"
    env = {**os.environ, "TVMLAYERS_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-W", "error", "-c", child], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["torch", "True"]

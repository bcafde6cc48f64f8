"""How many threads kernels run on.

By default kernels run on torch's own OpenMP pool (:mod:`tvmlayers.omp_pool`): one pool, one thread
count, ``torch.set_num_threads``'s.  With TVM's pool (``TVMLAYERS_THREAD_POOL=tvm``) the count is
TVM's: TVM sizes its pool as half the logical CPUs (it assumes hyper-threading), which on a 2-vCPU
machine is a single thread, so tvmlayers starts it with ``torch.get_num_threads()`` threads unless
``TVM_NUM_THREADS`` is set.  :func:`set_num_threads` sets both.
"""

from __future__ import annotations

import os

import torch
import tvm

from .omp_pool import get_thread_pool

_KIND_BIG_CORES = 1  # TVM's affinity mode: all "big" cores, which is every core on x86


def set_num_threads(count: int) -> None:
    """Run kernels on ``count`` threads; on torch's pool (the default) that is torch's thread count too."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"set_num_threads expects a positive integer, got {count!r}")
    _set_tvm_threads(count)
    if get_thread_pool() == "torch":
        torch.set_num_threads(count)


def get_num_threads() -> int:
    """The threads a kernel's parallel loops run on."""
    return torch.get_num_threads() if get_thread_pool() == "torch" else int(tvm.runtime.num_threads())


def _set_tvm_threads(count: int) -> None:
    # the environment bounds the pool; config_threadpool then resizes a pool that already exists
    os.environ["TVM_NUM_THREADS"] = str(count)
    tvm.get_global_func("runtime.config_threadpool")(_KIND_BIG_CORES, count)


def init_threads() -> None:
    """Called once on import: TVM's pool gets torch's thread count unless the user chose one for TVM."""
    if "TVM_NUM_THREADS" not in os.environ:
        _set_tvm_threads(torch.get_num_threads())

"""The size of TVM's CPU thread pool, kept equal to torch's by default.

TVM sizes its pool as half the logical CPUs (it assumes hyper-threading), which on a 2-vCPU machine
is a single thread.  tvmlayers starts with ``torch.get_num_threads()`` threads unless
``TVM_NUM_THREADS`` is set, and :func:`set_num_threads` changes it later.
"""

from __future__ import annotations

import os

import torch
import tvm

_KIND_BIG_CORES = 1  # TVM's affinity mode: all "big" cores, which is every core on x86


def set_num_threads(count: int) -> None:
    """Run kernels on ``count`` threads (like ``torch.set_num_threads``)."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"set_num_threads expects a positive integer, got {count!r}")
    # the environment bounds the pool; config_threadpool then resizes a pool that already exists
    os.environ["TVM_NUM_THREADS"] = str(count)
    tvm.get_global_func("runtime.config_threadpool")(_KIND_BIG_CORES, count)


def get_num_threads() -> int:
    return int(tvm.runtime.num_threads())


def init_threads() -> None:
    """Called once on import: torch's thread count unless the user chose one for TVM."""
    if "TVM_NUM_THREADS" not in os.environ:
        set_num_threads(torch.get_num_threads())

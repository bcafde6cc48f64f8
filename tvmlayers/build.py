"""The build pipeline: KernelSpec -> key -> schedule -> compile -> on-disk cache -> loaded Kernel.

``kernel_for(spec)`` is the only entry point; it memoizes per process, so a layer pays for the cache
lookup once per input shape.
"""

from __future__ import annotations

import hashlib
import os
import threading
from functools import cache
from pathlib import Path

import tvm

from . import ops, schedules
from .cache import KernelCache
from .formats import kernel_key
from .kernel import Kernel
from .spec import KernelSpec

_memo: dict[tuple, Kernel] = {}
_memo_lock = threading.Lock()


@cache
def code_fingerprint() -> str:
    """Hash of the op definitions and schedules: editing either must never reuse an old binary."""
    digest = hashlib.sha256()
    for package in (ops, schedules):
        root = Path(package.__file__).parent
        for source in sorted(root.rglob("*.py")):
            digest.update(source.relative_to(root).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _compile(spec: KernelSpec, layout: dict, so_path: Path) -> dict:
    """Schedule and compile ``spec``, export the library to ``so_path``; returns the manifest fields."""
    func = ops.prim_func(spec, layout)
    sch, rule = schedules.default_schedule(func, spec.target)
    executable = tvm.compile(sch.mod, target=spec.target)
    executable.export_library(str(so_path))
    return {
        "spec": spec.to_json(),
        "layout": layout,
        "provenance": {"source": "default", "rule": rule},
        "symbol": ops.SYMBOL,
        "output_shapes": [list(s) for s in ops.output_shapes(spec, layout)],
        "tvm_version": tvm.__version__,
    }


def kernel_for(spec: KernelSpec, cache_dir: Path | str | None = None) -> Kernel:
    """The compiled kernel of ``spec``: from this process's memo, else the disk cache, else a fresh build."""
    # the memo is keyed by what decides the cache directory, without building Paths on the hot path
    memo_key = (spec, cache_dir, os.environ.get("TVMLAYERS_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"))
    kernel = _memo.get(memo_key)
    if kernel is not None:
        return kernel
    kernel_cache = KernelCache(cache_dir)
    with _memo_lock:
        kernel = _memo.get(memo_key)
        if kernel is None:
            layout = schedules.weight_layout(spec.op, dict(spec.params), spec.dtype, spec.target)
            key = kernel_key(spec.to_json(), layout, {"source": "default", "code": code_fingerprint()}, tvm.__version__)
            entry, built = kernel_cache.get_or_build(key, lambda so: _compile(spec, layout, so))
            kernel = _memo[memo_key] = Kernel.load(spec, entry, built)
    return kernel

"""tvmlayers: torch's Conv2d, MaxPool2d, Linear and ReLU as Apache TVM tensor expressions, scheduled per
target, compiled to shared libraries, cached on disk, and called from torch-compatible modules."""

from . import functional, nn
from .build import kernel_for
from .convert import convert
from .kernel import Kernel
from .layouts import refresh_weights
from .nn import Conv2d, ConvAdd2d, ConvAddReLU2d, Linear, MaxPool2d, ReLU
from .omp_pool import get_thread_pool, set_thread_pool
from .spec import KernelSpec
from .targets import resolve_target
from .threads import get_num_threads, init_threads, set_num_threads

__version__ = "0.1.0"

# Tuning pulls in MetaSchedule's Python side; load it on first use, not on `import tvmlayers`.
_LAZY = {
    "tune": "tvmlayers.tuning.tuner",
    "extract_workloads": "tvmlayers.extract",
    "load_workloads": "tvmlayers.workloads",
    "save_workloads": "tvmlayers.workloads",
    "Workload": "tvmlayers.workloads",
    "bench": "tvmlayers.benchmark",
    "precompile": "tvmlayers.aot",
    "PrecompileReport": "tvmlayers.aot",
    "compile_bundle": "tvmlayers.bundle",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvmlayers' has no attribute {name!r}")


init_threads()

__all__ = [
    "Conv2d",
    "ConvAdd2d",
    "ConvAddReLU2d",
    "Kernel",
    "KernelSpec",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "convert",
    "functional",
    "kernel_for",
    "nn",
    "refresh_weights",
    "resolve_target",
    "get_num_threads",
    "set_num_threads",
    "get_thread_pool",
    "set_thread_pool",
    *_LAZY,
]

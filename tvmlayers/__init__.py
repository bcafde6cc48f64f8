"""tvmlayers: torch's Conv2d, MaxPool2d, Linear and ReLU as Apache TVM tensor expressions, scheduled per
target, compiled to shared libraries, cached on disk, and called from torch-compatible modules."""

from . import functional, nn
from .build import kernel_for
from .convert import convert
from .kernel import Kernel
from .nn import Conv2d, Linear, MaxPool2d, ReLU
from .spec import KernelSpec
from .targets import resolve_target
from .threads import get_num_threads, init_threads, set_num_threads

__version__ = "0.1.0"

init_threads()

__all__ = [
    "Conv2d",
    "Kernel",
    "KernelSpec",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "convert",
    "functional",
    "kernel_for",
    "nn",
    "resolve_target",
    "get_num_threads",
    "set_num_threads",
]

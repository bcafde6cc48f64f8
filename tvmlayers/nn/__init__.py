"""torch.nn-compatible modules backed by compiled TVM kernels."""

from .activation import ReLU
from .conv import Conv2d
from .linear import Linear
from .pooling import MaxPool2d

__all__ = ["Conv2d", "Linear", "MaxPool2d", "ReLU"]

"""torch.nn-compatible modules backed by compiled TVM kernels."""

from .activation import ReLU
from .conv import Conv2d
from .fused import ConvAdd2d, ConvAddReLU2d, ConvReLU2d, LinearReLU
from .linear import Linear
from .pooling import MaxPool2d

__all__ = ["Conv2d", "ConvAdd2d", "ConvAddReLU2d", "ConvReLU2d", "Linear", "LinearReLU", "MaxPool2d", "ReLU"]

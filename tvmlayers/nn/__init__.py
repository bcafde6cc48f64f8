"""torch.nn-compatible modules backed by compiled TVM kernels."""

from .activation import ReLU
from .conv import Conv2d
from .fused import Conv2dReLU6, ConvAdd2d, ConvAddReLU2d, ConvReLU2d, LinearReLU, LinearReLU6
from .linear import Linear
from .pooling import MaxPool2d

__all__ = [
    "Conv2d",
    "Conv2dReLU6",
    "ConvAdd2d",
    "ConvAddReLU2d",
    "ConvReLU2d",
    "Linear",
    "LinearReLU",
    "LinearReLU6",
    "MaxPool2d",
    "ReLU",
]

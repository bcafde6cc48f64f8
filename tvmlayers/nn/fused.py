"""Layers followed by ReLU or ReLU6, computed in one kernel: the activation is the epilogue of the
conv2d/linear kernel, so the output is written once instead of being written, read and written again.
``tvmlayers.convert`` puts them in place of a Conv2d/Linear whose output only a relu (relu6) reads
(``tvmlayers.graph``: a ReLU/ReLU6 module fused at every call becomes an ``nn.Identity``); parameters and
``state_dict`` keys stay those of the Conv2d/Linear.

``ConvAdd2d``/``ConvAddReLU2d`` add a second input, ResNet's shortcut, in the same epilogue:
``relu?(conv2d(x) + residual)``; their ``forward`` takes ``(input, residual)``."""

from __future__ import annotations

import torch

from .conv import Conv2d
from .linear import Linear


class ConvReLU2d(Conv2d):
    """``relu(conv2d(x))`` in one kernel; the constructor and parameters are :class:`Conv2d`'s."""

    _fuse_relu = True


class Conv2dReLU6(Conv2d):
    """``relu6(conv2d(x))`` (``min(max(x, 0), 6)``, MobileNet's activation) in one kernel; the constructor and
    parameters are :class:`Conv2d`'s."""

    _fuse_relu6 = True


class ConvAdd2d(Conv2d):
    """``conv2d(input) + residual`` in one kernel, ``residual`` of the output's shape, dtype and device (no
    broadcasting); the constructor, parameters and ``from_torch`` are :class:`Conv2d`'s."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._conv(input, residual)


class ConvAddReLU2d(ConvAdd2d):
    """``relu(conv2d(input) + residual)`` in one kernel (ResNet's block ending); otherwise :class:`ConvAdd2d`."""

    _fuse_relu = True


class LinearReLU(Linear):
    """``relu(linear(x))`` in one kernel; the constructor and parameters are :class:`Linear`'s."""

    _fuse_relu = True


class LinearReLU6(Linear):
    """``relu6(linear(x))`` in one kernel; the constructor and parameters are :class:`Linear`'s."""

    _fuse_relu6 = True

"""Layers followed by ReLU, computed in one kernel: the relu is the epilogue of the conv2d/linear kernel,
so the output is written once instead of being written, read and written again.  ``tvmlayers.convert``
puts them in place of a Conv2d/Linear that a ReLU follows in an ``nn.Sequential`` (the ReLU becomes an
``nn.Identity``); parameters and ``state_dict`` keys stay those of the Conv2d/Linear."""

from __future__ import annotations

from .conv import Conv2d
from .linear import Linear


class ConvReLU2d(Conv2d):
    """``relu(conv2d(x))`` in one kernel; the constructor and parameters are :class:`Conv2d`'s."""

    _fuse_relu = True


class LinearReLU(Linear):
    """``relu(linear(x))`` in one kernel; the constructor and parameters are :class:`Linear`'s."""

    _fuse_relu = True

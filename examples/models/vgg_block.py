"""A VGG-style block: two 3x3 convolutions with ReLU, then a 2x2 max-pool (VGG-16's first block)."""

from __future__ import annotations

from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
    ).eval()

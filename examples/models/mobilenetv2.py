"""MobileNetV2 (Sandler et al. 2018) with torchvision's layer configuration: depthwise 3x3 and pointwise
1x1 convolutions in inverted residual blocks."""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)

# expansion t, output channels c, repeats n, first stride s
CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1, relu: bool = True):
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return layers + ([nn.ReLU6(inplace=True)] if relu else [])


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers = _conv_bn(in_channels, hidden, 1, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)  # depthwise
        layers += _conv_bn(hidden, out_channels, 1, 1, relu=False)  # pointwise projection
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers, channels = _conv_bn(3, 32, 3, 2), 32
        for expansion, out_channels, repeats, stride in CONFIG:
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion))
                channels = out_channels
        layers += _conv_bn(channels, 1280, 1, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def model() -> nn.Module:
    return MobileNetV2().eval()

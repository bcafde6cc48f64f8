"""A small CNN (conv/relu/pool/linear) for quick tuning and conversion examples."""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def model() -> nn.Module:
    return SmallCNN().eval()

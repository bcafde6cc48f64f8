"""Convs whose channel counts are not multiples of a SIMD register (33, 65, 35, 100; groups of 13 -> 7 and
50 -> 65): the shapes the default schedules must not lose badly on.  The first is the conv of torch's
``nn.Conv2d`` docs."""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (2, 16, 50, 100)


class OddChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.docs = nn.Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1))
        self.rgb = nn.Conv2d(3, 33, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(33, 65, 3, padding=1)
        self.grouped = nn.Conv2d(65, 35, 3, padding=1, groups=5)  # 13 -> 7 channels per group
        self.pointwise = nn.Conv2d(35, 100, 1)
        self.pair = nn.Conv2d(100, 130, 3, padding=1, groups=2)  # 50 -> 65 channels per group

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.pair(self.pointwise(self.grouped(self.wide(self.docs(x)))))
        return y, self.rgb(x[:, :3])


def model() -> nn.Module:
    return OddChannels().eval()

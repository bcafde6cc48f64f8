"""The feed-forward block of a BERT-base encoder layer (hidden 768, intermediate 3072) on a 128-token
sequence.  GELU is not one of tvmlayers' layers, so only the two linears are tuned."""

from __future__ import annotations

from torch import nn

INPUT_SHAPE = (1, 128, 768)


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)).eval()

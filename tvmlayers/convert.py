"""convert(): swap every supported torch layer in a model for its tvmlayers twin."""

from __future__ import annotations

import copy

import torch

from . import nn
from .targets import TargetLike

# Exact types only: a subclass of nn.Conv2d may override forward, and we would silently drop that.
_TWINS: dict[type, type] = {
    torch.nn.Conv2d: nn.Conv2d,
    torch.nn.MaxPool2d: nn.MaxPool2d,
    torch.nn.Linear: nn.Linear,
    torch.nn.ReLU: nn.ReLU,
}


def convert(model: torch.nn.Module, target: TargetLike = None, inplace: bool = False) -> torch.nn.Module:
    """Replace every ``nn.Conv2d``/``MaxPool2d``/``Linear``/``ReLU`` in ``model``, recursively.

    Parameters are copied, so the result computes what ``model`` computes.  With ``inplace=False``
    (default) ``model`` is left untouched and a converted deep copy is returned.
    """
    if type(model) in _TWINS:
        return _TWINS[type(model)].from_torch(model, target=target)
    if not inplace:
        model = copy.deepcopy(model)
    for name, child in model.named_children():
        setattr(model, name, convert(child, target=target, inplace=True))
    return model

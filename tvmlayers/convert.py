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


# A Conv2d/Linear directly followed by a ReLU in an nn.Sequential: nothing else can see the intermediate.
_FUSED: dict[type, type] = {torch.nn.Conv2d: nn.ConvReLU2d, torch.nn.Linear: nn.LinearReLU}


def convert(
    model: torch.nn.Module, target: TargetLike = None, inplace: bool = False, fuse: bool = True
) -> torch.nn.Module:
    """Replace every ``nn.Conv2d``/``MaxPool2d``/``Linear``/``ReLU`` in ``model``, recursively.

    Parameters are copied, so the result computes what ``model`` computes.  With ``inplace=False``
    (default) ``model`` is left untouched and a converted deep copy is returned.  With ``fuse`` (default),
    a Conv2d or Linear followed by a ReLU inside an ``nn.Sequential`` becomes one fused layer
    (:class:`tvmlayers.nn.ConvReLU2d`/:class:`~tvmlayers.nn.LinearReLU`) and the ReLU an ``nn.Identity``.
    """
    if type(model) in _TWINS:
        return _TWINS[type(model)].from_torch(model, target=target)
    if not inplace:
        model = copy.deepcopy(model)
    children = list(model.named_children())
    index = 0
    while index < len(children):
        name, child = children[index]
        following = children[index + 1][1] if index + 1 < len(children) else None
        if (
            fuse
            and isinstance(model, torch.nn.Sequential)
            and type(child) in _FUSED
            and type(following) is torch.nn.ReLU
        ):
            setattr(model, name, _FUSED[type(child)].from_torch(child, target=target))
            setattr(model, children[index + 1][0], torch.nn.Identity())
            index += 2
            continue
        setattr(model, name, convert(child, target=target, inplace=True, fuse=fuse))
        index += 1
    return model

"""convert(): a model with every supported torch layer swapped for its tvmlayers twin, fused where its
dataflow allows (the graph passes are in ``tvmlayers.graph``)."""

from __future__ import annotations

import copy
import warnings

import torch

from .executor import install
from .graph import (
    FUSED,
    TWINS,
    ConversionReport,
    GraphUnsupported,
    convert_graph,
    has_forward_hooks,
    module_activation,
    twin,
)
from .targets import TargetLike


def convert(
    model: torch.nn.Module,
    target: TargetLike = None,
    inplace: bool = False,
    fuse: bool = True,
    *,
    example_inputs: tuple | None = None,
) -> torch.nn.Module:
    """Replace every ``nn.Conv2d``/``MaxPool2d``/``Linear``/``ReLU`` in ``model``, fused where the dataflow
    proves it safe, computing what ``model`` computes.

    ``model`` is traced with ``torch.fx`` and the result is a ``torch.fx.GraphModule`` holding ``model``'s
    children (same names and containers, layers swapped for their tvmlayers twins).  With ``fuse``
    (default), the graph passes of :mod:`tvmlayers.graph` run: eval-mode BatchNorms folded into the conv or
    linear before them (not while ``model.training``), conv/linear + relu or relu6 as one kernel, conv + residual add
    (+ relu) as one kernel, and torch's functional relu/max_pool2d/linear/conv2d calls become tvmlayers'.
    ``result.tvmlayers_report`` (a :class:`tvmlayers.graph.ConversionReport`) lists what was folded and
    fused.  A model that ``torch.fx`` cannot trace (data-dependent control flow) is converted module by
    module instead, with a warning naming the reason (then only a Conv2d/Linear followed by a ReLU in a
    plain ``nn.Sequential`` is fused with it).

    With ``inplace=False`` (default) ``model`` is left untouched (its deep copy is converted); with
    ``inplace=True`` its own modules are swapped in place, so that ``model`` itself runs the twins too.

    With ``example_inputs`` (a tuple of the forward's arguments), every kernel the converted model needs for
    them is compiled now, in parallel processes (:func:`tvmlayers.precompile`).
    """
    if example_inputs is not None:
        from .aot import precompile  # noqa: PLC0415 - it imports the fake-tensor machinery

        converted = convert(model, target, inplace, fuse)
        precompile(converted, *example_inputs)
        return converted
    if type(model) in TWINS:
        return twin(model, target)
    if not inplace:
        model = copy.deepcopy(model)
    try:
        return install(convert_graph(model, target, fuse))
    except GraphUnsupported as error:
        warnings.warn(f"tvmlayers.convert: {error}; converting module by module, without graph passes", stacklevel=2)
        convert_modules(model, target, fuse)
        model.tvmlayers_report = ConversionReport(fallback=str(error))
        return model


def convert_modules(
    model: torch.nn.Module, target: TargetLike, fuse: bool, twins: dict[int, torch.nn.Module] | None = None
) -> None:
    """Swap ``model``'s layers for their twins in place, recursively, without looking at its dataflow: only a
    Conv2d/Linear directly followed by a ReLU or ReLU6 inside a plain ``nn.Sequential`` (whose forward is
    Sequential's own: nothing else can see the intermediate) is fused, and neither may have hooks.  ``twins``
    (id of a torch layer -> its twin) keeps a layer registered twice one module."""
    twins = {} if twins is None else twins
    chain = fuse and type(model).forward is torch.nn.Sequential.forward
    children = list(model.named_children())
    index = 0
    while index < len(children):
        name, child = children[index]
        following = children[index + 1][1] if index + 1 < len(children) else None
        activation = module_activation(following) if chain else None
        if activation is not None and type(child) in FUSED[activation] and not has_forward_hooks(child):
            setattr(model, name, twin(child, target, activation))
            setattr(model, children[index + 1][0], torch.nn.Identity())
            index += 2
            continue
        if type(child) in TWINS:
            if id(child) not in twins:
                twins[id(child)] = twin(child, target)
            setattr(model, name, twins[id(child)])
        else:
            convert_modules(child, target, fuse, twins)
        index += 1

"""Graph-level conversion: torch.fx shows a model's real dataflow, and only what it proves is rewritten.

``convert_graph(model)`` traces ``model`` symbolically (torch's layers, tvmlayers' modules and modules with
hooks are leaves), runs the passes below on the graph, swaps the layers for their tvmlayers twins and
returns a ``torch.fx.GraphModule`` that keeps ``model``'s children (same names, same containers):

- **BatchNorm folding** (eval mode only): a ``BatchNorm2d`` whose input is a ``Conv2d`` output used by
  nothing else (or a ``BatchNorm1d`` after a ``Linear`` whose input is provably 2-D) is folded into a new
  weight and bias of that layer; the BatchNorm becomes an ``nn.Identity`` in the hierarchy.
- **relu/relu6 fusion**: a conv/linear output whose only user is a relu (``nn.ReLU``, ``F.relu``, ``torch.relu``,
  ``Tensor.relu``, their in-place forms) or a relu6 (``nn.ReLU6``, ``F.relu6``, ``nn.Hardtanh(0, 6)``,
  ``F.hardtanh(x, 0, 6)``, ``torch.clamp(x, 0, 6)``, ``Tensor.clamp(0, 6)``, their in-place forms) is computed
  with the activation as the kernel's epilogue.
- **residual fusion**: ``conv(x) + other`` (``+``, ``+=``, ``torch.add``, ``Tensor.add``), where the conv
  output has no other user, becomes one conv kernel adding ``other`` (and the relu that may follow) in its
  epilogue; a call whose ``other`` has another shape than the output falls back to conv then add.
- **functional calls**: ``F.relu``/``torch.relu``/``Tensor.relu``, ``F.max_pool2d``, ``F.linear`` and
  ``F.conv2d`` in traced code become ``tvmlayers.functional`` calls.

A module called several times stays one module, and is fused or folded only where every call allows it;
a module with forward hooks or pre-hooks is never fused or folded with another (its hooks see torch's
values).  Tracing fails on data-dependent control flow: ``GraphUnsupported`` says why, and
``tvmlayers.convert`` then falls back to converting module by module.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from . import functional as tf
from . import nn
from .nn._base import CompiledLayer
from .targets import TargetLike

# Exact types only: a subclass of nn.Conv2d may override forward, and we would silently drop that.  (fx traces
# through such a subclass, so what its forward computes is converted call by call.)
TWINS: dict[type, type] = {
    torch.nn.Conv2d: nn.Conv2d,
    torch.nn.MaxPool2d: nn.MaxPool2d,
    torch.nn.Linear: nn.Linear,
    torch.nn.ReLU: nn.ReLU,
}
# A Conv2d/Linear whose output only an activation reads (activation -> layer -> fused class): the activation
# runs as the kernel's epilogue.
FUSED: dict[str, dict[type, type]] = {
    "relu": {torch.nn.Conv2d: nn.ConvReLU2d, torch.nn.Linear: nn.LinearReLU},
    "relu6": {torch.nn.Conv2d: nn.Conv2dReLU6, torch.nn.Linear: nn.LinearReLU6},
}
# A Conv2d whose output is only added to another tensor (then maybe relu'd): relu? -> the kernel's class
_RESIDUAL: dict[bool, type] = {False: nn.ConvAdd2d, True: nn.ConvAddReLU2d}

# Every hook a module may carry: a module with any of the forward ones is never fused or folded, and a twin
# takes the original's dictionaries (so that the user's RemovableHandles still remove them).
_FORWARD_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
)
_HOOKS = (
    *_FORWARD_HOOKS,
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)

# torch's functional forms -> tvmlayers', with argument lists that are torch's
_FUNCTIONAL: dict[Callable, Callable] = {
    F.conv2d: tf.conv2d,
    F.linear: tf.linear,
    F.max_pool2d: tf.max_pool2d,
    F._max_pool2d: tf.max_pool2d,
    F.relu: tf.relu,
    torch.relu: tf.relu,
}
_INPLACE_RELU = (torch.relu_, F.relu_)
_ADD = (operator.add, operator.iadd, torch.add)
# relu6 as torch spells it: these functions/methods with the bounds (0, 6) where they take bounds; the bounds'
# parameter names, in order, and the in-place keyword where there is one
_RELU6_FUNCTIONS: dict[object, tuple[tuple[str, ...], str | None]] = {
    F.relu6: ((), "inplace"),
    F.hardtanh: (("min_val", "max_val"), "inplace"),
    F.hardtanh_: (("min_val", "max_val"), None),
    torch.clamp: (("min", "max"), None),
    torch.clamp_: (("min", "max"), None),
    torch.clip: (("min", "max"), None),
    torch.clip_: (("min", "max"), None),
}
_RELU6_METHODS = {name: ("min", "max") for name in ("clamp", "clamp_", "clip", "clip_")}


def _is_bound(value: object, bound: int) -> bool:
    """Whether a traced argument is the constant ``bound`` (a number, not a bool or a tensor)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == bound


def _has_relu6_bounds(args: tuple, kwargs: dict, names: tuple[str, ...], inplace: str | None) -> bool:
    """Whether a call's arguments after its input are exactly the bounds ``names`` = (0, 6) (by position or
    name) and, optionally, the in-place flag: nothing else that could change what it computes."""
    if len(args) > len(names) + (inplace is not None):
        return False
    given = dict(zip((*names, inplace), args, strict=False))
    if set(given) & set(kwargs) or not set(kwargs) <= {*names, inplace}:
        return False
    given.update(kwargs)
    given.pop(inplace, None)
    return all(_is_bound(given.get(name), bound) for name, bound in zip(names, (0, 6), strict=False))


def module_activation(module: torch.nn.Module | None) -> str | None:
    """``"relu"`` or ``"relu6"`` if ``module`` is exactly torch's (or tvmlayers') ReLU, torch's ReLU6 or a
    Hardtanh(0, 6) without forward hooks: an activation a conv/linear kernel can apply; else None."""
    if module is None or has_forward_hooks(module):
        return None
    if type(module) in (torch.nn.ReLU, nn.ReLU):
        return "relu"
    if type(module) in (torch.nn.ReLU6, torch.nn.Hardtanh) and (module.min_val, module.max_val) == (0, 6):
        return "relu6"
    return None


class GraphUnsupported(Exception):
    """``model`` cannot be converted as a graph (symbolic tracing failed); the message says why."""


@dataclass
class ConversionReport:
    """What ``tvmlayers.convert`` did to a model: ``converted_model.tvmlayers_report``.

    Entries name the modules by their qualified names (``layer1.0.conv1``) or, for functional calls, by the
    graph node's name; ``fallback`` is the reason the model was converted module by module, else None.
    """

    folded: list[str] = field(default_factory=list)  # "bn <- conv": BatchNorms folded into the layer before
    fused_relu: list[str] = field(default_factory=list)  # layers whose kernel applies the relu after them
    fused_relu6: list[str] = field(default_factory=list)  # layers whose kernel applies the relu6 after them
    fused_residual: list[str] = field(default_factory=list)  # convs whose kernel adds a residual (+ relu)
    functional: list[str] = field(default_factory=list)  # torch functional calls now tvmlayers functional
    fallback: str | None = None

    def summary(self) -> str:
        """One line: what was folded and fused, or why nothing graph-level happened."""
        if self.fallback is not None:
            return f"converted module by module (no graph passes): {self.fallback}"
        return (
            f"{len(self.folded)} BatchNorm folded, {len(self.fused_relu)} relu fused, "
            f"{len(self.fused_relu6)} relu6 fused, "
            f"{len(self.fused_residual)} residual add fused, {len(self.functional)} functional calls converted"
        )


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward hooks or pre-hooks (which must see what torch gives them)."""
    # two dict reads: the recorded inference program (tvmlayers.executor) asks this of every layer on every call.
    # ``_forward_hooks_with_kwargs`` needs no look: its keys are ids of hooks that ``_forward_hooks`` holds.
    return bool(module._forward_hooks or module._forward_pre_hooks)


def twin(
    module: torch.nn.Module, target: TargetLike, activation: str | None = None, residual: bool = False
) -> torch.nn.Module:
    """The tvmlayers module computing ``module`` (an exact ``TWINS`` type), with ``activation`` ("relu" or
    "relu6") fused after it (and before that a ``residual`` added: a Conv2d only, with "relu" or none); it
    shares the original's hook dictionaries."""
    if residual:
        kind = _RESIDUAL[activation == "relu"]
    else:
        kind = (FUSED[activation] if activation else TWINS)[type(module)]
    new = kind.from_torch(module, target=target)
    new.train(module.training)
    for name in _HOOKS:
        if name in module.__dict__:
            setattr(new, name, module.__dict__[name])
    return new


def conv2d_add(conv: nn.ConvAdd2d, input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``relu?(conv2d(input) + other)`` for the graph's fused residual: one kernel when ``other`` has the
    output's shape and dtype, else (torch broadcasts or promotes there) the conv, then torch's add (and relu),
    so that the result is always torch's."""
    try:
        return conv(input, other)
    except (ValueError, TypeError):
        out = tf.conv2d(
            input, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
            padding_mode=conv.padding_mode, target=conv.target,
        ) + other  # fmt: skip
        return tf.relu(out) if conv._fuse_relu else out


class _Tracer(torch.fx.Tracer):
    """torch's layers (fx's default), tvmlayers' modules and modules with hooks are leaves.  tvmlayers'
    functional calls are wrapped, so that a pickled converted model, whose code fx traces again, loads."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(tf.conv2d, tf.linear, tf.max_pool2d, tf.relu, conv2d_add))

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, CompiledLayer) or has_forward_hooks(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: torch.nn.Module) -> torch.fx.Graph:
    """``model``'s dataflow; raises ``GraphUnsupported`` with fx's reason where it cannot be traced."""
    try:
        return _Tracer().trace(model)
    except Exception as error:  # fx raises TraceError, but also TypeError/AttributeError from user code on proxies
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        why = f"torch.fx cannot trace {type(model).__name__}: {type(error).__name__}: {reason}"
        raise GraphUnsupported(why) from error


def convert_graph(model: torch.nn.Module, target: TargetLike, fuse: bool) -> torch.fx.GraphModule:
    """``model`` as a GraphModule with the passes applied; ``model``'s own modules are changed in place (its
    layers swapped for their twins, folded BatchNorms made ``nn.Identity``), and its forward still computes
    what it did (a fused relu's module stays, and relu is idempotent)."""
    graph = trace(model)
    passes = _Passes(model, graph, target)
    passes.functional_calls()
    if fuse:
        if not model.training:
            passes.fold_batch_norms()
        passes.fuse_relus()
        passes.fuse_residual_adds()
    passes.swap_layers()
    for node in graph.nodes:
        # The forward's annotations, which fx would write into the generated code: under ``from __future__ import
        # annotations`` they are strings, which fx turns into globals of the code that pickling cannot name
        # ("'str' object has no attribute '__name__'"); they check nothing at run time.
        if node.op in ("placeholder", "output"):
            node.type = None
    graph.lint()
    converted = torch.fx.GraphModule(model, graph)
    # Keep model's own children, parameters and buffers, in model's order: the containers stay what they were
    # (model.layer1[0].conv1 still works), and state_dict has model's keys (less those of folded BatchNorms).
    for table in ("_modules", "_parameters", "_buffers"):
        getattr(converted, table).clear()
        getattr(converted, table).update(getattr(model, table))
    converted._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    for name in _HOOKS:
        if name in model.__dict__:
            setattr(converted, name, model.__dict__[name])
    # GraphModule's deepcopy rebuilds from the graph and keeps only these user attributes
    converted.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = {"tvmlayers_report": passes.report}
    converted.tvmlayers_report = passes.report
    return converted


class _Passes:
    """The rewrites of one traced graph over ``root``'s module hierarchy."""

    def __init__(self, root: torch.nn.Module, graph: torch.fx.Graph, target: TargetLike) -> None:
        self.root, self.graph, self.target = root, graph, target
        self.report = ConversionReport()
        self.names = {id(m): name for name, m in root.named_modules()}
        self.activation: dict[int, str] = {}  # ids of the torch layers fused with an activation -> its name
        self.residual: set[int] = set()  # ids of the convs whose calls add a residual
        self.called = self.called_modules()  # before the passes: a ReLU no longer called was fused every time

    # ------------------------------------------------------------------------------------------ queries

    def module(self, node: object) -> torch.nn.Module | None:
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            return self.root.get_submodule(node.target)
        return None

    def called_modules(self) -> set[int]:
        return {id(self.module(n)) for n in self.graph.nodes if n.op == "call_module"}

    def calls(self, module: torch.nn.Module) -> list[torch.fx.Node]:
        return [n for n in self.graph.nodes if n.op == "call_module" and self.module(n) is module]

    def layer(self, node: object, *types: type) -> torch.nn.Module | None:
        """The exact-type torch layer ``node`` calls on one input, if it has no hooks and is not fused yet."""
        module = self.module(node)
        if (
            type(module) in types
            and not has_forward_hooks(module)
            and id(module) not in self.activation.keys() | self.residual
            and len(node.args) == 1
            and not node.kwargs
        ):
            return module
        return None

    @staticmethod
    def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
        return next(iter(node.users)) if len(node.users) == 1 else None

    def activation_input(self, node: object) -> tuple[torch.fx.Node, str] | tuple[None, None]:
        """(input of ``node``, "relu" or "relu6") if ``node`` is a relu or relu6 (any form above) whose fusion
        nothing can observe, else (None, None)."""
        if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None, None
        args, kwargs = node.args[1:], node.kwargs
        activation = None
        if node.op == "call_module":
            activation = module_activation(self.module(node)) if not args and not kwargs else None
        elif node.op == "call_function" and node.target in (tf.relu, *_INPLACE_RELU):
            activation = "relu" if len(node.args) + len(kwargs) <= 2 else None
        elif node.op == "call_function" and node.target in _RELU6_FUNCTIONS:
            activation = "relu6" if _has_relu6_bounds(args, kwargs, *_RELU6_FUNCTIONS[node.target]) else None
        elif node.op == "call_method" and node.target in ("relu", "relu_"):
            activation = "relu" if len(node.args) + len(kwargs) <= 2 else None
        elif node.op == "call_method" and node.target in _RELU6_METHODS:
            activation = "relu6" if _has_relu6_bounds(args, kwargs, _RELU6_METHODS[node.target], None) else None
        return (node.args[0], activation) if activation is not None else (None, None)

    def relu_input(self, node: object) -> torch.fx.Node | None:
        """The input of ``node`` if it is a relu (not relu6) whose fusion nothing can observe, else None."""
        producer, activation = self.activation_input(node)
        return producer if activation == "relu" else None

    def is_2d(self, node: object) -> bool:
        """Whether ``node`` is provably a 2-D tensor: a ``flatten(x, 1)`` (what a BatchNorm1d after a Linear
        needs to normalize the features; on 3-D input it normalizes dim 1), or a rank-keeping op of one."""
        if not isinstance(node, torch.fx.Node):
            return False
        module = self.module(node)
        if type(module) is torch.nn.Flatten:
            return module.start_dim == 1 and module.end_dim == -1
        if node.target in (torch.flatten, "flatten"):
            dims = (*node.args[1:], *node.kwargs.values())
            return tuple(dims) in ((1,), (1, -1))
        if type(module) in (torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout) or node.target in (tf.linear, tf.relu):
            return self.is_2d(node.args[0])
        return False

    # --------------------------------------------------------------------------------------- rewriting

    def replace_module(self, old: torch.nn.Module, new: torch.nn.Module) -> None:
        """Put ``new`` wherever ``old`` is in the hierarchy (a module registered under two names too)."""
        for parent in self.root.modules():
            for name, child in list(parent._modules.items()):
                if child is old:
                    parent._modules[name] = new
        self.names[id(new)] = self.names.get(id(old), "")

    def functional_calls(self) -> None:
        """torch functional relu/max_pool2d/linear/conv2d calls -> tvmlayers.functional's."""
        for node in self.graph.nodes:
            if node.op == "call_function" and node.target in _FUNCTIONAL:
                node.target = _FUNCTIONAL[node.target]
            elif node.op == "call_function" and node.target in _INPLACE_RELU:
                node.target, node.kwargs = tf.relu, {"inplace": True}
            elif node.op == "call_function" and node.target is F.max_pool2d_with_indices:
                node.target, node.kwargs = tf.max_pool2d, {**node.kwargs, "return_indices": True}
            elif node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
                node.op, node.target, node.kwargs = "call_function", tf.relu, {"inplace": node.target == "relu_"}
            else:
                continue
            self.report.functional.append(node.name)

    def fold_batch_norms(self) -> None:
        """An eval-mode BatchNorm after a Conv2d (Linear) into a new weight and bias of that layer, where every
        call of the layer feeds only the BatchNorm and every call of the BatchNorm reads the layer."""
        pairs = {torch.nn.BatchNorm2d: torch.nn.Conv2d, torch.nn.BatchNorm1d: torch.nn.Linear}
        for node in list(self.graph.nodes):
            norm = self.module(node)
            if type(norm) not in pairs or norm.training or norm.running_mean is None or has_forward_hooks(norm):
                continue
            if node.graph is not self.graph or len(node.args) != 1 or node.kwargs:
                continue
            layer = self.layer(node.args[0], pairs[type(norm)])
            if layer is None:
                continue
            norm_calls, layer_calls = self.calls(norm), self.calls(layer)
            if not all(self.only_user(c) in norm_calls for c in layer_calls):
                continue
            if not all(c.args[0] in layer_calls and self.is_2d_if_linear(c.args[0]) for c in norm_calls):
                continue
            self.replace_module(layer, _folded(layer, norm))
            self.replace_module(norm, torch.nn.Identity())
            for call in norm_calls:
                call.replace_all_uses_with(call.args[0])
                self.graph.erase_node(call)
            self.report.folded.append(f"{self.names[id(norm)]} <- {self.names[id(layer)]}")

    def is_2d_if_linear(self, layer_call: torch.fx.Node) -> bool:
        return type(self.module(layer_call)) is not torch.nn.Linear or self.is_2d(layer_call.args[0])

    def fuse_relus(self) -> None:
        """conv/linear -> relu or relu6, where the activation is the only user of the output, into one kernel;
        a module's calls only where every one is followed by the same activation."""
        records = {"relu": self.report.fused_relu, "relu6": self.report.fused_relu6}
        for node in list(self.graph.nodes):
            if node.graph is not self.graph:  # erased as the activation of an earlier layer call
                continue
            producer, activation = self.activation_input(node)
            if producer is None:
                continue
            if producer.op == "call_function" and producer.target in (tf.conv2d, tf.linear):
                fused = any(producer.kwargs.get(f"fuse_{name}") for name in records)
                if self.only_user(producer) is node and not fused:
                    producer.kwargs = {**producer.kwargs, f"fuse_{activation}": True}
                    self.drop(node, producer, records[activation], producer.name)
                continue
            layer = self.layer(producer, torch.nn.Conv2d, torch.nn.Linear)
            calls = self.calls(layer) if layer is not None else []
            if not calls or not all(self.activation_input(self.only_user(c)) == (c, activation) for c in calls):
                continue
            self.activation[id(layer)] = activation
            for call in calls:
                self.drop(self.only_user(call), call, records[activation] if call is calls[0] else None)

    def drop(self, node: torch.fx.Node, replacement: torch.fx.Node, record: list | None, name: str = "") -> None:
        """Erase the fused ``node``, its users reading ``replacement`` instead; note it in ``record``."""
        node.replace_all_uses_with(replacement)
        self.graph.erase_node(node)
        if record is not None:
            record.append(name or self.names[id(self.module(replacement))])

    def residual_operands(self, node: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
        """(conv call, other) pairs that ``node``, an add of two tensors, could take into the conv's kernel:
        either order, but an in-place ``a.add_(b)`` only with the conv output as ``a`` (``b`` is not
        written).  ``other`` is not a parameter or buffer: those keep their shape while the batch changes."""
        if node.kwargs or len(node.args) != 2:
            return []
        if node.op == "call_function" and node.target in _ADD or node.op == "call_method" and node.target == "add":
            orders = [node.args, node.args[::-1]]
        elif node.op == "call_method" and node.target == "add_":
            orders = [node.args]
        else:
            return []
        return [
            (conv, other)
            for conv, other in orders
            if self.layer(conv, torch.nn.Conv2d) is not None
            and isinstance(other, torch.fx.Node)
            and other is not conv
            and other.op != "get_attr"
            and self.only_user(conv) is node
        ]

    def fuse_residual_adds(self) -> None:
        """add(conv output, other) (and a relu that is the add's only user) into the conv kernel's epilogue
        (:class:`tvmlayers.nn.ConvAdd2d`), where every call of the conv allows it; the relu only where it
        follows every call."""
        for node in list(self.graph.nodes):
            if node.graph is not self.graph or not (operands := self.residual_operands(node)):
                continue
            conv = self.module(operands[0][0])
            plans = []  # per call of conv: (call, add, other, relu or None)
            for call in self.calls(conv):
                add = self.only_user(call)
                other = next((o for c, o in self.residual_operands(add) if c is call), None) if add else None
                if other is None:
                    break
                relu = self.only_user(add)
                plans.append((call, add, other, relu if relu is not None and self.relu_input(relu) is add else None))
            else:
                with_relu = all(relu is not None for *_, relu in plans)
                self.residual.add(id(conv))
                if with_relu:
                    self.activation[id(conv)] = "relu"
                for call, add, other, relu in plans:
                    with self.graph.inserting_before(add):
                        fused = self.graph.call_function(
                            conv2d_add, (self.graph.get_attr(call.target), call.args[0], other)
                        )
                    last = relu if with_relu else add
                    last.replace_all_uses_with(fused)
                    for done in (relu, add, call) if with_relu else (add, call):
                        self.graph.erase_node(done)
                self.report.fused_residual.append(self.names[id(conv)] + (" + relu" if with_relu else ""))

    def swap_layers(self) -> None:
        """Every torch layer in the hierarchy -> its tvmlayers twin (fused where decided), also inside leaf
        modules (a module with hooks is converted layer by layer inside, without graph passes); a ReLU or ReLU6
        whose every call was fused -> ``nn.Identity`` (``model`` itself, converted in place, still computes the
        same: both are idempotent)."""
        twins: dict[int, torch.nn.Module] = {}
        called = self.called_modules()
        for module in list(self.root.modules()):
            if module_activation(module) and id(module) in self.called and id(module) not in called:
                self.replace_module(module, torch.nn.Identity())
            elif type(module) in TWINS and id(module) not in twins:
                twins[id(module)] = twin(
                    module, self.target, self.activation.get(id(module)), residual=id(module) in self.residual
                )
                self.replace_module(module, twins[id(module)])


def _folded(layer: torch.nn.Conv2d | torch.nn.Linear, norm: torch.nn.modules.batchnorm._BatchNorm) -> torch.nn.Module:
    """A copy of ``layer`` computing ``norm(layer(x))`` in eval mode: weight * scale per output channel,
    (bias - mean) * scale + shift as its (always present) bias, computed in float64."""
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        weight, dtype = layer.weight.double(), layer.weight.dtype
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if layer.bias is not None:
            shift = shift + layer.bias.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        view = (-1,) + (1,) * (weight.dim() - 1)
        folded.weight = torch.nn.Parameter((weight * scale.view(view)).to(dtype), layer.weight.requires_grad)
        folded.bias = torch.nn.Parameter(shift.to(dtype), layer.weight.requires_grad)
    return folded

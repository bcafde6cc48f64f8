"""torch.nn.functional's conv2d, max_pool2d, linear and relu, running tvmlayers kernels.

Signatures are torch's, plus keyword-only ``target=`` (and ``padding_mode=`` for conv2d, which torch
only offers on the module).  Kernels are inference-only: outputs carry no autograd history.

Each op is split in two.  The *plan* (``_<op>_plan``) takes only hashable facts (shapes, dtypes,
devices, parameters, target), checks them with torch's messages and finds the compiled kernel; it is
memoized, so a layer called again with the same shapes pays a dictionary lookup, not the checks.
The per-call part only touches tensors: make them contiguous, pack the weight, allocate, call.

A conv2d/linear weight is packed once per version (``tvmlayers.layouts.packed_weight``); after writing
to it where torch cannot see (a numpy view, a raw pointer, ``weight.data.<op>_()`` on a plain tensor),
call ``refresh_weights(weight)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
import tvm

from . import layer_specs
from .build import kernel_for
from .kernel import Kernel
from .layouts import packed_weight, refresh_weights  # noqa: F401 (tl.functional.refresh_weights)
from .spec import DTYPES, KernelSpec
from .targets import TargetLike, device_type, resolve_target

__all__ = ["conv2d", "max_pool2d", "linear", "relu"]

DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
_PLAN_CACHE = 4096
JIT_UNSUPPORTED = (
    "tvmlayers layers cannot be compiled by torch.jit.{how}: their kernels are TVM functions that "
    "TorchScript cannot record. Run the model eagerly or with torch.compile (which calls the kernels "
    "as they are); ONNX export and torch.export are not supported yet."
)


class Plan(NamedTuple):
    """How calls with one set of argument facts run: memoized per (shapes, dtypes, devices, parameters,
    target), so the same object comes back for every such call (the modules rely on that identity)."""

    kernel: Kernel | None  # None: the result is empty and no kernel runs
    out_shape: tuple[int, ...]  # of the first output, in the caller's (unbatched or batched) rank
    # Views between the caller's shapes and the kernel's, None where they already agree (the usual
    # batched call): a view costs about a microsecond, a third of a small layer's whole call.
    in_view: tuple[int, ...] | None
    out_view: tuple[int, ...] | None
    # One stand-in per kernel output (a scalar expanded to its shape, dtype and device): the call
    # allocates with ``torch.empty_like(template)``, 1.1 us, where ``new_empty(shape)`` parses the
    # shape again and costs 1.7-2.9 us.
    out_templates: tuple[torch.Tensor, ...] = ()


_ARGUMENT_NAMES = {
    "conv2d": ("input", "weight", "bias"),
    "max_pool2d": ("input",),
    "linear": ("input", "weight", "bias"),
    "relu": ("input",),
}


def _facts(op: str, position: int, tensor: torch.Tensor | None) -> tuple | None:
    """The hashable facts a plan needs of one argument: (shape, dtype, device), None if absent.  Raises
    torch's TypeError for a non-tensor.  Runs on every call: kept to three attribute reads."""
    if isinstance(tensor, torch.Tensor):
        return tensor.shape, tensor.dtype, tensor.device  # torch.Size is a tuple: hashable, == tuples
    if tensor is None and position > 0:
        return None
    name = _ARGUMENT_NAMES[op][position]
    raise TypeError(f"{op}(): argument '{name}' (position {position + 1}) must be Tensor, not {type(tensor).__name__}")


def _check_types(op: str, tensors: tuple, target: tvm.target.Target) -> str:
    """Dtypes and devices of an op's tensors (their facts); returns the kernel dtype name."""
    # Every plan is made here; a traced call always makes one, since its shapes hold tensors that hash by id
    if torch.jit.is_tracing():
        raise RuntimeError(JIT_UNSUPPORTED.format(how="trace"))
    dtypes = [facts[1] for facts in tensors if facts is not None]
    devices = [facts[2] for facts in tensors if facts is not None]
    if dtypes[0] not in DTYPE_NAMES:
        raise TypeError(f"tvmlayers {op} supports {' and '.join(DTYPES)} tensors, but got {dtypes[0]}")
    for dtype in dtypes[1:]:
        if dtype != dtypes[0]:
            raise TypeError(f"expected scalar type {_scalar_name(dtypes[0])} but found {_scalar_name(dtype)}")
    distinct = list(dict.fromkeys(str(d) for d in devices))
    if len(distinct) > 1:
        raise ValueError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{distinct[0]} and {distinct[1]}!"
        )
    wanted = device_type(target)
    if devices[0].type != wanted:
        raise ValueError(
            f"{op}: the kernel for target '{target.kind.name}' works on {wanted} tensors, but got tensors on "
            f"{devices[0]}; move them with .to('{wanted}') or pass a target for that device"
        )
    return DTYPE_NAMES[dtypes[0]]


def _shapes(tensors: tuple) -> list[tuple[int, ...] | None]:
    return [None if facts is None else tuple(facts[0]) for facts in tensors]


def _scalar_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double"}.get(dtype, str(dtype).replace("torch.", ""))


def _plan(input: tuple, spec: KernelSpec | None, out_shape: tuple[int, ...]) -> Plan:
    """The plan of a call whose first tensor has the facts ``input`` (shape, dtype, device)."""
    if spec is None:
        return Plan(None, out_shape, None, None)
    in_shape, dtype, device = tuple(input[0]), input[1], input[2]
    kernel = kernel_for(spec)
    in_view = spec.input_shape if spec.input_shape != in_shape else None
    out_view = out_shape if kernel.output_shapes[0] != out_shape else None
    # the first output has the input's dtype; a second one (max_pool2d's) holds int64 indices
    dtypes = (dtype, torch.int64)
    templates = tuple(
        torch.empty((), dtype=dtypes[min(i, 1)], device=device).expand(shape)
        for i, shape in enumerate(kernel.output_shapes)
    )
    return Plan(kernel, out_shape, in_view, out_view, templates)


def _hashable(value: object) -> object:
    """Lists become tuples so that arguments can key the plan memo."""
    return tuple(value) if isinstance(value, list) else value


def _kernel_input(input: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``input`` as the kernel sees it: contiguous, batched/flattened to the spec's shape (a view if possible).
    No ``detach``: TVM reads the memory and the outputs carry no autograd history anyway."""
    input = input.contiguous()
    return input if plan.in_view is None else input.view(plan.in_view)


def _caller_view(output: torch.Tensor, plan: Plan) -> torch.Tensor:
    return output if plan.out_view is None else output.view(plan.out_view)


# ---------------------------------------------------------------------------------------------- conv2d


@lru_cache(maxsize=_PLAN_CACHE)
def _conv2d_plan(tensors: tuple, target: tvm.target.Target, *params: object) -> Plan:
    dtype = _check_types("conv2d", tensors, target)
    shapes = _shapes(tensors)
    return _plan(tensors[0], *layer_specs.conv2d_spec(*shapes, dtype, target, *params))


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    fuse_relu: bool = False,
    target: TargetLike = None,
) -> torch.Tensor:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``; input (N, C_in, H, W) or (C_in, H, W).

    ``padding_mode`` ('zeros', 'reflect', 'replicate', 'circular') pads like ``nn.Conv2d`` does;
    ``fuse_relu=True`` computes ``relu(conv2d(...))`` in one kernel.
    """
    return conv2d_with_plan(input, weight, bias, stride, padding, dilation, groups, padding_mode, target, fuse_relu)[0]


def conv2d_with_plan(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: object,
    padding: object,
    dilation: object,
    groups: int,
    padding_mode: str,
    target: TargetLike,
    fuse_relu: bool = False,
) -> tuple[torch.Tensor, Plan]:
    """``conv2d`` (followed by relu in the same kernel with ``fuse_relu``) and the plan that computed it."""
    tensors = (_facts("conv2d", 0, input), _facts("conv2d", 1, weight), _facts("conv2d", 2, bias))
    plan = _conv2d_plan(
        tensors,
        resolve_target(target),
        _hashable(stride),
        _hashable(padding),
        _hashable(dilation),
        groups,
        padding_mode,
        bool(fuse_relu),
    )
    if plan.kernel is None:
        return input.new_empty(plan.out_shape), plan
    return _run_with_weight(plan, input, weight, bias), plan


def _run_with_weight(plan: Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Call a conv2d/linear kernel: input as the kernel sees it, the weight packed once per version."""
    kernel = plan.kernel
    out = torch.empty_like(plan.out_templates[0])
    if bias is None:
        kernel.function(_kernel_input(input, plan), packed_weight(weight, kernel.weight_block), out)
    else:
        kernel.function(_kernel_input(input, plan), packed_weight(weight, kernel.weight_block), bias.contiguous(), out)
    return _caller_view(out, plan)


# ------------------------------------------------------------------------------------------ max_pool2d


@lru_cache(maxsize=_PLAN_CACHE)
def _max_pool2d_plan(tensors: tuple, target: tvm.target.Target, *params: object) -> Plan:
    dtype = _check_types("max_pool2d", tensors, target)
    (in_shape,) = _shapes(tensors)
    return _plan(tensors[0], *layer_specs.max_pool2d_spec(in_shape, dtype, target, *params))


def max_pool2d(
    input: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    *,
    target: TargetLike = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """2-D max pooling, as ``torch.nn.functional.max_pool2d``; input (N, C, H, W) or (C, H, W).

    With ``return_indices`` also returns int64 indices into each flattened H*W input plane.
    """
    outputs, _ = max_pool2d_with_plan(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, target)
    return (outputs[0], outputs[1]) if return_indices else outputs[0]


def max_pool2d_with_plan(
    input: torch.Tensor,
    kernel_size: object,
    stride: object,
    padding: object,
    dilation: object,
    ceil_mode: bool,
    return_indices: bool,
    target: TargetLike,
) -> tuple[list[torch.Tensor], Plan]:
    """[values] or [values, indices], and the plan that computed them."""
    plan = _max_pool2d_plan(
        (_facts("max_pool2d", 0, input),),
        resolve_target(target),
        _hashable(kernel_size),
        _hashable(stride),
        _hashable(padding),
        _hashable(dilation),
        bool(ceil_mode),
        bool(return_indices),
    )
    if plan.kernel is None:
        outputs = [input.new_empty(plan.out_shape), torch.empty(plan.out_shape, dtype=torch.int64)]
    else:
        outputs = [torch.empty_like(template) for template in plan.out_templates]
        plan.kernel.function(_kernel_input(input, plan), *outputs)
        outputs = [_caller_view(o, plan) for o in outputs]
    return outputs[: 2 if return_indices else 1], plan


# ---------------------------------------------------------------------------------------------- linear


@lru_cache(maxsize=_PLAN_CACHE)
def _linear_plan(tensors: tuple, target: tvm.target.Target, relu: bool) -> Plan:
    dtype = _check_types("linear", tensors, target)
    shapes = _shapes(tensors)
    return _plan(tensors[0], *layer_specs.linear_spec(*shapes, dtype, target, relu))


def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    fuse_relu: bool = False,
    target: TargetLike = None,
) -> torch.Tensor:
    """y = x W^T + b, as ``torch.nn.functional.linear``; input (*, in_features), weight (out, in).

    ``fuse_relu=True`` computes ``relu(linear(...))`` in one kernel.
    """
    return linear_with_plan(input, weight, bias, target, fuse_relu)[0]


def linear_with_plan(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: TargetLike, fuse_relu: bool = False
) -> tuple[torch.Tensor, Plan]:
    """``linear`` (followed by relu in the same kernel with ``fuse_relu``) and the plan that computed it."""
    tensors = (_facts("linear", 0, input), _facts("linear", 1, weight), _facts("linear", 2, bias))
    plan = _linear_plan(tensors, resolve_target(target), bool(fuse_relu))
    if plan.kernel is None:
        # an empty product: torch's result is empty, or just the (broadcast) bias
        out = input.new_zeros(plan.out_shape)
        out = out + bias.detach() if bias is not None else out
        return (torch.relu(out) if fuse_relu else out), plan
    return _run_with_weight(plan, input, weight, bias), plan


# ------------------------------------------------------------------------------------------------ relu


@lru_cache(maxsize=_PLAN_CACHE)
def _relu_plan(tensors: tuple, target: tvm.target.Target) -> Plan:
    dtype = _check_types("relu", tensors, target)
    (in_shape,) = _shapes(tensors)
    return _plan(tensors[0], *layer_specs.relu_spec(in_shape, dtype, target))


def relu(input: torch.Tensor, inplace: bool = False, *, target: TargetLike = None) -> torch.Tensor:
    """max(0, x) elementwise; with ``inplace=True`` the result is written into ``input``, which is returned."""
    return relu_with_plan(input, inplace, target)[0]


def relu_with_plan(input: torch.Tensor, inplace: bool, target: TargetLike) -> tuple[torch.Tensor, Plan]:
    """``relu`` and the plan that computed it."""
    plan = _relu_plan((_facts("relu", 0, input),), resolve_target(target))
    kernel = plan.kernel
    if kernel is None:
        return (input if inplace else input.clone()), plan
    if input.is_contiguous():
        source = input if plan.in_view is None else input.view(plan.in_view)
        if inplace:
            kernel.function(source, source)  # elementwise, each element read before it is written: aliasing is safe
            return input, plan
        out = torch.empty_like(source)
        kernel.function(source, out)
        return _caller_view(out, plan), plan
    # a strided view: compute on a contiguous copy, in place since the copy is ours
    result = _kernel_input(input.detach(), plan)
    kernel.function(result, result)
    if inplace:
        input.detach().copy_(_caller_view(result, plan))
        return input, plan
    return _caller_view(result, plan), plan

"""torch.nn.functional's conv2d, max_pool2d, linear and relu, running tvmlayers kernels.

Signatures are torch's, plus keyword-only ``target=`` (and ``padding_mode=`` for conv2d, which torch
only offers on the module).  Outputs follow torch's autograd: when grad mode is on and an input or
parameter requires grad, the call goes through ``tvmlayers.autograd`` (the kernel computes the output,
torch's ops the gradients); under ``torch.no_grad()``/``torch.inference_mode()``, or when nothing requires
grad, the kernel is called directly (the fast path).  ``relu(inplace=True)`` makes torch's in-place checks
and bumps the input's version.  A channels_last input gives a channels_last output where torch's does.

Each op is split in two.  The *plan* (``_<op>_plan``) takes only hashable facts (shapes, dtypes,
devices, parameters, target), checks them with torch's messages and finds the compiled kernel; it is
memoized, so a layer called again with the same shapes pays a dictionary lookup, not the checks.  For
relu and linear the two halves are public (``relu_plan``/``relu_run``, ``linear_plan``/``linear_run``):
a ``tvmlayers.nn`` module keeps its last plan and, called again alike, skips even the lookup.
The per-call part only touches tensors: make them contiguous, pack the weight, allocate, call.

A conv2d/linear weight is packed once per version (``tvmlayers.layouts.packed_weight``); after writing
to it where torch cannot see (a numpy view, a raw pointer, ``weight.data.<op>_()`` on a plain tensor),
call ``refresh_weights(weight)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from types import ModuleType
from typing import NamedTuple

import torch
import tvm
from torch.autograd.graph import increment_version
from torch.compiler import is_dynamo_compiling

from . import layer_specs
from .autograd import Layer, ReLUInPlace
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
    "TorchScript cannot record. Run the model eagerly, with torch.compile (which sees the layers "
    "as custom ops) or torch.export; ONNX export is not supported."
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
    # Whether a channels_last input gives channels_last outputs, as torch's CPU conv2d and max_pool2d do;
    # not conv2d with circular padding, whose padded copy torch makes contiguous.
    keeps_channels_last: bool = False


_ARGUMENT_NAMES = {
    "conv2d": ("input", "weight", "bias", "residual"),
    "max_pool2d": ("input",),
    "linear": ("input", "weight", "bias"),
    "relu": ("input",),
}
_KEYWORD_ONLY = ("residual",)


def traced(input: object) -> bool:
    """Whether a call is traced rather than run (dynamo, fake or functional tensors, FX proxies): then it goes
    through ``torch.ops.tvmlayers`` (``tvmlayers.torch_ops``), which tracers see as one op.  Runs on every
    eager call, so it is two cheap tests: ``is_dynamo_compiling`` is False in eager code, True to dynamo."""
    return type(input) is not torch.Tensor or is_dynamo_compiling()


def _torch_ops() -> ModuleType:
    from . import torch_ops  # noqa: PLC0415 - torch_ops builds on this module

    return torch_ops


def _facts(op: str, position: int, tensor: torch.Tensor | None) -> tuple | None:
    """The hashable facts a plan needs of one argument: (shape, dtype, device), None if absent.  Raises
    torch's TypeError for a non-tensor.  Runs on every call: kept to three attribute reads."""
    if isinstance(tensor, torch.Tensor):
        return tensor.shape, tensor.dtype, tensor.device  # torch.Size is a tuple: hashable, == tuples
    if tensor is None and position > 0:
        return None
    name = _ARGUMENT_NAMES[op][position]
    where = "" if name in _KEYWORD_ONLY else f" (position {position + 1})"
    raise TypeError(f"{op}(): argument '{name}'{where} must be Tensor, not {type(tensor).__name__}")


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
        # a CUDA kernel takes torch's CUDA tensors as they are (DLPack, zero-copy, on torch's current stream)
        other = "target='cuda' (this machine's GPU)" if devices[0].type == "cuda" else "a target for that device"
        raise ValueError(
            f"{op}: the kernel for target '{target.kind.name}' works on {wanted} tensors, but got tensors on "
            f"{devices[0]}; move them with .to('{wanted}') or pass {other}"
        )
    return DTYPE_NAMES[dtypes[0]]


def _shapes(tensors: tuple) -> list[tuple[int, ...] | None]:
    return [None if facts is None else tuple(facts[0]) for facts in tensors]


def _scalar_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double"}.get(dtype, str(dtype).replace("torch.", ""))


def _plan(input: tuple, spec: KernelSpec | None, out_shape: tuple[int, ...], keeps_channels_last: bool = False) -> Plan:
    """The plan of a call whose first tensor has the facts ``input`` (shape, dtype, device)."""
    if spec is None:
        return Plan(None, out_shape, None, None, keeps_channels_last=keeps_channels_last)
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
    return Plan(kernel, out_shape, in_view, out_view, templates, keeps_channels_last)


def blocked_plan(plan: Plan, in_block: int | None, out_block: int | None) -> Plan:
    """The plan of ``plan``'s conv2d or max_pool2d (a batched call's, whose kernel ran) with channel-blocked
    activations: the input in blocks of ``in_block`` channels, the output (and residual) in blocks of ``out_block``
    (None: NCHW; ``layer_specs.blocked_spec``).  Its shapes are the kernel's own (``out_shape`` the blocked output)."""
    spec = layer_specs.blocked_spec(plan.kernel.spec, in_block, out_block)
    kernel = kernel_for(spec)
    template, out_shape = plan.out_templates[0], kernel.output_shapes[0]
    blocked = torch.empty((), dtype=template.dtype, device=template.device).expand(out_shape)
    return Plan(kernel, out_shape, None, None, (blocked,))


def _hashable(value: object) -> object:
    """Lists become tuples so that arguments can key the plan memo."""
    return tuple(value) if isinstance(value, list) else value


# The compiled kernels may assume that their buffers start on TVM's allocation alignment, as every tensor
# torch allocates does: a view starting elsewhere (``x[1:]``) crashed the linear dot-product kernel and a
# relu writing into it.  Such a tensor is copied first.
_ALIGNMENT = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it is contiguous and starts on the kernels' alignment, else such a copy."""
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.data_ptr() % _ALIGNMENT else tensor


def _kernel_input(input: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``input`` as the kernel sees it: contiguous, aligned, batched/flattened to the spec's shape (a view if
    possible).  No ``detach``: TVM reads the memory, and autograd, where it is wanted, wraps the kernel call."""
    input = _aligned(input)
    return input if plan.in_view is None else input.view(plan.in_view)


def _caller_view(output: torch.Tensor, plan: Plan) -> torch.Tensor:
    return output if plan.out_view is None else output.view(plan.out_view)


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether torch lays out an op's result on ``tensor`` as channels_last: a 4-D NHWC-strided tensor
    that is not also contiguous (with one channel or a 1x1 plane it is both, and torch keeps NCHW)."""
    return tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)


def _channels_last_like_torch(outputs: list[torch.Tensor], plan: Plan, input: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's NCHW ``outputs`` in the memory format torch gives: channels_last when the input is, for a
    plan that keeps it.  Called only for an input that is not contiguous.  (torch's conv2d also gives
    channels_last for a channels_last weight; checking the weight on every call would cost the usual call
    a sixth of a microsecond, so here only the input decides.)"""
    if plan.keeps_channels_last and _is_channels_last(input):
        return [output.contiguous(memory_format=torch.channels_last) for output in outputs]
    return outputs


# ---------------------------------------------------------------------------------------------- conv2d


@lru_cache(maxsize=_PLAN_CACHE)
def _conv2d_plan(
    tensors: tuple,
    target: tvm.target.Target,
    stride: object,
    padding: object,
    dilation: object,
    groups: int,
    padding_mode: str,
    relu: bool,
    relu6: bool,
) -> Plan:
    # ``tensors`` ends with the residual's facts (None without one)
    input, residual = tensors[0], tensors[3]
    if residual is not None and input[1] in DTYPE_NAMES and residual[1] != input[1]:
        raise TypeError(
            f"expected scalar type {_scalar_name(input[1])} but found {_scalar_name(residual[1])} for argument "
            "'residual' (the kernel adds it to the output as it is, without type promotion)"
        )
    dtype = _check_types("conv2d", tensors, target)
    *shapes, residual_shape = _shapes(tensors)
    spec, out_shape = layer_specs.conv2d_spec(
        *shapes, dtype, target, stride, padding, dilation, groups, padding_mode, relu,
        residual=residual_shape, relu6=relu6,
    )  # fmt: skip
    return _plan(tensors[0], spec, out_shape, keeps_channels_last=padding_mode != "circular")


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
    fuse_relu6: bool = False,
    residual: torch.Tensor | None = None,
    target: TargetLike = None,
) -> torch.Tensor:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``; input (N, C_in, H, W) or (C_in, H, W).

    ``padding_mode`` ('zeros', 'reflect', 'replicate', 'circular') pads like ``nn.Conv2d`` does;
    ``fuse_relu=True`` computes ``relu(conv2d(...))`` in one kernel, ``fuse_relu6=True``
    ``relu6(conv2d(...))`` (MobileNet's activation; not both).  ``residual``, a tensor of the output's
    shape, dtype and device (no broadcasting), is added in the same kernel: ``relu?(conv2d(...) + residual)``,
    ResNet's shortcut connection.
    """
    if traced(input):
        return _torch_ops().conv2d(
            input, weight, bias, stride, padding, dilation, groups, padding_mode, fuse_relu, fuse_relu6, residual,
            target,
        )  # fmt: skip
    return conv2d_with_plan(
        input, weight, bias, stride, padding, dilation, groups, padding_mode, target, fuse_relu, residual, fuse_relu6
    )[0]


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
    residual: torch.Tensor | None = None,
    fuse_relu6: bool = False,
) -> tuple[torch.Tensor, Plan]:
    """``conv2d`` (plus ``residual``, then relu with ``fuse_relu`` or relu6 with ``fuse_relu6``, in the same
    kernel) and the plan that computed it."""
    tensors = (
        _facts("conv2d", 0, input),
        _facts("conv2d", 1, weight),
        _facts("conv2d", 2, bias),
        _facts("conv2d", 3, residual),
    )
    plan = _conv2d_plan(
        tensors,
        resolve_target(target),
        _hashable(stride),
        _hashable(padding),
        _hashable(dilation),
        groups,
        padding_mode,
        bool(fuse_relu),
        bool(fuse_relu6),
    )
    if torch.is_grad_enabled() and (
        input.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    ):
        return Layer.apply(_conv2d, plan, input, weight, bias, residual), plan
    return _conv2d(plan, input, weight, bias, residual), plan


def _conv2d(
    plan: Plan,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel's call of ``conv2d_with_plan``, in torch's memory format."""
    if plan.kernel is None:
        return input.new_empty(plan.out_shape)
    out = _run_with_weight(plan, input, weight, bias, residual)
    if not input.is_contiguous():
        (out,) = _channels_last_like_torch([out], plan, input)
    return _caller_view(out, plan)


def _run_with_weight(
    plan: Plan,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Call a conv2d/linear kernel: input as the kernel sees it, the weight packed once per version, the
    bias and the residual (in the kernel's output shape) contiguous and aligned; the output in the kernel's
    shape."""
    kernel = plan.kernel
    out_template = plan.out_templates[0]
    out = torch.empty_like(out_template)
    args = [_kernel_input(input, plan), packed_weight(weight, kernel.weight_block)]
    if bias is not None:
        args.append(_aligned(bias))
    if residual is not None:
        residual = _aligned(residual)
        args.append(residual if plan.out_view is None else residual.view(out_template.shape))
    kernel.function(*args, out)
    return out


# ------------------------------------------------------------------------------------------ max_pool2d


@lru_cache(maxsize=_PLAN_CACHE)
def _max_pool2d_plan(tensors: tuple, target: tvm.target.Target, *params: object) -> Plan:
    dtype = _check_types("max_pool2d", tensors, target)
    (in_shape,) = _shapes(tensors)
    return _plan(tensors[0], *layer_specs.max_pool2d_spec(in_shape, dtype, target, *params), keeps_channels_last=True)


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
    if traced(input):
        return _torch_ops().max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, target)
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
    if torch.is_grad_enabled() and input.requires_grad:
        outputs = list(Layer.apply(_max_pool2d, plan, input))
    else:
        outputs = _max_pool2d(plan, input)
    return outputs[: 2 if return_indices else 1], plan


def _max_pool2d(plan: Plan, input: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's call of ``max_pool2d_with_plan``: [values] or [values, indices], in torch's memory format."""
    if plan.kernel is None:
        return [input.new_empty(plan.out_shape), input.new_empty(plan.out_shape, dtype=torch.int64)]
    outputs = [torch.empty_like(template) for template in plan.out_templates]
    plan.kernel.function(_kernel_input(input, plan), *outputs)
    if not input.is_contiguous():
        outputs = _channels_last_like_torch(outputs, plan, input)
    return [_caller_view(o, plan) for o in outputs]


# ---------------------------------------------------------------------------------------------- linear


@lru_cache(maxsize=_PLAN_CACHE)
def _linear_plan(tensors: tuple, target: tvm.target.Target, relu: bool, relu6: bool) -> Plan:
    dtype = _check_types("linear", tensors, target)
    shapes = _shapes(tensors)
    return _plan(tensors[0], *layer_specs.linear_spec(*shapes, dtype, target, relu, relu6))


def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    fuse_relu: bool = False,
    fuse_relu6: bool = False,
    target: TargetLike = None,
) -> torch.Tensor:
    """y = x W^T + b, as ``torch.nn.functional.linear``; input (*, in_features), weight (out, in).

    ``fuse_relu=True`` computes ``relu(linear(...))`` in one kernel, ``fuse_relu6=True`` ``relu6(linear(...))``
    (not both).
    """
    if traced(input):
        return _torch_ops().linear(input, weight, bias, fuse_relu, fuse_relu6, target)
    plan = linear_plan(input, weight, bias, target, fuse_relu, fuse_relu6)
    return linear_run(plan, input, weight, bias, fuse_relu, fuse_relu6)


def linear_plan(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: TargetLike,
    fuse_relu: bool = False,
    fuse_relu6: bool = False,
) -> Plan:
    """The plan of ``linear`` (followed by relu or relu6 in the same kernel with ``fuse_relu``/``fuse_relu6``)
    on these tensors' facts; raises torch's errors for arguments torch refuses."""
    tensors = (_facts("linear", 0, input), _facts("linear", 1, weight), _facts("linear", 2, bias))
    return _linear_plan(tensors, resolve_target(target), bool(fuse_relu), bool(fuse_relu6))


def linear_run(
    plan: Plan,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fuse_relu: bool = False,
    fuse_relu6: bool = False,
) -> torch.Tensor:
    """``linear`` by ``plan``, which ``linear_plan`` made for tensors with these facts."""
    if plan.kernel is None:
        # an empty product, no kernel: torch's own op gives the result (empty, or the broadcast bias) and,
        # where grad is required, its gradients
        return torch_activation(torch.nn.functional.linear(input, weight, bias), fuse_relu, fuse_relu6)
    if torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return Layer.apply(_linear, plan, input, weight, bias)
    return _linear(plan, input, weight, bias)


def _linear(plan: Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's call of ``linear_run``."""
    return _caller_view(_run_with_weight(plan, input, weight, bias), plan)


def torch_activation(out: torch.Tensor, fuse_relu: bool, fuse_relu6: bool) -> torch.Tensor:
    """The fused activation done by torch's own op, where no kernel runs (the plan has already refused both)."""
    return torch.relu(out) if fuse_relu else torch.nn.functional.relu6(out) if fuse_relu6 else out


# ------------------------------------------------------------------------------------------------ relu


@lru_cache(maxsize=_PLAN_CACHE)
def _relu_plan(tensors: tuple, target: tvm.target.Target) -> Plan:
    dtype = _check_types("relu", tensors, target)
    (in_shape,) = _shapes(tensors)
    return _plan(tensors[0], *layer_specs.relu_spec(in_shape, dtype, target))


def relu(input: torch.Tensor, inplace: bool = False, *, target: TargetLike = None) -> torch.Tensor:
    """max(0, x) elementwise; with ``inplace=True`` the result is written into ``input``, which is returned."""
    if traced(input):
        return _torch_ops().relu(input, inplace, target)
    return relu_run(relu_plan(input, target), input, inplace)


def relu_plan(input: torch.Tensor, target: TargetLike) -> Plan:
    """The plan of ``relu`` on ``input``'s facts; raises torch's errors for an input torch refuses."""
    return _relu_plan((_facts("relu", 0, input),), resolve_target(target))


def relu_run(plan: Plan, input: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``relu`` by ``plan``, which ``relu_plan`` made for a tensor with ``input``'s facts."""
    if inplace:
        return _relu_inplace(plan, input)
    if input.requires_grad and torch.is_grad_enabled():
        return Layer.apply(_relu, plan, input)
    return _relu(plan, input)


# torch's messages for in-place writes it refuses
_LEAF_INPLACE = "a leaf Variable that requires grad is being used in an in-place operation."
_LEAF_VIEW_INPLACE = "a view of a leaf Variable that requires grad is being used in an in-place operation."
_INFERENCE_INPLACE = (
    "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to get a normal "
    "tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for more details."
)


def _memory_order(tensor: torch.Tensor) -> list[int] | None:
    """``tensor``'s dims from outermost to innermost in memory when its elements fill one block without gaps
    (contiguous, channels_last, a transpose), None when they do not (a sliced view)."""
    order = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    return order if tensor.permute(order).is_contiguous() else None


def _relu_memory(tensor: torch.Tensor, plan: Plan) -> torch.Tensor | None:
    """``tensor``'s own memory as the relu kernel's buffer: its elements in memory order in the kernel's
    shape (a view: elementwise, the kernel does not care which element is which); None where they have
    gaps between them (a sliced view) or do not start on the kernels' alignment."""
    if tensor.is_contiguous():
        memory = tensor if plan.in_view is None else tensor.view(plan.in_view)
    elif (order := _memory_order(tensor)) is not None:
        memory = tensor.permute(order).view(plan.kernel.spec.input_shape)
    else:
        return None
    return None if memory.data_ptr() % _ALIGNMENT else memory


def _relu(plan: Plan, input: torch.Tensor) -> torch.Tensor:
    """The kernel's call of ``relu``: a new tensor, strided like a gapless input (torch's preserve_format)."""
    kernel = plan.kernel
    if kernel is None:
        return input.clone()
    if input.is_contiguous():  # the usual call, inline
        if not input.data_ptr() % _ALIGNMENT:
            out = torch.empty_like(input)
            if plan.in_view is None:
                kernel.function(input, out)
            else:  # unbatched: the kernel's shape over the same memory
                kernel.function(input.view(plan.in_view), out.view(plan.in_view))
            return out
    elif (source := _relu_memory(input, plan)) is not None:
        out = torch.empty_like(input)  # the input's strides
        kernel.function(source, _relu_memory(out, plan))
        return out
    # gaps or off the alignment: compute on a contiguous copy, in place since the copy is ours
    result = _kernel_input(input, plan)
    kernel.function(result, result)
    return _caller_view(result, plan)


def _relu_inplace(plan: Plan, input: torch.Tensor) -> torch.Tensor:
    """``relu(input, inplace=True)`` as torch's ``relu_``: its checks before anything is written, the version
    bumped (TVM writes where autograd cannot see), and with grad required, ``input``'s history rewritten."""
    # torch's checks, in torch's order, before anything is written or bumped (autograd's own, in
    # ReLUInPlace.apply, would come after it bumps the version, and word the leaf case differently)
    tracked = torch.is_grad_enabled() and input.requires_grad
    if tracked and input._is_view():
        if torch._C._autograd._get_creation_meta(input) != torch._C._autograd.CreationMeta.DEFAULT:
            # a view autograd refuses to rebase (made under no_grad, one of unbind's outputs...): torch's own
            # relu_ raises its message, before writing
            return torch.relu_(input)
        if input._base.is_leaf:
            raise RuntimeError(_LEAF_VIEW_INPLACE)
    elif tracked and input.is_leaf:
        raise RuntimeError(_LEAF_INPLACE)
    if input.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_INPLACE)
    kernel = plan.kernel
    memory = relu_copy = None  # input's own memory as the kernel's buffer; or its relu in a contiguous copy
    if kernel is not None:
        memory = _relu_memory(input, plan)
        if memory is None:  # compute on a contiguous copy, copied back below
            relu_copy = _kernel_input(input.detach(), plan)
            kernel.function(relu_copy, relu_copy)
    if tracked:
        ReLUInPlace.apply(input, relu_copy)  # version and history, before the write
    else:
        increment_version(input)  # no write can fail from here on
    if memory is not None:
        kernel.function(memory, memory)  # elementwise, each element read before it is written: aliasing is safe
    elif relu_copy is not None:
        input.detach().copy_(relu_copy.view(input.shape))
    return input

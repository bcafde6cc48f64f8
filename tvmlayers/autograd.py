"""Autograd for the tvmlayers ops: the compiled kernels compute the forward pass, torch's own ops the gradients.

``tvmlayers.functional`` comes here only when grad mode is on and a tensor requires grad; under
``torch.no_grad()``/``torch.inference_mode()`` (or with nothing requiring grad) it calls the kernels directly.

Backward recomputes the layer with torch (``verify.torch_reference``, the oracle of every correctness
check: nn.Conv2d's padding modes, 'same' padding, groups, dilation, ceil_mode, the fused residual and
relu) and asks autograd for that graph's gradients.  The recomputation costs one torch forward pass per
backward; in exchange the gradients are torch's by construction, and with ``create_graph=True`` they are themselves
differentiable (double backward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .verify import torch_reference

if TYPE_CHECKING:
    from .functional import Plan
    from .spec import KernelSpec


class Layer(torch.autograd.Function):
    """One call of a tvmlayers op: ``Layer.apply(run, plan, *tensors)`` returns ``run(plan, *tensors)``
    (one output, or a list of outputs whose first one alone is differentiable: max_pool2d's indices)."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., Any], plan: Plan, *tensors: torch.Tensor | None) -> Any:
        outputs = run(plan, *tensors)
        ctx.spec = None if plan.kernel is None else plan.kernel.spec  # None: the output is empty
        ctx.save_for_backward(*tensors)
        if isinstance(outputs, list):
            ctx.mark_non_differentiable(*outputs[1:])
            return tuple(outputs)
        return outputs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, None, *gradients(ctx.spec, ctx.saved_tensors, ctx.needs_input_grad[2:], grad))


def gradients(
    spec: KernelSpec | None, tensors: Sequence[torch.Tensor | None], needed: Sequence[bool], grad: torch.Tensor
) -> list[torch.Tensor | None]:
    """The gradients of one call's ``tensors`` (input, weight, bias, residual, as given) where ``needed``, None
    elsewhere, for the gradient ``grad`` of its first output; ``spec`` None: the output is empty.  Shared by
    :class:`Layer` and the custom ops' autograd formula (``tvmlayers.torch_ops``)."""
    wanted = [t for t, need in zip(tensors, needed, strict=True) if need]
    if spec is None:  # an empty output: no element of any input reaches it
        found = [torch.zeros_like(t) for t in wanted]
    else:
        create_graph = torch.is_grad_enabled()
        if not create_graph:
            # Recompute on detached copies: with the saved tensors themselves, autograd.grad would also follow
            # their history where one input derives from another (ResNet's identity shortcut: the residual is
            # the conv input's ancestor), running the earlier layers' backward here and again in the caller's
            # pass (which then fails: their saved tensors are freed) and counting that gradient twice.
            tensors = [
                t if t is None else t.detach().requires_grad_(need) for t, need in zip(tensors, needed, strict=True)
            ]
            wanted = [t for t, need in zip(tensors, needed, strict=True) if need]
        x, weight, bias, residual = (*tensors, None, None, None)[:4]
        # Backward runs with grad mode off unless create_graph; the recomputed graph needs it on.  With
        # create_graph the saved tensors keep their own history, so that the gradients are differentiable.
        with torch.enable_grad():
            out = torch_reference(spec, x, weight, bias, residual)[0]
        found = torch.autograd.grad(out, wanted, grad, create_graph=create_graph)
    found = iter(found)
    return [next(found) if need else None for need in needed]


class ReLUInPlace(torch.autograd.Function):
    """``ReLUInPlace.apply(input, relu_copy)`` declares ``input`` overwritten by its relu and returns it;
    the caller has made torch's in-place checks and writes the relu into ``input`` after ``apply`` returns.

    ``apply`` bumps ``input``'s version and rewrites its history (through the base, for a view).  Backward
    needs the relu's output: ``relu_copy`` where the caller computes it in a copy (and copies it back,
    bumping the version again), else ``input`` itself, saved at the version ``apply`` gives it, which the
    kernel's write does not bump.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, relu_copy: torch.Tensor | None) -> torch.Tensor:
        ctx.mark_dirty(input)
        ctx.save_for_backward(input if relu_copy is None else relu_copy)
        return input

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (output,) = ctx.saved_tensors
        # torch's ReluBackward0 (grad where the output is positive), itself differentiable in grad
        return torch.ops.aten.threshold_backward(grad, output, 0), None

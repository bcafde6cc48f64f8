"""What every tvmlayers module shares: a target, and the kernels it ran, by input shape."""

from __future__ import annotations

import math

import torch
from torch.nn import Parameter, init

from ..functional import Plan
from ..kernel import Kernel
from ..targets import TargetLike


class CompiledLayer(torch.nn.Module):
    """Mixin state of the tvmlayers modules: ``target`` (None = host CPU) and ``kernels``."""

    target: TargetLike

    def _init_compiled(self, target: TargetLike) -> None:
        self.target = target
        # input shape -> the compiled kernel that ran it, with its spec and schedule provenance
        self.kernels: dict[tuple[int, ...], Kernel] = {}
        self._last_plan: Plan | None = None

    def _init_parameters(
        self, weight_shape: tuple[int, ...], bias: bool, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> None:
        """``weight`` and optional ``bias`` (one per output channel/feature) as torch creates them."""
        factory = {"device": device, "dtype": dtype}
        self.weight = Parameter(torch.empty(weight_shape, **factory))
        if bias:
            self.bias = Parameter(torch.empty(weight_shape[0], **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialization of Conv2d and Linear, call for call, so that a seed gives torch's weights:
        kaiming_uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def _remember(self, input: torch.Tensor, plan: Plan) -> None:
        # A plan is one object per input shape (and dtype, device): the same plan as last call means
        # this shape is recorded already, an identity test instead of hashing the shape (0.4 us a call).
        if plan is not self._last_plan:
            if plan.kernel is not None:
                self.kernels[input.shape] = plan.kernel  # torch.Size: a tuple, without tuple()'s copy
            self._last_plan = plan

    def _with_target(self, extra_repr: str) -> str:
        """``extra_repr`` with ``target=...`` appended when one was given."""
        target = "" if self.target is None else f"target={self.target!r}"
        return ", ".join(part for part in (extra_repr, target) if part)

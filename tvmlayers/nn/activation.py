"""tvmlayers.nn.ReLU: torch.nn.ReLU's surface, computed by a compiled TVM kernel."""

from __future__ import annotations

import torch

from .. import functional as F
from .. import torch_ops
from ..targets import TargetLike
from ._base import CompiledLayer


class ReLU(CompiledLayer):
    r"""Applies the rectified linear unit function element-wise: :math:`\text{ReLU}(x) = (x)^+ = \max(0, x)`.

    Args:
        inplace: write the result into the input's memory and return the input. Default: ``False``
        target: keyword-only, where the kernel runs (default: the host CPU)

    Shape:
        - Input: :math:`(*)`, any number of dimensions.
        - Output: :math:`(*)`, same shape as the input.
    """

    __constants__ = ["inplace"]

    def __init__(self, inplace: bool = False, *, target: TargetLike = None) -> None:
        super().__init__()
        self.inplace = inplace
        self._init_compiled(target)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if F.traced(input):  # one torch.ops.tvmlayers op in the tracer's graph
            return torch_ops.relu(input, self.inplace, self.target)
        plan = self._memoized_plan(input)
        if plan is None:
            plan = self._remember(input, F.relu_plan(input, self.target))
        return F.relu_run(plan, input, self.inplace)

    def extra_repr(self) -> str:
        return self._with_target("inplace=True" if self.inplace else "")

    @classmethod
    def from_torch(cls, module: torch.nn.ReLU, target: TargetLike = None) -> ReLU:
        return cls(module.inplace, target=target)

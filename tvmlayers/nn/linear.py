"""tvmlayers.nn.Linear: torch.nn.Linear's surface, computed by a compiled TVM kernel."""

from __future__ import annotations

import torch

from .. import functional as F
from .. import torch_ops
from ..targets import TargetLike
from ._base import CompiledLayer


class Linear(CompiledLayer):
    r"""Applies a linear transformation to the incoming data: :math:`y = xA^T + b`.

    Same constructor, parameters, initialization and ``state_dict`` keys as :class:`torch.nn.Linear`,
    plus keyword-only ``target``.

    Shape:
        - Input: :math:`(*, H_{in})`, :math:`*` any number of dimensions including none.
        - Output: :math:`(*, H_{out})`, :math:`H_{out} = \text{out\_features}`.

    Attributes:
        weight: :math:`(\text{out\_features}, \text{in\_features})`, from :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`,
            :math:`k = \frac{1}{\text{in\_features}}`
        bias: :math:`(\text{out\_features})`, same distribution, if ``bias=True``.

    Examples::

        >>> m = Linear(20, 30)
        >>> m(torch.randn(128, 20)).size()
        torch.Size([128, 30])
    """

    _fuse_relu = False  # LinearReLU: the relu that follows runs in the same kernel
    _fuse_relu6 = False  # LinearReLU6: the relu6 that follows runs in the same kernel

    __constants__ = ["in_features", "out_features"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        target: TargetLike = None,
    ) -> None:
        super().__init__()
        if in_features < 0 or out_features < 0:
            raise ValueError(
                f"Trying to create tensor with negative dimension {min(in_features, out_features)}: "
                f"[{out_features}, {in_features}]"
            )
        self.in_features = in_features
        self.out_features = out_features
        self._init_compiled(target)
        self._init_parameters((out_features, in_features), bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if F.traced(input):  # one torch.ops.tvmlayers op in the tracer's graph (its own parameter reads, too)
            return torch_ops.linear(input, self.weight, self.bias, self._fuse_relu, self._fuse_relu6, self.target)
        weight, bias = self._weight_and_bias()
        plan = self._memoized_plan(input, weight, bias)
        if plan is None:
            plan = F.linear_plan(input, weight, bias, self.target, self._fuse_relu, self._fuse_relu6)
            self._remember(input, plan, weight, bias)
        return F.linear_run(plan, input, weight, bias, self._fuse_relu, self._fuse_relu6)

    def extra_repr(self) -> str:
        return self._with_target(
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )

    @classmethod
    def from_torch(cls, module: torch.nn.Linear, target: TargetLike = None) -> Linear:
        new = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
            target=target,
        )
        new.load_state_dict(module.state_dict())
        return new

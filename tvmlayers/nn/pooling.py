"""tvmlayers.nn.MaxPool2d: torch.nn.MaxPool2d's surface, computed by a compiled TVM kernel."""

from __future__ import annotations

import torch

from .. import functional as F
from .. import torch_ops
from ..targets import TargetLike
from ._base import CompiledLayer


class MaxPool2d(CompiledLayer):
    r"""Applies a 2D max pooling over an input signal composed of several input planes.

    Same constructor and behaviour as :class:`torch.nn.MaxPool2d` (implicit -inf padding, ``stride``
    defaulting to ``kernel_size``, dilation, ``ceil_mode`` where a last window starting in the right
    padding is dropped, ``return_indices`` with indices into each flattened :math:`H \times W` input
    plane), plus keyword-only ``target``.

    Shape:
        - Input: :math:`(N, C, H_{in}, W_{in})` or :math:`(C, H_{in}, W_{in})`
        - Output: :math:`(N, C, H_{out}, W_{out})` or :math:`(C, H_{out}, W_{out})`, where

          .. math::
              H_{out} = \left\lfloor\frac{H_{in} + 2 * \text{padding[0]} - \text{dilation[0]}
                    \times (\text{kernel\_size[0]} - 1) - 1}{\text{stride[0]}} + 1\right\rfloor

          (ceil instead of floor with ``ceil_mode=True``) and likewise for :math:`W_{out}`.

    Examples::

        >>> m = MaxPool2d(3, stride=2)
        >>> output = m(torch.randn(20, 16, 50, 32))
    """

    __constants__ = ["kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"]

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        *,
        target: TargetLike = None,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if (stride is not None) else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode
        self._init_compiled(target)

    def forward(self, input: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if F.traced(input):  # one torch.ops.tvmlayers op in the tracer's graph
            return torch_ops.max_pool2d(
                input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                self.return_indices, self.target,
            )  # fmt: skip
        outputs, plan = F.max_pool2d_with_plan(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
            self.return_indices,
            target=self.target,
        )
        self._remember(input, plan)
        return (outputs[0], outputs[1]) if self.return_indices else outputs[0]

    def extra_repr(self) -> str:
        return self._with_target(
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )

    @classmethod
    def from_torch(cls, module: torch.nn.MaxPool2d, target: TargetLike = None) -> MaxPool2d:
        return cls(
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.return_indices,
            module.ceil_mode,
            target=target,
        )

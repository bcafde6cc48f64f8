"""tvmlayers.nn.Conv2d: torch.nn.Conv2d's surface, computed by a compiled TVM kernel."""

from __future__ import annotations

import torch

from .. import functional as F
from .. import torch_ops
from ..ops import shapes
from ..targets import TargetLike
from ._base import CompiledLayer


class Conv2d(CompiledLayer):
    r"""Applies a 2D convolution over an input signal composed of several input planes.

    Same constructor, parameters, initialization and ``state_dict`` keys as :class:`torch.nn.Conv2d`,
    plus keyword-only ``target`` (a preset name such as ``"host"``, a TVM tag, a target dict or a
    ``tvm.target.Target``; default: the host CPU).  The kernel is compiled per input shape on first use
    and cached on disk.  Differentiable like ``torch.nn.Conv2d`` (see ``tvmlayers.autograd``); under
    ``torch.no_grad()``/``torch.inference_mode()`` the kernel is called without autograd.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`, where

          .. math::
              H_{out} = \left\lfloor\frac{H_{in}  + 2 \times \text{padding}[0] - \text{dilation}[0]
                        \times (\text{kernel\_size}[0] - 1) - 1}{\text{stride}[0]} + 1\right\rfloor

          and likewise for :math:`W_{out}` with index 1.  ``padding='same'`` keeps :math:`H, W` (stride 1
          only); when :math:`\text{dilation} \times (\text{kernel\_size} - 1)` is odd the extra row/column
          of padding goes to the bottom/right, as in torch.

    Attributes:
        weight (Tensor): :math:`(\text{out\_channels}, \frac{\text{in\_channels}}{\text{groups}},
            \text{kernel\_size[0]}, \text{kernel\_size[1]})`, initialized from
            :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`, :math:`k = \frac{groups}{C_\text{in} * \prod \text{kernel\_size}}`
        bias (Tensor): :math:`(\text{out\_channels})`, same distribution, if ``bias=True``.
        kernels (dict): input shape -> :class:`tvmlayers.kernel.Kernel` that ran it (spec, provenance).

    Examples::

        >>> m = Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1))
        >>> output = m(torch.randn(20, 16, 50, 100))
    """

    _fuse_relu = False  # ConvReLU2d: the relu that follows runs in the same kernel
    _fuse_relu6 = False  # Conv2dReLU6: the relu6 that follows runs in the same kernel

    __constants__ = [
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "in_channels",
        "out_channels",
        "kernel_size",
    ]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        target: TargetLike = None,
    ) -> None:
        super().__init__()
        kernel_size_ = shapes.pair(kernel_size, "kernel_size")
        stride_ = shapes.pair(stride, "stride")
        padding_ = padding if isinstance(padding, str) else shapes.pair(padding, "padding")
        dilation_ = shapes.pair(dilation, "dilation")
        shapes.check_conv_module_args(in_channels, out_channels, groups, padding_, stride_, padding_mode)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size_
        self.stride = stride_
        self.padding = padding_
        self.dilation = dilation_
        self.groups = groups
        self.padding_mode = padding_mode
        self._init_compiled(target)
        self._init_parameters((out_channels, in_channels // groups, *kernel_size_), bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv(input, None)

    def _conv(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The layer's kernel on ``input`` (plus ``residual`` in its epilogue, for the fused subclasses)."""
        if F.traced(input):  # one torch.ops.tvmlayers op in the tracer's graph
            return torch_ops.conv2d(
                input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                self.padding_mode, self._fuse_relu, self._fuse_relu6, residual, self.target,
            )  # fmt: skip
        weight, bias = self._weight_and_bias()
        out, plan = F.conv2d_with_plan(
            input,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            padding_mode=self.padding_mode,
            target=self.target,
            fuse_relu=self._fuse_relu,
            residual=residual,
            fuse_relu6=self._fuse_relu6,
        )
        self._remember(input, plan)
        return out

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return self._with_target(s)

    @classmethod
    def from_torch(cls, module: torch.nn.Conv2d, target: TargetLike = None) -> Conv2d:
        """A tvmlayers Conv2d with the configuration and a copy of the parameters of ``module``."""
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device=module.weight.device,
            dtype=module.weight.dtype,
            target=target,
        )
        new.load_state_dict(module.state_dict())
        return new

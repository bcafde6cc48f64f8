"""What every tvmlayers module shares: a target, and the kernels it ran, by input shape."""

from __future__ import annotations

import torch

from ..kernel import Kernel
from ..targets import TargetLike


class CompiledLayer(torch.nn.Module):
    """Mixin state of the tvmlayers modules: ``target`` (None = host CPU) and ``kernels``."""

    target: TargetLike

    def _init_compiled(self, target: TargetLike) -> None:
        self.target = target
        # input shape -> the compiled kernel that ran it, with its spec and schedule provenance
        self.kernels: dict[tuple[int, ...], Kernel] = {}

    def _remember(self, input: torch.Tensor, kernel: Kernel | None) -> None:
        if kernel is not None:
            self.kernels[tuple(input.shape)] = kernel

    def _with_target(self, extra_repr: str) -> str:
        """``extra_repr`` with ``target=...`` appended when one was given."""
        target = "" if self.target is None else f"target={self.target!r}"
        return ", ".join(part for part in (extra_repr, target) if part)

"""What every tvmlayers module shares: a target, and the kernels it ran, by input shape."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import Parameter, init

from ..functional import JIT_UNSUPPORTED, Plan
from ..kernel import Kernel
from ..layouts import track_data_writes
from ..targets import TargetLike


class CompiledLayer(torch.nn.Module):
    """Mixin state of the tvmlayers modules: ``target`` (None = host CPU) and ``kernels``.

    ``weight`` is a ``tvmlayers.layouts.TrackedParameter``, however it gets in (construction, assignment, ``.to()``,
    unpickling), so that ``.data`` writes reach its packed copy.  Kernels are not state: pickling and
    ``copy.deepcopy`` drop them and the next call loads them from the kernel cache.
    """

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

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        # nn.Module.__setattr__ and load_state_dict(assign=True) come through here
        if name == "weight":
            track_data_writes(param)
        super().register_parameter(name, param)

    def _apply(self, fn: Any, recurse: bool = True) -> CompiledLayer:
        # .to()/.double() may put new plain Parameters into _parameters directly (torch.__future__ options)
        super()._apply(fn, recurse)
        track_data_writes(self._parameters.get("weight"))
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Loaded kernels hold TVM functions, which neither pickle nor deepcopy; they are a cache, not state.
        state = self.__dict__.copy()
        state["kernels"] = {}
        state["_last_plan"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Parameter.__reduce_ex__ rebuilds a plain Parameter
        track_data_writes(self._parameters.get("weight"))

    def __prepare_scriptable__(self) -> CompiledLayer:
        # torch.jit.script calls this on every module of a model before compiling it; tracing is refused
        # where a plan is made (tvmlayers.functional), since a traced call never hits the plan memo
        raise RuntimeError(JIT_UNSUPPORTED.format(how="script"))

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

"""What every tvmlayers module shares: a target, and the kernels it ran, by input shape."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import Parameter, init

from ..functional import JIT_UNSUPPORTED, Plan
from ..kernel import Kernel
from ..targets import TargetLike


class TrackedParameter(Parameter):
    """The ``weight`` of the tvmlayers modules: a ``Parameter`` whose ``.data`` is ``detach()``.

    torch gives ``p.data`` a version counter of its own, so ``p.data.zero_()`` (EMA updates, weight
    clipping, old init code) leaves ``p._version`` unchanged and the packed copy of the weight, which is
    memoized per version (``tvmlayers.layouts.packed_weight``), would go stale.  ``detach()`` shares the
    version counter, so such writes are seen like any in-place write.  The autograd consequence is
    torch's for in-place writes: a ``.data`` write between a forward that saved the weight and its
    backward now raises at backward instead of silently using the new values.

    Only weights are tracked: the bias is read on every call, it has no packed copy to go stale, and each
    attribute read of a ``Parameter`` subclass costs 0.1 us more than of a ``Parameter`` (torch looks
    for ``__torch_function__`` on every access but to its own two classes).
    """

    @property
    def data(self) -> torch.Tensor:
        return self.detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        torch._C.TensorBase.data.__set__(self, value)
        # A new storage changes data_ptr, which the memo keys on, but a storage freed earlier can come back
        # at the same address: a new version rules that out.
        torch.autograd.graph.increment_version(self)

    def __repr__(self) -> str:
        # torch's repr of a Parameter subclass names the subclass twice; print what nn.Conv2d prints
        return Parameter.__repr__(torch.Tensor._make_subclass(Parameter, self.detach(), self.requires_grad))


def track_data_writes(param: Parameter | None) -> None:
    """Make a plain ``Parameter`` a ``TrackedParameter`` in place, keeping its identity (weight tying,
    optimizers holding it).  Other ``Parameter`` subclasses are left as they are: ``tl.refresh_weights``
    after their ``.data`` writes."""
    if type(param) is Parameter:
        param.__class__ = TrackedParameter


class CompiledLayer(torch.nn.Module):
    """Mixin state of the tvmlayers modules: ``target`` (None = host CPU) and ``kernels``.

    ``weight`` is a ``TrackedParameter``, however it gets in (construction, assignment, ``.to()``,
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

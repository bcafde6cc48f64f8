"""What every tvmlayers module shares: a target, and the kernels it ran, by input shape."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import Parameter, init

from .. import layouts
from ..functional import JIT_UNSUPPORTED, Plan
from ..kernel import Kernel
from ..layouts import track_data_writes
from ..targets import TargetLike

_tracing_state = torch._C._get_tracing_state  # bound once: read on every call

# How many times any tvmlayers module forgot its memo for a change of its state (attribute set or deleted,
# parameter registered, ``.to()``, unpickling): ``tvmlayers.executor``'s recorded programs compare it once per
# call instead of checking each module.
module_changes = 0


def _forget_memo(module: torch.nn.Module) -> None:
    global module_changes
    module.__dict__["_memo"] = None
    module_changes += 1


class CompiledLayer(torch.nn.Module):
    """Mixin state of the tvmlayers modules: ``target`` (None = host CPU) and ``kernels``.

    A module remembers its last plan with the input facts and the parameter tensors it was made for
    (``_memo``), so that a module called again on an input of the same shape, dtype and device skips the plan
    lookup (hashing the facts and the target costs a small layer a fifth of its call).  Everything else a
    plan depends on is the module's own state, so any change to it forgets the memo: an attribute set or
    deleted (``target``, ``inplace``, ``stride``, a new ``weight`` or ``bias``, ``load_state_dict(assign=True)``),
    ``.to()`` and friends, unpickling, and a ``.data`` assignment to a weight
    (``tvmlayers.layouts.data_assignments``).  A ``.data`` assignment to a bias (a plain ``Parameter``, see
    ``TrackedParameter``) is not seen: a bias of another shape, dtype or device then fails the kernel's own
    argument check (ValueError, TypeError) instead of raising torch's message; it never computes.  Only
    modules whose plan depends on nothing else per call look the memo up (ReLU, Linear): a conv2d plan also
    depends on the fused modules' ``residual``, so Conv2d (like MaxPool2d) only records its kernels.

    ``weight`` is a ``tvmlayers.layouts.TrackedParameter``, however it gets in (construction, assignment, ``.to()``,
    unpickling), so that ``.data`` writes reach its packed copy.  Kernels are not state: pickling and
    ``copy.deepcopy`` drop them and the next call loads them from the kernel cache.
    """

    target: TargetLike

    def _init_compiled(self, target: TargetLike) -> None:
        self.target = target
        # input shape -> the compiled kernel that ran it, with its spec and schedule provenance
        self.kernels: dict[tuple[int, ...], Kernel] = {}
        # (input shape, dtype, device, layouts.data_assignments, plan, weight, bias) of the last call: one
        # tuple, read once per call, so that a thread never pairs one call's facts with another call's plan
        self._memo: tuple | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        _forget_memo(self)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        _forget_memo(self)

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
        _forget_memo(self)

    def _apply(self, fn: Any, recurse: bool = True) -> CompiledLayer:
        # .to()/.double() may put new plain Parameters into _parameters directly (torch.__future__ options)
        super()._apply(fn, recurse)
        track_data_writes(self._parameters.get("weight"))
        _forget_memo(self)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Loaded kernels hold TVM functions, which neither pickle nor deepcopy; they are a cache, not state.
        state = self.__dict__.copy()
        state["kernels"] = {}
        state["_memo"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _forget_memo(self)  # also for pickles made before the memo existed
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

    def _weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``self.weight, self.bias``, read from ``_parameters`` where they are registered there: through
        ``Module.__getattr__`` each costs a small layer's call 0.6 us.  A parametrized weight
        (``torch.nn.utils.parametrize``) is not registered there, and comes from its property."""
        parameters = self._parameters
        if "weight" in parameters and "bias" in parameters:
            return parameters["weight"], parameters["bias"]
        return self.weight, self.bias

    def _memoized_plan(
        self, input: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> Plan | None:
        """The plan of the last call when ``input`` has its facts, ``weight`` and ``bias`` are its tensors
        (``torch.func.functional_call`` swaps parameters without an attribute set) and nothing changed since,
        else None."""
        memo = self._memo
        if (
            memo is not None
            # torch.jit.trace gives shapes of tensors, which compare equal to ints: it must make a plan, which
            # refuses it (tvmlayers.functional)
            and not _tracing_state()
            and input.shape == memo[0]
            and input.dtype is memo[1]
            and input.device == memo[2]
            and layouts.data_assignments == memo[3]
            and weight is memo[5]
            and bias is memo[6]
        ):
            return memo[4]
        return None

    def _remember(
        self, input: torch.Tensor, plan: Plan, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> Plan:
        """Record ``plan``'s kernel by input shape and memoize it for the next call; returns ``plan``."""
        # A plan is one object per input shape (and dtype, device): the same plan as last call means
        # this shape is recorded already, an identity test instead of hashing the shape (0.4 us a call).
        memo = self._memo
        if memo is None or plan is not memo[4] or weight is not memo[5] or bias is not memo[6]:
            if plan.kernel is not None:
                self.kernels[input.shape] = plan.kernel  # torch.Size: a tuple, without tuple()'s copy
            # not through __setattr__, which forgets the memo
            self.__dict__["_memo"] = (
                input.shape, input.dtype, input.device, layouts.data_assignments, plan, weight, bias
            )  # fmt: skip
        return plan

    def _with_target(self, extra_repr: str) -> str:
        """``extra_repr`` with ``target=...`` appended when one was given."""
        target = "" if self.target is None else f"target={self.target!r}"
        return ", ".join(part for part in (extra_repr, target) if part)

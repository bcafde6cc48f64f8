"""The schedule-rule and rule-family interfaces (as in TVM's s_tir.dlight) and small helpers the rules share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV, SBlockRV


class ScheduleRule(Protocol):
    """A rule inspects an unscheduled PrimFunc and returns a Schedule for it, or None if it does not apply.

    ``tunable=True`` asks for a search space: tile sizes become sampling instructions that MetaSchedule
    can explore instead of the fixed choices of the default schedule.
    """

    name: str

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> Schedule | None: ...


class RuleFamily(Protocol):
    """Rules written for a kind of target, which declares the targets it serves (dlight's
    ``is_target_available``): the dispatcher asks each family instead of matching target triples itself."""

    name: str
    rules: Sequence[ScheduleRule]

    def is_target_available(self, target: tvm.target.Target) -> bool: ...


def op_of(func: tvm.tirx.PrimFunc) -> str | None:
    attrs = func.attrs
    return str(attrs["tvmlayers.op"]) if attrs is not None and "tvmlayers.op" in attrs else None


def input_dtype(func: tvm.tirx.PrimFunc) -> str:
    """The element type of the kernel's first input (all our kernels compute in their input's type)."""
    return str(func.params[0].dtype)


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def block_extents(sch: Schedule, name: str) -> list[int]:
    """The extent of each iteration dimension of block ``name``, in the order of its compute."""
    return [int(v.dom.extent) for v in sch.get(sch.get_sblock(name)).iter_vars]


def has_block(sch: Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM reports a missing block with its own error type
        return False
    return True


def inner_loops(sch: Schedule, block: SBlockRV, outer: int, names: list[str]) -> dict[str, LoopRV]:
    """Name the loops that ``compute_at(..., preserve_unit_loops=True)`` made for ``block``.

    Below its first ``outer`` loops the block then has one loop per iteration dimension, in order, even
    where the extent is 1: the number of loops never depends on tile sizes, which keeps traces with
    sampled tile sizes replayable.
    """
    loops = sch.get_loops(block)[outer:]
    if len(loops) != len(names):
        raise RuntimeError(f"expected loops {names} under the compute_at point, found {len(loops)}")
    return dict(zip(names, loops, strict=True))


def parallel_outer(sch: Schedule, block_name: str, count: int) -> None:
    """Fuse the ``count`` outermost loops of a block and run them on the thread pool."""
    loops = sch.get_loops(sch.get_sblock(block_name))
    sch.parallel(sch.fuse(*loops[:count]) if count > 1 else loops[0])

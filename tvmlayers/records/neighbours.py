"""Nearest shapes: the tuned workload closest to an untuned one, and its schedule re-fitted to the new shape.

Two workloads are neighbours when they are of the same op class, the things a schedule's structure depends
on: the op and dtype, and for conv2d the kernel size, stride, dilation, kind of groups (dense, depthwise,
grouped) and padding mode; for max_pool2d its window, stride, dilation, ceil_mode and indices; for linear
and relu the rank.  Among those the distance counts how far the sizes are (|log2| of each ratio: batch,
channels, height, width, features) and what differs in the epilogue (bias, activation, residual) or the
padding, which adds or removes a stage of the kernel.

A trace's ``SamplePerfectTile`` decisions are factors of the loop extents of the shape it was tuned on;
re-fitting replays the trace on the new workload and replaces each by factors of the new extent, the
innermost ones (the register tile) kept as close to the tuned ones as the new extent allows.  Fixed
splits, unrolls and annotations replay as they are.  The result is a trace of the new workload, checked
against torch and timed like any candidate (:mod:`tvmlayers.records.travel`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import tvm

from .. import ops, schedules
from ..spec import KernelSpec
from .apply import RecordError
from .database import TuningRecord, workload_hash

MAX_DISTANCE = 4.0  # e.g. twice the channels in and out and half the height and width: what a build tries
EPILOGUE_COST = 0.5  # a bias, activation or residual more or less: one write-back stage differs
PADDING_COST = 1.0  # padding or none: a padding stage appears or goes


def op_class(spec: KernelSpec) -> tuple:
    """What two workloads must share for one's schedule to fit the other."""
    p = dict(spec.params)
    if spec.op == "conv2d":
        in_per_group, groups = p["weight_shape"][1], p["groups"]
        kind = "dense" if groups == 1 else "depthwise" if in_per_group == 1 else "grouped"
        return ("conv2d", spec.dtype, tuple(p["weight_shape"][2:]), p["stride"], p["dilation"], kind, p["padding_mode"])
    if spec.op == "max_pool2d":
        return (
            "max_pool2d",
            spec.dtype,
            p["kernel_size"],
            p["stride"],
            p["dilation"],
            p["ceil_mode"],
            p["return_indices"],
        )
    return (spec.op, spec.dtype, len(spec.input_shape))


def _sizes(spec: KernelSpec) -> tuple[int, ...]:
    p = dict(spec.params)
    if spec.op == "conv2d":
        n, c, h, w = spec.input_shape
        return (n, c, p["weight_shape"][0], h, w)
    if spec.op == "linear":
        return (math.prod(spec.input_shape[:-1]), spec.input_shape[-1], p["weight_shape"][0])
    return tuple(spec.input_shape)


def _epilogue(spec: KernelSpec) -> tuple:
    return tuple(bool(spec.get(name, False)) for name in ("bias", "relu", "relu6", "residual"))


def _padded(spec: KernelSpec) -> bool:
    return any(spec.get("padding", ())) if spec.op in ("conv2d", "max_pool2d") else False


def distance(a: KernelSpec, b: KernelSpec) -> float:
    """How far apart two workloads are (``math.inf`` for different op classes); 0 for the same shape."""
    if op_class(a) != op_class(b):
        return math.inf
    sizes = sum(abs(math.log2(x / y)) for x, y in zip(_sizes(a), _sizes(b), strict=True) if x and y)
    epilogue = EPILOGUE_COST * sum(x != y for x, y in zip(_epilogue(a), _epilogue(b), strict=True))
    padding = PADDING_COST * (_padded(a) != _padded(b))
    return sizes + epilogue + padding


def nearest(spec: KernelSpec, tuned: Iterator[KernelSpec]) -> list[tuple[float, KernelSpec]]:
    """The tuned workloads within ``MAX_DISTANCE`` of ``spec``, nearest first."""
    found = [(distance(spec, other), other) for other in tuned]
    return sorted(((d, s) for d, s in found if d <= MAX_DISTANCE), key=lambda pair: pair[0])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def refit_tile(extent: int, tuned: list[int], max_innermost: int) -> list[int]:
    """Factors of ``extent``, as many as ``tuned`` has, each inner one the divisor of what is left nearest to
    the tuned factor (a smaller one on a tie), the innermost at most ``max_innermost`` (when positive); the
    outermost takes the rest."""
    rest, inner = extent, []
    for position in range(len(tuned) - 1, 0, -1):
        limit = max_innermost if position == len(tuned) - 1 and max_innermost > 0 else rest
        factor = min((d for d in _divisors(rest) if d <= limit), key=lambda d: (abs(d - tuned[position]), d))
        inner.append(factor)
        rest //= factor
    return [rest, *reversed(inner)]


def refit_trace(source: KernelSpec, record: TuningRecord, spec: KernelSpec, layout: dict) -> list:
    """``record``, tuned for ``source`` (a spec on the target of the record's log), replayed on ``spec``'s
    workload with its tile sizes re-chosen to divide the new extents: a trace of ``spec``; RecordError when
    it does not fit."""
    source_func = ops.prim_func(source, schedules.weight_layout(source))
    if workload_hash(source_func) != record.workload_hash:
        raise RecordError("its log's workload entry does not describe the workload the record was tuned for")
    try:
        tuned = tvm.s_tir.Schedule(source_func)
        tvm.s_tir.Trace.apply_json_to_schedule(record.trace, tuned)
        sch = tvm.s_tir.Schedule(ops.prim_func(spec, layout))

        def refit(instruction: object, inputs: list, attrs: list, decision: object) -> object:
            if instruction.kind.name != "SamplePerfectTile":
                return decision
            extent = int(sch.get(inputs[0]).extent)
            return refit_tile(extent, [int(f) for f in decision], int(attrs[1]))

        tuned.trace.apply_to_schedule(sch, remove_postproc=False, decision_provider=refit)
        return plain_json(sch.trace.as_json())
    except Exception as err:  # noqa: BLE001 - whatever TVM raises, the trace does not fit this workload
        text = str(err).strip()
        raise RecordError(
            f"does not re-fit: {type(err).__name__}: {text.splitlines()[-1][:200] if text else ''}"
        ) from err


def plain_json(value: object) -> object:
    """A trace's JSON as a log stores it: ``Trace.as_json`` leaves the decisions made in Python (and attributes
    copied from them) as TVM integer and float nodes."""
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, tvm.tirx.IntImm):
        return int(value.value)
    if isinstance(value, tvm.tirx.FloatImm):
        return float(value.value)
    return value

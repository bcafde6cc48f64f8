"""A tuning record is code: the allow-list every record read from a log passes before it is used.

A MetaSchedule record's trace is replayed on our PrimFunc and the result compiled into a library that
this process loads.  Some schedule instructions carry code in their arguments: an ``Annotate`` with the
key ``pragma_import_llvm`` links arbitrary LLVM IR (``module asm``, an ``.init_array`` constructor) into
the kernel, and the instructions that take an ``IndexMap`` (``TransformLayout`` ...) deserialize an
arbitrary TVM object graph.  Such a kernel can compute the right values, pass the check against torch
and run its payload as soon as the library is loaded.  So records are checked here, before they are
replayed, compiled, merged or handed to MetaSchedule, against what our search spaces and MetaSchedule's
CPU and CUDA rules actually produce for our float32/float64 ops (derived from the shipped logs and from
the design spaces and postprocessors of ``--space ours``, ``--space generic`` on x86 and the CUDA rules).

Trace JSON (``Trace.as_json``): ``[[instruction, ...], [[instruction index, decision], ...]]``, each
instruction ``[kind, inputs, attrs, outputs]``.  Inputs are random-variable names (``b0`` blocks,
``l1`` loops, ``v2`` sampled values), ``"None"``, numbers, lists of those, or a string literal written
with its quotes (``"\\"SSRSRS\\""``); a ``{...}`` string is a serialized object graph.  Outputs are names.

Not accepted, because nothing we tune produces them: tensorization (``Blockize``/``Tensorize`` and the
tensor-core path; no intrinsic covers float32/float64), instructions that take an ``IndexMap`` or change
dtypes or hide buffer accesses, any ``pragma_*`` annotation other than MetaSchedule's two unroll ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable

RV_NAME = re.compile(r"[blv][0-9]{1,9}")  # what Trace.as_json names random variables
OUTPUT_NAME = re.compile(r"[blv][0-9]{1,9}|_")  # "_": an output that is None
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,199}")  # block and function names
MAX_INSTRUCTIONS = 20_000
MAX_INPUT_DEPTH = 3  # CacheRead's consumer list is the deepest input MetaSchedule writes

# the storage scopes MetaSchedule's CPU and CUDA rules cache into
STORAGE_SCOPES = frozenset({"global", "local", "shared", "shared.dyn", "warp"})
THREAD_AXES = frozenset(f"{axis}.{dim}" for axis in ("blockIdx", "threadIdx", "vthread") for dim in "xyz") | {"vthread"}


class DisallowedRecord(ValueError):
    """A record whose trace holds something our search spaces and MetaSchedule's rules never produce."""


def _fail(message: str) -> None:
    raise DisallowedRecord(message)


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _ints(attrs: list, count: int | None = None) -> None:
    if (count is not None and len(attrs) != count) or not all(_is_int(a) or type(a) is bool for a in attrs):
        _fail(f"attributes {attrs!r} are not {count if count is not None else 'some'} integers")


def _no_attrs(attrs: list) -> None:
    if attrs:
        _fail(f"takes no attributes, got {attrs!r}")


def _block_name(attrs: list) -> None:
    if len(attrs) != 2 or not all(isinstance(a, str) and IDENTIFIER.fullmatch(a) for a in attrs):
        _fail(f"attributes {attrs!r} are not [block name, function name]")


def _scope(attrs: list) -> None:
    if len(attrs) != 2 or not _is_int(attrs[0]) or attrs[1] not in STORAGE_SCOPES:
        _fail(f"attributes {attrs!r} are not [buffer index, one of {sorted(STORAGE_SCOPES)}]")


def _thread_axis(attrs: list) -> None:
    if len(attrs) != 1 or attrs[0] not in THREAD_AXES:
        _fail(f"attributes {attrs!r} are not [one of {sorted(THREAD_AXES)}]")


def _categorical(attrs: list) -> None:
    ok = len(attrs) == 2 and all(isinstance(a, list) for a in attrs) and len(attrs[0]) == len(attrs[1])
    if not ok or not all(_is_int(c) for c in attrs[0]) or not all(_is_number(p) for p in attrs[1]):
        _fail(f"attributes {attrs!r} are not [[candidates], [probabilities]]")


def _annotation_key(attrs: list) -> None:
    if len(attrs) != 1 or attrs[0] not in ANNOTATIONS:
        key = attrs[0] if len(attrs) == 1 else attrs
        _fail(f"annotation key {key!r} is not one MetaSchedule or our schedules use")


# instruction kind -> check of its attributes (the inputs are checked alike for every kind)
INSTRUCTIONS: dict[str, Callable[[list], None]] = {
    **dict.fromkeys(
        (
            "GetLoops",
            "GetChildBlocks",
            "GetProducers",
            "GetConsumers",
            "GetOutputBlocks",
            "Reorder",
            "Parallel",
            "Vectorize",
            "Unroll",
            "ComputeInline",
            "ReverseComputeInline",
            "DecomposeReduction",
            "SampleComputeLocation",
            "AddUnitLoop",
            "EnterPostproc",
        ),
        _no_attrs,
    ),
    "GetSBlock": _block_name,
    "Split": lambda attrs: _ints(attrs, 2),
    "Fuse": lambda attrs: _ints(attrs, 1),
    "ComputeAt": lambda attrs: _ints(attrs, 2),
    "ReverseComputeAt": lambda attrs: _ints(attrs, 2),
    "RFactor": lambda attrs: _ints(attrs, 1),
    "StorageAlign": lambda attrs: _ints(attrs, 4),
    "SamplePerfectTile": lambda attrs: _ints(attrs, 2),
    "SamplePartitionedTile": lambda attrs: _ints(attrs, 3),
    "SampleCategorical": _categorical,
    "Bind": _thread_axis,
    "CacheRead": _scope,
    "CacheWrite": _scope,
    "SetScope": _scope,
    "Annotate": _annotation_key,
    "Unannotate": _annotation_key,
}


def _int_or_sampled(value: object) -> bool:
    return _is_int(value) or (isinstance(value, str) and RV_NAME.fullmatch(value) is not None)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(_is_int(v) for v in value)


def _tiling_structure(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r'"[SR]{1,32}"', value) is not None


# annotation key -> check of its value (the second input of Annotate)
ANNOTATIONS: dict[str, Callable[[object], bool]] = {
    **dict.fromkeys(
        (
            "meta_schedule.parallel",
            "meta_schedule.vectorize",
            "meta_schedule.unroll_explicit",
            "meta_schedule.unroll_implicit",
            "meta_schedule.cooperative_fetch",
            "meta_schedule.thread_extent_low_inclusive",
            "meta_schedule.thread_extent_high_inclusive",
            "meta_schedule.random_compute_producer",
            "pragma_auto_unroll_max_step",
            "pragma_unroll_explicit",
        ),
        _int_or_sampled,
    ),
    "meta_schedule.tiling_structure": _tiling_structure,
    **dict.fromkeys(
        ("software_pipeline_stage", "software_pipeline_order", "software_pipeline_async_stages"), _int_list
    ),
}


def _check_inputs(inputs: list, depth: int = 0) -> None:
    for value in inputs:
        if isinstance(value, list):
            if depth >= MAX_INPUT_DEPTH:
                _fail("inputs nested too deeply")
            _check_inputs(value, depth + 1)
        elif isinstance(value, str):
            if value != "None" and not RV_NAME.fullmatch(value):
                _fail(f"input {value[:60]!r} is not a variable name (string literals and objects are refused)")
        elif not _is_number(value):  # dicts, null, booleans
            _fail(f"input {str(value)[:60]!r} of type {type(value).__name__} is not accepted")


def _check_instruction(instruction: object) -> str:
    """The kind of a well-formed, allowed instruction; raises DisallowedRecord otherwise."""
    if not (isinstance(instruction, list) and len(instruction) == 4 and isinstance(instruction[0], str)):
        _fail("is not [kind, inputs, attrs, outputs]")
    kind, inputs, attrs, outputs = instruction
    check_attrs = INSTRUCTIONS.get(kind)
    if check_attrs is None:
        _fail(f"instruction kind {kind[:60]!r} is not one our search spaces or MetaSchedule's rules produce")
    if not (isinstance(inputs, list) and isinstance(attrs, list) and isinstance(outputs, list)):
        _fail("inputs, attrs and outputs must be lists")
    check_attrs(attrs)
    if kind == "Annotate":
        # the value is the one input that may be a string literal, and only for keys that take one
        if len(inputs) != 2 or not isinstance(inputs[0], str) or not RV_NAME.fullmatch(inputs[0]):
            _fail("inputs are not [block or loop, value]")
        if not ANNOTATIONS[attrs[0]](inputs[1]):
            _fail(f"value {str(inputs[1])[:60]!r} is not one MetaSchedule writes for {attrs[0]!r}")
        inputs = inputs[:1]
    _check_inputs(inputs)
    if not all(isinstance(o, str) and OUTPUT_NAME.fullmatch(o) for o in outputs):
        _fail(f"outputs {str(outputs)[:60]} are not variable names")
    return kind


def _check_decisions(decisions: object, count: int) -> None:
    if not isinstance(decisions, list):
        _fail("decisions are not a list")
    for decision in decisions:
        ok = isinstance(decision, list) and len(decision) == 2 and _is_int(decision[0]) and 0 <= decision[0] < count
        value = decision[1] if ok else None
        if not ok or not (_is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))):
            _fail(f"decision {str(decision)[:60]} is not [instruction index, integer or integers]")


def _describe(instruction: object) -> str:
    """The kind of an instruction, with the key of an annotation: what a warning names."""
    if not (isinstance(instruction, list) and len(instruction) == 4):
        return "malformed"
    kind, _, attrs, _ = instruction
    if kind in ("Annotate", "Unannotate") and isinstance(attrs, list) and attrs:
        return f"{kind} {str(attrs[0])[:60]!r}"
    return str(kind)[:60]


def check_trace(trace: object) -> None:
    """Raise :class:`DisallowedRecord` saying which instruction and why, unless every instruction,
    annotation and value of ``trace`` (MetaSchedule's trace JSON) is on the allow-list."""
    if not (isinstance(trace, list) and len(trace) == 2 and isinstance(trace[0], list)):
        _fail("the trace is not [instructions, decisions]")
    instructions, decisions = trace
    if len(instructions) > MAX_INSTRUCTIONS:
        _fail(f"the trace has {len(instructions)} instructions, more than {MAX_INSTRUCTIONS}")
    for index, instruction in enumerate(instructions):
        try:
            _check_instruction(instruction)
        except DisallowedRecord as err:
            raise DisallowedRecord(f"instruction {index} ({_describe(instruction)}): {err}") from None
    _check_decisions(decisions, len(instructions))


def trace_problem(trace: object) -> str | None:
    """None if ``trace`` passes :func:`check_trace`, else why not."""
    try:
        check_trace(trace)
    except DisallowedRecord as err:
        return str(err)
    return None

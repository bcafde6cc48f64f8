"""A tuning record is code: a record off the allow-list (here one whose ``pragma_import_llvm`` annotation
links an ``.init_array`` constructor into the kernel) is refused wherever a log is read: lookup, merge,
repair before tuning, ``compile_record``.  And a malformed log never fails a layer call, ``logs ls`` or
``logs merge``: each bad line is reported once with its file and line, and skipped."""

from __future__ import annotations

import json
import platform
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from conftest import HOST, conv3x3_spec, conv_child_report, start_conv_child
from tvmlayers import build, cli, ops, schedules
from tvmlayers.records.apply import RecordError, compile_record
from tvmlayers.records.database import (
    META_FILE,
    RECORD_FILE,
    WORKLOAD_FILE,
    TuningLog,
    TuningRecord,
    shipped_log_root,
    workload_hash,
)
from tvmlayers.records.record_check import check_trace, trace_problem
from tvmlayers.spec import KernelSpec
from tvmlayers.tuning.fast_import import import_tensor_intrin
from tvmlayers.tuning.tuner import search_space
from tvmlayers.verify import check_kernel

CONV = conv3x3_spec((1, 8, 6, 6), 16)  # what the conv of _conv_provenance() calls
LAYOUT = schedules.weight_layout(CONV)
FUNC = ops.prim_func(CONV, LAYOUT)
HASH = workload_hash(FUNC)


def _payload(marker: Path) -> str:
    """LLVM IR whose module asm adds an ``.init_array`` entry: loading the library creates ``marker``
    (open(2) with O_CREAT, straight through the syscall; x86-64 Linux)."""
    asm = [
        ".pushsection .text",
        "tvmlayers_test_payload:",
        "lea tvmlayers_test_marker(%rip), %rdi",
        "mov $0x241, %esi",  # O_WRONLY | O_CREAT | O_TRUNC
        "mov $0x1a4, %edx",  # 0644
        "mov $2, %eax",  # SYS_open
        "syscall",
        "xor %eax, %eax",
        "ret",
        ".popsection",
        ".pushsection .rodata",
        f"tvmlayers_test_marker: .asciz \\22{marker}\\22",
        ".popsection",
        ".pushsection .init_array,\\22aw\\22",
        ".p2align 3",
        ".quad tvmlayers_test_payload",
        ".popsection",
    ]
    return "".join(f'module asm "{line}"\n' for line in asm)


def _crafted_schedule(marker: Path) -> tvm.s_tir.Schedule:
    """The default schedule of CONV with the payload annotated on its conv2d loop nest."""
    sch, _ = schedules.default_schedule(FUNC, HOST)
    sch.annotate(sch.get_loops(sch.get_sblock("conv2d"))[0], "pragma_import_llvm", _payload(marker))
    return sch


def _write_record(root: Path, sch: tvm.s_tir.Schedule, seconds: float) -> Path:
    """Append ``sch``'s trace to the log of HOST under ``root`` as MetaSchedule writes it; the record file."""
    directory = TuningLog.for_target(root, HOST).directory
    directory.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(
        path_workload=str(directory / WORKLOAD_FILE), path_tuning_record=str(directory / RECORD_FILE)
    )
    workload = database.commit_workload(_normalize_mod(FUNC))
    arg_info = ms.arg_info.ArgInfo.from_prim_func(FUNC)
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [seconds], HOST, arg_info))
    return directory / RECORD_FILE


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """(log root holding only the crafted record, claiming 1 ns, the marker its payload would create)."""
    marker = tmp_path / "payload-ran"
    _write_record(tmp_path / "crafted", _crafted_schedule(marker), 1e-9)
    return tmp_path / "crafted", marker


@pytest.fixture(scope="module")
def legit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log root with one legitimate record of CONV: its default schedule, as the tuner seeds it."""
    root = tmp_path_factory.mktemp("legit")
    _write_record(root, schedules.default_schedule(FUNC, HOST)[0], 1e-4)
    return root


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel cache for the malformed-log cases: the legit record's kernel is compiled once."""
    return tmp_path_factory.mktemp("cache")


def _conv_provenance() -> dict:
    """Where the schedule of CONV's kernel came from, after checking the kernel against torch.  Asked of the
    build pipeline, as a layer's first call does: a layer memoizes its kernel per call signature for the
    whole process, so it would not look at the logs that each test sets up again."""
    kernel = build.kernel_for(CONV)
    assert check_kernel(CONV, LAYOUT, kernel.function) is None
    return kernel.provenance


def _caught(action: Callable[[], object]) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    return result, [str(w.message) for w in caught]


def _record_lines(root: Path) -> list[str]:
    path = TuningLog.for_target(root, HOST).directory / RECORD_FILE
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------------------------- the allow-list
def test_every_shipped_record_passes_the_allow_list() -> None:
    files = sorted(shipped_log_root().glob(f"*/{RECORD_FILE}"))
    assert files
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            assert trace_problem(json.loads(line)[1][0]) is None, f"{path}:{number}"
        directory = path.parent
        _, messages = _caught(lambda d=directory: TuningLog(d)._parse())
        assert messages == [], "the shipped logs parse without a warning"


def test_what_metaschedule_and_our_spaces_produce_passes(tmp_path: Path) -> None:
    """The design spaces of --space ours and --space generic on this CPU, and of MetaSchedule's CUDA rules,
    with their postprocessors applied (what a tuning record holds), all pass the allow-list."""
    import_tensor_intrin()
    cuda = tvm.target.Target("nvidia/nvidia-a100")
    pool = {"kernel_size": (3, 3), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "ceil_mode": False}
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    for target, space in ((HOST, "ours"), (HOST, "generic"), (cuda, "generic")):
        for op, shape, params in (
            ("conv2d", CONV.input_shape, dict(CONV.params)),
            ("linear", (4, 32), {"bias": True, "weight_shape": (16, 32)}),
            ("max_pool2d", (1, 8, 8, 8), {**pool, "return_indices": True}),
        ):
            spec = KernelSpec.make(op, shape, "float32", target, **params)
            func = ops.prim_func(spec, schedules.weight_layout(spec))
            context = ms.TuneContext(func, target=target, space_generator=search_space(space, target), num_threads=1)
            workload = database.commit_workload(_normalize_mod(func))
            arg_info = ms.arg_info.ArgInfo.from_prim_func(func)
            for sch in context.generate_design_space():
                for postproc in context.space_generator.postprocs:
                    postproc.apply(sch)
                record = ms.database.TuningRecord(sch.trace, workload, [1e-3], target, arg_info)
                database.commit_tuning_record(record)
    lines = (tmp_path / "database_tuning_record.json").read_text().splitlines()  # as a tuning log holds them
    assert len(lines) >= 9
    for line in lines:
        check_trace(json.loads(line)[1][0])
    kinds = {inst[0] for line in lines for inst in json.loads(line)[1][0][0]}
    assert {"Bind", "CacheRead", "SampleCategorical", "Annotate"} <= kinds, "the CUDA rules' instructions are there"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda insts: insts.append(["TransformLayout", ["b0", "{}"], [0, 0], []]), "TransformLayout"),
        (lambda insts: insts.append(["Annotate", ["b0", '"x"'], ["pragma_import_c"], []]), "pragma_import_c"),
        (lambda insts: insts.append(["Annotate", ["b0", '"C"'], ["meta_schedule.tiling_structure"], []]), "value"),
        (lambda insts: insts.append(["Annotate", ["b0", {"a": 1}], ["meta_schedule.parallel"], []]), "value"),
        (lambda insts: insts.append(["Tensorize", ["b0"], ["dot_16x4_vnni", 1], []]), "Tensorize"),
        (lambda insts: insts.append(["CacheRead", ["b0", []], [0, "global.evil"], ["b9"]]), "global.evil"),
        (lambda insts: insts.append(["Split", ['"literal"', "None", 4], [1, 0], ["l9", "l10"]]), "literal"),
        (lambda insts: insts.append(["GetSBlock", [], ["x\ny", "main"], ["b9"]]), "block name"),
    ],
)
def test_the_allow_list_refuses(mutate: Callable[[list], None], reason: str) -> None:
    trace = [[["GetSBlock", [], ["conv2d", "main"], ["b0"]]], []]
    assert trace_problem(trace) is None
    mutate(trace[0])
    problem = trace_problem(trace)
    assert problem is not None and problem.startswith("instruction 1 (") and reason in problem


# ------------------------------------------------------------------------------------ the crafted record
@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="x86-64 Linux payload")
def test_the_crafted_record_is_a_real_payload(crafted: tuple[Path, Path], tmp_path: Path) -> None:
    """Without the allow-list the record compiles, and loading its library runs the payload: the refusals
    below are of a working attack, not of a record that would have failed anyway."""
    root, marker = crafted
    (line,) = _record_lines(root)
    sch = tvm.s_tir.Schedule(FUNC)
    tvm.s_tir.Trace.apply_json_to_schedule(json.loads(line)[1][0], sch)
    tvm.compile(sch.mod, target=HOST).export_library(str(tmp_path / "crafted.so"))
    assert not marker.exists()
    tvm.runtime.load_module(str(tmp_path / "crafted.so"))
    assert marker.exists()


def test_a_crafted_record_is_refused_at_lookup(
    crafted: tuple[Path, Path], fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, marker = crafted
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(root))
    provenance, messages = _caught(_conv_provenance)
    assert provenance["source"] == "default", "the layer runs with the default schedule"
    assert not marker.exists(), "the payload never ran"
    # the same layer in a fresh process, through the module API
    report = conv_child_report(start_conv_child(6, {"TVMLAYERS_TUNING_LOGS": str(root)}))
    assert report["provenance"]["source"] == "default" and report["error"] < 1e-4
    assert not marker.exists()
    records = TuningLog.for_target(root, HOST).directory / RECORD_FILE
    refusals = [m for m in messages if m.startswith(f"{records}:1: refusing a tuning record")]
    assert len(refusals) == 1 and re.search(r"instruction \d+ \(Annotate 'pragma_import_llvm'\)", refusals[0])
    assert TuningLog.for_target(root, HOST).best(HASH) is None


def test_merge_never_copies_a_crafted_record(
    crafted: tuple[Path, Path], legit: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, marker = crafted
    into = tmp_path / "merged"
    code, messages = _caught(lambda: cli.main(["logs", "merge", str(root), str(legit), "--into", str(into)]))
    assert code == 0
    (line,) = _record_lines(into)
    assert "pragma_import_llvm" not in line and json.loads(line)[1][0] == json.loads(_record_lines(legit)[0])[1][0]
    records = TuningLog.for_target(root, HOST).directory / RECORD_FILE
    assert any(m.startswith(f"{records}:1: refusing") and "pragma_import_llvm" in m for m in messages), messages
    assert not marker.exists()


def test_compile_record_refuses_a_crafted_record(crafted: tuple[Path, Path]) -> None:
    root, marker = crafted
    (line,) = _record_lines(root)
    directory = TuningLog.for_target(root, HOST).directory
    record = TuningRecord(directory, 1, HASH, json.loads(line)[1][0], 1e-9, directory.name)
    with pytest.raises(RecordError, match=r"not on the allow-list.*Annotate 'pragma_import_llvm'"):
        compile_record(CONV, LAYOUT, record)
    assert not marker.exists()


def test_repair_before_tuning_moves_a_crafted_record_out(crafted: tuple[Path, Path], legit: Path) -> None:
    """``tune`` repairs the log before MetaSchedule opens it: MetaSchedule would replay the fastest records
    of its database as seeds of the search, and build and run their candidates."""
    root, _ = crafted
    log = TuningLog.for_target(root, HOST)
    with open(log.directory / RECORD_FILE, "a") as f:  # a legitimate record of the same workload after it
        f.write(_record_lines(legit)[0] + "\n")
    moved, _ = _caught(log.repair)
    assert moved == 1
    assert "pragma_import_llvm" in (log.directory / f"{RECORD_FILE}.corrupt").read_text()
    assert [json.loads(line) for line in _record_lines(root)] == [json.loads(_record_lines(legit)[0])]


# ------------------------------------------------------------------------------------- malformed logs
def _append(path: Path, text: str) -> int:
    """Append a line; its 1-based line number."""
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("".join(line + "\n" for line in [*lines, text]))
    return len(lines) + 1


def _legit_body(directory: Path) -> list:
    return json.loads((directory / RECORD_FILE).read_text().splitlines()[0])[1]


def _workload_five(directory: Path) -> tuple[str, int]:
    line = _append(directory / WORKLOAD_FILE, "5")
    _append(directory / RECORD_FILE, json.dumps([line - 1, _legit_body(directory)]))  # a record of it
    return WORKLOAD_FILE, line


def _meta_list(directory: Path) -> tuple[str, int]:
    (directory / META_FILE).write_text("[]\n")
    return META_FILE, 1


def _meta_fields(directory: Path) -> tuple[str, int]:
    meta = {"workloads": 5, "rejected": [], "retimed": {HASH: 5}, "trials": {HASH: "many"}, "baselines": 1}
    (directory / META_FILE).write_text(json.dumps(meta))
    return META_FILE, 1


def _nested(directory: Path) -> tuple[str, int]:
    return RECORD_FILE, _append(directory / RECORD_FILE, "[" * 200_000 + "]" * 200_000)


def _huge(directory: Path) -> tuple[str, int]:
    body = _legit_body(directory)
    return RECORD_FILE, _append(directory / RECORD_FILE, json.dumps([0, body, "x" * (20 << 20)]))


def _bad_target(directory: Path) -> tuple[str, int]:
    trace, seconds, _, args = _legit_body(directory)
    return RECORD_FILE, _append(directory / RECORD_FILE, json.dumps([0, [trace, [1e-9], {"kind": "nope"}, args]]))


def _record_five(directory: Path) -> tuple[str, int]:
    return RECORD_FILE, _append(directory / RECORD_FILE, "5")


def _negative_index(directory: Path) -> tuple[str, int]:
    return RECORD_FILE, _append(directory / RECORD_FILE, json.dumps([-1, _legit_body(directory)]))


@pytest.mark.parametrize(
    "corrupt",
    [_workload_five, _meta_list, _meta_fields, _nested, _huge, _bad_target, _record_five, _negative_index],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_malformed_log_never_fails_a_call(
    corrupt: Callable[[Path], tuple[str, int]],
    legit: Path,
    shared_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    root = tmp_path / "logs"
    shutil.copytree(legit, root)
    directory = TuningLog.for_target(root, HOST).directory
    name, line = corrupt(directory)
    where = f"{directory / name}:{line}: "
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(root))
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(shared_cache))

    provenance, messages = _caught(_conv_provenance)
    assert provenance["source"] == "tuned" and provenance["line"] == 1, messages

    def read_again() -> None:  # parsed again as after a change of the files: no second warning
        TuningLog._indexes.pop(directory, None)
        assert TuningLog(directory).best(HASH) is not None

    _, again = _caught(read_again)
    reports = [m for m in messages + again if m.startswith(where)]
    assert reports and len(reports) == len(set(reports)), "each bad line or field is reported, once"

    code, _ = _caught(lambda: cli.main(["logs", "ls", "--log-dir", str(root)]))
    assert code == 0 and re.search(r"\s1 trials", capsys.readouterr().out)
    code, _ = _caught(lambda: cli.main(["logs", "merge", str(root), "--into", str(tmp_path / "merged")]))
    assert code == 0 and len(_record_lines(tmp_path / "merged")) == 1


def test_an_error_reading_the_logs_never_fails_a_call(
    tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: TuningLog, workload: str) -> None:
        raise RuntimeError("a log bug nobody foresaw")

    monkeypatch.setattr(TuningLog, "best", broken)
    monkeypatch.setattr(build, "_warned_logs", False)
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(shared_cache))
    provenance, messages = _caught(_conv_provenance)
    assert provenance["source"] == "default"
    assert sum("reading the tuning logs failed (RuntimeError: a log bug nobody foresaw)" in m for m in messages) == 1

"""Tuning that travels: records of another CPU of the family adopted or declined on this machine, neighbours
re-fitted to other shapes, the verdicts file and its corruption, and `tvmlayers logs ls|adopt`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

import tvmlayers as tl
from conftest import conv3x3_spec, conv_child_report, start_conv_child
from tvmlayers import cli, ops, schedules
from tvmlayers.build import kernel_for
from tvmlayers.records import travel, trial
from tvmlayers.records.apply import compile_record
from tvmlayers.records.database import META_FILE, RECORD_FILE, WORKLOAD_FILE, TuningLog, TuningRecord, workload_hash
from tvmlayers.records.family import family_key
from tvmlayers.records.neighbours import distance, refit_tile, refit_trace
from tvmlayers.records.travel import retarget
from tvmlayers.records.verdicts import TRAVEL_FILE, Verdicts
from tvmlayers.schedules.rule import has_block, parallel_outer
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target, target_json, target_key
from tvmlayers.tuning.tuner import tune
from tvmlayers.verify import check_kernel

HOST = resolve_target("host")
CONV = conv3x3_spec((1, 8, 6, 6), 16)  # the tuning tests' tiny conv: the Conv2d(8, 16, 3, padding=1) child's
# CPUs that may share the host's family: the first of them that does, under another name, tuned "elsewhere"
OTHER_CPUS = ("skylake-avx512", "icelake-server", "haswell", "skylake", "znver3", "cortex-a72", "neoverse-n1")


def _sibling() -> tvm.target.Target:
    for cpu in OTHER_CPUS:
        target = tvm.target.Target({**target_json(HOST), "mcpu": cpu})
        if target_key(target) != target_key(HOST) and family_key(target) == family_key(HOST):
            return target
    pytest.skip(f"no other CPU of this machine's family {family_key(HOST)} in {OTHER_CPUS}")


SIBLING = _sibling()


def _hash(spec: KernelSpec) -> str:
    return workload_hash(ops.prim_func(spec, schedules.weight_layout(spec)))


def _move_log(directory: Path, root: Path, target: tvm.target.Target) -> Path:
    """Make ``directory``'s log one tuned for ``target`` (its folder, its records' and metadata's target) in
    ``root``, as if it came from a machine with that CPU."""
    moved = root / target_key(target)
    shutil.copytree(directory, moved)
    lines = [json.loads(line) for line in (moved / RECORD_FILE).read_text().splitlines() if line.strip()]
    for line in lines:
        line[1][2] = {**target_json(target), "keys": ["cpu"]}
    (moved / RECORD_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta = json.loads((moved / META_FILE).read_text())
    (moved / META_FILE).write_text(json.dumps({**meta, "target": target_json(target)}))
    return moved


@pytest.fixture(autouse=True)
def short_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials time a few rounds only: what they decide here is asserted only where the gap is wide."""
    monkeypatch.setattr(trial, "TIMING_S", 0.1)
    monkeypatch.setattr(travel, "ADOPT_TIMING_S", 0.1)


@pytest.fixture(scope="module")
def sibling_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log root holding a few trials of CONV tuned here, filed as tuned on another CPU of the family."""
    tuned = tmp_path_factory.mktemp("tuned")
    (result,) = tune([CONV], HOST, trials=4, log_dir=tuned, space="ours", trials_per_iter=4, progress=False)
    assert result.best is not None
    root = tmp_path_factory.mktemp("sibling")
    _move_log(tuned / target_key(HOST), root, SIBLING)
    return root


@pytest.fixture
def logs(sibling_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's user log root: a copy of ``sibling_root`` (verdicts written here stay here)."""
    root = tmp_path / "logs"
    shutil.copytree(sibling_root, root)
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(root))
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TVMLAYERS_TUNED", raising=False)
    return root


def _verdicts(root: Path) -> dict:
    return json.loads((root / target_key(HOST) / TRAVEL_FILE).read_text())["verdicts"]


def test_families_follow_the_vector_isa() -> None:
    assert family_key(SIBLING) == family_key(HOST) and target_key(SIBLING) != target_key(HOST)
    assert family_key(resolve_target("rasp4b")) == family_key(resolve_target("rasp5"))
    assert family_key(resolve_target("x86-avx2")) != family_key(resolve_target("x86-avx512"))
    assert family_key(resolve_target("armv7")) != family_key(resolve_target("aarch64"))


def _any_speed_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a trial measures here, a record that computes what torch does is adopted."""
    monkeypatch.setattr(trial, "MIN_SPEEDUP", 0.0)


def test_a_record_of_another_cpu_is_adopted_once_per_machine(
    logs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _any_speed_wins(monkeypatch)
    kernel = kernel_for(CONV)
    sibling_log = TuningLog(logs / target_key(SIBLING))
    assert kernel.provenance["source"] == "adopted"
    assert kernel.provenance["record"] == sibling_log.best(_hash(CONV)).id
    assert kernel.schedule.startswith(f"tuned on {SIBLING.attrs['mcpu']}, adopted here, ")
    (verdict,) = _verdicts(logs)[_hash(CONV)].values()
    assert verdict["adopted"] and verdict["speedup"] > 0 and verdict["source_cpu"] == SIBLING.attrs["mcpu"]
    # a fresh process finds the verdict: the same record, nothing tried again, and torch's result
    remembered = (logs / target_key(HOST) / TRAVEL_FILE).stat().st_mtime_ns
    report = conv_child_report(start_conv_child(6, {"TVMLAYERS_CACHE_DIR": str(tmp_path / "child-cache")}))
    assert report["provenance"]["source"] == "adopted" and report["error"] < 1e-4
    assert (logs / target_key(HOST) / TRAVEL_FILE).stat().st_mtime_ns == remembered
    # this machine's own record comes first; TVMLAYERS_TUNED=exact asks for nothing else
    monkeypatch.setenv("TVMLAYERS_TUNED", "exact")
    assert kernel_for(CONV).provenance["source"] == "default"


def _write_log(root: Path, target: tvm.target.Target, spec: KernelSpec, sch: tvm.s_tir.Schedule) -> None:
    """A log of ``target`` whose one record of ``spec`` is ``sch``'s trace, claiming a fast run."""
    spec = retarget(spec, target)
    func = ops.prim_func(spec, schedules.weight_layout(spec))
    log = TuningLog(root / target_key(target))
    log.add_workloads({workload_hash(func): spec}, target)
    database = ms.database.JSONDatabase(
        path_workload=str(log.directory / WORKLOAD_FILE), path_tuning_record=str(log.directory / RECORD_FILE)
    )
    workload = database.commit_workload(_normalize_mod(func))
    args = ms.arg_info.ArgInfo.from_prim_func(func)
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-7], target, args))


def test_a_record_slower_here_is_declined(logs: Path) -> None:
    spec = conv3x3_spec((1, 16, 28, 28), 32)
    # slow on purpose: scalar loops, but on the thread pool like the default, so that a loaded machine (other
    # tests' threads) slows both alike; a single-threaded record once beat the spinning default there
    slow = tvm.s_tir.Schedule(ops.prim_func(spec, schedules.weight_layout(spec)))
    for block in ("pad", "conv_blocked", "conv2d"):
        if has_block(slow, block):
            parallel_outer(slow, block, 2)
    _write_log(logs, SIBLING, spec, slow)
    x, weight, bias = torch.randn(1, 16, 28, 28), torch.randn(32, 16, 3, 3), torch.randn(32)
    with torch.inference_mode():
        out = tl.functional.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, bias, padding=1), rtol=1e-4, atol=1e-4)
    assert kernel_for(spec).provenance["source"] == "default"
    (verdict,) = _verdicts(logs)[_hash(spec)].values()
    assert not verdict["adopted"] and 0 < verdict["speedup"] < trial.MIN_SPEEDUP
    assert "of the default here" in verdict["reason"]


def test_refit_tiles_divide_the_new_extent() -> None:
    for extent in (1, 7, 12, 43, 56, 85, 96):
        for tuned, innermost in (([4, 14], 16), ([2, 1, 2, 2], 64), ([1, 7, 1, 4], 0)):
            tiles = refit_tile(extent, tuned, innermost)
            assert len(tiles) == len(tuned) and math.prod(tiles) == extent
            assert innermost <= 0 or tiles[-1] <= innermost
            if extent % tuned[-1] == 0:
                assert tiles[-1] == tuned[-1], "a tuned innermost factor that still divides is kept"


# CONV's shape changed in each dimension in turn, then all at once
NEIGHBOURS = {
    "batch": conv3x3_spec((2, 8, 6, 6), 16),
    "in channels": conv3x3_spec((1, 12, 6, 6), 16),
    "out channels": conv3x3_spec((1, 8, 6, 6), 24),
    "height": conv3x3_spec((1, 8, 9, 6), 16),
    "width": conv3x3_spec((1, 8, 6, 11), 16),
    "bias": KernelSpec.make("conv2d", CONV.input_shape, "float32", HOST, **{**dict(CONV.params), "bias": False}),
    "all": conv3x3_spec((3, 5, 10, 7), 40),
}


@pytest.mark.parametrize("change", list(NEIGHBOURS))
def test_a_neighbour_refitted_to_another_shape_computes_what_torch_does(sibling_root: Path, change: str) -> None:
    log = TuningLog(sibling_root / target_key(SIBLING))
    source = retarget(CONV, SIBLING)
    spec = NEIGHBOURS[change]
    assert 0 < distance(spec, source) < math.inf
    layout = schedules.weight_layout(spec)
    for record in log.records(_hash(source))[:3]:
        trace = refit_trace(source, record, spec, layout)
        refitted = TuningRecord(log.directory, 0, _hash(spec), trace, 0.0, target_key(HOST))
        kernel = compile_record(spec, layout, refitted).jit()[ops.SYMBOL]  # checked against torch (seed 0)
        assert check_kernel(spec, layout, kernel, seed=1) is None


def test_a_layer_without_a_record_borrows_its_neighbours(logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _any_speed_wins(monkeypatch)
    monkeypatch.setenv("TVMLAYERS_TUNED", "neighbours")  # no adoption: the neighbour step alone
    conv = tl.Conv2d(8, 24, 3, padding=1)
    x = torch.randn(1, 8, 6, 11)
    with torch.inference_mode():
        out = conv(x)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    (kernel,) = conv.kernels.values()
    assert kernel.provenance["source"] == "neighbour"
    assert kernel.schedule.startswith(f"re-fitted from conv2d 1x8x6x6 w16x8x3x3 (tuned on {SIBLING.attrs['mcpu']})")


def test_corrupt_verdicts_are_reported_and_ignored(logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _any_speed_wins(monkeypatch)
    kernel_for(CONV)  # one good verdict
    path = logs / target_key(HOST) / TRAVEL_FILE
    data = json.loads(path.read_text())
    entries = data["verdicts"][_hash(CONV)]
    (candidate,) = entries
    good = entries[candidate]
    payload = [[["Annotate", ["b0", '"x"'], ["pragma_import_llvm"], []]], []]  # code, not a schedule
    data["verdicts"]["1"] = {"neighbour:k:r": {**good, "candidate": "neighbour:k:r", "trace": payload}}
    data["verdicts"]["2"] = {"adopt:k:r": {**good, "candidate": "adopt:k:r", "adopted": "yes"}}
    data["verdicts"]["3"] = {"adopt:k:s": "not an object"}
    data["verdicts"]["4"] = {"neighbour:k:t": {**good, "candidate": "neighbour:k:t"}}  # won, but with no trace
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="corrupt adoption entry") as caught:
        verdicts = Verdicts(path.parent).all()
    assert set(verdicts) == {_hash(CONV)} and verdicts[_hash(CONV)][candidate].adopted
    assert any("allow-list" in str(w.message) for w in caught)
    # a file that is not JSON: reported, read as empty, never failing a call; the next verdict rewrites it
    path.write_text('{"format": 1, "verdicts": {')
    with pytest.warns(UserWarning, match="unreadable adoption file"):
        kernel = kernel_for(retarget(CONV, HOST), cache_dir=logs.parent / "other-cache")
    assert kernel.provenance["source"] == "adopted"
    assert _verdicts(logs)[_hash(CONV)][candidate]["adopted"]


def test_logs_ls_and_adopt(logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _move_log(logs / target_key(SIBLING), logs, resolve_target("rasp4b"))  # a log of another family
    assert cli.main(["logs", "ls", "--log-dir", str(logs)]) == 0
    listing = capsys.readouterr().out
    assert f"{target_key(SIBLING)}: same family" in listing
    assert f"{target_key(resolve_target('rasp4b'))}: another family" in listing
    rows = [line for line in listing.splitlines() if CONV.describe() in line]  # whole names, never cut
    assert len(rows) == 2 and "here: not tried yet" in rows[0] + rows[1] and "here: none" in rows[0] + rows[1]
    assert cli.main(["logs", "adopt", "--from", target_key(SIBLING), "--log-dir", str(logs)]) == 0
    adopted = capsys.readouterr().out
    assert CONV.describe() in adopted and f"serve {target_key(HOST)}" in adopted
    assert cli.main(["logs", "ls", "--log-dir", str(logs)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if CONV.describe() in line and "none" not in line]
    assert "here: adopted, " in row or "here: declined: " in row
    verdicts = logs / target_key(HOST) / TRAVEL_FILE
    judged = verdicts.stat().st_mtime_ns
    adopt = ["logs", "adopt", "--from", target_key(SIBLING), "--log-dir", str(logs)]
    assert cli.main(adopt) == 0 and verdicts.stat().st_mtime_ns == judged, "judged once"
    assert cli.main([*adopt, "--again"]) == 0 and verdicts.stat().st_mtime_ns > judged
    capsys.readouterr()
    assert cli.main(["logs", "adopt", "--from", "llvm-no-such-cpu", "--log-dir", str(logs)]) == 2
    assert "no tuning log 'llvm-no-such-cpu'" in capsys.readouterr().err

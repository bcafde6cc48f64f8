"""Offline tuning: candidates exported here, measured where the kernels run by the folder's measure.py, imported
back as records that the layers and ``tvmlayers compile`` then use.

The host path runs measure.py with this Python (the same code a device runs); the air-gapped ARM board is the
aarch64 Python of tvmlayers.emulation under qemu; for sm_90 only the export (nvcc, no GPU here) is checked: the
GPU check script measures those.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cuda_build import _device_code, embedded_fatbin

import tvmlayers as tl
import tvmlayers.tuning.offline as offline
from tvmlayers import layer_specs
from tvmlayers.cli import main
from tvmlayers.emulation import ensure_arm_environment
from tvmlayers.records.database import RECORD_FILE, TuningLog
from tvmlayers.targets import resolve_target, target_key
from tvmlayers.tuning.offline import MeasuredFileError, export_candidates, import_measurements
from tvmlayers.workloads import Workload, save_workloads

CONV = ("conv2d", [1, 8, 10, 10], {"weight_shape": [16, 8, 3, 3], "stride": [1, 1], "padding": [1, 1, 1, 1],
                                   "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "bias": True})  # fmt: skip
RELU = ("relu", [1, 8, 10, 10], {})


def _workloads(*layers: tuple) -> list[Workload]:
    host = resolve_target("host")
    return [Workload.from_spec(layer_specs.workload_spec(op, s, "float32", p, host)) for op, s, p in layers]


def _measure(folder: Path, out: Path, python: list[str] | None = None) -> dict:
    run = subprocess.run(
        [*(python or [sys.executable]), str(folder / "measure.py"), "--out", str(out), "--repeat", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(out.read_text())


def _by_workload(manifest: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for kernel in manifest["kernels"]:
        groups.setdefault(kernel["candidate"]["workload_hash"], []).append(kernel)
    return groups


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Host candidates of a conv and a relu, exported by the CLI, measured by measure.py with this Python."""
    root = tmp_path_factory.mktemp("offline")
    save_workloads(_workloads(CONV, RELU), root / "w.toml")
    logs, folder = root / "logs", root / "cand"
    argv = ["tune", str(root / "w.toml"), "--target", "host", "--log-dir", str(logs)]
    assert main([*argv, "--export-candidates", str(folder), "--candidates", "3"]) == 0
    measured = _measure(folder, root / "measured.json")
    return {"root": root, "logs": logs, "folder": folder, "measured": root / "measured.json", "rows": measured}


def _host_log(logs: Path) -> Path:
    """The host target's log in a log root (the root holds other entries too: its lock, other targets)."""
    return logs / target_key(resolve_target("host"))


def _tampered(exported: dict, tmp_path: Path, change) -> Path:
    measured = json.loads(exported["measured"].read_text())
    change(measured)
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(measured))
    return path


def _log_lines(logs: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in _host_log(logs).glob("database_*.json")}


def test_the_folder_is_a_bundle_of_distinct_candidates_with_the_default_first(exported):
    folder = exported["folder"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "run.py").exists() and (folder / "measure.py").exists()
    conv, relu = _by_workload(manifest).values()
    for group in (conv, relu):
        assert [k["candidate"]["is_default"] for k in group] == [True] + [False] * (len(group) - 1)
        assert len({k["candidate"]["trace_sha256"] for k in group}) == len(group)
        assert len({k["references"] for k in group}) == 1  # one reference per workload, shared
        assert all(k["schedule"]["source"] == "candidate" for k in group)
    assert 2 <= len(conv) <= 4  # the default and up to 3 sampled tilings
    assert len(relu) == 1  # our relu rule has nothing to sample: only its default schedule
    export = conv[0]["candidate"]["export"]
    ledger = json.loads((_host_log(exported["logs"]) / "offline" / f"{export}.json").read_text())
    assert set(ledger["candidates"]) == {k["candidate"]["id"] for k in manifest["kernels"]}
    for kernel in manifest["kernels"]:
        entry = ledger["candidates"][kernel["candidate"]["id"]]
        assert entry["trace"] == kernel["candidate"]["trace"]
        expected = hashlib.sha256(offline.canonical_json(entry["trace"]).encode()).hexdigest()
        assert entry["trace_sha256"] == expected


def test_measured_candidates_become_records_that_the_layers_use(exported, tmp_path, monkeypatch, capsys):
    rows = exported["rows"]["kernels"]
    assert [r["status"] for r in rows] == ["ok"] * len(rows) and all(r["median_us"] > 0 for r in rows)
    assert main(["logs", "import", str(exported["measured"]), "--log-dir", str(exported["logs"])]) == 0
    out = capsys.readouterr().out
    assert "measured on" in out and "x over the default" in out and "new record(s)" in out
    log = TuningLog(_host_log(exported["logs"]))
    imported = {r["candidate"]["id"] for r in rows}
    assert {r.id for records in log.all_records().values() for r in records} == imported
    # a second import adds nothing
    report = import_measurements(exported["measured"], exported["logs"])
    assert sum(w.imported for w in report.workloads.values()) == 0
    assert sum(w.already for w in report.workloads.values()) == len(rows)
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(exported["logs"]))
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(tmp_path / "cache"))
    conv = tl.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-4, atol=1e-4)
    (kernel,) = conv.kernels.values()
    assert kernel.provenance["source"] == "tuned" and kernel.provenance["record"] in imported
    assert kernel.provenance["origin"] == f"measured offline on {exported['rows']['device']}"


def test_measure_py_goes_on_after_a_kernel_that_killed_it(exported, tmp_path):
    """What measure.py leaves when a candidate takes the process down: the rows before it, and that candidate
    written as failed before it ran.  Run again, it keeps those and measures the rest."""
    rows = exported["rows"]["kernels"]
    assert len(rows) >= 3
    died = {**rows[1], "status": "failed", "problem": "the process died while running it"}
    died.pop("median_us")
    left = {**exported["rows"], "kernels": [rows[0], died]}
    (tmp_path / "measured.json").write_text(json.dumps(left))
    measured = _measure(exported["folder"], tmp_path / "measured.json")
    assert [r["name"] for r in measured["kernels"]] == [r["name"] for r in rows]
    assert measured["kernels"][:2] == [rows[0], died]
    assert [r["status"] for r in measured["kernels"][2:]] == ["ok"] * (len(rows) - 2)


def test_a_measured_file_with_an_altered_trace_is_refused_whole(exported, tmp_path):
    def alter(measured: dict) -> None:
        trace = measured["kernels"][1]["candidate"]["trace"]
        trace[0].append(["Annotate", ["b0", '"x"'], ["pragma_import_llvm"], []])

    before = _log_lines(exported["logs"])
    with pytest.raises(MeasuredFileError, match="trace differ from what was exported; refusing the whole file"):
        import_measurements(_tampered(exported, tmp_path, alter), exported["logs"])
    assert _log_lines(exported["logs"]) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(target_key="llvm-aarch64-linux-gnu-cortex-a72-+neon"), "which this machine did not export"),
        (lambda m: m["kernels"][0]["candidate"].update(id="0" * 20), "was not exported in"),
        (lambda m: m["kernels"][0]["candidate"].update(is_default=False), "is_default differ"),
        (lambda m: m["kernels"][0]["candidate"].update(target_key="cuda-sm_90"), "another target or export"),
        (lambda m: m.update(device="GPU\x1b[2J"), "not a device name"),
        (lambda m: m.update(format=99), "format 99"),
        (lambda m: m["kernels"].append(m["kernels"][0]), "measured twice"),
    ],
)
def test_a_tampered_measured_file_is_refused_with_what_is_wrong(exported, tmp_path, change, message):
    with pytest.raises(MeasuredFileError, match=message):
        import_measurements(_tampered(exported, tmp_path, change), exported["logs"])


def test_the_import_command_reports_a_refused_file_in_one_line(exported, tmp_path, capsys):
    path = tmp_path / "measured.json"
    path.write_text("{not json")
    assert main(["logs", "import", str(path), "--log-dir", str(exported["logs"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tvmlayers logs import: error: ") and "is not JSON" in err


def test_a_candidate_marked_ok_without_a_time_is_skipped_and_said(exported, tmp_path):
    def fake_ok(measured: dict) -> None:
        measured["kernels"][1].update(status="ok", median_us=None)

    logs = _fresh_log(exported, tmp_path)
    report = import_measurements(_tampered(exported, tmp_path, fake_ok), logs)
    assert any("marked ok but without a run time; not imported" in line for line in report.skipped)
    conv = next(w for w in report.workloads.values() if w.spec.op == "conv2d")
    assert conv.failed == 1 and conv.imported == len(_by_workload_rows(exported)[0]) - 1


def _by_workload_rows(exported: dict) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in exported["rows"]["kernels"]:
        groups.setdefault(row["candidate"]["workload_hash"], []).append(row)
    return list(groups.values())


def test_candidates_that_compute_wrong_results_are_counted_not_imported(exported, tmp_path):
    folder = tmp_path / "cand"
    shutil.copytree(exported["folder"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    conv = next(k for k in manifest["kernels"] if k["layer"] == "conv2d")
    with np.load(folder / conv["references"]) as data:
        arrays = dict(data)
    arrays["output0"] = arrays["output0"] * 2  # torch's answer doubled: every conv candidate now differs from it
    np.savez(folder / conv["references"], **arrays)
    manifest["files"][conv["references"]] = hashlib.sha256((folder / conv["references"]).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    measured = _measure(folder, tmp_path / "measured.json")
    assert {r["status"] for r in measured["kernels"] if r["candidate"]["spec"]["op"] == "conv2d"} == {"wrong"}
    logs = _fresh_log(exported, tmp_path)
    report = import_measurements(tmp_path / "measured.json", logs)
    conv_counts = next(w for w in report.workloads.values() if w.spec.op == "conv2d")
    assert conv_counts.imported == 0 and conv_counts.wrong == len(_by_workload_rows(exported)[0])
    assert conv_counts.best_us is None


def test_a_second_export_after_an_import_brings_new_candidates(exported, tmp_path):
    logs = _fresh_log(exported, tmp_path)
    first = {r["candidate"]["id"] for r in exported["rows"]["kernels"] if not r["candidate"]["is_default"]}
    assert first  # the first export had sampled candidates
    import_measurements(exported["measured"], logs)
    again = export_candidates(_workloads(CONV, RELU), "host", tmp_path / "again", count=3, log_dir=logs)
    groups = list(again.candidates.values())
    assert all(group[0].is_default for group in groups)  # the baseline is measured again, with the others
    assert not first & {c.id for group in groups for c in group[1:]}


def _fresh_log(exported: dict, tmp_path: Path) -> Path:
    """A copy of the exported log root as it was right after the export: its ledger, no records."""
    logs = tmp_path / "logs"
    shutil.copytree(exported["logs"], logs)
    for records in _host_log(logs).glob("database_*.json"):
        records.write_text("")
    return logs


def test_an_import_that_dies_before_its_commit_leaves_the_records_as_they_were(exported, tmp_path, monkeypatch):
    logs = _fresh_log(exported, tmp_path)
    records = _host_log(logs) / RECORD_FILE
    before = records.read_text() if records.exists() else None  # an export alone may not have created it
    real_replace = Path.replace

    def dies_at_the_record_file(self: Path, target: Path) -> Path:
        if Path(target).name == RECORD_FILE:
            raise KeyboardInterrupt  # the process killed just before its commit
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", dies_at_the_record_file)
    with pytest.raises(KeyboardInterrupt):
        import_measurements(exported["measured"], logs)
    monkeypatch.undo()
    log = TuningLog(_host_log(logs))
    assert log.all_records() == {} and (records.read_text() if records.exists() else None) == before
    report = import_measurements(exported["measured"], logs)  # the next import completes it
    assert sum(w.imported for w in report.workloads.values()) == len(exported["rows"]["kernels"])


def test_an_interrupted_export_leaves_no_folder_and_no_ledger(tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second candidate compiles
        return real_compile(*args, **kwargs)

    real_compile = offline.tvm.compile
    monkeypatch.setattr(offline.tvm, "compile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_candidates(_workloads(CONV), "host", tmp_path / "cand", count=2, log_dir=tmp_path / "logs")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no staging left, no ledger


def test_an_air_gapped_arm_board_round_trip_under_qemu(tmp_path, monkeypatch, capsys):
    """rasp4b: candidates cross-compiled here, measured by the board's aarch64 Python (qemu), imported, and then
    `tvmlayers compile --target rasp4b` builds the bundle with the imported records."""
    env = ensure_arm_environment()
    logs = tmp_path / "logs"
    save_workloads(_workloads(CONV, RELU), tmp_path / "w.toml")
    report = export_candidates(tmp_path / "w.toml", "rasp4b", tmp_path / "cand", count=3, log_dir=logs)
    assert [len(group) for group in report.candidates.values()][1] == 1
    measured = _measure(tmp_path / "cand", tmp_path / "measured.json", env.python_argv())
    assert {r["status"] for r in measured["kernels"]} == {"ok"}, measured["kernels"]
    assert "aarch64" in measured["device"]
    imported = import_measurements(tmp_path / "measured.json", logs)
    assert sum(w.imported for w in imported.workloads.values()) == len(measured["kernels"])
    log = TuningLog(logs / report.target_key)
    best = {shash: log.best(shash) for shash in imported.workloads}
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(logs))
    assert main(["compile", str(tmp_path / "w.toml"), "--target", "rasp4b", "-o", str(tmp_path / "bundle")]) == 0
    bundle = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    for kernel in bundle["kernels"]:
        shash = next(h for h, w in imported.workloads.items() if w.spec.to_json() == kernel["spec"])
        assert kernel["schedule"]["source"] == "tuned" and kernel["schedule"]["record"] == best[shash].id
        assert kernel["schedule"]["origin"] == f"measured offline on {measured['device']}"


def test_sm_90_candidates_carry_sass_and_ptx(tmp_path):
    """Built here only (nvcc, no GPU): the GPU check script measures them."""
    report = export_candidates(
        _workloads(CONV), "sm_90", tmp_path / "cand", count=1, log_dir=tmp_path / "logs", references=False
    )
    manifest = json.loads((tmp_path / "cand" / "manifest.json").read_text())
    assert report.target_key == "cuda-sm_90" and len(manifest["kernels"]) == 2
    for kernel in manifest["kernels"]:
        library = tmp_path / "cand" / kernel["library"]
        assert kernel["device_code"]["sha256"] == hashlib.sha256(embedded_fatbin(library)).hexdigest()
        sass, ptx, _ = _device_code(library, tmp_path)
        assert sass == ["sm_90"] and ptx == ["sm_90"]
        assert kernel["references"] is None

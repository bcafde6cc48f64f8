"""Tuning end to end on tiny workloads: records measured and written, picked up by a fresh process,
resumed, corrupt lines, records of another target, wrong records, merging, and RPC on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import tvm.rpc

import tvmlayers as tl
from conftest import conv3x3_spec, conv_child_report, start_conv_child
from tvmlayers import ops, schedules
from tvmlayers.fingerprint import code_fingerprint
from tvmlayers.locks import file_lock
from tvmlayers.records.database import RECORD_FILE, TuningLog, merge_logs, workload_hash
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target
from tvmlayers.tuning import interrupt as interrupt_module
from tvmlayers.tuning.interrupt import Interrupt, InterruptCallback
from tvmlayers.tuning.tuner import tune
from tvmlayers.verify import check_kernel
from tvmlayers.workloads import Workload, format_workloads, load_workloads, save_workloads

HOST = resolve_target("host")
# The tiny conv every tuning test uses: small enough that a build and a run take well under a second.
CONV = conv3x3_spec((1, 8, 6, 6), 16)


def _log(root: Path) -> TuningLog:
    return TuningLog.for_target(root, HOST)


def _hash(spec: KernelSpec) -> str:
    layout = schedules.weight_layout(spec)
    return workload_hash(ops.prim_func(spec, layout))


@pytest.fixture(scope="module")
def tuned_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log root with a few measured records of CONV (shared: tuning costs tens of seconds)."""
    root = tmp_path_factory.mktemp("logs")
    (result,) = tune([CONV], HOST, trials=6, log_dir=root, trials_per_iter=6, progress=False)
    assert result.best is not None and result.trials >= 1
    return root


def test_records_are_measured_and_written(tuned_log: Path) -> None:
    log = _log(tuned_log)
    records = log.records(_hash(CONV))
    assert records and all(r.seconds > 0 for r in records)
    assert records == sorted(records, key=lambda r: r.seconds)
    meta = json.loads((log.directory / "tvmlayers.json").read_text())
    assert meta["format"] == 1 and meta["tvm_version"] and meta["target"]["mcpu"] == HOST.attrs["mcpu"]
    assert meta["workloads"][_hash(CONV)]["op"] == "conv2d"


def _child(env: dict) -> dict:
    return conv_child_report(start_conv_child(6, env))


def test_a_fresh_process_uses_the_tuned_record(tuned_log: Path, tmp_path: Path) -> None:
    report = _child({"TVMLAYERS_TUNING_LOGS": str(tuned_log), "TVMLAYERS_CACHE_DIR": str(tmp_path)})
    best = _log(tuned_log).best(_hash(CONV))
    assert report["provenance"]["source"] == "tuned" and report["provenance"]["record"] == best.id
    assert report["error"] < 1e-4
    # without the log the same layer falls back to the default rule (and a different cache key)
    report = _child({"TVMLAYERS_TUNING_LOGS": str(tmp_path / "empty"), "TVMLAYERS_CACHE_DIR": str(tmp_path)})
    assert report["provenance"] == {"source": "default", "rule": "cpu.conv2d_blocked"}


def test_rerun_counts_existing_trials(tuned_log: Path) -> None:
    log = _log(tuned_log)
    before = log.trials(_hash(CONV))
    lines = (log.directory / RECORD_FILE).read_text()
    (result,) = tune([CONV], HOST, trials=before, log_dir=tuned_log, progress=False)
    assert result.trials == before, "nothing left to do: no new trials"
    assert (log.directory / RECORD_FILE).read_text() == lines, "no search ran and no baseline was re-measured"


def test_default_schedule_is_measured_again_when_the_schedule_code_changes(
    tuned_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "logs"
    shutil.copytree(tuned_log, root)
    log = _log(root)
    trials = log.trials(_hash(CONV))

    def meta() -> dict:
        return json.loads((log.directory / "tvmlayers.json").read_text())

    def lines() -> int:
        return len((log.directory / RECORD_FILE).read_text().splitlines())

    assert meta()["baseline_code"][_hash(CONV)] == code_fingerprint()
    before = lines()
    monkeypatch.setattr("tvmlayers.tuning.tuner.code_fingerprint", lambda: "edited")
    tune([CONV], HOST, trials=trials, log_dir=root, progress=False)
    assert lines() == before + 1, "the default schedule of the edited code is measured and recorded"
    assert meta()["baseline_code"][_hash(CONV)] == "edited"
    assert meta()["baselines"][_hash(CONV)] in meta()["retimed"][_hash(CONV)]
    tune([CONV], HOST, trials=trials, log_dir=root, progress=False)
    assert lines() == before + 1, "once per version of the code"


def test_a_second_tuner_on_the_same_log_is_refused(tmp_path: Path) -> None:
    with file_lock(_log(tmp_path).directory / ".tuner.lock"):  # as a running tuner holds it
        with pytest.raises(RuntimeError, match="another tvmlayers tune is already writing"):
            tune([CONV], HOST, trials=1, log_dir=tmp_path, progress=False)


def test_a_search_that_builds_nothing_new_stops_with_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """MetaSchedule can keep searching spaces it has measured out (MobileNetV2 under ``--space ours``: 15
    minutes without a build); after ``STALL_S`` without a build or a measurement tuning ends as if done.  Here
    the limit is a second, shorter than a search round, so it ends after the first batch of each task."""
    monkeypatch.setattr(interrupt_module, "STALL_S", 1.0)
    depthwise = conv3x3_spec((1, 16, 6, 6), 16, groups=16)
    results = tune([CONV, depthwise], HOST, trials=200, log_dir=tmp_path, space="ours", progress=False)
    assert "nothing new to build or measure for 1 s" in capsys.readouterr().err
    assert all(r.best is not None and 1 <= r.trials < 200 for r in results)
    log = _log(tmp_path)
    assert all(log.records(_hash(spec)) for spec in (CONV, depthwise))


def test_interrupted_tuning_keeps_records_and_resumes(tmp_path: Path) -> None:
    workload_file = tmp_path / "tiny.toml"
    save_workloads([Workload.from_spec(CONV)], workload_file, name="tiny")
    command = [  # the CLI, with SIGINT handled as in a terminal's foreground job even when this test
        # run was started in the background, where SIGINT is ignored and children inherit that
        sys.executable,
        "-c",
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from tvmlayers.cli import main; sys.exit(main(sys.argv[1:]))",
        "tune",
        str(workload_file),
        "--trials",
        "500",
        "--trials-per-iter",
        "4",
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    # its own process group, so that SIGINT reaches the build/run workers as well, as Ctrl-C in a terminal does
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    records = _log(tmp_path / "logs").directory / RECORD_FILE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (records.exists() and records.read_text().count("\n") >= 4):
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
    _, stderr = process.communicate(timeout=180)  # stops within one batch of 4 trials at the latest
    assert process.returncode == 130 and "interrupted" in stderr, stderr[-2000:]
    kept = _log(tmp_path / "logs").trials(_hash(CONV))
    assert kept >= 4, "the records measured before the interrupt are kept"
    assert all(json.loads(line) for line in records.read_text().splitlines())
    (result,) = tune(
        str(workload_file), HOST, trials=kept + 4, log_dir=tmp_path / "logs", trials_per_iter=4, progress=False
    )
    assert kept < result.trials <= kept + 8, "resumed: only the missing trials were run"


@pytest.fixture
def python_sigint() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive run
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_raises_only_where_python_can_unwind(python_sigint: None) -> None:
    # A KeyboardInterrupt thrown inside MetaSchedule's C++ ended in std::terminate (a segfault) in most
    # Ctrl-C's; one landing in a garbage-collection callback was dropped and tuning went on.
    interrupt = Interrupt()
    with pytest.raises(KeyboardInterrupt), interrupt.catching():
        signal.raise_signal(signal.SIGINT)  # as if the main thread were in C++: only noted
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            InterruptCallback(interrupt).apply(None, 0, [], [], [])  # the next measured batch stops
        raise RuntimeError("")  # what a KeyboardInterrupt becomes when it crosses MetaSchedule's C++
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Python's handler is back"
    waiting = Interrupt()
    with pytest.raises(KeyboardInterrupt), waiting.catching(), waiting.raising():
        signal.raise_signal(signal.SIGINT)  # waiting in the Python builder/runner: raises at once
        pytest.fail("not interrupted")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: SIGINT stays ignored
    with Interrupt().catching():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_corrupt_line_is_reported_and_skipped(tuned_log: Path, tmp_path: Path) -> None:
    root = tmp_path / "logs"
    merge_logs([tuned_log], root)
    records = _log(root).directory / RECORD_FILE
    with open(records, "a") as f:
        f.write('[0, [["truncated\n')
    with pytest.warns(UserWarning, match=rf"{records}:2: skipping a corrupt tuning-log line"):
        assert _log(root).best(_hash(CONV)) is not None
    assert _log(root).repair() == 1
    assert (records.parent / (RECORD_FILE + ".corrupt")).read_text().startswith('[0, [["truncated')


def test_records_of_another_target_are_never_applied(tuned_log: Path, tmp_path: Path) -> None:
    root = tmp_path / "logs"
    merge_logs([tuned_log], root)
    records = _log(root).directory / RECORD_FILE
    lines = []
    for line in records.read_text().splitlines():
        index, (trace, secs, target, args) = json.loads(line)
        target = {**target, "mcpu": "skylake-avx512"}  # measured on another CPU
        lines.append(json.dumps([index, [trace, secs, target, args]]))
    records.write_text("\n".join(lines) + "\n")
    assert _log(root).records(_hash(CONV)) == []
    assert _log(root).best(_hash(CONV)) is None


def test_an_unusable_record_is_rejected_and_skipped(tuned_log: Path, tmp_path: Path, monkeypatch) -> None:
    """A record whose trace no longer replays (here: it names a block the kernel does not have) must never
    reach the user as an error: it is marked rejected, and the layer falls back to the default rule."""
    root = tmp_path / "logs"
    merge_logs([tuned_log], root)
    log = _log(root)
    records = log.directory / RECORD_FILE
    index, (trace, secs, target, args) = json.loads(records.read_text().splitlines()[0])
    instructions = json.dumps(trace[0])
    assert '"GetSBlock"' in instructions
    tampered = instructions.replace('["conv_blocked", "main"]', '["no_such_block", "main"]')
    assert tampered != instructions
    trace = [json.loads(tampered), trace[1]]
    records.write_text(json.dumps([index, [trace, secs, target, args]]) + "\n")
    assert log.best(_hash(CONV)) is not None
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(root))
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(tmp_path / "cache"))
    x, w, b = torch.randn(1, 8, 6, 6), torch.randn(16, 8, 3, 3), torch.randn(16)
    with pytest.warns(UserWarning, match=r"is unusable for conv2d 1x8x6x6 .*: does not build.*marked rejected"):
        out = tl.functional.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)
    assert log.best(_hash(CONV)) is None
    assert list(json.loads((log.directory / "tvmlayers.json").read_text())["rejected"].values())[0].startswith(
        "does not build"
    )


def test_check_kernel_flags_a_wrong_kernel() -> None:
    def zeros(*args: torch.Tensor) -> None:
        args[-1].zero_()

    problem = check_kernel(CONV, {"weight_block": 16}, zeros)
    assert problem is not None and "differs from torch" in problem


def test_merge_keeps_the_best_record_per_workload(tuned_log: Path, tmp_path: Path) -> None:
    merged = merge_logs([tuned_log], tmp_path / "merged")
    assert list(merged.values()) == [1]
    log = _log(tmp_path / "merged")
    assert len(log.records(_hash(CONV))) == 1
    assert log.best(_hash(CONV)).seconds == _log(tuned_log).best(_hash(CONV)).seconds
    assert log.trials(_hash(CONV)) == _log(tuned_log).trials(_hash(CONV))


def test_workload_file_round_trip_and_errors(tmp_path: Path) -> None:
    workloads = [Workload.from_spec(CONV, count=3), Workload.from_spec(KernelSpec.make("relu", (64,), "float32", HOST))]
    path = tmp_path / "w.toml"
    path.write_text(format_workloads(workloads, name="two", target="host"))
    loaded, settings = load_workloads(path)
    assert loaded == workloads and settings == {"name": "two", "target": "host"}
    path.write_text('format = 1\n[[layer]]\nop = "conv3d"\ninput_shape = [1]\n')
    with pytest.raises(ValueError, match=r"\[\[layer\]\] number 1 is invalid: unknown op 'conv3d'"):
        load_workloads(path)
    path.write_text("format = 2\n")
    with pytest.raises(ValueError, match="expected 'format = 1'"):
        load_workloads(path)


def test_extract_workloads_counts_repeated_calls() -> None:
    from tvmlayers.extract import extract_workloads

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
    )
    workloads = extract_workloads(model, torch.randn(1, 3, 10, 10))
    counts = {(w.op, w.input_shape): w.count for w in workloads}
    assert counts == {("conv2d", (1, 3, 10, 10)): 1, ("relu", (1, 8, 10, 10)): 2, ("conv2d", (1, 8, 10, 10)): 2}
    assert extract_workloads(tl.convert(model, fuse=False), torch.randn(1, 3, 10, 10)) == workloads
    fused = extract_workloads(tl.convert(model), torch.randn(1, 3, 10, 10))  # what the converted model runs
    assert [(w.op, w.input_shape, dict(w.params).get("relu"), w.count) for w in fused] == [
        ("conv2d", (1, 3, 10, 10), True, 1),
        ("conv2d", (1, 8, 10, 10), True, 1),
        ("conv2d", (1, 8, 10, 10), None, 1),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _registered(port: int, key: str) -> bool:
    tracker = tvm.rpc.connect_tracker("127.0.0.1", port)
    try:
        return any(info["key"] == f"server:{key}" for info in tracker.summary()["server_info"])
    finally:
        tracker.close()


def _wait_until(ready: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def test_tuning_through_an_rpc_tracker_on_loopback(tmp_path: Path) -> None:
    tracker_port, server_port = _free_port(), _free_port()
    python = sys.executable
    tracker = subprocess.Popen(
        [
            python,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(tracker_port),
            "--port-end",
            str(tracker_port + 1),
        ],
        start_new_session=True,  # with its popen worker, which serves: killed with the group below
    )
    server = None
    try:
        _wait_until(lambda: _listens(tracker_port), "the tracker listens")  # importing tvm can take long under load
        server = subprocess.Popen(
            [
                python,
                "-m",
                "tvm.exec.rpc_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(server_port),
                "--port-end",
                str(server_port + 1),
                "--tracker",
                f"127.0.0.1:{tracker_port}",
                "--key",
                "loopback",
            ],
            start_new_session=True,
        )
        _wait_until(lambda: _registered(tracker_port, "loopback"), "the server registers")
        assert tracker.poll() is None and server.poll() is None, "tracker and server are up"
        (result,) = tune(
            [CONV],
            HOST,
            trials=2,
            log_dir=tmp_path,
            trials_per_iter=2,
            rpc_tracker=f"127.0.0.1:{tracker_port}",
            rpc_key="loopback",
            progress=False,
        )
        assert result.trials >= 1 and result.best is not None and result.best.seconds > 0
    finally:
        for process in (server, tracker):
            if process is not None:  # the group: a terminated server or tracker leaves its popen worker running
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)


def test_best_record_follows_the_retimed_times(tuned_log: Path) -> None:
    log = _log(tuned_log)
    meta = json.loads((log.directory / "tvmlayers.json").read_text())
    retimed = meta["retimed"][_hash(CONV)]
    baseline = meta["baselines"][_hash(CONV)]
    assert baseline in retimed, "the default schedule is always re-timed with the candidates"
    assert log.best(_hash(CONV)).id == min(retimed, key=retimed.get)

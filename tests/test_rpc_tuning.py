"""Tuning for a board over RPC, with an aarch64 RPC server under qemu standing in for a Raspberry Pi 4
(tvmlayers.tuning.qemu_board): candidates are compiled and linked here for the Cortex-A72, measured on the
board, and the chosen records checked there against torch; the records land in the rasp4b log, which
``tvmlayers compile`` then uses.  Emulated timings are meaningless: only where things run and what they
compute is asserted."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tvm
from tvm import rpc
from tvm.s_tir.meta_schedule.runner.rpc_runner import RPCRunnerFuture

import tvmlayers.verify
from conftest import conv3x3_spec
from tvmlayers import ops, schedules
from tvmlayers.bundle import compile_bundle
from tvmlayers.cli import main
from tvmlayers.records.database import TuningLog, workload_hash
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target, runs_here, target_key
from tvmlayers.tuning.devices import RPCDevice
from tvmlayers.tuning.interrupt import Interrupt, InterruptibleRunnerFuture
from tvmlayers.tuning.qemu_board import QemuBoard
from tvmlayers.tuning.tuner import TaskResult, tune
from tvmlayers.workloads import Workload, save_workloads

RASP4B = resolve_target("rasp4b")
KEY = "rasp4b"
CONV = conv3x3_spec((1, 8, 6, 6), 16, target=RASP4B)
RELU = KernelSpec.make("relu", (256,), "float32", RASP4B)
TRIALS = 4


def _hash(spec: KernelSpec) -> str:
    return workload_hash(ops.prim_func(spec, schedules.weight_layout(spec)))


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def board() -> Iterator[QemuBoard]:
    """The emulated board; stopping it must end every process it started (qemu, TVM's workers, sessions)."""
    with QemuBoard(KEY) as board:
        started = [psutil.Process(p.pid) for p in board.processes.values()]
        yield board
        family = [*started, *(c for p in started for c in p.children(recursive=True))]
    alive = [p.pid for p in family if _running(p)]
    assert not alive, f"the qemu board left processes running: {alive}"


@pytest.fixture(scope="module")
def tuned(board: QemuBoard, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[TaskResult]]:
    """A log root with the conv and the relu tuned on the board (shared: tuning through qemu takes a minute)."""
    root = tmp_path_factory.mktemp("logs")
    results = tune(
        [CONV, RELU], KEY, trials=TRIALS, log_dir=root, trials_per_iter=TRIALS, rpc_tracker=board.tracker,
        rpc_key=KEY, progress=False,
    )  # fmt: skip
    return root, results


def test_records_land_in_the_rasp4b_log_and_were_measured_on_the_board(tuned) -> None:
    root, results = tuned
    log = TuningLog.for_target(root, RASP4B)
    assert log.directory.name == target_key(RASP4B)
    meta = json.loads((log.directory / "tvmlayers.json").read_text())
    assert meta["target"]["mtriple"] == "aarch64-linux-gnu" and meta["target"]["mcpu"] == "cortex-a72"
    for spec, result in zip([CONV, RELU], results, strict=True):
        assert result.spec == spec and result.best is not None
        records = log.records(_hash(spec))
        assert 2 <= len(records) <= TRIALS and result.trials == len(records)
        assert all(r.target_key == target_key(RASP4B) and r.seconds > 0 for r in records)
        # the default schedule was measured on the board first, and the best records timed again there
        assert meta["baselines"][_hash(spec)] in meta["retimed"][_hash(spec)]
        assert result.best.id in meta["retimed"][_hash(spec)]
    assert not meta["rejected"], "every record computed what torch computes on the board"


def _run_on_board(board: QemuBoard, library: Path, symbol: str, inputs: list, outputs: list) -> list[np.ndarray]:
    """Upload ``library``, call ``symbol`` on ``inputs`` there, return the outputs (shaped like ``outputs``)."""
    host, port = board.tracker.split(":")
    tracker = rpc.connect_tracker(host, int(port))
    session = tracker.request(KEY, session_timeout=60)
    tracker.close()
    session.upload(str(library), library.name)
    device = session.cpu()
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    results = [tvm.runtime.empty(o.shape, str(o.dtype), device) for o in outputs]
    session.load_module(library.name)[symbol](*args, *results)
    return [r.numpy() for r in results]


def test_the_rasp4b_bundle_uses_the_tuned_records_which_compute_torchs_results_on_the_board(
    tuned, board: QemuBoard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, results = tuned
    monkeypatch.setenv("TVMLAYERS_TUNING_LOGS", str(root))
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(tmp_path / "cache"))
    assert not runs_here(RASP4B), "the kernels can only be checked on the board"
    workloads = [Workload.from_spec(s) for s in (CONV, RELU)]
    manifest = json.loads(compile_bundle(workloads, KEY, tmp_path / "b", progress=False).read_text())
    for kernel, result in zip(manifest["kernels"], results, strict=True):
        assert kernel["schedule"]["source"] == "tuned" and kernel["schedule"]["record"] == result.best.id
        library = tmp_path / "b" / kernel["library"]
        assert int.from_bytes(library.read_bytes()[18:20], "little") == 183, "an ELF for AArch64 (EM_AARCH64)"
        with np.load(tmp_path / "b" / kernel["references"]) as references:
            inputs = [references[f"input{i}"] for i in range(len(kernel["inputs"]))]
            expected = [references[f"output{i}"] for i in range(len(kernel["outputs"]))]  # torch's, on this host
        for got, want in zip(_run_on_board(board, library, kernel["symbol"], inputs, expected), expected, strict=True):
            limit = kernel["tolerance"] * (1 + np.abs(want).max())
            assert np.abs(got - want).max() <= limit, kernel["describe"]


def test_a_record_that_computes_wrong_results_on_the_board_is_rejected(
    tuned, board: QemuBoard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, results = tuned
    shutil.copytree(root, tmp_path / "logs")
    conv_best, relu_best = (r.best.id for r in results)
    # torch's reference of the first conv check is tampered with: the board's outputs for the record checked
    # first (the best one) no longer match, as when a kernel computes something else on the device
    reference, tampered = tvmlayers.verify.torch_reference, []

    def tampered_once(spec: KernelSpec, *args: object) -> list:
        outputs = reference(spec, *args)
        if spec.op == "conv2d" and not tampered:
            tampered.append(spec)
            return [o + 1 for o in outputs]
        return outputs

    monkeypatch.setattr(tvmlayers.verify, "torch_reference", tampered_once)
    # one trial: everything is measured already, so this only checks the chosen records on the board again
    conv, relu = tune(
        [CONV, RELU], KEY, trials=1, log_dir=tmp_path / "logs", rpc_tracker=board.tracker, rpc_key=KEY,
        progress=False,
    )  # fmt: skip
    assert tampered, "the conv's best record was checked on the board"
    log = TuningLog.for_target(tmp_path / "logs", RASP4B)
    rejected = json.loads((log.directory / "tvmlayers.json").read_text())["rejected"]
    assert list(rejected) == [conv_best] and rejected[conv_best].startswith("output 0 differs from torch")
    assert conv.best is not None and conv.best.id != conv_best, "the next record, checked on the board, replaces it"
    assert relu.best.id == relu_best
    assert log.best(_hash(CONV)).id == conv.best.id, "what tvmlayers compile now picks"


def test_tune_command_over_rpc(tuned, board: QemuBoard, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, results = tuned
    shutil.copytree(root, tmp_path / "logs")
    workloads = tmp_path / "w.toml"
    save_workloads([Workload.from_spec(CONV), Workload.from_spec(RELU)], workloads)
    command = ["tune", str(workloads), "--target", KEY, "--trials", "1", "--log-dir", str(tmp_path / "logs")]
    assert main([*command, "--rpc-tracker", board.tracker, "--rpc-key", KEY]) == 0
    out = capsys.readouterr().out
    assert all(r.best.id in out for r in results), out
    with pytest.raises(RuntimeError, match=r"no device is registered .* key 'rasp5' \(registered: rasp4b\)"):
        RPCDevice(board.tracker, "rasp5", RASP4B, timeout=60).check_registered(wait=0)


def test_a_target_of_another_architecture_is_tuned_over_rpc_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot run on this machine.*--rpc-tracker HOST:PORT --rpc-key KEY"):
        tune([CONV], KEY, trials=1, log_dir=tmp_path)
    with pytest.raises(ValueError, match="--rpc-tracker needs --rpc-key"):
        tune([CONV], KEY, trials=1, log_dir=tmp_path, rpc_tracker="127.0.0.1:9190")
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RuntimeError, match=f"no RPC tracker answers at {nobody}"):
        tune([CONV], KEY, trials=1, log_dir=tmp_path, rpc_tracker=nobody, rpc_key=KEY)
    assert not (tmp_path / target_key(RASP4B)).exists(), "nothing was written"


def test_ctrl_c_stops_the_wait_for_a_remote_measurement() -> None:
    # MetaSchedule's C++ waits in a runner future's result(); an RPC measurement takes seconds on a board
    measurement = concurrent.futures.Future()
    threading.Timer(10, measurement.set_result, ([1e-3],)).start()  # a measurement that takes 10 s
    interrupt = Interrupt()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive run
    try:
        # Ctrl-C after half a second: a signal to the process, which the main thread receives
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt), interrupt.catching():
            InterruptibleRunnerFuture(RPCRunnerFuture(measurement, timeout_sec=60), interrupt).result()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 5, "raised while waiting, not once the measurement ended"

"""Clear errors instead of TVM internals: tensors too large for 32-bit indices, inconsistent workload
files, the CLI's one-line errors, and tuning that leaves no TVM popen worker and no shutdown noise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import tvm
from tvm.support.popen_pool import PopenPoolExecutor

import tvmlayers as tl
import tvmlayers.functional as F
from conftest import HOST, conv3x3_spec, popen_workers
from tvmlayers import layer_specs
from tvmlayers.cli import main
from tvmlayers.records.database import RECORD_FILE, TuningLog
from tvmlayers.spec import KernelSpec
from tvmlayers.tuning.pools import close_pool
from tvmlayers.tuning.tuner import tune
from tvmlayers.workloads import Workload, load_workloads, save_workloads

LIMIT = "2,147,483,647"


def _huge(*shape: int) -> torch.Tensor:
    """A tensor of that shape without its memory: one element, expanded (stride 0)."""
    return torch.zeros(()).expand(*shape)


@pytest.fixture
def no_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    def compile_(*args: object, **kwargs: object) -> None:
        raise AssertionError("a kernel was compiled: the size check must come first")

    monkeypatch.setattr(tvm, "compile", compile_)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: F.relu(_huge(65536, 32768)), r"relu: the input tensor of size \[65536, 32768\] has 2,147,483,648"),
        (lambda: tl.ReLU()(_huge(4, 2**20, 1024)), r"relu: the input tensor .* at most 1 \(of 4\)"),
        (
            lambda: F.conv2d(_huge(2, 8, 16384, 16384), torch.zeros(8, 8, 1, 1)),
            r"conv2d: the input tensor of size \[2, 8, 16384, 16384\] has 4,294,967,296 elements.*"
            r"even one entry of the batch is too large",
        ),
        (
            lambda: tl.Conv2d(1, 16, 3, padding=1)(_huge(4, 1, 8192, 8192)),
            r"conv2d: the output tensor of size \[4, 16, 8192, 8192\].* at most 1 \(of 4\)",
        ),
        (
            lambda: tl.MaxPool2d(2)(_huge(16, 16, 4096, 4096)),
            r"max_pool2d: the input tensor .* split the call along the batch into calls of at most 7 \(of 16\)",
        ),
        (
            lambda: F.linear(_huge(2**22, 1024), torch.zeros(8, 1024)),
            r"linear: the input tensor .* at most 2,097,151 \(of 4,194,304\)",
        ),
        (
            lambda: F.linear(torch.zeros(1, 2**16), _huge(2**15, 2**16)),
            r"linear: the weight tensor of size \[32768, 65536\] .* fewer outputs",
        ),
    ],
)
def test_too_many_elements_for_int32_indices(call, expected: str, no_compiling: None) -> None:
    with pytest.raises(ValueError, match=expected) as error:
        call()
    assert LIMIT in str(error.value) and "32-bit" in str(error.value)


def test_the_limit_is_where_tvm_breaks() -> None:
    # 2**31 - 1 elements compile with TVM 0.27 (checked by hand: compiling takes minutes), 2**31 do not
    assert layer_specs.relu_spec((2**31 - 1,), "float32", HOST)[0] is not None
    with pytest.raises(ValueError, match="2,147,483,648 elements"):
        layer_specs.relu_spec((2**16, 2**15), "float32", HOST)
    layer_specs.linear_spec((2**21, 1023), (16, 1023), None, "float32", HOST)  # 2**31 - 2**21 elements
    with pytest.raises(ValueError, match="the weight tensor"):
        layer_specs.conv2d_spec((1, 2**16, 1, 1), (2**15, 2**16, 1, 1), None, "float32", HOST, 1, 0, 1, 1, "zeros")


_CONV = (
    'op = "conv2d"\ninput_shape = [1, 8, 6, 6]\nweight_shape = [16, 8, 3, 3]\nstride = [1, 1]\n'
    'padding = [1, 1, 1, 1]\ndilation = [1, 1]\ngroups = 1\npadding_mode = "zeros"\nbias = true\n'
)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("weight_shape = [16, 8, 3, 3]", "weight_shape = [16, 4, 3, 3]"), "expected input.* to have 4 channels"),
        (("groups = 1", "groups = 2"), "expected input.* to have 16 channels, but got 8"),
        (("groups = 1", "groups = 3"), "expected weight to be divisible by 3"),
        (("bias = true", 'bias = "yes"'), "bias must be true or false"),
        (("padding = [1, 1, 1, 1]", "padding = [1, 1]"), r"padding must be a list of 4 integers"),
        (("stride = [1, 1]", "strides = [1, 1]"), "unknown parameter.* strides for conv2d"),
        (("dilation = [1, 1]\n", ""), "missing parameter.* dilation"),
        (('op = "conv2d"', 'op = "conv3d"'), "unknown op 'conv3d'"),
        (("weight_shape = [16, 8, 3, 3]", "weight_shape = [16, 8, 9, 9]"), "Kernel size can't be greater"),
        (("input_shape = [1, 8, 6, 6]", "input_shape = [2, 8, 16384, 16384]"), "more than the 2,147,483,647"),
    ],
)
def test_workload_file_errors_name_the_file_and_layer(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    path = tmp_path / "w.toml"
    path.write_text(f"format = 1\n\n[[layer]]\n{_CONV}\n[[layer]]\n{_CONV.replace(*edit)}")
    with pytest.raises(ValueError, match=rf"w\.toml: \[\[layer\]\] number 2 is invalid: .*{expected}"):
        load_workloads(path)


def test_workload_file_of_good_layers_loads(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(f"format = 1\n[[layer]]\n{_CONV}relu = true\n")
    (workload,) = load_workloads(path)[0]
    spec = conv3x3_spec((1, 8, 6, 6), 16)
    assert workload == Workload.from_spec(
        KernelSpec.make(spec.op, spec.input_shape, spec.dtype, HOST, **dict(spec.params), relu=True)
    )


def test_logs_merge_of_a_missing_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-logs"
    assert main(["logs", "merge", str(missing), "--into", str(tmp_path / "into")]) == 2
    assert f"tvmlayers logs merge: error: no such log folder: {missing}" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["logs", "merge", str(tmp_path / "file"), "--into", str(tmp_path / "into")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_errors_are_one_line_and_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"format = 1\n[[layer]]\n{_CONV.replace('groups = 1', 'groups = 2')}")
    assert main(["tune", str(path), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith(f"tvmlayers tune: error: {path}: [[layer]] number 1 is invalid: Given groups=2")
    assert lines[1].startswith("hint: ") and "--debug" in lines[1]
    for argv in (["--debug", "tune", str(path), "--trials", "1"], ["tune", str(path), "--trials", "1", "--debug"]):
        with pytest.raises(ValueError, match="Given groups=2"):  # the traceback, as Python prints it
            main(argv)
    assert main(["tune", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.startswith("tvmlayers tune: error: workload file not found")


CONV = conv3x3_spec((1, 8, 6, 6), 16)


@pytest.fixture
def python_sigint() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive run
    yield
    signal.signal(signal.SIGINT, previous)


def test_tuning_leaves_no_popen_worker(tmp_path: Path, python_sigint: None) -> None:
    records = TuningLog.for_target(tmp_path, HOST).directory / RECORD_FILE

    def interrupt_after_a_batch() -> None:
        deadline = time.monotonic() + 240
        while not (records.exists() and records.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.05)  # the default schedule's record and a first batch of two
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_a_batch, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as interrupted:
        tune([CONV], HOST, trials=100, log_dir=tmp_path, trials_per_iter=2, progress=False)
    # checked while the traceback holds the tuner's frames: TVM's pools, shut down only when garbage-collected,
    # kept their workers running as long as an interrupted tune's traceback lived
    left = popen_workers(str(os.getpid()))
    assert not left, [" ".join(p.cmdline()) for p in left]
    del interrupted
    (result,) = tune([CONV], HOST, trials=4, log_dir=tmp_path, trials_per_iter=2, progress=False)
    assert result.trials >= 4 and not popen_workers(str(os.getpid())), "nor after tuning that ends normally"


def test_ctrl_c_while_a_pool_closes_leaves_it_closed(python_sigint: None) -> None:
    """SIGINT inside TVM's ``PopenPoolExecutor.shutdown`` (between its lock's acquire and release) used to
    leave that lock held: the pool's threads waited for it forever and the interpreter hung at exit."""
    pool = PopenPoolExecutor(max_workers=2, timeout=60)
    list(pool.map_with_error_catching(abs, [-1, -2]))  # two workers started
    workers = [w._proc.pid for w in pool._worker_map.values()]
    real_lock = pool._lock

    class InterruptedLock:  # the signal arrives just as shutdown takes the lock
        def acquire(self) -> bool:
            acquired = real_lock.acquire()
            os.kill(os.getpid(), signal.SIGINT)
            return acquired

        def release(self) -> None:
            real_lock.release()

    pool._lock = InterruptedLock()
    with pytest.raises(KeyboardInterrupt):  # not lost: raised once the pool is closed
        close_pool(pool)
    assert not real_lock.locked()
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in workers)
    assert not any(t.is_alive() for t in pool._threadpool._threads)


def test_ctrl_c_during_a_build_prints_only_our_message(tmp_path: Path) -> None:
    workload_file = tmp_path / "tiny.toml"
    save_workloads([Workload.from_spec(CONV)], workload_file, name="tiny")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",  # SIGINT as in a terminal's foreground job (see test_tuning's Ctrl-C test)
            "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from tvmlayers.cli import main; sys.exit(main(sys.argv[1:]))",
            *("tune", str(workload_file), "--trials", "500", "--trials-per-iter", "4"),
            *("--log-dir", str(tmp_path / "logs")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    parent = psutil.Process(process.pid)

    def workers() -> int:
        try:
            return sum("tvm.exec.popen_worker" in c.cmdline() for c in parent.children())
        except psutil.Error:
            return 0

    deadline = time.monotonic() + 240
    while workers() < 2 and time.monotonic() < deadline:  # the runner's worker, and builders: a build runs
        time.sleep(0.02)
    # SIGINT to the tuner only (as `kill -INT`): its build workers go on, and TVM's pool used to be
    # garbage-collected in one of its own threads, printing "cannot join current thread"
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130 and "interrupted" in stderr, stderr[-2000:]
    assert "Exception ignored" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not popen_workers(str(os.getpid())), "the tuner's pools were closed before it exited"

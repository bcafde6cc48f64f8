"""A stand-in for an aarch64 board: a TVM RPC tracker on 127.0.0.1, and TVM's RPC server running on the
aarch64 Python under qemu-user (:mod:`tvmlayers.emulation`), registered with the tracker under a key.

``python -m tvmlayers.tuning.qemu_board --key rasp4b`` serves until Ctrl-C; tests and examples use
``with QemuBoard("rasp4b") as board: tune(..., rpc_tracker=board.tracker, rpc_key="rasp4b")``.  Tuning
through it runs the real aarch64 kernels with the real TVM runtime, so it checks results and exercises the
whole RPC path; emulated timings are meaningless, and records tuned on it rank candidates by noise.

What TVM's RPC server needs under qemu-user: it starts its worker by re-running ``sys.executable``, an
aarch64 binary this host cannot execute without binfmt_misc, so the server is pointed at the wrapper script
that runs it under qemu; and the runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``: seconds instead of tens of
seconds to import) lacks the random fill MetaSchedule's runner calls, which ``libtvm_runtime_extra.so`` has.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from tvm import rpc

from ..emulation import ensure_arm_environment

# run by the aarch64 Python: TVM's RPC server, re-running itself through the qemu wrapper (argv[1])
_SERVER = (
    "import runpy, sys; sys.executable = sys.argv.pop(1); sys.argv[0] = 'rpc_server'; "
    "runpy.run_module('tvm.exec.rpc_server', run_name='__main__')"
)
_SERVER_PORTS = 50  # the server takes the first free port from a free one on


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuBoard:
    """An RPC tracker on ``127.0.0.1:port`` (a free port when None) and an aarch64 RPC server under qemu
    registered with it under ``key``.  :meth:`start` returns once the server is registered; :meth:`stop`
    ends both with every process they started."""

    def __init__(self, key: str = "rasp4b", port: int | None = None, startup_timeout: float = 180.0) -> None:
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"the device key must be a non-empty word, got {key!r}")
        self.key = key
        self.port = port or _free_port()
        self.startup_timeout = startup_timeout
        self._logs: tempfile.TemporaryDirectory | None = None
        self._processes: dict[str, subprocess.Popen] = {}

    @property
    def tracker(self) -> str:
        """``HOST:PORT`` of the tracker, as ``tvmlayers tune --rpc-tracker`` takes it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> QemuBoard:
        env = ensure_arm_environment()
        self._logs = tempfile.TemporaryDirectory(prefix="tvmlayers-qemu-board-")
        try:
            self._spawn(
                "tracker",
                [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                 "--port-end", str(self.port + 1)],
            )  # fmt: skip
            self._wait("the tracker to listen", self._tracker_listens)
            server_port = _free_port()
            extra = env.site / "tvm" / "lib" / "libtvm_runtime_extra.so"
            self._spawn(
                "server",
                [*env.python_argv(runtime_only=True), "-c", _SERVER, str(env.python_wrapper),
                 "--host", "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + _SERVER_PORTS),
                 "--tracker", self.tracker, "--key", self.key, "--load-library", str(extra)],
            )  # fmt: skip
            self._wait(f"the aarch64 RPC server to register as {self.key!r}", self._registered)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self._logs is not None
        with open(Path(self._logs.name) / f"{name}.log", "wb") as log:  # the child writes its own copy
            # a process group of its own: stop() ends it with the workers and session processes it forked
            self._processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not ready():
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the qemu board's {name} exited ({process.returncode}) while waiting for {what}:\n"
                        f"{self.log_tail(name)}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"timed out after {self.startup_timeout:.0f} s waiting for {what}:\n{self.log_tail('server')}"
                )
            time.sleep(0.5)

    def _tracker_listens(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _registered(self) -> bool:
        tracker = rpc.connect_tracker("127.0.0.1", self.port)
        try:
            servers = tracker.summary()["server_info"]
        finally:
            tracker.close()
        return any(info["key"] == f"server:{self.key}" for info in servers)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The end of what the tracker or the server (``name``) printed."""
        if self._logs is None:
            return ""
        path = Path(self._logs.name) / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """The running ``tracker`` and ``server`` processes, each the leader of its process group."""
        return dict(self._processes)

    def alive(self) -> bool:
        return bool(self._processes) and all(p.poll() is None for p in self._processes.values())

    def stop(self) -> None:
        """End the server, then the tracker, each with its whole process group; idempotent."""
        for name in ("server", "tracker"):
            process = self._processes.pop(name, None)
            if process is None:
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # the group's other members (the server's forked session processes) may outlive its leader
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._logs is not None:
            self._logs.cleanup()
            self._logs = None

    def __enter__(self) -> QemuBoard:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _stop_serving(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tvmlayers.tuning.qemu_board",
        description="Serve an emulated aarch64 board for `tvmlayers tune --rpc-tracker ... --rpc-key ...` "
        "until Ctrl-C: an RPC tracker on 127.0.0.1 and TVM's RPC server under qemu-aarch64 registered with it.",
    )
    parser.add_argument("--key", default="rasp4b", help="the device key the server registers (default: rasp4b)")
    parser.add_argument("--port", type=int, default=9190, help="the tracker's port (default: 9190)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_serving)  # as Ctrl-C does (which a background job ignores)
    board = QemuBoard(args.key, args.port)
    try:
        with board:
            print(
                f"qemu board ready: tvmlayers tune WORKLOADS --target rasp4b --rpc-tracker {board.tracker} "
                f"--rpc-key {board.key}  (any aarch64 target; Ctrl-C stops the board)",
                flush=True,
            )
            while board.alive():
                time.sleep(1)
            print(f"the qemu board stopped on its own:\n{board.log_tail('server')}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

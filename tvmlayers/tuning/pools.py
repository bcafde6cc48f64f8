"""MetaSchedule's local builder and its runners' process pools, shut down by us when tuning ends.

TVM shuts a ``PopenPoolExecutor`` down only when the pool is garbage-collected.  After an interrupt that
can happen in one of the pool's own threads (the last to drop it), whose ``shutdown(wait=True)`` then
fails with "cannot join current thread", printed as ignored noise after tuning ended; and a pool that is
never collected keeps its ``tvm.exec.popen_worker`` processes running as long as the process lives.  So
the builder here is LocalBuilder's ``build`` with a pool that is closed whatever happens, and the
tuner closes its runner's pool when tuning ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from tvm.runtime import Module
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult
from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
from tvm.support.popen_pool import MapResult, PopenPoolExecutor, StatusKind, kill_child_processes


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back until the block ends, then deliver it to the handler that was there.

    An interrupt raised inside ``PopenPoolExecutor.shutdown`` leaves the pool's lock held (it has no
    ``try``), and the pool's threads then wait for it forever: the interpreter, joining them at exit,
    hangs after tuning has printed that it stopped.  Masking the signal would not do: a process-directed
    signal goes to any thread that does not mask it, and Python runs its handler in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Python handlers run only in the main thread: nothing can interrupt this one
        return
    arrived: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if arrived:
            signal.raise_signal(signal.SIGINT)


def close_pool(pool: PopenPoolExecutor) -> None:
    """Kill the pool's worker processes (and theirs) and shut it down, from the calling thread.

    Queued jobs are cancelled first: each would start a fresh worker and run to its end.  ``shutdown``
    alone closes each worker's pipe before killing it, and that close waits for a pool thread still
    reading the pipe, i.e. for a build or run in progress to finish: killing first ends those reads.
    TVM has no public way to reach a pool's workers or threads; ``_threadpool``, ``_worker_map`` and
    ``_proc`` are its attributes.
    """
    with _sigint_deferred():
        pool._threadpool.shutdown(wait=False, cancel_futures=True)
        for worker in list(pool._worker_map.values()):
            process = worker._proc
            if process is not None:
                kill_child_processes(process.pid)
                with contextlib.suppress(OSError):
                    process.kill()
        pool.shutdown(wait=True)  # joins the threads, which may have started a worker after the kill above
        for worker in list(pool._worker_map.values()):
            worker.kill()  # kills and reaps what is left


class ClosingLocalBuilder:
    """MetaSchedule's ``LocalBuilder.build`` (a fresh process pool per batch, as TVM does against a memory
    leak of reused workers), whose pool is closed before ``build`` returns or raises.  ``export``: the
    builder's ``f_export`` (None: MetaSchedule's default archive)."""

    def __init__(
        self,
        max_workers: int,
        timeout_sec: float,
        initializer: Callable[[], None] | None,
        export: Callable[[Module], str] | None = None,
    ) -> None:
        self.max_workers = max_workers
        self.timeout_sec = timeout_sec
        self.initializer = initializer
        self.export = export

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec, initializer=self.initializer)
        try:
            jobs = [(None, self.export, i.mod, i.target, _serialize_params(i.params)) for i in build_inputs]
            return [self._result(r) for r in pool.map_with_error_catching(lambda job: _worker_func(*job), jobs)]
        finally:
            close_pool(pool)

    def _result(self, result: MapResult) -> BuilderResult:
        # LocalBuilder's messages
        if result.status == StatusKind.COMPLETE:
            return BuilderResult(result.value, None)
        if result.status == StatusKind.TIMEOUT:
            return BuilderResult(None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds")
        return BuilderResult(None, "LocalBuilder: An exception occurred\n" + str(result.value))

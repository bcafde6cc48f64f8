"""Ctrl-C during tuning: stop within moments, never in the middle of MetaSchedule's C++.

Python's own SIGINT handling raises ``KeyboardInterrupt`` wherever the main thread is.  Inside
MetaSchedule's C++ (the search, the task scheduler) TVM checks for signals and throws the error through
code that cannot unwind, and the process dies in ``std::terminate`` (a segfault, before this module);
inside a garbage-collection callback Python prints "Exception ignored" and tuning goes on for an hour.
So during tuning SIGINT only sets a flag, except while the main thread waits in the Python builder or
runner, or for a measurement's result (an RPC runner's, on a board or under qemu, takes seconds each): there
it raises at once.  Raising from Python that C++ called is safe (TVM hands the error back
through ``tune_tasks`` as a bare ``RuntimeError``, which the tuner turns back into ``KeyboardInterrupt``),
so the flag is checked at every such call: builder, runner, each cost-model prediction (every few
seconds of search) and each measured batch, after its records are in the database.  A second Ctrl-C
while the first waits for one of those exits at once: the records of finished batches are on disk.

The same place also ends a search that found nothing new: MetaSchedule keeps evolving populations of a task
whose space holds no candidate it has not measured (``--space ours`` on a small layer: a few dozen tile
choices), and ``tune_tasks`` never returns (MobileNetV2's 31 layers at 24 trials each: 275 measured, then 15
minutes of search at full CPU with no build).  When the cost model is asked for predictions and nothing was
built or measured for ``STALL_S``, tuning stops as if the trials were done, keeping every record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import Builder, BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.cost_model import CostModel, PyCostModel
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.runner import (
    PyRunner,
    PyRunnerFuture,
    Runner,
    RunnerFuture,
    RunnerInput,
    RunnerResult,
)

from .pools import ClosingLocalBuilder

SIGINT_EXIT = 130  # the shell's status for a process ended by SIGINT
# Seconds of search with nothing built or measured after which the spaces count as exhausted: a search round
# takes seconds, a build a second or two, a measurement under qemu up to a minute (in the runner, not counted)
STALL_S = 180.0


class SearchExhausted(RuntimeError):
    """Raised into MetaSchedule's search when it has found nothing new to build for ``STALL_S``."""


class Interrupt:
    """Whether SIGINT arrived while :meth:`catching` was active."""

    def __init__(self) -> None:
        self.requested = False
        self.exhausted = False  # the search stopped finding new candidates (see SearchExhausted)
        self._raise_here = 0  # > 0 while the main thread is in Python code that may raise
        self._progress_at = time.monotonic()

    def _handler(self, signum: int, frame: object) -> None:
        if self.requested and not self._raise_here:
            sys.stderr.write("\ntvmlayers tune: interrupted twice; stopping now\n")
            os._exit(SIGINT_EXIT)
        self.requested = True
        if self._raise_here:
            raise KeyboardInterrupt
        sys.stderr.write("\ntvmlayers tune: stopping at the end of this search step (Ctrl-C again: now)\n")

    @contextlib.contextmanager
    def catching(self) -> Iterator[Interrupt]:
        """Install the handler: only in the main thread (signals go there), and not where SIGINT is
        ignored (a job started in the background by a shell: Ctrl-C is not meant for it)."""
        main = threading.current_thread() is threading.main_thread()
        if not main or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        except BaseException:
            if self.requested:
                raise KeyboardInterrupt from None  # whatever the interrupt became on its way through C++
            if not self.exhausted:
                raise
            sys.stderr.write(
                f"\ntvmlayers tune: nothing new to build or measure for {STALL_S:.0f} s (the search spaces hold no "
                "candidate that was not measured); stopping with the records measured\n"
            )
        finally:
            signal.signal(signal.SIGINT, previous)
        self.check()  # tuning ended although its interrupt was swallowed: stop before re-timing

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """A region of Python that C++ called through the FFI, which turns an exception into an error
        return (unlike TVM's signal checks deep inside its C++), so SIGINT may raise here."""
        self.check()
        self._raise_here += 1
        try:
            yield
        finally:
            self._raise_here -= 1

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def progressed(self) -> None:
        """Candidates were built or measured: the search is not stuck."""
        self._progress_at = time.monotonic()

    def check_stall(self) -> None:
        """Raise ``SearchExhausted`` into the search when it has built nothing for ``STALL_S``."""
        if time.monotonic() - self._progress_at > STALL_S:
            self.exhausted = True
            raise SearchExhausted(f"no new candidate for {STALL_S:.0f} s")


@derived_object
class InterruptibleBuilder(PyBuilder):
    def __init__(self, builder: Builder | ClosingLocalBuilder, interrupt: Interrupt) -> None:
        super().__init__()
        self.builder = builder
        self.interrupt = interrupt

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        with self.interrupt.raising():
            results = self.builder.build(build_inputs)
        self.interrupt.progressed()
        return results


@derived_object
class InterruptibleRunner(PyRunner):
    def __init__(self, runner: Runner, interrupt: Interrupt) -> None:
        super().__init__()
        self.runner = runner
        self.interrupt = interrupt

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        with self.interrupt.raising():
            futures = self.runner.run(runner_inputs)
        return [InterruptibleRunnerFuture(future, self.interrupt) for future in futures]


@derived_object
class InterruptibleRunnerFuture(PyRunnerFuture):
    """A measurement in progress: MetaSchedule's C++ waits in ``result``, for many seconds on a remote or
    emulated device, and SIGINT may raise there."""

    def __init__(self, future: RunnerFuture, interrupt: Interrupt) -> None:
        super().__init__()
        self.future = future
        self.interrupt = interrupt

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        with self.interrupt.raising():
            result = self.future.result()
        self.interrupt.progressed()
        return result


@derived_object
class InterruptibleCostModel(PyCostModel):
    """Checks the flag, and whether the search is stuck, each time it asks for predictions (every few seconds of
    the C++ search).

    Only a check on entry: a prediction calls back into C++ (feature extraction), so SIGINT must not
    raise in the middle of one."""

    def __init__(self, model: CostModel, interrupt: Interrupt) -> None:
        super().__init__()
        self.model = model
        self.interrupt = interrupt

    def load(self, path: str) -> None:
        self.model.load(path)

    def save(self, path: str) -> None:
        self.model.save(path)

    def update(self, context, candidates, results) -> None:
        self.model.update(context, candidates, results)

    def predict(self, context, candidates):
        self.interrupt.check()
        self.interrupt.check_stall()
        return self.model.predict(context, candidates)


@derived_object
class InterruptCallback(PyMeasureCallback):
    """Stops tuning after a measured batch (its records already added) when an interrupt is pending."""

    def __init__(self, interrupt: Interrupt) -> None:
        super().__init__()
        self.interrupt = interrupt

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.interrupt.check()

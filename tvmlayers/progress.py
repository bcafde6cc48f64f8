"""Tuning progress: a one-line bar on a terminal, plain log lines otherwise.

Fed by a MetaSchedule measure callback after every measured batch: trials done, best latency per task,
failures, elapsed time and an ETA.  It sits low (only TVM below it) because ahead-of-time builds
(:mod:`tvmlayers.aot`) show their elapsed time and ETA with the same ``clock``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback


class Progress:
    def __init__(self, names: list[str], total: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.names = names
        self.total = max(total, 1)
        self.done = 0
        self.failed = 0
        self.best = [math.inf] * len(names)
        self.first_error: str | None = None
        self.start = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet  # count, but print nothing

    def update(self, task: int, seconds: list[float | None], errors: list[str]) -> None:
        self.done += len(seconds)
        self.failed += sum(s is None for s in seconds)
        measured = [s for s in seconds if s is not None]
        if measured:
            self.best[task] = min(self.best[task], *measured)
        if errors and self.first_error is None:
            self.first_error = errors[0]
        self._show(task)

    def _show(self, task: int) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * max(self.total - self.done, 0) if self.done else 0.0
        best = self.best[task]
        best_text = f"{best * 1e3:.3f} ms" if math.isfinite(best) else "none yet"
        status = (
            f"{self.done}/{self.total} trials, {self.failed} failed | task {task + 1}/{len(self.names)} "
            f"{self.names[task]}: best {best_text} | elapsed {clock(elapsed)}, ETA {clock(eta)}"
        )
        if self.tty:
            width = 24
            filled = min(width, int(width * self.done / self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {status}\x1b[K")
        else:
            self.stream.write(f"tvmlayers tune: {status}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


def clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@derived_object
class ProgressCallback(PyMeasureCallback):
    """The MetaSchedule side: turns each measured batch into a Progress update."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        seconds, errors = [], []
        for built, ran in zip(builder_results, runner_results, strict=False):
            error = built.error_msg or ran.error_msg
            if error or not ran.run_secs:
                seconds.append(None)
                errors.append(str(error or "no run time measured"))
            else:
                seconds.append(sum(float(s) for s in ran.run_secs) / len(ran.run_secs))
        self.progress.update(int(task_id), seconds, errors)

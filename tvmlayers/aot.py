"""Ahead-of-time compilation (tl.precompile): every kernel a forward needs, built up front by parallel processes.

A first forward compiles its kernels one at a time, as each layer meets a new shape (densenet121: 132
kernels, 12.8 s).  :func:`precompile` runs the forward once on fake tensors (``torch._subclasses``: shapes,
no data), where every tvmlayers call goes through its custom op's fake implementation
(``tvmlayers.torch_ops``), which records the call's KernelSpec and compiles nothing.  The kernels missing
from the on-disk cache are then built by worker processes, one kernel each at a time (TVM compiles a kernel
on one thread, so processes give real parallelism); each worker calls ``kernel_for``, which publishes its
entry atomically under the key's file lock.  The parent finally loads every kernel, so the first real
forward compiles nothing.  A converted model in eval mode is also called once with grad disabled: that records
its inference program (``tvmlayers.executor``), whose convs may need channel-blocked variants of their kernels,
built the same way (:func:`build_kernels`).

Ctrl-C ends the workers.  A kernel being built is left unpublished (its staging folder is removed by the
next build of that key), so the cache holds only complete entries.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._subclasses import FakeTensorMode
from torch.utils._pytree import tree_map_only

from .build import is_cached, kernel_for
from .executor import is_installed, programs
from .progress import clock
from .spec import KernelSpec
from .torch_ops import recorded_specs

__all__ = ["BuildRecord", "PrecompileReport", "build_kernels", "needed_specs", "precompile"]


@dataclass(frozen=True)
class BuildRecord:
    """One kernel built by a worker: which, by which process, and when (``time.time()`` seconds)."""

    spec: KernelSpec
    pid: int
    start: float
    end: float


@dataclass
class PrecompileReport:
    """What :func:`precompile` did."""

    kernels: list[KernelSpec]  # every kernel the forward needs
    built: list[BuildRecord] = field(default_factory=list)  # those compiled now, by the workers
    workers: int = 0  # processes started (0: everything was cached)
    seconds: float = 0.0

    @property
    def cached(self) -> int:
        return len(self.kernels) - len(self.built)

    def __str__(self) -> str:
        return (
            f"{len(self.kernels)} kernels: {len(self.built)} built by {self.workers} workers, {self.cached} cached, "
            f"{self.seconds:.1f} s"
        )


def needed_specs(model: torch.nn.Module, *example_inputs: Any) -> list[KernelSpec]:
    """The KernelSpec of every tvmlayers call of ``model(*example_inputs)``, found by running the forward on
    fake tensors (nothing is computed or compiled).  Layers converted by ``tl.convert``, tvmlayers modules and
    ``tl.functional`` calls are all seen."""
    # allow_non_fake_inputs: the parameters stay real tensors, faked as the ops meet them
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad(), recorded_specs() as specs:
        model(*tree_map_only(torch.Tensor, mode.from_tensor, example_inputs))
    return sorted(specs, key=KernelSpec.describe)


def _build_one(spec: KernelSpec, cache_dir: str | None) -> dict:
    """Build one kernel into the shared cache: its start and end times, or the error."""
    start = time.time()
    try:
        kernel_for(spec, cache_dir)
    except Exception as err:  # noqa: BLE001 - reported by precompile, naming the kernel
        return {"error": f"{type(err).__name__}: {err}"}
    return {"start": start, "end": time.time()}


def _worker_main() -> None:
    """A worker process: says it is ready, then builds the kernel of each spec it reads (one JSON request a
    line on stdin), answering each with one JSON line (:func:`_build_one`) on its stdout."""
    warnings.simplefilter("ignore")  # the parent warns once, as it loads the kernels (untuned layers)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever TVM or a library prints goes to stderr, not into the answers
    answers.write('{"ready": true}\n')
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps(_build_one(KernelSpec.from_json(request["spec"]), request["cache_dir"])) + "\n")
        answers.flush()


class BuildProgress:
    """One line on a terminal, as the tuning progress bar: counts, the kernel just built, elapsed, ETA; silent
    when the stream is not a terminal or ``quiet``.  ``workers``: how many build at once, when several do."""

    def __init__(self, total: int, workers: int = 1, quiet: bool = False) -> None:
        self.total, self.workers, self.done = total, workers, 0
        self.stream = sys.stderr
        self.show = not quiet and self.stream.isatty()
        self.start = time.monotonic()

    def update(self, spec: KernelSpec | None) -> None:
        if spec is not None:
            self.done += 1
        if not self.show:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        width = 24
        filled = width * self.done // max(self.total, 1)
        last = f" | {spec.op} {'x'.join(map(str, spec.input_shape))}" if spec is not None else ""
        workers = f", {self.workers} workers" if self.workers > 1 else ""
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} kernels{workers}"
            f"{last} | elapsed {clock(elapsed)}, ETA {clock(eta)}\x1b[K"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.show:
            self.stream.write("\n")
            self.stream.flush()


def precompile(
    model: torch.nn.Module,
    *example_inputs: Any,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: Path | str | None = None,
) -> PrecompileReport:
    """Build every kernel that ``model(*example_inputs)`` needs, in ``workers`` processes at once (this one
    and ``workers - 1`` started for it; default: one per core, at most one per missing kernel), with a
    progress bar on a terminal (``progress=False``: none); then load them, so that the first forward compiles
    nothing (a converted model in eval mode: its recorded program's too, recorded by one real call).  Raises
    ``RuntimeError`` naming every kernel whose build failed (the others are built and cached).
    """
    start = time.monotonic()
    specs = needed_specs(model, *example_inputs)
    report = PrecompileReport(specs)
    report.workers, report.built = build_kernels(specs, workers, progress, cache_dir)
    for spec in specs:
        kernel_for(spec, cache_dir)
    if _records_a_program(model, example_inputs):
        # A converted model's inference forward runs a recorded program, whose convs may be compiled for
        # channel-blocked activations (tvmlayers.executor): one call records it, building those in parallel too.
        with torch.no_grad():
            model(*example_inputs)
        for program in programs(model):
            blocked = [spec for spec in program.kernel_specs if spec not in report.kernels]
            report.kernels += blocked
            report.built += [record for record in program.built if record.spec in blocked]
    report.seconds = time.monotonic() - start
    return report


def _records_a_program(model: torch.nn.Module, example_inputs: tuple) -> bool:
    """Whether ``model`` is a converted model in eval mode (``model.eval()``) whose forward records a program on
    these inputs (a forward with grad disabled then changes nothing: no BatchNorm statistics, no dropout)."""
    plain = all(type(x) is torch.Tensor and not x.requires_grad for x in example_inputs)
    return is_installed(model) and plain and not model.training


def build_kernels(
    specs: list[KernelSpec], workers: int | None = None, progress: bool = True, cache_dir: Path | str | None = None
) -> tuple[int, list[BuildRecord]]:
    """Build those of ``specs`` not in the kernel cache yet, in ``workers`` processes at once (default: one per
    core, at most one per missing kernel), with a progress bar on a terminal; returns the workers and what each
    built.  Raises ``RuntimeError`` naming every kernel whose build failed."""
    missing = list(dict.fromkeys(spec for spec in specs if not is_cached(spec, cache_dir)))
    if not missing:
        return 0, []
    count = max(1, min(workers or os.cpu_count() or 1, len(missing)))
    return count, _build_all(missing, count, progress, cache_dir)


def _build_all(
    specs: list[KernelSpec], workers: int, progress: bool, cache_dir: Path | str | None
) -> list[BuildRecord]:
    bar = BuildProgress(len(specs), workers, quiet=not progress)
    built: list[BuildRecord] = []
    failed: list[str] = []
    queue = list(reversed(specs))
    # Fresh interpreters, not multiprocessing's spawn (which imports the caller's __main__ script again in
    # every worker, running its top-level code) nor fork (a forked copy of a process running torch's and
    # TVM's thread pools may deadlock).  Their own session: Ctrl-C reaches only this process, which ends them.
    root = str(Path(__file__).resolve().parent.parent)  # where this tvmlayers is imported from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "from tvmlayers.aot import _worker_main; _worker_main()"]
    processes: list[subprocess.Popen] = []
    working: dict[int, KernelSpec] = {}  # pid -> the spec it builds
    selector = selectors.DefaultSelector()
    directory = None if cache_dir is None else str(cache_dir)

    def hand_out(process: subprocess.Popen) -> None:
        if queue:
            spec = working[process.pid] = queue.pop()
            process.stdin.write(json.dumps({"spec": spec.to_json(), "cache_dir": directory}) + "\n")
            process.stdin.flush()
        else:
            selector.unregister(process.stdout)
            process.stdin.close()  # the worker exits

    def finished(spec: KernelSpec, pid: int, answer: dict) -> None:
        if "error" in answer:
            failed.append(f"{spec.describe()}: {answer['error']}")
        else:
            built.append(BuildRecord(spec, pid, answer["start"], answer["end"]))
        bar.update(spec)

    try:
        for _ in range(workers - 1):  # this process is one of the builders
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
            )
            processes.append(process)
            selector.register(process.stdout, selectors.EVENT_READ, process)
        bar.update(None)
        while queue or working:
            # While kernels wait, this process builds one between looks at the workers; a worker starting up
            # (importing torch and TVM takes seconds) gets work only when it says it is ready.
            for key, _ in selector.select(timeout=0 if queue else None):
                process = key.data
                line = process.stdout.readline()
                spec = working.pop(process.pid, None)
                if not line:  # the worker died (its error went to stderr)
                    selector.unregister(process.stdout)
                    if spec is not None:
                        finished(spec, process.pid, {"error": f"the worker exited with status {process.wait()}"})
                    continue
                if spec is not None:
                    finished(spec, process.pid, json.loads(line))
                hand_out(process)
            if queue:
                spec = queue.pop()
                finished(spec, os.getpid(), _build_one(spec, directory))
    finally:
        bar.close()
        selector.close()
        # after Ctrl-C or an error, builds still running are abandoned: a half-built kernel is never published
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()
            process.stdout.close()
            if not process.stdin.closed:
                process.stdin.close()
    if failed:
        raise RuntimeError(f"tvmlayers.precompile: {len(failed)} kernel build(s) failed:\n" + "\n".join(failed))
    return built

"""tl.precompile: every kernel of a forward built up front, by parallel worker processes, into the shared cache."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import tvmlayers as tl
from tvmlayers import aot, build, executor
from tvmlayers.aot import needed_specs
from tvmlayers.cache import KernelCache
from tvmlayers.spec import KernelSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernel cache of the test's own: nothing is cached yet (the workers inherit the variable)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(cache))
    warnings.filterwarnings("ignore", message="tvmlayers: no tuning record")
    return cache


class Residual(torch.nn.Module):
    """A model that calls tvmlayers modules and tl.functional: precompile must see both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = tl.Conv2d(3, 4, 3, padding=1)
        self.relu = tl.ReLU()
        self.pool = tl.MaxPool2d(2)
        self.fc = tl.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.relu(self.conv(x)))
        y = tl.functional.max_pool2d(y, 2, stride=1, padding=1, return_indices=True)[0]
        return self.fc(y.flatten(1))


def test_needed_specs_compiles_nothing_and_matches_the_forward() -> None:
    model, x = Residual(), torch.randn(2, 3, 6, 6)
    specs = needed_specs(model, x)
    assert [s.op for s in specs] == ["conv2d", "linear", "max_pool2d", "max_pool2d", "relu"]
    assert not any(build.is_cached(spec) for spec in specs)
    with torch.no_grad():
        model(x)
    ran = {k.spec for m in model.modules() for k in getattr(m, "kernels", {}).values()}
    assert ran <= set(specs) and len(ran) == 4  # the functional max_pool2d is not a module's


def test_precompile_builds_everything_in_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Residual(), torch.randn(2, 3, 6, 6)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    # A worker takes seconds to import torch and TVM, while this process starts building at once: slow this
    # process's builds down, so that the worker gets kernels to build too.
    build_here = aot._build_one

    def slowly(*args: object) -> dict:
        time.sleep(3)
        return build_here(*args)

    monkeypatch.setattr(aot, "_build_one", slowly)
    report = tl.precompile(model, x, workers=2)
    assert report.workers == 2 and len(report.built) == len(report.kernels) == 5 and report.cached == 0
    # this process and one worker built kernels, the worker while this process was building its own
    here = [r for r in report.built if r.pid == os.getpid()]
    worker = [r for r in report.built if r.pid != os.getpid()]
    assert here and worker
    assert min(r.start for r in here) < min(r.end for r in worker) < max(r.end for r in here)
    assert "5/5 kernels, 2 workers" in stream.getvalue()
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(build, "_build", None)  # the forward finds every kernel loaded: it builds (calls) nothing
        out = model(x)
    # and again: all cached, no worker started, nothing printed when asked not to
    stream.truncate(0)
    again = tl.precompile(model, x, progress=False)
    assert (again.workers, again.built, again.cached) == (0, [], 5)
    assert stream.getvalue() == ""
    with torch.no_grad():
        reference = torch.nn.functional.max_pool2d(
            torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, model.conv.weight, model.conv.bias,
                                                                                 padding=1)), 2), 2, 1, 1)  # fmt: skip
        expected = torch.nn.functional.linear(reference.flatten(1), model.fc.weight, model.fc.bias)
    torch.testing.assert_close(out, expected)


def test_convert_with_example_inputs_precompiles() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = torch.randn(1, 3, 4, 4)
    converted = tl.convert(model, example_inputs=(x,))
    assert all(build.is_cached(spec) for spec in needed_specs(converted, x))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


def test_a_failed_build_names_its_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The workers import this package fresh; a sitecustomize on their path breaks relu builds only.
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import tvmlayers.build as build
            real = build._compile
            def broken(spec, *args):
                if spec.op == "relu":
                    raise ValueError("planted failure")
                return real(spec, *args)
            build._compile = broken
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    real = build._compile

    def broken(spec: KernelSpec, *args: object) -> dict:  # the same in this process, which builds too
        if spec.op == "relu":
            raise ValueError("planted failure")
        return real(spec, *args)

    monkeypatch.setattr(build, "_compile", broken)
    model = torch.nn.Sequential(tl.Linear(3, 4), tl.ReLU())
    planted = r"1 kernel build\(s\) failed:\nrelu 2x4 float32: ValueError: planted failure"
    with pytest.raises(RuntimeError, match=planted):
        tl.precompile(model, torch.randn(2, 3), workers=2, progress=False)
    assert [s.op for s in needed_specs(model, torch.randn(2, 3)) if build.is_cached(s)] == ["linear"]


def _interrupted_precompile(cache: Path) -> tuple[str, list[int]]:
    """Ctrl-C to a precompile of 40 kernels once the first is published: its stderr and its worker pids."""
    script = textwrap.dedent(
        """
        import signal, sys, torch, tvmlayers as tl
        # SIGINT handled as in a terminal's foreground job even when this test run was started in the
        # background, where SIGINT is ignored and children inherit that
        signal.signal(signal.SIGINT, signal.default_int_handler)
        model = torch.nn.Sequential(*[tl.Conv2d(3, 3, k, padding=k // 2) for k in range(1, 80, 2)])
        print("start", flush=True)
        tl.precompile(model, torch.randn(1, 3, 32, 32), workers=2, progress=False)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert parent.stdout.readline() == "start\n"
    deadline = time.monotonic() + 60
    while not (workers := _children(parent.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers, "no worker processes seen"
    # interrupted once builds are under way (the first kernel published), with most of the 40 still to build
    while not _published(cache) and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.send_signal(signal.SIGINT)
    _, err = parent.communicate(timeout=60)
    return err, workers


def test_ctrl_c_ends_the_workers_and_leaves_the_cache_usable(fresh_cache: Path) -> None:
    err, workers = _interrupted_precompile(fresh_cache)
    assert "KeyboardInterrupt" in err
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the interrupted precompile"
    # the cache holds only complete entries: every kernel loads or builds now
    model = torch.nn.Sequential(*[tl.Conv2d(3, 3, k) for k in (3, 5)])
    report = tl.precompile(model, torch.randn(1, 3, 32, 32), workers=1, progress=False)
    assert len(report.kernels) == 2
    assert len(KernelCache(fresh_cache).entries()) == len(_published(fresh_cache)) >= 2  # no incomplete entry


def _published(cache: Path) -> list[Path]:
    return [d for d in cache.glob("kernels/*/*/*") if not d.name.startswith(".")]


def _children(pid: int) -> list[int]:
    import psutil  # noqa: PLC0415

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    import psutil  # noqa: PLC0415

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_precompile_builds_the_kernels_of_a_converted_models_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted model's inference forward runs a recorded program whose convs take and give channel-blocked
    activations (tvmlayers.executor): precompile records it, which builds those kernels in worker processes, so the
    first forward builds nothing."""
    monkeypatch.setattr(executor, "PARALLEL_BUILD_MIN", 1)  # this small model's 3 in parallel too
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
        torch.nn.Conv2d(16, 8, 1), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 2),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 6, 6)
    converted = tl.convert(model)
    report = tl.precompile(converted, x, progress=False)
    # the first conv gives blocked channels, the depthwise one takes and gives them, the 1x1 takes them
    blocked = [spec for spec in report.kernels if spec.get("in_block") or spec.get("out_block")]
    assert [(spec.get("in_block") is not None, spec.get("out_block") is not None) for spec in blocked] == [
        (False, True), (True, True), (True, False)
    ]  # fmt: skip
    assert set(blocked) <= {record.spec for record in report.built}
    assert executor.programs(converted)[0].kernel_specs[:3] == blocked
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(build, "_build", None)  # the forward finds every kernel loaded: it builds (calls) nothing
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)

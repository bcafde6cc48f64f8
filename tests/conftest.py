"""Shared test setup: one kernel cache for the whole run (shared by the xdist workers, so each kernel
is compiled once per run), and helpers that compare with torch."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import tvm

from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target

# Kernels are keyed by a hash of the op and schedule sources, so a cache kept between runs never serves a
# kernel of older code; tests about building and caching use their own empty directories.
os.environ.setdefault("TVMLAYERS_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "kernels"))
# The user's tuning logs stay out of the tests, and the verdicts of the tests' first builds on records of other
# CPUs and on neighbours (tvmlayers.records.travel) out of the user's logs.
os.environ.setdefault("TVMLAYERS_TUNING_LOGS", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "logs"))

# Every process this test process starts, and theirs, inherit this mark: the popen workers that TVM's process
# pools start are found by it at the end of the session even when their parent died and they were re-parented.
# One mark per process (xdist worker), so that one worker never sees another's workers still running.
_MARK = "TVMLAYERS_TEST_PROCESS"
os.environ[_MARK] = str(os.getpid())

HOST = resolve_target("host")
TOLERANCES = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


def popen_workers(mark: str) -> list[psutil.Process]:
    """The running ``tvm.exec.popen_worker`` processes started under ``mark`` (zombies are already dead)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if "tvm.exec.popen_worker" not in (process.info["cmdline"] or []) or process.info["status"] == "zombie":
                continue
            if process.environ().get(_MARK) == mark:
                found.append(process)
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_popen_workers_left() -> Iterator[None]:
    """Fails the session (as an error in the last test's teardown, which xdist reports) if TVM popen workers
    of this process outlive its tests; they are killed, so they do not run on after the tests either."""
    yield
    deadline = time.monotonic() + 10  # a worker whose pipe just closed exits within moments
    while (left := popen_workers(str(os.getpid()))) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for process in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"pid {process.pid} (parent {process.ppid()})")
            process.kill()
    assert not left, f"tvm.exec.popen_worker processes left running: {'; '.join(described)}"


def assert_matches_torch(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty kernel cache for this test only."""
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def conv3x3_spec(
    input_shape: tuple[int, ...], out_channels: int, groups: int = 1, target: tvm.target.Target = HOST
) -> KernelSpec:
    """The tests' small conv: 3x3, stride 1, one pixel of zero padding, with bias."""
    return KernelSpec.make(
        "conv2d",
        input_shape,
        "float32",
        target,
        stride=(1, 1),
        padding=(1, 1, 1, 1),
        dilation=(1, 1),
        groups=groups,
        padding_mode="zeros",
        bias=True,
        weight_shape=(out_channels, input_shape[1] // groups, 3, 3),
    )


# A fresh process that runs Conv2d(8, 16, 3, padding=1) on a (1, 8, size, size) input through the module
# API and prints, as its last line, what the pipeline did.
_CONV_CHILD = textwrap.dedent(
    """
    import json, sys, torch, tvmlayers as tl
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(8, 16, 3, padding=1)
    ours = tl.Conv2d.from_torch(reference)
    size = int(sys.argv[1])
    x = torch.randn(1, 8, size, size)
    with torch.no_grad():
        error = (ours(x) - reference(x)).abs().max().item()
    (kernel,) = ours.kernels.values()
    print(json.dumps({"built_here": kernel.built_here, "error": error, "key": kernel.key,
                      "provenance": kernel.provenance}))
    """
)


def start_conv_child(size: int, env: dict[str, str]) -> subprocess.Popen:
    """Start the conv child with ``env`` added to this process's environment."""
    return subprocess.Popen(
        [sys.executable, "-c", _CONV_CHILD, str(size)], env={**os.environ, **env}, stdout=subprocess.PIPE, text=True
    )


def conv_child_report(process: subprocess.Popen) -> dict:
    """Wait for a conv child; its report as a dict (it must have succeeded)."""
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def torch_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding_mode: str = "zeros",
    fuse_relu: bool = False,
    residual: torch.Tensor | float | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """What a torch user computes for ``tl.functional.conv2d``: nn.Conv2d (whose padding_mode the functional
    form takes), then ``+ residual``, then relu."""
    module = torch.nn.Conv2d(
        weight.shape[1] * kwargs.get("groups", 1),
        weight.shape[0],
        weight.shape[2:],
        bias=bias is not None,
        padding_mode=padding_mode,
        dtype=weight.dtype,
        **kwargs,
    )
    out = module._conv_forward(x, weight, bias)
    out = out + residual if residual is not None else out
    return torch.relu(out) if fuse_relu else out


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 after folding and fusion: the error relative to the output's magnitude."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0))

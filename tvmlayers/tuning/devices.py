"""Where the tuner runs kernels besides MetaSchedule's measurements: the default schedule's baseline, the
re-timing of the best records, and the check of records against torch.

:class:`LocalDevice` is this process.  :class:`RPCDevice` is a device behind a TVM RPC tracker (a board, or
the qemu stand-in of :mod:`tvmlayers.tuning.qemu_board`): each kernel is linked for the target on this host
(:mod:`tvmlayers.tuning.export`) and uploaded; the check sends the inputs torch's reference was computed from,
runs the kernel there and compares its outputs here with torch's (:func:`tvmlayers.verify.check_kernel`, the
same oracle and tolerance as in this process).  Both time a kernel alike: MetaSchedule's evaluator settings
on random data.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import rpc
from tvm.s_tir import meta_schedule as ms

from .. import ops
from ..spec import KernelSpec
from ..verify import check_kernel
from .export import export_candidate, export_linked, linker


class LoadedKernel:
    """A kernel loaded on a device: checked against torch and timed there."""

    def __init__(self, module: tvm.runtime.Module, device: tvm.runtime.Device) -> None:
        self.module: tvm.runtime.Module | None = module
        self.device: tvm.runtime.Device | None = device

    def release(self) -> None:
        """Drop the module and device: a remote one keeps its RPC session, and so the device, busy."""
        self.module = self.device = None

    def _call(self, spec: KernelSpec, layout: dict) -> Callable[..., None]:
        """The kernel as ``check_kernel`` calls it (torch inputs, then outputs), through the device's memory."""
        outputs = len(ops.output_shapes(spec, layout))

        def call(*args: torch.Tensor) -> None:
            tensors = [tvm.runtime.tensor(a.numpy(), self.device) for a in args]
            self.module[ops.SYMBOL](*tensors)
            for result, tensor in zip(args[-outputs:], tensors[-outputs:], strict=True):
                result.copy_(torch.from_numpy(tensor.numpy()))

        return call

    def check(self, spec: KernelSpec, layout: dict) -> str | None:
        """None if the kernel computes what torch computes on random inputs, else what differs."""
        return check_kernel(spec, layout, self._call(spec, layout))

    def time(self, func: tvm.tirx.PrimFunc) -> float:
        """Mean run time, measured like MetaSchedule's runners do."""
        # random data, as MetaSchedule's runners use: uninitialized memory can hold denormals, which make
        # floating-point arithmetic many times slower and the baseline look far worse than it is
        rng = np.random.default_rng(0)
        args = [
            tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)), self.device)
            for p in func.params
        ]
        config = ms.runner.EvaluatorConfig()
        timer = self.module.time_evaluator(
            ops.SYMBOL, self.device, number=config.number, repeat=config.repeat, min_repeat_ms=config.min_repeat_ms
        )
        return float(timer(*args).mean)


class LocalDevice:
    """This process: kernels of a target of this machine, measured by MetaSchedule's local runner."""

    def builder_export(self, work_dir: str) -> None:
        return None  # MetaSchedule's default archive: the local runner links it itself

    def runner(self, timeout: float) -> ms.runner.Runner:
        return ms.runner.LocalRunner(timeout_sec=timeout)

    @contextlib.contextmanager
    def loaded(self, executable: tvm.runtime.Executable) -> Iterator[LoadedKernel]:
        yield LoadedKernel(executable.jit(), tvm.cpu())


class RPCDevice:
    """The devices registered with a TVM RPC tracker under ``key``, for kernels of ``target``."""

    def __init__(self, tracker: str, key: str | None, target: tvm.target.Target, timeout: float) -> None:
        if not key:
            raise ValueError("--rpc-tracker needs --rpc-key: the key the devices registered with")
        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--rpc-tracker must be HOST:PORT, got {tracker!r}")
        self.host, self.port, self.key = host, int(port), key
        self.compiler = linker(target)  # before anything is built: a missing cross compiler says so now
        self.session_timeout = max(timeout, 60.0)

    def check_registered(self, wait: float = 30.0) -> None:
        """Raise a clear error unless the tracker answers and a device registers with the key within ``wait``
        seconds (one may still be starting): a request for a key nobody serves would wait forever."""
        deadline = time.monotonic() + wait
        while self.key not in (keys := self._registered_keys()):
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"no device is registered with the RPC tracker at {self.host}:{self.port} under the key "
                    f"{self.key!r} (registered: {', '.join(sorted(keys)) or 'none'}); start the RPC server on the "
                    f"device with `python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} --key {self.key}`"
                )
            time.sleep(0.5)

    def _registered_keys(self) -> set[str]:
        try:
            # TVM's own connect retries for a minute; a tracker on the other end answers at once
            socket.create_connection((self.host, self.port), timeout=10).close()
            tracker = rpc.connect_tracker(self.host, self.port)
            summary = tracker.summary()
            tracker.close()
        except (OSError, RuntimeError) as err:
            raise RuntimeError(
                f"no RPC tracker answers at {self.host}:{self.port} ({err}); start one with "
                f"`python -m tvm.exec.rpc_tracker --host {self.host} --port {self.port}`"
            ) from None
        return {info["key"].split(":", 1)[-1] for info in summary.get("server_info", [])}

    def builder_export(self, work_dir: str) -> Callable[[tvm.runtime.Module], str]:
        """MetaSchedule builder's ``f_export``: each candidate linked here for the device, in ``work_dir``."""
        return partial(export_candidate, compiler=self.compiler, directory=work_dir)

    def runner(self, timeout: float) -> ms.runner.Runner:
        config = ms.runner.RPCConfig(
            tracker_host=self.host,
            tracker_port=self.port,
            tracker_key=self.key,
            session_timeout_sec=int(self.session_timeout),
        )
        return ms.runner.RPCRunner(rpc_config=config)

    @contextlib.contextmanager
    def _session(self) -> Iterator[rpc.RPCSession]:
        tracker = rpc.connect_tracker(self.host, self.port)
        try:
            yield tracker.request(self.key, session_timeout=self.session_timeout)
        finally:
            tracker.close()

    @contextlib.contextmanager
    def loaded(self, executable: tvm.runtime.Executable) -> Iterator[LoadedKernel]:
        with tempfile.TemporaryDirectory(prefix="tvmlayers-rpc-") as folder, self._session() as session:
            path = Path(folder) / "kernel.so"
            export_linked(executable, path, self.compiler)
            session.upload(str(path), path.name)
            kernel = LoadedKernel(session.load_module(path.name), session.cpu())
            try:
                yield kernel
            finally:
                # the session ends when nothing refers to it any more (TVM has no close), and the device
                # serves nobody else until then: the caller's name for the kernel must not keep it
                kernel.release()
                session.remove(path.name)


Device = LocalDevice | RPCDevice

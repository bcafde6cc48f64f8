"""Check a bundle's kernels without TVM's runtime, through our C harness (``kernel_harness.c``).

For targets that have no TVM wheel (armv7): the harness is compiled with the bundle's own gcc against
tvm-ffi's C headers, and runs each kernel on its reference input, natively or under an emulator
(``qemu-arm`` on this machine); the outputs are compared with torch's as ``run.py`` compares them.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm_ffi

from . import bundle_run
from .emulation import qemu_argv
from .targets import host_arch, resolve_target, toolchain

HARNESS_SOURCE = Path(__file__).with_name("kernel_harness.c")


def build_harness(target: dict, out: Path) -> Path:
    """Compile the harness for the target (a bundle's ``target`` JSON) into ``out``."""
    compiler = toolchain(resolve_target(target)).require("building the kernel harness")
    include = Path(tvm_ffi.__file__).parent / "include"
    command = [compiler, "-O2", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-rdynamic", f"-I{include}"]
    result = subprocess.run(
        [*command, str(HARNESS_SOURCE), "-o", str(out), "-ldl"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling {HARNESS_SOURCE.name} with {compiler} failed:\n{result.stderr[-2000:]}")
    return out


def check_bundle(bundle: str | Path, runner: Sequence[str] | None = None) -> list[dict]:
    """Run every kernel of ``bundle`` once through the harness and compare its outputs with the references;
    one row per kernel as run.py's (``name``, ``layer``, ``correct``, ``problem``), no timing.  ``runner``: the
    argv prefix that runs the bundle's binaries (None: natively on its architecture, else its qemu).  Raises
    :class:`tvmlayers.bundle_run.BundleError` for a tampered or unreadable bundle, as run.py refuses it."""
    bundle = Path(bundle)
    manifest = bundle_run.read_manifest(bundle)
    bundle_run.check_files(bundle, manifest)
    if runner is None:
        runner = [] if manifest["arch"] == host_arch() else qemu_argv(manifest["arch"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="tvmlayers-harness-") as tmp:
        work = Path(tmp)
        harness = build_harness(manifest["target"], work / "kernel_harness")
        for kernel in manifest["kernels"]:
            inputs, expected = bundle_run.references(bundle, kernel)
            arguments = []
            for kind, arrays in (("i", inputs), ("o", expected)):
                for index, array in enumerate(arrays):
                    path = work / f"{kind}{index}.bin"
                    if kind == "i":
                        np.ascontiguousarray(array).tofile(path)
                    dims = ",".join(str(d) for d in array.shape)
                    arguments.append(f"{kind}:{path}:{array.dtype}:{dims}")
            library = str(bundle / kernel["library"])
            run = subprocess.run(
                [*runner, str(harness), library, kernel["symbol"], *arguments],
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0:
                problem = f"the harness exited {run.returncode}: {run.stderr.strip()[-500:]}"
            else:
                outputs = [
                    np.fromfile(work / f"o{i}.bin", dtype=e.dtype).reshape(e.shape) for i, e in enumerate(expected)
                ]
                problems = [
                    bundle_run.compare(o, e, kernel["tolerance"])[1] for o, e in zip(outputs, expected, strict=True)
                ]
                problem = next((p for p in problems if p), None)
            rows.append(
                {"name": kernel["name"], "layer": kernel["describe"], "correct": problem is None, "problem": problem}
            )
    return rows

#!/usr/bin/env python3
"""Check, then time, every kernel of this tvmlayers bundle on this machine: ``python3 run.py [--json]``.

Needs only Python 3, numpy and TVM's runtime (``pip install apache-tvm numpy``; TVM is imported with
``TVM_USE_RUNTIME_LIB=1``, the runtime alone).  Before loading anything it checks that this machine has the
bundle's architecture and that every file matches the SHA-256 in ``manifest.json``; then each kernel runs on
its reference input and its outputs are compared with torch's (computed where the bundle was compiled), and
only then is it timed with TVM's ``time_evaluator``.  Exit status: 0 when every kernel matches, 1 when one
differs, 2 for a bundle that cannot be checked here (wrong architecture, tampered or missing file, unknown
format).  Under an emulator (qemu) the times mean nothing; only the check does.

This file is tvmlayers/bundle_run.py, copied into each bundle; the format is documented in tvmlayers/formats.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

FORMAT = 1  # tvmlayers.formats.BUNDLE_FORMAT
# platform.machine() spellings of each architecture a bundle can be for
MACHINES = {"x86_64": ("x86_64", "amd64"), "aarch64": ("aarch64", "arm64"), "arm": ("armv7l", "armv8l", "armv7")}


class BundleError(Exception):
    """A bundle that must not be run here; the message says why and what to do."""


def read_manifest(bundle: Path) -> dict:
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{bundle}: no readable manifest.json ({err}): is this a tvmlayers bundle?") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{bundle}: bundle format {found!r}, this run.py reads format {FORMAT}")
    return manifest


def check_architecture(manifest: dict, machine: str) -> None:
    """Raise BundleError unless ``machine`` (``platform.machine()``) runs the bundle's architecture."""
    arch = manifest["arch"]
    if machine.lower() not in MACHINES.get(arch, (arch,)):
        raise BundleError(
            f"this bundle is for {arch} ({manifest['target_key']}), but this machine is {machine}: copy the bundle "
            f"to a {arch} device and run it there, or compile one for this machine (tvmlayers compile --target host)"
        )


def check_files(bundle: Path, manifest: dict) -> None:
    """Raise BundleError when a file the manifest lists is missing or its SHA-256 differs."""
    for name, digest in manifest["files"].items():
        path = bundle / name
        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as err:
            raise BundleError(
                f"refusing to run: {name} is missing or unreadable ({err}); copy the whole bundle"
            ) from None
        if actual != digest:
            raise BundleError(
                f"refusing to run: {name} does not match manifest.json (sha256 {actual[:16]}..., expected "
                f"{digest[:16]}...): the file was changed or damaged after compiling; copy the bundle again"
            )


def compare(got: np.ndarray, want: np.ndarray, tolerance: float) -> str | None:
    """None when ``got`` matches torch's ``want`` (indices exactly, values within the relative tolerance),
    else what differs."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    if np.issubdtype(want.dtype, np.integer):
        wrong = int((got != want).sum())
        return f"{wrong} of {want.size} indices differ" if wrong else None
    if not want.size:
        return None
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return "NaN in different places"
    finite = ~np.isnan(want)
    error = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
    limit = tolerance * (1 + float(np.max(np.abs(want[finite]), initial=0.0)))
    return None if error <= limit else f"max abs error {error:.3g} > {limit:.3g}"


def references(bundle: Path, kernel: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The kernel's reference inputs and torch's outputs."""
    with np.load(bundle / kernel["references"], allow_pickle=False) as data:
        inputs = [data[f"input{i}"] for i in range(len(kernel["inputs"]))]
        outputs = [data[f"output{i}"] for i in range(len(kernel["outputs"]))]
    return inputs, outputs


def run_kernel(bundle: Path, kernel: dict, number: int, repeat: int) -> dict:
    """Load, check, then time one kernel: a row of the report."""
    import tvm  # noqa: PLC0415 - only after the bundle was checked

    device = tvm.cpu()
    module = tvm.runtime.load_module(str(bundle / kernel["library"]))
    inputs, expected = references(bundle, kernel)
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    outs = [tvm.runtime.empty(o["shape"], o["dtype"], device) for o in kernel["outputs"]]
    module[kernel["symbol"]](*args, *outs)
    problems = [compare(o.numpy(), e, kernel["tolerance"]) for o, e in zip(outs, expected, strict=True)]
    problem = next((p for p in problems if p), None)
    row = {"name": kernel["name"], "layer": kernel["describe"], "correct": problem is None, "problem": problem}
    if problem is None and repeat:
        timer = module.time_evaluator(kernel["symbol"], device, number=number, repeat=repeat)
        row["median_us"] = float(np.median(timer(*args, *outs).results)) * 1e6
    return row


def table(manifest: dict, rows: list[dict]) -> str:
    lines = [f"{manifest['target_key']} ({manifest['arch']}), {len(rows)} kernels, tvm {manifest['tvm_version']}"]
    lines.append(f"{'kernel':22} {'check':8} {'median us':>11}  layer")
    for row in rows:
        check = "ok" if row["correct"] else "WRONG"
        time = f"{row['median_us']:11.1f}" if "median_us" in row else f"{'-':>11}"
        lines.append(f"{row['name']:22} {check:8} {time}  {row['layer'][:90]}")
        if row["problem"]:
            lines.append(f"{'':22} {row['problem']}")
    wrong = sum(not row["correct"] for row in rows)
    lines.append(f"{len(rows) - wrong} of {len(rows)} kernels match torch")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check and time the kernels of this tvmlayers bundle.")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--number", type=int, default=10, help="calls per timing (time_evaluator's number)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per kernel (0: check only)")
    args = parser.parse_args(argv)
    bundle = Path(__file__).resolve().parent
    try:
        manifest = read_manifest(bundle)
        check_architecture(manifest, platform.machine())
        check_files(bundle, manifest)
    except BundleError as err:
        print(f"run.py: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime alone: no compiler needed on the device
    rows = [run_kernel(bundle, kernel, args.number, args.repeat) for kernel in manifest["kernels"]]
    print(json.dumps({"target_key": manifest["target_key"], "kernels": rows}) if args.json else table(manifest, rows))
    return 0 if all(row["correct"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Measure the offline-tuning candidates of this folder on this machine: ``python3 measure.py --out measured.json``.

The folder is a tvmlayers bundle (``run.py`` next to this file) whose kernels are the candidate schedules of
``tvmlayers tune --export-candidates``.  Every candidate goes through run.py's own steps: the bundle's files
and architecture are checked first, then each kernel is checked against torch's reference and, only if it
matches, timed.  The results go to ``--out`` in the measured.json format of tvmlayers/formats.py, which
``tvmlayers logs import`` turns into tuning records where the candidates were exported.

The file is rewritten (atomically) after every candidate, and the candidate about to run is written first as
failed: if a kernel takes the process down, what was measured is kept, that kernel reads as failed, and running
the same command again goes on with the candidates not measured yet.  A GPU candidate that fails and leaves the
CUDA context unusable (a kernel fault: every later CUDA call fails) is recorded as failed, and the command starts
itself again in a fresh process, which goes on with the next candidate.

This file is tvmlayers/tuning/offline_measure.py, copied into each candidates folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import run  # this folder's run.py (tvmlayers/bundle_run.py): the bundle's checks and the kernel runner

MEASURED_FORMAT = 1  # tvmlayers.formats.MEASURED_FORMAT
DIED = "the process died while running it"


def export_id(manifest: dict) -> str:
    """The export these candidates belong to (every kernel's ``candidate`` names it)."""
    exports = {str(kernel.get("candidate", {}).get("export")) for kernel in manifest["kernels"]}
    if len(exports) != 1 or "None" in exports:
        raise run.BundleError("this is a bundle, not a folder written by tvmlayers tune --export-candidates")
    return exports.pop()


def _write(path: Path, measured: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(measured, indent=1) + "\n")
    os.replace(tmp, path)


def _started(path: Path, manifest: dict) -> dict:
    """The measurements of an earlier run of this export (to go on from), or a fresh file."""
    try:
        earlier = json.loads(path.read_text())
        if earlier.get("export") == export_id(manifest) and earlier.get("format") == MEASURED_FORMAT:
            return earlier
    except (OSError, ValueError, AttributeError):
        pass
    return {
        "format": MEASURED_FORMAT,
        "export": export_id(manifest),
        "target_key": manifest["target_key"],
        "device": run.device_name(manifest),
        "created": time.time(),
        "kernels": [],
    }


def _gpu_context_lost() -> bool:
    """Whether CUDA calls fail in this process now (after an illegal address, say, every one does)."""
    import torch  # noqa: PLC0415 - a CUDA bundle runs with torch, loaded by run.py already

    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception:  # noqa: BLE001 - whatever torch raises, the context is gone
        return True
    return False


def measure(bundle: Path, out: Path, number: int, repeat: int) -> int:
    manifest = run.read_manifest(bundle)
    run.check_architecture(manifest, platform.machine())
    run.check_files(bundle, manifest)
    export_id(manifest)  # a plain bundle has no candidates to measure
    run.load_runtime(bundle, bool(manifest.get("cuda_arch")))  # none here: said once, not per candidate
    measured = _started(out, manifest)
    done = {row["name"] for row in measured["kernels"]}
    for kernel in manifest["kernels"]:
        if kernel["name"] in done:
            continue
        row = {"name": kernel["name"], "candidate": kernel["candidate"], "status": "failed", "problem": DIED}
        measured["kernels"].append(row)
        _write(out, measured)  # if this kernel kills the process, it reads as failed
        try:
            result = run.run_kernel(bundle, kernel, number, repeat)
            status = "ok" if result["correct"] else "wrong"
            timed = {field: result.get(field) for field in ("median_us", "max_err", "torch_us")}
            row.update(status=status, problem=result["problem"], **timed)
        except Exception as err:  # noqa: BLE001 - a candidate that does not load or launch is a failed one
            row.update(problem=f"{type(err).__name__}: {str(err).strip()[-300:]}", median_us=None)
            if manifest.get("cuda_arch") and _gpu_context_lost():
                _write(out, measured)
                # a kernel fault leaves the process's CUDA context unusable: every later candidate would fail
                # too; a fresh process (the same command) goes on from the file with the next candidate
                print(f"{kernel['name']}: failed and took the GPU context down; going on in a new process", flush=True)
                os.execv(sys.executable, [sys.executable, *sys.argv])
        _write(out, measured)
        time_text = f"{row['median_us']:.4g} us" if row["median_us"] else ""
        print(f"{kernel['name']:24} {row['status']:7} {time_text}", flush=True)
    ok = sum(row["status"] == "ok" for row in measured["kernels"])
    print(f"{ok} of {len(measured['kernels'])} candidates correct and timed on {measured['device']}; wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check and time this folder's offline-tuning candidates.")
    parser.add_argument("--out", required=True, help="the measured.json to write (tvmlayers logs import reads it)")
    parser.add_argument("--number", type=int, default=10, help="calls per timing (time_evaluator's number)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per candidate; the median is kept")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.number < 1:
        parser.error("--number and --repeat must be at least 1: a candidate without a time cannot be imported")
    try:
        return measure(Path(__file__).resolve().parent, Path(args.out), args.number, args.repeat)
    except run.BundleError as err:
        print(f"measure.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Build, here (no GPU needed), what ``scripts/gpu_check.sh`` carries to a GPU machine: ``.gpu_payload/``.

    .venv/bin/python scripts/gpu_payload.py [--arch sm_90] [--python 3.12] [--candidates DIR ...] [-o .gpu_payload]

The payload (under 40 MiB; the device tool carries at most 64 MiB) holds:

- ``runtime/``: a runtime pack (``tvmlayers runtime-pack --cuda``) for the GPU machine's CPython on x86_64;
- ``bundles/modes``: every op in every mode (the layers of tests/test_arm_emulation.py), batch as there;
- ``bundles/resnet18-b1`` and ``bundles/resnet18-b16``: ResNet-18's layers (examples/workloads/resnet18.toml)
  at batch 1 and 16;
- ``candidates/<name>``: offline-tuning candidates folders (``tvmlayers tune --export-candidates``), when given;
- ``payload.json``: what is where (read by scripts/gpu_report.py).

The bundles carry no ``.npz`` references: run.py computes torch's on the GPU (the ResNet-18 references at batch
16 alone would take over 100 MiB).  The payload is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from tvmlayers import layer_specs
from tvmlayers.bundle import compile_bundle
from tvmlayers.published import published_folder
from tvmlayers.runtime_pack import make_runtime_pack
from tvmlayers.targets import resolve_target
from tvmlayers.workloads import Workload, load_workloads

REPO = Path(__file__).resolve().parents[1]
PAYLOAD_FORMAT = 1  # scripts/gpu_report.py reads this format
MAX_PAYLOAD_MIB = 40


def every_mode() -> list[Workload]:
    """The layers of the ARM emulation tests: every op in every mode the core supports (one list, kept there)."""
    spec = importlib.util.spec_from_file_location("test_arm_emulation", REPO / "tests" / "test_arm_emulation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    host = resolve_target("host")
    workloads = []
    for op, shape, params, *dtype in module.LAYERS:
        call = layer_specs.workload_spec(op, list(shape), dtype[0] if dtype else "float32", params, host)
        workloads.append(Workload.from_spec(call))
    return workloads


def at_batch(workloads: list[Workload], batch: int) -> list[Workload]:
    """The same layers with the input's first dimension (the batch) set to ``batch``."""
    return [dataclasses.replace(w, input_shape=(batch, *w.input_shape[1:])) for w in workloads]


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def standard_bundles() -> dict[str, list[Workload]]:
    """The payload's bundles: every op and mode, ResNet-18's layers at batch 1 and 16."""
    resnet18, _ = load_workloads(REPO / "examples" / "workloads" / "resnet18.toml")
    return {"modes": every_mode(), "resnet18-b1": at_batch(resnet18, 1), "resnet18-b16": at_batch(resnet18, 16)}


def build_payload(
    out: Path, arch: str, python: str, candidates: list[Path], bundles: dict[str, list[Workload]] | None = None
) -> dict:
    """Write the payload folder ``out`` (replaced when it holds a payload) with ``bundles`` (default:
    :func:`standard_bundles`; the summary reads "modes", "resnet18-b1" and "resnet18-b16"); returns its
    payload.json."""
    if out.exists() and not (out / "payload.json").exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a GPU payload: choose an empty or new folder")
    for folder in candidates:
        if not (folder / "measure.py").is_file() or not (folder / "manifest.json").is_file():
            raise FileNotFoundError(f"{folder} is not a candidates folder (tvmlayers tune --export-candidates)")
    bundles = standard_bundles() if bundles is None else bundles
    with published_folder(out) as staging:
        make_runtime_pack(staging / "runtime", python=python, arch="x86_64", cuda=True)
        kernels = {}
        for name, workloads in bundles.items():
            print(f"compiling {len(workloads)} layers for {arch}: bundles/{name}", flush=True)
            bundle = staging / "bundles" / name
            manifest = compile_bundle(workloads, arch, bundle, references=False, progress=sys.stderr.isatty())
            kernels[name] = len(json.loads(manifest.read_text())["kernels"])
        for folder in candidates:
            shutil.copytree(folder, staging / "candidates" / folder.name)
        payload = {
            "format": PAYLOAD_FORMAT,
            "created": time.time(),
            "cuda_arch": json.loads((staging / "bundles" / "modes" / "manifest.json").read_text())["cuda_arch"],
            "python": python,
            "runtime": "runtime",
            "bundles": {name: {"path": f"bundles/{name}", "kernels": count} for name, count in kernels.items()},
            "batches": {"resnet18": {"1": "resnet18-b1", "16": "resnet18-b16"}},
            "candidates": [f"candidates/{folder.name}" for folder in candidates],
        }
        (staging / "payload.json").write_text(json.dumps(payload, indent=1) + "\n")
        size = folder_mib(staging)
        if size > MAX_PAYLOAD_MIB:
            raise RuntimeError(f"the payload is {size:.1f} MiB, over {MAX_PAYLOAD_MIB} MiB: carry fewer candidates")
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the payload of scripts/gpu_check.sh (no GPU needed).")
    parser.add_argument("-o", "--output", default=str(REPO / ".gpu_payload"), help="default: .gpu_payload")
    parser.add_argument("--arch", default="sm_90", help="the GPU's preset (default sm_90: H100, H200)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's CPython version (default 3.12)")
    parser.add_argument("--candidates", nargs="*", default=[], help="candidates folders to measure there")
    args = parser.parse_args(argv)
    out = Path(args.output)
    payload = build_payload(out, args.arch, args.python, [Path(c) for c in args.candidates])
    kernels = sum(b["kernels"] for b in payload["bundles"].values())
    print(
        f"{out}: {folder_mib(out):.1f} MiB, {kernels} kernels for {payload['cuda_arch']} in "
        f"{len(payload['bundles'])} bundles, {len(payload['candidates'])} candidates folders"
    )
    print("On the GPU machine, from the repository root: scripts/gpu_check.sh  (writes under $OUT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

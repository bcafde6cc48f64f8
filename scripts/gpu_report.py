#!/usr/bin/env python3
"""The Python half of scripts/gpu_check.sh (standard library only; runs on the GPU machine, and here for
``--dry-run``):

    gpu_report.py validate PAYLOAD [--here]   the payload is complete and unchanged (every bundle through its own
                                              run.py's checks); --here: for the GPU machine's Python (this one)
    gpu_report.py check-gpu PAYLOAD           torch sees a GPU of the payload's architecture
    gpu_report.py list PAYLOAD bundles|candidates
    gpu_report.py summarize PAYLOAD OUT       OUT/gpu_check.json and OUT/summary.md from what the runs wrote

The payload is written by scripts/gpu_payload.py (``payload.json``: its format is PAYLOAD_FORMAT there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

PAYLOAD_FORMAT = 1  # scripts/gpu_payload.py's
MAX_CARRIED_MIB = 64  # what the device tool carries per call


class PayloadError(Exception):
    """A payload that cannot be used; the message says why and what to do."""


def read_payload(payload: Path) -> dict:
    try:
        meta = json.loads((payload / "payload.json").read_text())
    except (OSError, ValueError) as err:
        raise PayloadError(
            f"{payload}: no readable payload.json ({err}): build it with scripts/gpu_payload.py"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != PAYLOAD_FORMAT:
        raise PayloadError(f"{payload}: payload format {meta.get('format')!r}, expected {PAYLOAD_FORMAT}: rebuild it")
    return meta


def bundle_runner(bundle: Path):  # noqa: ANN201 - the bundle's run.py as a module
    """A bundle's own run.py (tvmlayers/bundle_run.py), whose checks validate the bundle."""
    spec = importlib.util.spec_from_file_location(f"run_{bundle.name.replace('-', '_')}", bundle / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate(payload: Path, here: bool) -> list[str]:
    """Raise PayloadError for a payload that cannot run; returns one line per part that can."""
    meta = read_payload(payload)
    lines = []
    pack_file = payload / meta["runtime"] / "runtime-pack.json"
    try:
        pack = json.loads(pack_file.read_text())
    except (OSError, ValueError) as err:
        raise PayloadError(f"{pack_file}: missing or unreadable ({err}): rebuild the payload") from None
    if not pack.get("cuda") or pack.get("arch") != "x86_64":
        raise PayloadError(f"{pack_file}: not a CUDA runtime pack for x86_64: rebuild the payload")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here and pack.get("python") != python:
        raise PayloadError(
            f"the runtime pack is for CPython {pack.get('python')}, this is {python}: rebuild the payload with "
            f"scripts/gpu_payload.py --python {python}"
        )
    lines.append(
        f"runtime pack: TVM {pack['tvm_version']} (CUDA), tvm_ffi {pack['tvm_ffi_version']}, CPython {pack['python']}"
    )
    for name, entry in meta["bundles"].items():
        bundle = payload / entry["path"]
        run = bundle_runner(bundle)
        try:
            manifest = run.read_manifest(bundle)
            run.check_files(bundle, manifest)
        except run.BundleError as err:
            raise PayloadError(f"bundle {name}: {err}") from None
        if manifest.get("cuda_arch") != meta["cuda_arch"]:
            raise PayloadError(f"bundle {name} is for {manifest.get('cuda_arch')}, the payload for {meta['cuda_arch']}")
        lines.append(f"bundle {name}: {len(manifest['kernels'])} kernels for {manifest['cuda_arch']}, files intact")
    for folder in meta["candidates"]:
        if not (payload / folder / "measure.py").is_file():
            raise PayloadError(f"{payload / folder}: no measure.py: rebuild the payload")
        lines.append(
            f"candidates {folder}: {len(json.loads((payload / folder / 'manifest.json').read_text())['kernels'])}"
        )
    size = sum(p.stat().st_size for p in payload.rglob("*") if p.is_file()) / 2**20
    if size > MAX_CARRIED_MIB:
        raise PayloadError(f"the payload is {size:.1f} MiB, over the {MAX_CARRIED_MIB} MiB the device tool carries")
    lines.append(f"size: {size:.1f} MiB")
    return lines


def check_gpu(payload: Path) -> str:
    """The GPU's name and architecture; PayloadError unless it is the payload's."""
    wanted = read_payload(payload)["cuda_arch"]
    try:
        import torch  # noqa: PLC0415
    except ImportError as err:
        raise PayloadError(f"torch is not importable ({err}): the check needs torch with CUDA") from None
    if not torch.cuda.is_available():
        raise PayloadError(f"torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    name = f"{torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    if f"sm_{major}{minor}" != wanted.rstrip("af"):
        raise PayloadError(f"this GPU is {name}, the payload is for {wanted}: rebuild it with --arch sm_{major}{minor}")
    return name


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _check(row: dict) -> str:
    return "yes" if row.get("correct") else f"NO: {row.get('problem') or 'failed'}"[:80]


def summarize(payload: Path, out: Path) -> tuple[dict, str]:
    """The whole check as JSON, and its Markdown summary."""
    meta = read_payload(payload)
    reports, failures = {}, []
    for name in meta["bundles"]:
        report, rc = _read_json(out / f"{name}.json"), (out / f"{name}.rc")
        code = rc.read_text().strip() if rc.exists() else "not run"
        reports[name] = report or {"kernels": []}
        reports[name]["exit_status"] = code
        if code != "0":
            failures.append((name, code, _log_tail(out / f"{name}.log")))
    measured = {}
    for folder in meta["candidates"]:
        name = Path(folder).name
        data = _read_json(out / f"measured-{name}.json") or {"kernels": []}
        rows = data.get("kernels", [])
        measured[name] = {
            "file": f"measured-{name}.json",
            "ok": sum(r.get("status") == "ok" for r in rows),
            "wrong": sum(r.get("status") == "wrong" for r in rows),
            "failed": sum(r.get("status") == "failed" for r in rows),
            "total": len(rows),
        }
    device = next((r.get("device") for r in reports.values() if r.get("device")), "unknown GPU")
    runtime = next((r.get("runtime") for r in reports.values() if r.get("runtime")), {})
    per_op = _per_op(reports, meta)
    result = {
        "created": time.time(),
        "device": device,
        "runtime": runtime,
        "cuda_arch": meta["cuda_arch"],
        "per_op": per_op,
        "bundles": reports,
        "candidates": measured,
    }
    return result, _markdown(result, meta, failures)


def _per_op(reports: dict, meta: dict) -> dict:
    """Per op: kernels equal to torch (all bundles), and the geometric mean of ours/torch per ResNet-18 batch."""
    per_op: dict[str, dict] = {}
    for report in reports.values():
        for row in report["kernels"]:
            op = row["layer"].split()[0]
            entry = per_op.setdefault(op, {"kernels": 0, "equal": 0})
            entry["kernels"] += 1
            entry["equal"] += bool(row.get("correct"))
    for batch, name in meta["batches"]["resnet18"].items():
        for op, entry in per_op.items():
            rows = [r for r in reports.get(name, {"kernels": []})["kernels"] if r["layer"].split()[0] == op]
            entry[f"resnet18_b{batch}_ratio"] = _geomean([r.get("ratio") for r in rows])
    return per_op


def _markdown(result: dict, meta: dict, failures: list) -> str:
    runtime = result["runtime"]
    lines = [
        f"# GPU check: {result['device']}",
        "",
        f"Kernels for {result['cuda_arch']}, run by each bundle's run.py on TVM's runtime ({runtime.get('kind', '?')}, "
        f"TVM {runtime.get('tvm_version', '?')}); torch on the same GPU is the reference and the peer (cuDNN/cuBLAS, "
        "TF32 off), timed with CUDA events, median; ratio = our time / torch's (below 1: faster).",
        "",
        "## Per op",
        "",
        "| op | equal to torch | ResNet-18 batch 1: ours/torch (geomean) | batch 16 |",
        "| --- | --- | --- | --- |",
    ]
    for op, entry in sorted(result["per_op"].items()):
        lines.append(
            f"| {op} | {entry['equal']} of {entry['kernels']} | {_ratio(entry.get('resnet18_b1_ratio'))} | "
            f"{_ratio(entry.get('resnet18_b16_ratio'))} |"
        )
    batches = meta["batches"]["resnet18"]
    b1, b16 = (result["bundles"].get(batches[b], {"kernels": []})["kernels"] for b in ("1", "16"))
    lines += [
        "",
        "## ResNet-18 layers, batch 1 and 16 (us)",
        "",
        "| layer (batch 1) | equal | ours b1 | torch b1 | ratio b1 | equal b16 | ours b16 | torch b16 | ratio b16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for one, sixteen in zip(b1, b16 + [{}] * (len(b1) - len(b16)), strict=False):
        lines.append(
            f"| {one['layer'][:80]} | {_check(one)} | {_us(one.get('median_us'))} | {_us(one.get('torch_us'))} | "
            f"{_ratio(one.get('ratio'))} | {_check(sixteen)} | {_us(sixteen.get('median_us'))} | "
            f"{_us(sixteen.get('torch_us'))} | {_ratio(sixteen.get('ratio'))} |"
        )
    lines += ["", "## Every op and mode", "", "| kernel | equal | max err | ours us | torch us | ratio |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for row in result["bundles"].get("modes", {"kernels": []})["kernels"]:
        error = "-" if row.get("max_err") is None else f"{row['max_err']:.2g}"
        lines.append(
            f"| {row['layer'][:90]} | {_check(row)} | {error} | {_us(row.get('median_us'))} | "
            f"{_us(row.get('torch_us'))} | {_ratio(row.get('ratio'))} |"
        )
    if result["candidates"]:
        lines += ["", "## Offline-tuning candidates", "", "| folder | ok | wrong | failed | measured file |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for name, m in result["candidates"].items():
            lines.append(f"| {name} | {m['ok']} of {m['total']} | {m['wrong']} | {m['failed']} | {m['file']} |")
    if failures:
        lines += ["", "## Bundles that did not pass", ""]
        for name, code, tail in failures:
            lines += [f"- {name}: exit status {code}", "", "```", tail, "```", ""]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    validate_ = commands.add_parser("validate")
    validate_.add_argument("payload", type=Path)
    validate_.add_argument("--here", action="store_true", help="also check the pack is for this Python")
    commands.add_parser("check-gpu").add_argument("payload", type=Path)
    listing = commands.add_parser("list")
    listing.add_argument("payload", type=Path)
    listing.add_argument("what", choices=("bundles", "candidates"))
    summary = commands.add_parser("summarize")
    summary.add_argument("payload", type=Path)
    summary.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            print("\n".join(validate(args.payload, args.here)))
        elif args.command == "check-gpu":
            print(f"GPU: {check_gpu(args.payload)} on {platform.node()}")
        elif args.command == "list":
            meta = read_payload(args.payload)
            entries = [e["path"] for e in meta["bundles"].values()] if args.what == "bundles" else meta["candidates"]
            print("\n".join(entries))
        else:
            result, markdown = summarize(args.payload, args.out)
            _write(args.out / "gpu_check.json", json.dumps(result, indent=1) + "\n")
            _write(args.out / "summary.md", markdown)
            print(markdown)
    except PayloadError as err:
        print(f"gpu_report.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

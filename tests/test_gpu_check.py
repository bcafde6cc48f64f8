"""scripts/gpu_check.sh and its payload, as far as they run without a GPU: a small payload for sm_90 built here
(scripts/gpu_payload.py), validated by the script's --dry-run, refused when changed or when the check is run on
another Python, a CUDA bundle's run.py refusing a machine without a GPU, and the summary of a run's outputs.
What needs the GPU (the kernels' results and times) is the script itself, run on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tvmlayers import layer_specs
from tvmlayers.targets import resolve_target
from tvmlayers.workloads import Workload

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_payload = _script("gpu_payload")
gpu_report = _script("gpu_report")

CONV = {
    "weight_shape": (8, 4, 3, 3),
    "stride": (1, 1),
    "padding": (1, 1, 1, 1),
    "dilation": (1, 1),
    "groups": 1,
    "padding_mode": "zeros",
    "bias": False,
    "relu": True,
}
POOL = {
    "kernel_size": (3, 3),
    "stride": (2, 2),
    "padding": (1, 1),
    "dilation": (1, 1),
    "ceil_mode": False,
    "return_indices": True,
}


def _workload(op: str, shape: tuple, params: dict) -> Workload:
    return Workload.from_spec(layer_specs.workload_spec(op, list(shape), "float32", params, resolve_target("host")))


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("payload") / "gpu"
    conv = _workload("conv2d", (1, 4, 8, 8), CONV)
    bundles = {
        "modes": [conv, _workload("max_pool2d", (1, 4, 9, 9), POOL)],
        "resnet18-b1": [conv],
        "resnet18-b16": gpu_payload.at_batch([conv], 16),
    }
    gpu_payload.build_payload(out, "sm_90", "3.12", [], bundles)
    return out


def _check(*args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
    )


def test_payload_holds_a_cuda_runtime_pack_for_312_and_sm_90_bundles_without_references(payload):
    meta = json.loads((payload / "payload.json").read_text())
    assert meta["cuda_arch"] == "sm_90" and meta["python"] == "3.12"
    pack = json.loads((payload / "runtime" / "runtime-pack.json").read_text())
    assert pack["cuda"] and pack["python"] == "3.12" and pack["arch"] == "x86_64"
    b16 = json.loads((payload / "bundles" / "resnet18-b16" / "manifest.json").read_text())
    assert b16["cuda_arch"] == "sm_90" and b16["kernels"][0]["spec"]["input_shape"][0] == 16
    assert not list(payload.rglob("*.npz"))  # torch computes the references on the GPU
    assert (payload / "bundles" / "modes" / "tvmlayers_reference.py").is_file()
    assert gpu_payload.folder_mib(payload) < gpu_payload.MAX_PAYLOAD_MIB


def test_dry_run_validates_the_payload_and_lists_what_it_would_run(payload, tmp_path):
    run = _check("--dry-run", str(payload), out=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bundle resnet18-b16: 1 kernels for sm_90, files intact" in run.stdout
    for name in ("modes", "resnet18-b1", "resnet18-b16"):
        assert f"{payload}/bundles/{name}/run.py --json {tmp_path}/{name}.json" in run.stdout


def test_a_changed_kernel_or_another_python_stops_the_check_before_anything_runs(payload, tmp_path):
    run = _check(str(payload), out=tmp_path / "wrong-python")  # this Python is not the pack's 3.12
    assert run.returncode == 2
    assert "the runtime pack is for CPython 3.12" in run.stderr
    assert "did not run" in (tmp_path / "wrong-python" / "summary.md").read_text()
    changed = tmp_path / "changed"
    shutil.copytree(payload, changed)
    library = changed / "bundles" / "modes" / "kernels" / "00-conv2d.so"
    library.write_bytes(library.read_bytes() + b"\0")
    run = _check("--dry-run", str(changed), out=tmp_path / "changed-out")
    assert run.returncode == 2
    assert "bundle modes: refusing to run: kernels/00-conv2d.so does not match manifest.json" in run.stderr


def test_a_cuda_bundles_run_py_refuses_a_machine_without_a_gpu(payload):
    run = subprocess.run(
        [sys.executable, str(payload / "bundles" / "modes" / "run.py")], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2
    assert "this bundle is for sm_90 GPUs, and torch sees no GPU here" in run.stderr


def _rows(payload: Path, name: str, ours: float, theirs: float) -> list[dict]:
    kernels = json.loads((payload / "bundles" / name / "manifest.json").read_text())["kernels"]
    return [
        {"name": k["name"], "layer": k["describe"], "correct": True, "problem": None, "max_err": 1e-6,
         "median_us": ours, "torch_us": theirs, "ratio": ours / theirs}
        for k in kernels
    ]  # fmt: skip


def test_summary_per_op_and_per_batch_and_the_failed_bundle(payload, tmp_path):
    # the files gpu_check.sh leaves, in run.py's --json format: two bundles passed, one failed
    runtime = {"kind": "runtime-only pack", "path": "/payload/runtime", "tvm_version": "0.27.0.post1"}
    for name, ours, theirs in (("modes", 10.0, 20.0), ("resnet18-b1", 30.0, 20.0)):
        report = {"device": "NVIDIA H100 (sm_90)", "runtime": runtime, "kernels": _rows(payload, name, ours, theirs)}
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
        (tmp_path / f"{name}.rc").write_text("0\n")
    (tmp_path / "resnet18-b16.rc").write_text("124\n")
    (tmp_path / "resnet18-b16.log").write_text("loading...\ntimed out after 100 s\n")
    result, markdown = gpu_report.summarize(payload, tmp_path)
    assert result["device"] == "NVIDIA H100 (sm_90)"
    conv = result["per_op"]["conv2d"]
    assert (conv["kernels"], conv["equal"]) == (2, 2)
    assert conv["resnet18_b1_ratio"] == pytest.approx(1.5) and conv["resnet18_b16_ratio"] is None
    assert "| conv2d | 2 of 2 | 1.50x | - |" in markdown
    assert "| max_pool2d | 1 of 1 | - | - |" in markdown
    assert "- resnet18-b16: exit status 124" in markdown and "timed out after 100 s" in markdown
    assert result["bundles"]["resnet18-b16"]["exit_status"] == "124"

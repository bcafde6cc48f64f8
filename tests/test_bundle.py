"""Bundles on this machine: the manifest, the references, run.py's checks and refusals, the compile command.

Bundles for this machine's own architecture run their run.py here with this Python (the same code a board
runs); the ARM bundles are checked under emulation in test_arm_emulation.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm

import tvmlayers as tl
from tvmlayers import layer_specs
from tvmlayers.bundle import compile_bundle
from tvmlayers.cli import main
from tvmlayers.formats import BUNDLE_FORMAT
from tvmlayers.model_bench import randomize_batchnorm
from tvmlayers.targets import host_arch, resolve_target
from tvmlayers.workloads import Workload

ROOT = Path(__file__).resolve().parent.parent
SMALL_CNN = ROOT / "examples" / "models" / "small_cnn.py"


def _workloads() -> list[Workload]:
    host = resolve_target("host")
    layers = [
        ("relu", [2, 3, 4, 5], {}),
        ("max_pool2d", [1, 2, 7, 7], {"kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1],
                                      "ceil_mode": True, "return_indices": True}),
        ("linear", [2, 12], {"weight_shape": [8, 12], "bias": True}),
    ]  # fmt: skip
    return [Workload.from_spec(layer_specs.workload_spec(op, s, "float32", p, host)) for op, s, p in layers]


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "host"
    compile_bundle(_workloads(), "host", out, progress=False)
    return out


def _run_py(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(bundle / "run.py"), *args], capture_output=True, text=True, timeout=300, cwd=bundle
    )


def _copy(bundle: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(bundle), str(to)], check=True)
    return to


def test_manifest_describes_every_kernel_and_hashes_every_file(host_bundle):
    manifest = json.loads((host_bundle / "manifest.json").read_text())
    assert manifest["format"] == BUNDLE_FORMAT
    assert manifest["tvm_version"] == tvm.__version__ and manifest["tvmlayers_version"] == tl.__version__
    assert manifest["arch"] == host_arch() and manifest["preset"] == "host"
    assert [k["layer"] for k in manifest["kernels"]] == ["relu", "max_pool2d", "linear"]
    on_disk = {p.relative_to(host_bundle).as_posix() for p in host_bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((host_bundle / name).read_bytes()).hexdigest() == digest
    pool = manifest["kernels"][1]
    assert [o["dtype"] for o in pool["outputs"]] == ["float32", "int64"]  # values and indices
    assert pool["schedule"]["source"] in ("default", "tuned")
    linear = manifest["kernels"][2]
    assert linear["inputs"][1]["shape"][-1] == linear["weight_layout"]["weight_block"]  # pre-packed weight


def test_references_are_torchs_outputs(host_bundle):
    manifest = json.loads((host_bundle / "manifest.json").read_text())
    refs = {k["layer"]: np.load(host_bundle / k["references"]) for k in manifest["kernels"]}
    x = torch.from_numpy(refs["relu"]["input0"])
    torch.testing.assert_close(torch.from_numpy(refs["relu"]["output0"]), F.relu(x))
    x = torch.from_numpy(refs["max_pool2d"]["input0"])
    values, indices = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    torch.testing.assert_close(torch.from_numpy(refs["max_pool2d"]["output0"]), values)
    assert torch.equal(torch.from_numpy(refs["max_pool2d"]["output1"]), indices)


def test_run_py_checks_then_times_every_kernel(host_bundle):
    run = _run_py(host_bundle, "--json", "--repeat", "2", "--number", "2")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["kernels"]
    assert len(rows) == 3 and all(row["correct"] and row["median_us"] > 0 for row in rows)
    table = _run_py(host_bundle, "--repeat", "0")
    assert table.returncode == 0 and "3 of 3 kernels match torch" in table.stdout


def test_run_py_refuses_a_tampered_or_missing_file(host_bundle, tmp_path):
    bundle = _copy(host_bundle, tmp_path / "tampered")
    library = bundle / "kernels" / "02-linear.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    run = _run_py(bundle)
    assert run.returncode == 2 and "kernels/02-linear.so does not match manifest.json" in run.stderr
    assert "median" not in run.stdout  # nothing was loaded or run
    missing = _copy(host_bundle, tmp_path / "missing")
    (missing / "kernels" / "00-relu.npz").unlink()
    run = _run_py(missing)
    assert run.returncode == 2 and "kernels/00-relu.npz is missing" in run.stderr


def test_run_py_reports_a_kernel_that_differs_from_torch(host_bundle, tmp_path):
    bundle = _copy(host_bundle, tmp_path / "wrong")
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = manifest["kernels"][2]["references"]
    with np.load(bundle / name) as data:
        arrays = dict(data)
    arrays["output0"] = arrays["output0"] + 1  # torch's reference changed, and its hash with it
    np.savez(bundle / name, **arrays)
    manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    run = _run_py(bundle, "--repeat", "0")
    assert run.returncode == 1
    assert "WRONG" in run.stdout and "2 of 3 kernels match torch" in run.stdout


def test_a_bundle_for_another_architecture_says_so(tmp_path):
    other = "armv7" if host_arch() == "aarch64" else "aarch64"
    compile_bundle(_workloads()[:1], other, tmp_path / "arm", progress=False)
    run = _run_py(tmp_path / "arm")
    assert run.returncode == 2
    assert f"this bundle is for {'arm' if other == 'armv7' else other}" in run.stderr
    assert f"this machine is {host_arch()}" in run.stderr


def test_missing_cross_compiler_fails_before_compiling(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="aarch64-linux-gnu-gcc.*apt-get install gcc-aarch64-linux-gnu"):
        compile_bundle(_workloads(), "rasp4b", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_compile_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a tvmlayers bundle"):
        compile_bundle(_workloads(), "host", tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_models_bundle_holds_its_folded_weights_pre_packed(tmp_path):
    # conv -> BatchNorm -> relu is one kernel after tl.convert: its reference must be the model's own output
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    randomize_batchnorm(model).eval()
    compile_bundle(model, "host", tmp_path / "model", input_shape=(1, 3, 10, 10), progress=False)
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    (kernel,) = manifest["kernels"]
    assert kernel["spec"]["params"]["relu"] and kernel["spec"]["params"]["bias"]  # BatchNorm folded into a bias
    with np.load(tmp_path / "model" / kernel["references"]) as data:
        x, packed, output = (torch.from_numpy(data[k]) for k in ("input0", "input1", "output0"))
    assert packed.shape[-1] == kernel["weight_layout"]["weight_block"]
    with torch.no_grad():
        torch.testing.assert_close(output, model(x), rtol=1e-4, atol=1e-5)
    run = _run_py(tmp_path / "model", "--repeat", "0")
    assert run.returncode == 0 and "1 of 1 kernels match torch" in run.stdout


def test_compile_command_for_a_model_file(tmp_path, capsys):
    out = tmp_path / "cnn"
    code = main(
        ["compile", "--model", str(SMALL_CNN), "--input-shape", "1,3,32,32", "--target", "host", "-o", str(out)]
    )
    assert code == 0
    assert f"{out}: " in capsys.readouterr().out
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    assert {k["layer"] for k in kernels} == {"conv2d", "max_pool2d", "linear"}  # relu fused into the convs
    run = _run_py(out, "--repeat", "0")
    assert run.returncode == 0 and f"{len(kernels)} of {len(kernels)} kernels match torch" in run.stdout


def test_compile_command_usage_errors(capsys, tmp_path):
    assert main(["compile", "--target", "host", "-o", str(tmp_path / "x")]) == 2
    assert "give a workload file or --model" in capsys.readouterr().err

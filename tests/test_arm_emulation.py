"""The real ARM build, checked here under emulation against torch's outputs.

Every layer in every mode the core supports is compiled for aarch64 and armv7 into one bundle each.  The aarch64
bundle is checked by its own run.py, run by an aarch64 Python with TVM's aarch64 runtime under qemu-aarch64; the
armv7 bundle (no TVM wheel for 32-bit ARM) by our C harness under qemu-arm.  Nothing here skips: the fixture
installs the Debian packages and assembles the aarch64 Python (tvmlayers.emulation), as `make test` does.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest

from tvmlayers import layer_specs
from tvmlayers.bundle import compile_bundle
from tvmlayers.bundle_harness import check_bundle
from tvmlayers.emulation import ensure_arm_environment
from tvmlayers.targets import resolve_target
from tvmlayers.workloads import Workload


def _conv(shape, weight, *, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, mode="zeros", **extra):
    params = {
        "weight_shape": weight,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "padding_mode": mode,
        "bias": extra.pop("bias", True),
        **extra,
    }
    return ("conv2d", shape, params)


def _pool(shape, kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=False, indices=False):
    params = {
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "ceil_mode": ceil_mode,
        "return_indices": indices,
    }
    return ("max_pool2d", shape, params)


# (op, input shape, params[, dtype]): every mode of the four layers, on shapes small enough for an emulator
LAYERS = [
    _conv((1, 8, 10, 10), (16, 8, 3, 3)),
    _conv((2, 8, 9, 9), (12, 8, 3, 3), stride=(2, 2), bias=False, relu=True),
    _conv((1, 8, 10, 10), (8, 4, 3, 3), groups=2),
    _conv((1, 8, 10, 10), (8, 1, 3, 3), groups=8, relu=True),  # depthwise
    _conv((1, 8, 9, 9), (16, 1, 3, 3), stride=(2, 2), groups=8),  # depthwise, channel multiplier 2
    _conv((1, 8, 12, 12), (8, 8, 3, 3), padding=(2, 2, 2, 2), dilation=(2, 2)),
    _conv((1, 8, 10, 10), (8, 8, 2, 2), padding=(0, 0, 1, 1)),  # 'same' with an even kernel
    _conv((1, 4, 8, 8), (8, 4, 3, 3), mode="reflect"),
    _conv((1, 4, 8, 8), (8, 4, 3, 3), mode="replicate"),
    _conv((1, 4, 8, 8), (8, 4, 3, 3), mode="circular"),
    _conv((1, 8, 8, 8), (5, 8, 1, 1), padding=(0, 0, 0, 0)),  # 1x1, output channels not a SIMD multiple
    _conv((1, 3, 9, 11), (7, 3, 3, 3), stride=(2, 1), relu=True),  # odd channels: the last block zero-padded
    _conv((1, 4, 7, 7), (5, 4, 3, 3), residual=True) + ("float64",),  # and of 2 float64 lanes on AArch64
    _conv((1, 8, 8, 8), (8, 8, 3, 3), relu6=True),
    _conv((1, 8, 8, 8), (8, 8, 3, 3), residual=True, relu=True),
    _conv((1, 4, 7, 7), (8, 4, 3, 3), padding=(1, 1, 1, 1), relu=True) + ("float64",),
    _pool((1, 4, 11, 11)),
    _pool((1, 4, 11, 11), kernel=(2, 2), padding=(0, 0), ceil_mode=True),
    _pool((2, 3, 10, 10), ceil_mode=True, indices=True),
    _pool((1, 4, 12, 12), padding=(0, 0), dilation=(2, 2), indices=True),
    _pool((1, 4, 9, 9), indices=True) + ("float64",),
    ("linear", (3, 20), {"weight_shape": (16, 20), "bias": True}),
    ("linear", (2, 24), {"weight_shape": (12, 24), "bias": False, "relu": True}),
    ("linear", (1, 64), {"weight_shape": (10, 64), "bias": True}),  # few outputs: dot products
    ("linear", (3, 16), {"weight_shape": (8, 16), "bias": True, "relu6": True}, "float64"),
    ("relu", (300,), {}),
    ("relu", (2, 4, 5, 5), {}, "float64"),
]


def _workloads() -> list[Workload]:
    host = resolve_target("host")
    workloads = []
    for op, shape, params, *dtype in LAYERS:
        spec = layer_specs.workload_spec(op, list(shape), dtype[0] if dtype else "float32", params, host)
        workloads.append(Workload.from_spec(spec))
    return workloads


@pytest.fixture(scope="module")
def arm_environment():
    return ensure_arm_environment()


def test_every_layer_on_aarch64_through_the_bundles_run_py_under_qemu(arm_environment, tmp_path):
    manifest_path = compile_bundle(_workloads(), "aarch64", tmp_path / "bundle", progress=False)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["arch"] == "aarch64" and len(manifest["kernels"]) == len(LAYERS)
    # one timing round keeps time_evaluator's path exercised; the emulated times themselves mean nothing
    run = subprocess.run(
        [
            *arm_environment.python_argv(),
            str(tmp_path / "bundle" / "run.py"),
            "--json",
            "--repeat",
            "1",
            "--number",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(run.stdout)["kernels"]
    assert [row["name"] for row in rows] == [k["name"] for k in manifest["kernels"]]
    assert all(row["correct"] for row in rows), [row for row in rows if not row["correct"]]
    assert all(row["median_us"] > 0 for row in rows)


def test_run_py_under_qemu_refuses_a_tampered_library(arm_environment, tmp_path):
    bundle = tmp_path / "bundle"
    compile_bundle(_workloads()[-2:], "rasp4b", bundle, progress=False)
    library = bundle / "kernels" / "00-relu.so"
    library.write_bytes(library.read_bytes() + b"\0")
    run = subprocess.run(
        [*arm_environment.python_argv(), str(bundle / "run.py")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2
    assert "kernels/00-relu.so does not match manifest.json" in run.stderr


def test_every_layer_on_armv7_through_the_c_harness_under_qemu(arm_environment, tmp_path):
    manifest_path = compile_bundle(_workloads(), "armv7", tmp_path / "bundle", progress=False)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["arch"] == "arm"
    rows = check_bundle(tmp_path / "bundle")
    assert len(rows) == len(LAYERS)
    assert all(row["correct"] for row in rows), [row for row in rows if not row["correct"]]


def test_the_c_harness_reports_outputs_that_differ_from_the_reference(arm_environment, tmp_path):
    bundle = tmp_path / "bundle"
    compile_bundle(_workloads()[:1], "armv7", bundle, progress=False)
    # torch's reference output doubled (and the manifest's hash with it): the kernel's true output must now fail
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = manifest["kernels"][0]["references"]
    with np.load(bundle / name) as data:
        arrays = dict(data)
    arrays["output0"] = arrays["output0"] * 2
    np.savez(bundle / name, **arrays)
    manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (row,) = check_bundle(bundle)
    assert not row["correct"] and "max abs error" in row["problem"]


def test_the_emulated_python_is_aarch64_with_the_pinned_tvm(arm_environment):
    import tvm  # noqa: PLC0415

    code = "import platform, tvm, numpy; print(platform.machine(), tvm.__version__)"
    run = subprocess.run([*arm_environment.python_argv(), "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["aarch64", tvm.__version__]

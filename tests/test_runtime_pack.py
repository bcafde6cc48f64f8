"""Runtime packs: a bundle's run.py on a Python that cannot import apache-tvm, with TVM's runtime libraries and
tvm_ffi from a pack (``tvmlayers runtime-pack``), on this machine and, for aarch64, under qemu.

The Python without TVM is this interpreter run with ``-S`` (no site-packages: neither apache-tvm nor tvm_ffi
nor torch) and ``PYTHONPATH`` = the pack + a folder that holds only numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from tvmlayers import layer_specs
from tvmlayers.bundle import compile_bundle
from tvmlayers.cli import main as cli_main
from tvmlayers.emulation import ensure_arm_environment
from tvmlayers.runtime_pack import make_runtime_pack
from tvmlayers.targets import resolve_target
from tvmlayers.workloads import Workload

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

# one kernel of each op (indices and a fused relu included), small
LAYERS = [
    (
        "conv2d",
        (1, 4, 8, 8),
        {
            "weight_shape": (8, 4, 3, 3),
            "stride": (1, 1),
            "padding": (1, 1, 1, 1),
            "dilation": (1, 1),
            "groups": 1,
            "padding_mode": "zeros",
            "bias": True,
            "relu": True,
        },
    ),
    (
        "max_pool2d",
        (1, 4, 9, 9),
        {
            "kernel_size": (3, 3),
            "stride": (2, 2),
            "padding": (1, 1),
            "dilation": (1, 1),
            "ceil_mode": True,
            "return_indices": True,
        },
    ),
    ("linear", (3, 16), {"weight_shape": (8, 16), "bias": True}),
    ("relu", (2, 4, 5, 5), {}),
]


def _workloads() -> list[Workload]:
    host = resolve_target("host")
    return [Workload.from_spec(layer_specs.workload_spec(op, list(s), "float32", p, host)) for op, s, p in LAYERS]


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "host"
    compile_bundle(_workloads(), "host", out, progress=False)
    return out


@pytest.fixture(scope="module")
def host_pack(tmp_path_factory) -> Path:
    return make_runtime_pack(tmp_path_factory.mktemp("pack") / "runtime").parent


def _numpy_only(folder: Path, site: Path) -> Path:
    """A folder whose only packages are ``site``'s numpy (links to it)."""
    folder.mkdir(exist_ok=True)
    for name in ("numpy", "numpy.libs"):
        if (site / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(site / name)
    return folder


@pytest.fixture(scope="module")
def numpy_only(tmp_path_factory) -> Path:
    return _numpy_only(tmp_path_factory.mktemp("numpy-only"), Path(numpy.__file__).parent.parent)


def _run_without_tvm(bundle: Path, pythonpath: list[Path], *args: str, env: dict | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TVM"))}
    environ.update(PYTHONPATH=os.pathsep.join(map(str, pythonpath)), **(env or {}))
    return subprocess.run(
        [sys.executable, "-S", str(bundle / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
        cwd=bundle,
    )


def test_the_python_of_these_tests_cannot_import_tvm(host_pack, numpy_only, tmp_path):
    environ = {**os.environ, "PYTHONPATH": f"{host_pack}{os.pathsep}{numpy_only}"}
    probe = "import numpy, tvm_ffi\ntry:\n    import tvm\nexcept ImportError:\n    print('no tvm')"
    result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, env=environ)
    assert result.stdout.strip() == "no tvm", result.stderr


def test_pack_holds_the_runtime_and_tvm_ffi_for_this_python(host_pack):
    meta = json.loads((host_pack / "runtime-pack.json").read_text())
    assert meta["arch"] == "x86_64" and meta["python"] == PYTHON and meta["cuda"] is False
    assert list(meta["libraries"]) == ["tvm_runtime_libs/libtvm_runtime.so"]
    assert (host_pack / "typing_extensions.py").is_file()
    tag = f"cpython-{PYTHON.replace('.', '')}-x86_64-linux-gnu"
    assert (host_pack / "tvm_ffi" / f"core.{tag}.so").is_file()
    assert not (host_pack / "tvm_ffi" / "include").exists()  # C++ headers build extensions; nothing loads them
    assert "PYTHONPATH=" in (host_pack / "README.txt").read_text()


def test_run_py_without_apache_tvm_loads_the_pack_checks_and_times_every_kernel(host_bundle, host_pack, numpy_only):
    run = _run_without_tvm(host_bundle, [host_pack, numpy_only], "--json", "--repeat", "2", "--number", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["runtime"]["kind"] == "runtime-only pack"
    assert Path(report["runtime"]["path"]) == host_pack.resolve()
    rows = report["kernels"]
    assert [row["name"] for row in rows] == [f"{i:02d}-{op}" for i, (op, _, _) in enumerate(LAYERS)]
    assert all(row["correct"] for row in rows), rows
    assert all(row["median_us"] > 0 for row in rows), rows


def test_the_table_says_which_runtime_and_json_goes_to_a_file(host_bundle, host_pack, numpy_only, tmp_path):
    report = tmp_path / "report.json"
    run = _run_without_tvm(
        host_bundle, [numpy_only], "--repeat", "1", "--json", str(report), env={"TVMLAYERS_RUNTIME": str(host_pack)}
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"runtime: runtime-only pack {host_pack.resolve()}" in run.stdout
    assert f"{len(LAYERS)} of {len(LAYERS)} kernels match torch" in run.stdout
    assert len(json.loads(report.read_text())["kernels"]) == len(LAYERS)


def test_run_py_without_any_runtime_says_how_to_get_one(host_bundle, numpy_only):
    run = _run_without_tvm(host_bundle, [numpy_only])
    assert run.returncode == 2
    assert "TVM's runtime is not installed here" in run.stderr and "tvmlayers runtime-pack" in run.stderr


def test_run_py_refuses_a_pack_for_another_python_or_with_a_changed_library(
    host_bundle, host_pack, numpy_only, tmp_path
):
    other = make_runtime_pack(tmp_path / "py312", python="3.12" if PYTHON != "3.12" else "3.11").parent
    run = _run_without_tvm(host_bundle, [other, numpy_only])
    assert run.returncode == 2
    assert f"is for CPython {json.loads((other / 'runtime-pack.json').read_text())['python']}" in run.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(host_pack, damaged)
    library = damaged / "tvm_runtime_libs" / "libtvm_runtime.so"
    library.write_bytes(library.read_bytes() + b"\0")
    run = _run_without_tvm(host_bundle, [damaged, numpy_only])
    assert run.returncode == 2
    assert "tvm_runtime_libs/libtvm_runtime.so does not match runtime-pack.json" in run.stderr


def test_a_cuda_pack_for_the_gpu_machines_python_carries_tvms_cuda_runtime(tmp_path, capsys):
    assert cli_main(["runtime-pack", "-o", str(tmp_path / "gpu"), "--python", "3.12", "--cuda"]) == 0
    assert "for CPython 3.12" in capsys.readouterr().out
    meta = json.loads((tmp_path / "gpu" / "runtime-pack.json").read_text())
    assert list(meta["libraries"]) == ["tvm_runtime_libs/libtvm_runtime.so", "tvm_runtime_libs/libtvm_runtime_cuda.so"]
    assert (tmp_path / "gpu" / "tvm_ffi" / "core.cpython-312-x86_64-linux-gnu.so").is_file()


def test_runtime_pack_usage_errors(tmp_path, capsys):
    assert cli_main(["runtime-pack", "-o", str(tmp_path / "p"), "--python", "three"]) == 2
    assert "python must be a CPython version such as 3.12" in capsys.readouterr().err
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    assert cli_main(["runtime-pack", "-o", str(tmp_path / "occupied")]) == 1  # an OSError, as compile's
    assert "is not a runtime pack" in capsys.readouterr().err


def test_an_aarch64_pack_runs_a_rasp4b_bundle_under_qemu_without_apache_tvm(tmp_path):
    env = ensure_arm_environment()
    bundle = tmp_path / "rasp4b"
    compile_bundle(_workloads()[1:3], "rasp4b", bundle, progress=False)
    pack = make_runtime_pack(tmp_path / "pack", python="3.11", arch="aarch64").parent
    numpy_dir = _numpy_only(tmp_path / "numpy-only", env.site)
    argv = env.python_argv(runtime_only=False)
    argv[argv.index(f"PYTHONPATH={env.site}")] = f"PYTHONPATH={pack}{os.pathsep}{numpy_dir}"
    run = subprocess.run(
        [*argv, "-S", str(bundle / "run.py"), "--json", "--repeat", "1", "--number", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["runtime"]["kind"] == "runtime-only pack"
    assert all(row["correct"] for row in report["kernels"]) and len(report["kernels"]) == 2

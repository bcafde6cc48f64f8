"""CUDA kernels built here without a GPU: every library carries nvcc's fatbin (SASS for exactly the target's
architecture plus its PTX), CUDA bundles, and the clear refusals of a machine that cannot run them.

What needs a GPU (the numbers, the call path with torch CUDA tensors, streams) is checked on the GPU machine by
``tvmlayers/cuda_call_check.py`` and the bundles' run.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tvm

import tvmlayers as tl
from tvmlayers import cuda_call_check, layer_specs
from tvmlayers.build import compile_library, kernel_for
from tvmlayers.bundle import compile_bundle
from tvmlayers.cli import main
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target, toolchain
from tvmlayers.workloads import Workload, save_workloads

_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
# ELF e_machine of the host code: x86_64 and AArch64
_ELF_MACHINES = {"x86_64": 62, "aarch64": 183}


def _cuobjdump() -> str:
    """cuobjdump: on PATH, or from NVIDIA's pip package nvidia-cuda-cuobjdump (the dev extra installs it)."""
    found = shutil.which("cuobjdump") or next(
        (str(p) for p in Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/*/bin/cuobjdump")), None
    )
    if found is None:
        pytest.fail("cuobjdump is missing: pip install -e '.[dev]' installs nvidia-cuda-cuobjdump")
    return found


def _spec(op: str, target: str) -> KernelSpec:
    """Small calls of each op (nvcc's time hardly depends on the shape; TVM's and the reference's do)."""
    tgt, x = resolve_target(target), (1, 8, 12, 12)
    if op == "conv2d":
        return layer_specs.conv2d_spec(x, (16, 8, 3, 3), (16,), "float32", tgt, 1, 1, 1, 1, "zeros", True)[0]
    if op == "depthwise_conv2d":
        return layer_specs.conv2d_spec(x, (8, 1, 3, 3), None, "float32", tgt, 2, 1, 1, 8, "zeros")[0]
    if op == "linear":
        return layer_specs.linear_spec((2, 32), (16, 32), (16,), "float32", tgt)[0]
    if op == "max_pool2d":
        return layer_specs.max_pool2d_spec((1, 4, 9, 9), "float32", tgt, 3, 2, 1, 1, True, True)[0]
    return layer_specs.relu_spec((2, 4, 5), "float32", tgt)[0]


def embedded_fatbin(library: Path) -> bytes:
    """The one fatbin inside a kernel library (cuobjdump cannot find it in the .so: TVM's module blob holds it,
    not an ELF .nv_fatbin section).  A fatbin's header: magic, u16 version, u16 header size, u64 payload size."""
    data = library.read_bytes()
    assert data.count(_FATBIN_MAGIC) == 1, f"{library} holds {data.count(_FATBIN_MAGIC)} fatbins"
    start = data.index(_FATBIN_MAGIC)
    _, header, payload = struct.unpack_from("<HHQ", data, start + 4)
    return data[start : start + header + payload]


def _device_code(library: Path, tmp_path: Path) -> tuple[list[str], list[str], str]:
    """The architectures of the SASS and the PTX in a library's fatbin, as cuobjdump lists them, and the PTX."""
    fatbin = tmp_path / f"{library.stem}.fatbin"
    fatbin.write_bytes(embedded_fatbin(library))
    listed = []
    for what in ("--list-elf", "--list-ptx", "--dump-ptx"):
        done = subprocess.run([_cuobjdump(), what, str(fatbin)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        listed.append(re.findall(r"\.(sm_\d+[af]?)\.(?:cubin|ptx)$", done.stdout, re.M) or done.stdout)
    return listed[0], listed[1], listed[2]


def _elf_machine(library: Path) -> int:
    data = library.read_bytes()
    assert data[:4] == b"\x7fELF"
    return struct.unpack_from("<H", data, 18)[0]


@pytest.mark.parametrize("target, arch, host", [("sm_80", "sm_80", "x86_64"), ("jetson-orin", "sm_87", "aarch64"),
                                                ("sm_90", "sm_90", "x86_64")])  # fmt: skip
@pytest.mark.parametrize("op", ["conv2d", "depthwise_conv2d", "linear", "max_pool2d", "relu"])
def test_library_carries_sass_for_its_arch_and_ptx(op: str, target: str, arch: str, host: str, tmp_path: Path):
    spec = _spec(op, target)
    library = tmp_path / "kernel.so"
    linker = toolchain(spec.target).require("the jetson-orin libraries")  # gcc, or aarch64-linux-gnu-gcc
    fields = compile_library(spec, library, tvm.support.cc.cross_compiler(linker))
    sass, ptx, ptx_text = _device_code(library, tmp_path)
    assert sass == [arch] and ptx == [arch], (sass, ptx)
    # no fast math: nothing flushes denormals to zero (relu and max_pool2d keep a denormal input, as torch does)
    assert ".entry" in ptx_text and ".ftz" not in ptx_text
    assert _elf_machine(library) == _ELF_MACHINES[host]
    fatbin = embedded_fatbin(library)
    assert fields["cuda_arch"] == arch
    assert fields["device_code"]["sha256"] == hashlib.sha256(fatbin).hexdigest()
    assert b"__global__" not in library.read_bytes()  # no CUDA source left for the GPU machine to compile


def test_a_cuda_target_without_nvcc_says_what_provides_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvcc (nor gcc, which nvcc's check precedes)
    with pytest.raises(RuntimeError, match=r"nvcc, which is not on PATH: install the CUDA toolkit.*nvidia-cuda-tool"):
        compile_library(_spec("relu", "sm_90"), tmp_path / "kernel.so")
    with pytest.raises(RuntimeError, match="nvcc.*cuda-nvcc"):
        compile_bundle([Workload.from_spec(_spec("relu", "sm_90"))], "sm_90", tmp_path / "bundle", progress=False)
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "kernel.so").exists()


@pytest.mark.parametrize("target, why", [("sm_90", "torch sees no CUDA GPU here"),
                                         ("jetson-orin", "its host code is aarch64")])  # fmt: skip
def test_a_cuda_kernel_is_never_loaded_where_it_cannot_run(target: str, why: str):
    spec = _spec("relu", target)
    arch = spec.target.attrs["arch"]
    with pytest.raises(RuntimeError, match=rf"cannot run kernels for {arch} \({why}\).*tvmlayers compile --target"):
        kernel_for(spec)


def test_cuda_modules_and_functions_refuse_cpu_tensors_with_torchs_words():
    x = torch.randn(1, 4, 8, 8)
    conv = tl.Conv2d(4, 4, 3, padding=1, target="sm_90")
    cuda_kernel = r"for target 'cuda' works on cuda tensors, but got tensors on cpu; move them with \.to\('cuda'\)"
    with pytest.raises(ValueError, match=cuda_kernel):
        conv(x)
    with pytest.raises(ValueError, match=cuda_kernel):
        tl.functional.max_pool2d(x, 2, target="sm_90")
    # the user's spelling, target="cuda", means this machine's GPU: here there is none
    with pytest.raises(ValueError, match="target 'cuda' means the GPU of this machine, and torch sees none"):
        tl.Conv2d(4, 4, 3, padding=1, target="cuda")(x)
    # a CUDA module whose weight is on one device and its input on another: torch's message (meta stands in for
    # cuda, which this CPU build of torch cannot allocate)
    with pytest.raises(ValueError, match="Expected all tensors to be on the same device, but found at least two "
                                         "devices, cpu and meta!"):  # fmt: skip
        conv.to("meta")(x)


def test_sm_90_bundle_without_references(tmp_path: Path):
    workloads = [Workload.from_spec(_spec(op, "sm_90")) for op in ("conv2d", "max_pool2d")]
    workload_file = tmp_path / "small.toml"
    save_workloads(workloads, workload_file)
    out = tmp_path / "h100"
    assert main(["compile", str(workload_file), "--target", "sm_90", "-o", str(out), "--no-references"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["preset"], manifest["target_key"], manifest["cuda_arch"], manifest["arch"]) == (
        "sm_90", "cuda-sm_90", "sm_90", "x86_64"
    )  # fmt: skip
    assert [k["layer"] for k in manifest["kernels"]] == ["conv2d", "max_pool2d"]
    assert not list(out.rglob("*.npz"))
    for kernel in manifest["kernels"]:
        library = out / kernel["library"]
        assert kernel["references"] is None
        assert kernel["device_code"]["sha256"] == hashlib.sha256(embedded_fatbin(library)).hexdigest()
        assert manifest["files"][kernel["library"]] == hashlib.sha256(library.read_bytes()).hexdigest()
    assert [o["dtype"] for o in manifest["kernels"][1]["outputs"]] == ["float32", "int64"]  # with indices
    assert not [name for name in manifest["files"] if name.endswith(".npz")]
    # the GPU check of the call path reads this bundle, and here says what it needs
    with pytest.raises(SystemExit, match=r"needs a GPU that torch sees"):
        cuda_call_check.main([str(out)])

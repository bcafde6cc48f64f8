"""CUDA device code compiled here, by nvcc, into every CUDA kernel library: no GPU, driver or NVRTC needed to
build it, and the machine that runs it needs only the driver and TVM's runtime.

TVM 0.27's ``tvm.compile`` for a CUDA target keeps the kernels' CUDA *source* in its device module (format
``cuda``); its runtime compiles that source when the library is loaded (``tvm_callback_cuda_compile``, NVRTC
or nvcc on the GPU machine).  That callback is never called while compiling (the CUDA codegen in
``libtvm_compiler`` does not look it up), so registering one here changes nothing.  Instead the library's
embedded module blob (``__tvm_ffi__library_bin``, what ``export_library`` links into the .so) is written by us:
TVM's own serialization of the import tree, with the CUDA module's payload ``[format "cuda"][function table]
[source]`` turned into ``[format "fatbin"][the same table][nvcc's fatbin]``.  TVM's CUDA runtime loads any
format but ``cuda`` with ``cuModuleLoadData``, which takes a fatbin: the driver picks the SASS for its GPU, or
JIT-compiles the PTX on a newer one.

nvcc flags (:func:`nvcc_command`): ``--fatbin -O3 -gencode arch=compute_XX,code=[sm_XX,compute_XX]``, and no
``--use_fast_math`` (TVM's default adds it): fast math flushes denormals to zero (``-ftz=true``) and uses
approximate division and square roots, while torch's CUDA ops (cuDNN, cuBLAS, its elementwise kernels) keep
denormals and IEEE division.  relu and max_pool2d of a denormal input would give 0 where torch gives the input,
and max_pool2d's indices would change with it; the FMA contraction nvcc does by default (``-fmad=true``) stays,
as torch's kernels use FMA too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import tvm

__all__ = ["NVCC_FLAGS", "cuda_arch", "device_code_id", "compile_fatbin", "export_cuda_library", "require_nvcc"]

# Everything but the architecture: also part of the kernel cache key (device_code_id), so that changing a flag
# never reuses a binary built with the old ones.
NVCC_FLAGS = ("--fatbin", "-O3")
# TVM's format name of the payload we embed; its runtime hands the bytes to cuModuleLoadData
_EMBEDDED_FORMAT = "fatbin"
_NVCC_TIMEOUT_S = 300


def require_nvcc(what: str) -> str:
    """The path of nvcc, or a RuntimeError naming what provides it (``what``: who needs it)."""
    path = shutil.which("nvcc")
    if path is None:
        raise RuntimeError(
            f"{what} needs NVIDIA's CUDA compiler nvcc, which is not on PATH: install the CUDA toolkit "
            "(`apt-get install nvidia-cuda-toolkit` on Debian/Ubuntu, or NVIDIA's cuda-nvcc package, e.g. from "
            "NVIDIA's CUDA repository) and put its bin/ folder on PATH; no GPU is needed to compile"
        )
    return path


def cuda_arch(target: tvm.target.Target) -> str:
    """A CUDA target's architecture as nvcc names the real GPU, e.g. ``sm_90``."""
    arch = str(target.attrs.get("arch", ""))
    if not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(
            f"CUDA target {target.export()} has no architecture nvcc can compile for (arch={arch!r}): use a "
            "preset such as sm_80, sm_90 or jetson-orin, or give the target dict an 'arch' like 'sm_90'"
        )
    return arch


def nvcc_command(nvcc: str, arch: str, source: Path, output: Path) -> list[str]:
    """nvcc's command line: a fatbin of ``source`` with SASS for ``arch`` and its PTX (for newer GPUs)."""
    virtual = "compute_" + arch.removeprefix("sm_")
    return [nvcc, *NVCC_FLAGS, "-gencode", f"arch={virtual},code=[{arch},{virtual}]", "-o", str(output), str(source)]


def device_code_id(target: tvm.target.Target) -> str:
    """What decides a CUDA target's device code besides the kernel's source: the flags and architecture (the
    kernel cache key holds it)."""
    return " ".join(nvcc_command("nvcc", cuda_arch(target), Path("k.cu"), Path("k.fatbin")))


def compile_fatbin(source: str, arch: str, what: str) -> bytes:
    """nvcc's fatbin of the CUDA ``source`` for ``arch`` (SASS + PTX); RuntimeError with nvcc's output when it
    fails (``what``: the kernel, for the message).  nvcc's files, its own temporaries included (``TMPDIR``),
    stay in a private folder that is removed afterwards."""
    nvcc = require_nvcc(f"compiling {what} for {arch}")
    with tempfile.TemporaryDirectory(prefix="tvmlayers-nvcc-") as work:  # mode 0700
        source_path, output = Path(work) / "kernels.cu", Path(work) / "kernels.fatbin"
        source_path.write_text(source)
        try:
            done = subprocess.run(
                nvcc_command(nvcc, arch, source_path, output),
                cwd=work,
                env={**os.environ, "TMPDIR": work},
                capture_output=True,
                text=True,
                timeout=_NVCC_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"nvcc took over {_NVCC_TIMEOUT_S} s compiling {what} for {arch}") from err
        if done.returncode != 0:
            log = (done.stdout + done.stderr).strip()[-4000:]
            raise RuntimeError(f"nvcc failed compiling {what} for {arch} (exit {done.returncode}):\n{log}")
        fatbin = output.read_bytes()
    if not fatbin:
        raise RuntimeError(f"nvcc wrote an empty fatbin compiling {what} for {arch}")
    return fatbin


def export_cuda_library(
    executable: Any, so_path: Path, target: tvm.target.Target, what: str, fcompile: Any = None
) -> dict:
    """Export the CUDA ``executable`` (``tvm.compile``'s result) to the library ``so_path``, its host code linked
    by ``fcompile`` (None: the system's compiler) and its device code a fatbin compiled by nvcc for the target's
    architecture; returns the manifest fields that describe the device code."""
    arch = cuda_arch(target)
    host = executable.mod
    device = [m for m in host.imports if m.kind == "cuda"]
    if len(device) != 1 or len(host.imports) != 1:
        kinds = [m.kind for m in host.imports]
        raise RuntimeError(f"{what}: expected one CUDA device module in TVM's build, found {kinds}")
    source = device[0].inspect_source("cuda")
    fatbin = compile_fatbin(source, arch, what)
    blob = _with_fatbin(bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(host).numpy()), source, fatbin)

    def pack_imports(_module: Any, is_system_lib: bool, prefix: str, workspace: str) -> str:
        if is_system_lib or prefix:
            raise RuntimeError(f"{what}: a system-library build of a CUDA kernel is not supported")
        path = os.path.join(workspace, "devc.c")
        Path(path).write_text(_blob_c_source(blob))
        return path

    executable.export_library(str(so_path), fcompile=fcompile, fpack_imports=pack_imports)
    return {
        "cuda_arch": arch,
        "device_code": {
            "format": _EMBEDDED_FORMAT,
            "nvcc": device_code_id(target),
            "sha256": hashlib.sha256(fatbin).hexdigest(),
            "size": len(fatbin),
        },
    }


def _read_u64(blob: bytes, offset: int) -> tuple[int, int]:
    if offset + 8 > len(blob):
        raise _layout_error("truncated")
    return struct.unpack_from("<Q", blob, offset)[0], offset + 8


def _read_bytes(blob: bytes, offset: int) -> tuple[bytes, int]:
    size, offset = _read_u64(blob, offset)
    if offset + size > len(blob):
        raise _layout_error("truncated")
    return blob[offset : offset + size], offset + size


def _packed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _layout_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"TVM {tvm.__version__} packs a library's modules differently than tvmlayers.nvcc expects ({what}): the "
        "CUDA device code cannot be embedded; use the TVM version pinned in pyproject.toml"
    )


def _with_fatbin(blob: bytes, source: str, fatbin: bytes) -> bytes:
    """TVM's packed module blob with its CUDA module's source replaced by ``fatbin``.

    The blob is ``[u64 size of the rest][u64 vector: import tree row pointers][u64 vector: child indices]`` and
    then per module ``[string kind]`` plus, for every kind but the host library ``_lib``, ``[bytes payload]``
    (strings and bytes: u64 length, then the data).  The CUDA payload is ``[string format][function table]
    [bytes code]``; only the format and the code change, the function table is kept byte for byte."""
    size, offset = _read_u64(blob, 0)
    if size != len(blob) - 8:
        raise _layout_error("size header")
    for _ in range(2):  # the import tree: row pointers, child indices
        count, offset = _read_u64(blob, offset)
        offset += 8 * count
    out = bytearray(blob[8:offset])
    replaced = 0
    while offset < len(blob):
        kind, offset = _read_bytes(blob, offset)
        out += _packed(kind)
        if kind == b"_lib":
            continue
        payload, offset = _read_bytes(blob, offset)
        if kind == b"cuda":
            payload = _fatbin_payload(payload, source, fatbin)
            replaced += 1
        out += _packed(payload)
    if replaced != 1:
        raise _layout_error(f"{replaced} CUDA modules")
    return _packed(bytes(out))


def _fatbin_payload(payload: bytes, source: str, fatbin: bytes) -> bytes:
    head, code = _packed(b"cuda"), _packed(source.encode())
    if not (payload.startswith(head) and payload.endswith(code)):
        raise _layout_error("CUDA module payload")
    table = payload[len(head) : len(payload) - len(code)]
    return _packed(_EMBEDDED_FORMAT.encode()) + table + _packed(fatbin)


def _blob_c_source(blob: bytes) -> str:
    """The C file that defines ``__tvm_ffi__library_bin`` as TVM's own packer writes it (declared extern first:
    a const array is otherwise internal to a C++ translation unit, and g++ may compile it)."""
    rows = ",\n".join(",".join(str(b) for b in blob[i : i + 32]) for i in range(0, len(blob), 32))
    return (
        '#ifdef __cplusplus\nextern "C" {\n#endif\n'
        "extern const unsigned char __tvm_ffi__library_bin[];\n"
        f"const unsigned char __tvm_ffi__library_bin[{len(blob)}] = {{\n{rows}\n}};\n"
        "#ifdef __cplusplus\n}\n#endif\n"
    )

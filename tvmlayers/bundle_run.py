#!/usr/bin/env python3
"""Check, then time, every kernel of this tvmlayers bundle on this machine: ``python3 run.py [--json [FILE]]``.

Needs Python 3, numpy and TVM's runtime: apache-tvm (``pip install apache-tvm``; imported with
``TVM_USE_RUNTIME_LIB=1``, the runtime alone) or, where it is not installed, a runtime pack (``tvmlayers
runtime-pack``: TVM's runtime libraries and tvm_ffi) on ``PYTHONPATH`` or named by ``TVMLAYERS_RUNTIME``
(``PYTHONPATH=pack python3 run.py``); the first line of the report says which was loaded.  A CUDA bundle also
needs torch with CUDA, and a GPU of the bundle's architecture.

Before loading anything it checks that this machine has the bundle's architecture (and GPU) and that every file
matches the SHA-256 in ``manifest.json``.  Then each kernel runs on its reference input and its outputs are
compared with torch's: those the bundle carries (computed where it was compiled) or, for a CUDA bundle without
them, torch's on this GPU (``tvmlayers_reference.py``, next to this file, on inputs drawn here).  Only a kernel
that matches is timed: on a CPU with TVM's ``time_evaluator``; on a GPU with CUDA events on torch's current
stream, against torch's own op (cuDNN, cuBLAS; TF32 off: both sides compute in float32), median of ``--repeat``
timings of ``--number`` calls each.  Exit status: 0 when every kernel matches, 1 when one differs or fails, 2 for
a bundle that cannot be checked here (wrong architecture or GPU, tampered or missing file, unknown format, no
TVM runtime).  Under an emulator (qemu) the times mean nothing; only the check does.

This file is tvmlayers/bundle_run.py, copied into each bundle; the formats of bundles and runtime packs are
documented in tvmlayers/formats.py.  It imports nothing of tvmlayers.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import struct
import sys
from pathlib import Path

import numpy as np

FORMAT = 1  # tvmlayers.formats.BUNDLE_FORMAT
RUNTIME_PACK_FORMAT = 1  # tvmlayers.formats.RUNTIME_PACK_FORMAT
# platform.machine() spellings of each architecture a bundle can be for
MACHINES = {"x86_64": ("x86_64", "amd64"), "aarch64": ("aarch64", "arm64"), "arm": ("armv7l", "armv8l", "armv7")}
REFERENCE_MODULE = "tvmlayers_reference.py"  # tvmlayers/reference.py, copied into each bundle
# a GPU timing lasts about this long at most (fewer calls than --number for slow kernels)
_CUDA_TIMING_MS = 20.0
_CUDA_WARMUP_CALLS = 3
_ALIGNMENT = 64  # bytes: TVM's kDLTensorAllocAlignment, what its kernels assume of every tensor's data


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


def _torch():
    """torch, or BundleError for a CUDA bundle on a machine without it."""
    try:
        import torch  # noqa: PLC0415 - only CUDA bundles need it
    except ImportError as err:
        raise BundleError(f"this is a CUDA bundle: it needs torch with CUDA (pip install torch): {err}") from None
    return torch


def gpu_arch(torch) -> str:  # noqa: ANN001 - torch is imported lazily
    """The current GPU's architecture as nvcc names it, e.g. ``sm_90``."""
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def check_architecture(manifest: dict, machine: str) -> None:
    """Raise BundleError unless ``machine`` (``platform.machine()``) runs the bundle's architecture and, for a
    CUDA bundle, torch sees a GPU of the bundle's ``cuda_arch``."""
    arch = manifest["arch"]
    if machine.lower() not in MACHINES.get(arch, (arch,)):
        raise BundleError(
            f"this bundle is for {arch} ({manifest['target_key']}), but this machine is {machine}: copy the bundle "
            f"to a {arch} device and run it there, or compile one for this machine (tvmlayers compile --target host)"
        )
    wanted = manifest.get("cuda_arch")
    if not wanted:
        return
    torch = _torch()
    if not torch.cuda.is_available():
        raise BundleError(
            f"this bundle is for {wanted} GPUs, and torch sees no GPU here (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}): run it on a machine with an NVIDIA GPU, its driver and a CUDA build of torch"
        )
    found = gpu_arch(torch)
    if found != wanted.rstrip("af"):
        raise BundleError(
            f"bundle for {wanted}, this GPU is {found} ({torch.cuda.get_device_name()}): compile one for it "
            f"(tvmlayers compile --target {found}, or --target cuda on this machine)"
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


# --- TVM's runtime: apache-tvm when installed, else a runtime pack --------------------------------------------

_runtime: dict = {}  # what load_runtime loaded: {"kind", "path", "tvm_version", "lib_dir", "cuda"}


def _find_pack(bundle: Path) -> Path | None:
    """A runtime pack: ``$TVMLAYERS_RUNTIME``, else a folder on ``sys.path`` (PYTHONPATH), else ``runtime/``
    in or beside the bundle."""
    named = os.environ.get("TVMLAYERS_RUNTIME")
    if named:
        if not (Path(named) / "runtime-pack.json").is_file():
            raise BundleError(f"TVMLAYERS_RUNTIME={named} is not a runtime pack (no runtime-pack.json in it)")
        return Path(named).resolve()
    for folder in [*map(Path, filter(None, sys.path)), bundle / "runtime", bundle.parent / "runtime"]:
        if (folder / "runtime-pack.json").is_file():
            return folder.resolve()
    return None


def _load_pack(pack: Path) -> dict:
    """Check a runtime pack, put it first on ``sys.path`` (its tvm_ffi) and load its runtime libraries."""
    try:
        meta = json.loads((pack / "runtime-pack.json").read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{pack}: unreadable runtime-pack.json ({err}): make the pack again") from None
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not isinstance(meta, dict) or meta.get("format") != RUNTIME_PACK_FORMAT:
        raise BundleError(
            f"{pack}: runtime pack format {meta.get('format')!r}, this run.py reads {RUNTIME_PACK_FORMAT}"
        )
    if platform.machine().lower() not in MACHINES.get(meta.get("arch"), ()) or meta.get("python") != python:
        raise BundleError(
            f"the runtime pack {pack} is for CPython {meta.get('python')} on {meta.get('arch')}, this is CPython "
            f"{python} on {platform.machine()}: make one with tvmlayers runtime-pack --python {python} --arch "
            f"{platform.machine()}"
        )
    libraries = meta.get("libraries")
    if not isinstance(libraries, dict) or not libraries:
        raise BundleError(f"{pack}: runtime-pack.json lists no libraries: make the pack again")
    for name, digest in libraries.items():
        path = pack / name
        if path.resolve().parent.parent != pack or not path.is_file():
            raise BundleError(f"{pack}: the pack's library {name} is missing: copy the whole pack")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise BundleError(f"{pack}: {name} does not match runtime-pack.json: copy the pack again")
    if str(pack) not in sys.path:
        sys.path.insert(0, str(pack))
    import tvm_ffi  # noqa: PLC0415, F401 - loads libtvm_ffi, which TVM's runtime links to

    lib_dir = next(iter(libraries)).rsplit("/", 1)[0]
    # TVM's runtime goes global: the kernel libraries resolve its symbols (TVMBackendAllocWorkspace, ...)
    ctypes.CDLL(str(pack / lib_dir / "libtvm_runtime.so"), ctypes.RTLD_GLOBAL)
    return {
        "kind": "runtime-only pack",
        "path": str(pack),
        "tvm_version": meta.get("tvm_version"),
        "lib_dir": pack / lib_dir,
    }


def load_runtime(bundle: Path, cuda: bool) -> dict:
    """Load TVM's runtime once (apache-tvm when it imports, else a runtime pack) and, for ``cuda``, its CUDA
    runtime; returns what was loaded (the report's ``runtime``)."""
    if not _runtime:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime alone: no compiler needed on the device
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # never JIT-compile a torch extension here
        try:
            import tvm  # noqa: PLC0415 - only after the bundle was checked

            _runtime.update(
                kind="apache-tvm", path=str(Path(tvm.__file__).parent), tvm_version=tvm.__version__,
                lib_dir=Path(tvm.__file__).parent / "lib",
            )  # fmt: skip
        except ImportError as err:
            pack = _find_pack(bundle)
            if pack is None:
                raise BundleError(
                    f"TVM's runtime is not installed here ({err}): pip install apache-tvm, or copy a runtime pack "
                    "(tvmlayers runtime-pack -o DIR) and run PYTHONPATH=DIR python3 run.py"
                ) from None
            _runtime.update(_load_pack(pack))
        _runtime["cuda"] = False
    if cuda and not _runtime["cuda"]:
        _load_cuda_runtime(_runtime["lib_dir"] / "libtvm_runtime_cuda.so")
        _runtime["cuda"] = True
    return _runtime


def _load_cuda_runtime(library: Path) -> None:
    """TVM's CUDA runtime (it registers the cuda device and module loader), after torch's CUDA runtime."""
    if not library.is_file():
        raise BundleError(
            f"TVM's CUDA runtime {library} is missing: make the runtime pack with tvmlayers runtime-pack --cuda"
        )
    torch = _torch()
    torch.cuda.init()  # loads torch's libcudart, which TVM's CUDA runtime links to
    try:
        ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
        return
    except OSError as err:
        first_error = err
    # a torch that linked libcudart statically: load a CUDA runtime library from pip's nvidia packages
    for folder in map(Path, filter(None, sys.path)):
        for cudart in sorted(folder.glob("nvidia/*/lib/libcudart.so.*")):
            ctypes.CDLL(str(cudart), ctypes.RTLD_GLOBAL)
            try:
                ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue
    raise BundleError(f"TVM's CUDA runtime does not load: {first_error}")


def runtime_line(runtime: dict) -> str:
    return f"runtime: {runtime['kind']} {runtime['path']} (TVM {runtime['tvm_version']})"


def _load_kernel(bundle: Path, kernel: dict, cuda: bool):  # noqa: ANN202 - a tvm_ffi.Function
    load_runtime(bundle, cuda)
    import tvm_ffi  # noqa: PLC0415 - importable once the runtime is loaded

    module = tvm_ffi.load_module(str((bundle / kernel["library"]).resolve()))
    return module, module[kernel["symbol"]]


# --- checking and timing ---------------------------------------------------------------------------------------


def compare(got: np.ndarray, want: np.ndarray, tolerance: float) -> tuple[float, str | None]:
    """(the error, None when ``got`` matches torch's ``want``, else what differs): indices must be equal (the error
    counts those that differ), values within the relative tolerance (the error is the largest absolute one)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf"), f"got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    if np.issubdtype(want.dtype, np.integer):
        wrong = int((got != want).sum())
        return float(wrong), f"{wrong} of {want.size} indices differ" if wrong else None
    if not want.size:
        return 0.0, None
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return float("inf"), "NaN in different places"
    finite = ~np.isnan(want)
    error = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
    limit = tolerance * (1 + float(np.max(np.abs(want[finite]), initial=0.0)))
    return error, None if error <= limit else f"max abs error {error:.3g} > {limit:.3g}"


def _checked(row: dict, got: list[np.ndarray], want: list[np.ndarray], tolerance: float) -> dict:
    results = [compare(g, w, tolerance) for g, w in zip(got, want, strict=True)]
    problem = next((p for _, p in results if p), None)
    return {**row, "correct": problem is None, "problem": problem, "max_err": max(e for e, _ in results)}


def references(bundle: Path, kernel: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The kernel's reference inputs and torch's outputs."""
    with np.load(bundle / kernel["references"], allow_pickle=False) as data:
        inputs = [data[f"input{i}"] for i in range(len(kernel["inputs"]))]
        outputs = [data[f"output{i}"] for i in range(len(kernel["outputs"]))]
    return inputs, outputs


def _aligned(shape: list[int], dtype: np.dtype, values: np.ndarray | None = None) -> np.ndarray:
    """An array whose data starts on a 64-byte boundary, as TVM's kernels assume (their vector loads fault on
    numpy's 16-byte alignment), holding ``values`` when given."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    array = raw[offset : offset + nbytes].view(dtype).reshape(shape)
    if values is not None:
        array[...] = values
    return array


def run_kernel(bundle: Path, kernel: dict, number: int, repeat: int) -> dict:
    """Load, check, then time one kernel: a row of the report."""
    cuda = kernel["spec"]["target"].get("kind") == "cuda"
    module, function = _load_kernel(bundle, kernel, cuda)
    row = {"name": kernel["name"], "layer": kernel["describe"]}
    if cuda:
        return _run_on_gpu(bundle, kernel, function, row, number, repeat)
    import tvm_ffi  # noqa: PLC0415

    inputs, expected = references(bundle, kernel)
    inputs = [_aligned(a.shape, a.dtype, a) for a in inputs]
    outputs = [_aligned(o["shape"], np.dtype(o["dtype"])) for o in kernel["outputs"]]
    args = [tvm_ffi.from_dlpack(a) for a in (*inputs, *outputs)]
    function(*args)
    row = _checked(row, outputs, expected, kernel["tolerance"])
    if row["correct"] and repeat:
        evaluator = tvm_ffi.get_global_func("runtime.RPCTimeEvaluator")
        # (module, name, device type cpu, device id, number, repeat, min_repeat_ms, limit_zero_time_iterations,
        #  cooldown_interval_ms, repeats_to_cooldown, cache_flush_bytes, preprocessing function): time_evaluator's
        timer = evaluator(module, kernel["symbol"], 1, 0, number, repeat, 0, 100, 0, 1, 0, "")
        seconds = struct.unpack(f"@{repeat}d", bytes(timer(*args)))
        row["median_us"] = statistics.median(seconds) * 1e6
    return row


@functools.cache
def _reference_module(bundle: Path):  # noqa: ANN202 - a module
    path = bundle / REFERENCE_MODULE
    if not path.is_file():
        raise BundleError(f"this bundle carries neither references nor {REFERENCE_MODULE}: compile it again")
    spec = importlib.util.spec_from_file_location("tvmlayers_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_median_ms(torch, call, number: int, repeat: int) -> float:  # noqa: ANN001
    """Median milliseconds per call of ``call`` on torch's current stream, by CUDA events: a few warm-up calls,
    then ``repeat`` timings of up to ``number`` calls each (fewer when one call is slow)."""
    for _ in range(_CUDA_WARMUP_CALLS):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    calls = max(1, min(number, int(_CUDA_TIMING_MS / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(repeat):
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _run_on_gpu(bundle: Path, kernel: dict, function, row: dict, number: int, repeat: int) -> dict:  # noqa: ANN001
    """Check a CUDA kernel against torch on this GPU (zero-copy torch CUDA tensors, torch's current stream), then
    time it and torch's op."""
    import tvm_ffi  # noqa: PLC0415

    torch = _torch()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides: torch's reference and its timing
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", torch.cuda.current_device())
    reference = _reference_module(bundle) if not kernel.get("references") or repeat else None
    spec, out_shape = kernel["spec"], kernel["outputs"][0]["shape"]
    op, params, shape, dtype = spec["op"], spec["params"], spec["input_shape"], spec["dtype"]
    torch_args = ()
    if reference is not None:
        generator = torch.Generator(device=device).manual_seed(0)
        torch_args = reference.random_layer_inputs(op, params, shape, dtype, out_shape, generator, device)
    with torch.no_grad():
        if kernel.get("references"):  # torch's outputs from where the bundle was compiled
            inputs, expected = references(bundle, kernel)
            args = [torch.from_numpy(a).to(device) for a in inputs]
        else:
            expected = [t.cpu().numpy() for t in reference.layer_outputs(op, params, *torch_args)]
            block = kernel["weight_layout"].get("weight_block", 1)
            args = reference.kernel_arguments(shape, block, *torch_args, output_shape=out_shape)
    outputs = [torch.empty(o["shape"], dtype=getattr(torch, o["dtype"]), device=device) for o in kernel["outputs"]]
    shapes = [list(a.shape) for a in args]
    if shapes != [i["shape"] for i in kernel["inputs"]]:
        return {**row, "correct": False, "problem": f"arguments of shapes {shapes}, the manifest lists other inputs"}
    # DLPack views of torch's memory, made once: the timed calls then cost what a call of the kernel costs
    views = [tvm_ffi.from_dlpack(t) for t in (*args, *outputs)]
    with tvm_ffi.use_torch_stream():
        function(*views)
    torch.cuda.synchronize()
    row = _checked(row, [o.cpu().numpy() for o in outputs], expected, kernel["tolerance"])
    if row["correct"] and repeat:
        with tvm_ffi.use_torch_stream():
            ours = _cuda_median_ms(torch, lambda: function(*views), number, repeat)
        with torch.no_grad():
            theirs = _cuda_median_ms(torch, lambda: reference.layer_outputs(op, params, *torch_args), number, repeat)
        row.update(median_us=ours * 1e3, torch_us=theirs * 1e3, ratio=ours / theirs)
    return row


# --- the report ------------------------------------------------------------------------------------------------


def device_name(manifest: dict) -> str:
    """The GPU's name for a CUDA bundle, else the board's model or the CPU's, and the machine's architecture (what
    offline-tuning records say they were measured on)."""
    if manifest.get("cuda_arch"):
        torch = _torch()
        return f"{torch.cuda.get_device_name()} ({gpu_arch(torch)})"
    for path, prefix in (("/proc/device-tree/model", ""), ("/proc/cpuinfo", "model name")):
        try:
            text = Path(path).read_text(errors="replace").replace("\0", "")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(prefix):
                return f"{(line.split(':', 1)[1] if prefix else line).strip()} ({platform.machine()})"
    return platform.machine()


def table(manifest: dict, rows: list[dict], runtime: dict) -> str:
    gpu = any("torch_us" in row for row in rows)
    lines = [
        f"{manifest['target_key']} ({manifest['arch']}), {len(rows)} kernels, TVM {manifest['tvm_version']}",
        runtime_line(runtime),
    ]
    lines.append(
        f"{'kernel':22} {'check':8} {'median us':>11}" + (f" {'torch us':>11} {'ratio':>6}" if gpu else "") + "  layer"
    )
    for row in rows:
        check = "ok" if row["correct"] else "WRONG"
        time = f"{row['median_us']:11.2f}" if "median_us" in row else f"{'-':>11}"
        if gpu:
            time += f" {row['torch_us']:11.1f} {row['ratio']:6.2f}" if "torch_us" in row else f" {'-':>11} {'-':>6}"
        lines.append(f"{row['name']:22} {check:8} {time}  {row['layer'][:90]}")
        if row["problem"]:
            lines.append(f"{'':22} {row['problem']}")
    wrong = sum(not row["correct"] for row in rows)
    lines.append(f"{len(rows) - wrong} of {len(rows)} kernels match torch")
    return "\n".join(lines)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check and time the kernels of this tvmlayers bundle.")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="the results as JSON: printed, or written to FILE"
    )
    parser.add_argument("--number", type=int, default=10, help="calls per timing (time_evaluator's number)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per kernel (0: check only)")
    args = parser.parse_args(argv)
    if args.number < 1 or args.repeat < 0:
        parser.error("--number must be at least 1 and --repeat at least 0")
    bundle = Path(__file__).resolve().parent
    try:
        manifest = read_manifest(bundle)
        check_architecture(manifest, platform.machine())
        check_files(bundle, manifest)
        runtime = load_runtime(bundle, bool(manifest.get("cuda_arch")))
    except BundleError as err:
        print(f"run.py: {err}", file=sys.stderr)
        return 2
    if runtime["tvm_version"] != manifest["tvm_version"]:
        print(
            f"run.py: note: compiled by TVM {manifest['tvm_version']}, running TVM {runtime['tvm_version']}'s runtime",
            file=sys.stderr,
        )
    rows = []
    report = {
        "target_key": manifest["target_key"],
        "cuda_arch": manifest.get("cuda_arch"),
        "device": device_name(manifest),
        "runtime": {key: runtime[key] for key in ("kind", "path", "tvm_version")},
        "kernels": rows,
    }
    to_file = args.json not in (None, "-")
    for kernel in manifest["kernels"]:
        if to_file:  # a log of the scripted run names the kernel it was in when it hung or died
            print(f"run.py: {kernel['name']}  {kernel['describe'][:100]}", file=sys.stderr, flush=True)
        try:
            rows.append(run_kernel(bundle, kernel, args.number, args.repeat))
        except Exception as err:  # noqa: BLE001 - a kernel that does not load or run is reported, the others still run
            problem = f"failed: {type(err).__name__}: {str(err).strip()[-500:]}"
            rows.append({"name": kernel["name"], "layer": kernel["describe"], "correct": False, "problem": problem})
        if to_file:  # after every kernel: a run cut short (a timeout) keeps what it measured
            _write_atomically(Path(args.json), json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json == "-" else table(manifest, rows, runtime))
    return 0 if all(row["correct"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

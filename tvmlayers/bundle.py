"""Bundles: a target's kernels cross-compiled into a folder that checks itself where it runs.

``compile_bundle(layers, target, out_dir)`` (``tvmlayers compile``) compiles each distinct layer call with the
schedule ``kernel_for`` would use on that target (its best tuning record, else the default rules), links it
with the target's gcc, computes a reference with torch on this machine, and writes the folder described in
:mod:`tvmlayers.formats` (bundles).  Kernels for a target that cannot run here are never called here: the
bundle's ``run.py`` checks them on the device (or under qemu in the tests).

One library per kernel, not one for all: every kernel exports the same symbol (``ops.SYMBOL``, the calling
convention of the kernel cache), so a bundle's library is exactly what the cache would hold; each file has its
own hash, and a device loads, checks and times the kernels one by one, so one bad kernel names itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm

from . import __version__, bundle_run, reference
from .aot import BuildProgress, needed_specs
from .build import compile_library, export_kernel
from .convert import convert
from .extract import recording_layer_calls
from .formats import BUNDLE_FORMAT
from .nvcc import cuda_arch, require_nvcc
from .published import published_folder
from .schedules import weight_layout
from .spec import KernelSpec
from .targets import PRESETS, TargetLike, resolve_target, target_arch, target_json, target_key, toolchain
from .verify import TOLERANCE, kernel_inputs, random_inputs, torch_reference
from .workloads import Workload, load_workloads

__all__ = ["compile_bundle", "model_layers"]


@dataclass
class LayerCall:
    """One kernel of a bundle: its spec and, for a model's layer, the layer's own weight and bias (torch layout).
    ``compile`` compiles the kernel with a schedule of the caller's choice (``tvm.compile``'s executable),
    described by ``provenance`` (offline tuning's candidates); None: the schedule ``kernel_for`` would use.
    ``manifest_fields``: more fields of its manifest entry."""

    spec: KernelSpec
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    compile: Callable[[], Any] | None = None
    provenance: dict | None = None
    manifest_fields: dict = field(default_factory=dict)


def model_layers(model: torch.nn.Module, input_shape: Sequence[int], target: TargetLike) -> list[LayerCall]:
    """Every distinct kernel of ``tl.convert(model)`` (``model`` is put in eval mode: bundles are for inference)
    on an input of ``input_shape``, for ``target``, with the converted layers' weights (BatchNorm folded in).
    The forward runs on fake tensors: nothing is computed or compiled here, so any target works."""
    target = resolve_target(target)
    converted = convert(model.eval(), target=target)
    with recording_layer_calls(converted, target) as calls:
        specs = needed_specs(converted, torch.zeros(tuple(input_shape)))
    layers: dict[KernelSpec, torch.nn.Module] = {}
    for spec, module in calls:
        layers.setdefault(spec, module)
    return [LayerCall(spec, *_weights(layers.get(spec))) for spec in specs]


def _weights(module: torch.nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A layer's weight and bias as plain tensors (read outside the fake forward, where they would be faked;
    the modules' weights are a Parameter subclass, which .numpy() refuses)."""
    if module is None or getattr(module, "weight", None) is None:
        return None, None
    plain = [None if t is None else t.detach().as_subclass(torch.Tensor) for t in (module.weight, module.bias)]
    return plain[0], plain[1]


def _layer_calls(
    layers: str | Path | Sequence[Workload] | Sequence[LayerCall] | torch.nn.Module,
    target: tvm.target.Target,
    input_shape: Sequence[int] | None,
) -> tuple[list[LayerCall], str]:
    """The distinct kernels to compile, and what they came from (the manifest's ``source``)."""
    if isinstance(layers, torch.nn.Module):
        if input_shape is None:
            raise ValueError("compiling a model needs its input shape (input_shape=, --input-shape 1,3,224,224)")
        return model_layers(layers, input_shape, target), f"model {type(layers).__name__} {list(input_shape)}"
    if isinstance(layers, str | Path):
        workloads, _ = load_workloads(layers)
        source = str(layers)
    elif all(isinstance(layer, LayerCall) for layer in layers):
        return list(layers), "layer calls"
    else:
        workloads, source = list(layers), "workloads"
    specs = list(dict.fromkeys(w.spec(target) for w in workloads))  # a file may list a call twice
    return [LayerCall(spec) for spec in specs], source


def _reference(call: LayerCall, layout: dict, generator: torch.Generator) -> dict[str, np.ndarray]:
    """input0.. (what the kernel takes: weights blocked) and output0.. (torch's) of one call."""
    x, weight, bias, residual = random_inputs(call.spec, generator)
    if call.weight is not None:
        weight, bias = call.weight.to(x.dtype), None if call.bias is None else call.bias.to(x.dtype)
    with torch.no_grad():
        expected = torch_reference(call.spec, x, weight, bias, residual)
        inputs = kernel_inputs(call.spec, layout, x, weight, bias, residual)
    arrays = {f"input{i}": t.contiguous().numpy() for i, t in enumerate(inputs)}
    arrays.update({f"output{i}": t.contiguous().numpy() for i, t in enumerate(expected)})
    return arrays


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kernel_entry(
    name: str, call: LayerCall, fields: dict, arrays: dict[str, np.ndarray], references: str | None
) -> dict:
    spec = call.spec

    def tensors(prefix: str) -> list[dict]:
        found = sorted((k for k in arrays if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :]))
        return [{"shape": list(arrays[k].shape), "dtype": str(arrays[k].dtype)} for k in found]

    entry = {
        "name": name,
        "layer": spec.op,
        "describe": spec.describe(),
        "spec": spec.to_json(),
        "inputs": tensors("input"),
        "outputs": tensors("output"),
        "weight_layout": fields["layout"],
        "schedule": fields["provenance"],
        "symbol": fields["symbol"],
        "library": f"kernels/{name}.so",
        "references": references,
        "tolerance": TOLERANCE[spec.dtype],
    }
    if "device_code" in fields:  # a CUDA kernel's fatbin (tvmlayers.nvcc)
        entry["device_code"] = fields["device_code"]
    return entry | call.manifest_fields


def compile_bundle(
    layers: str | Path | Sequence[Workload] | Sequence[LayerCall] | torch.nn.Module,
    target: TargetLike,
    out_dir: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    references: bool = True,
) -> Path:
    """Compile ``layers`` (a workload file, workloads, layer calls or a torch model with ``input_shape``) for
    ``target`` into the bundle folder ``out_dir`` (replaced if it holds a bundle); returns the path of its
    ``manifest.json``.

    ``references=False`` writes no ``.npz`` references (a CUDA bundle for a GPU machine that has torch: its
    ``run.py`` computes torch's there, on inputs drawn from ``seed``; a model's own weights are then not carried).
    A missing cross compiler (or, for a CUDA target, nvcc) raises RuntimeError naming what provides it, before
    anything is compiled."""
    tgt = resolve_target(target)
    if tgt.kind.name == "cuda":
        require_nvcc(f"compiling for {target_key(tgt)}")
    compiler = toolchain(tgt).require(f"compiling for {target_key(tgt)}")
    calls, source = _layer_calls(layers, tgt, input_shape)
    out = Path(out_dir)
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a tvmlayers bundle: choose an empty or new folder")
    fcompile = tvm.support.cc.cross_compiler(compiler)
    generator = torch.Generator().manual_seed(seed)
    with published_folder(out) as staging:
        (staging / "kernels").mkdir()
        kernels = []
        bar = BuildProgress(len(calls), quiet=not progress)
        saved: dict[KernelSpec, tuple[str, dict]] = {}  # kernels of one spec (candidates) share its reference
        for index, call in enumerate(calls):
            name = f"{index:02d}-{call.spec.op}"
            library = staging / "kernels" / f"{name}.so"
            if call.compile is None:
                fields = compile_library(call.spec, library, fcompile)
            else:
                layout = weight_layout(call.spec)
                fields = export_kernel(call.spec, layout, call.compile(), call.provenance, library, fcompile)
            if call.spec not in saved:
                arrays = _reference(call, fields["layout"], generator)  # without references, still their shapes
                if references:
                    np.savez(staging / "kernels" / f"{name}.npz", **arrays)
                saved[call.spec] = (f"kernels/{name}.npz" if references else None, arrays)
            npz, arrays = saved[call.spec]
            kernels.append(_kernel_entry(name, call, fields, arrays, npz))
            bar.update(call.spec)
        bar.close()
        shutil.copyfile(bundle_run.__file__, staging / "run.py")
        (staging / "run.py").chmod(0o755)
        # torch's reference code, for run.py where the bundle carries no references (a CUDA bundle: torch on the GPU)
        shutil.copyfile(reference.__file__, staging / bundle_run.REFERENCE_MODULE)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "format": BUNDLE_FORMAT,
            "tvmlayers_version": __version__,
            "tvm_version": tvm.__version__,
            "created": time.time(),
            "target": target_json(tgt),
            "target_key": target_key(tgt),
            "preset": target if isinstance(target, str) and target in PRESETS else None,
            "arch": target_arch(tgt),
            "cuda_arch": cuda_arch(tgt) if tgt.kind.name == "cuda" else None,
            "compiler": compiler,
            "seed": seed,
            "source": source,
            "kernels": kernels,
            "files": {p.relative_to(staging).as_posix(): _sha256(p) for p in files},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out / "manifest.json"

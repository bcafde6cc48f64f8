"""A compiled kernel loaded from the cache: a callable plus what it is and where its schedule came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from . import omp_pool
from .cache import CacheEntry
from .ops import SYMBOL
from .spec import KernelSpec


@dataclass
class Kernel:
    """Call it with DLPack-compatible tensors (torch tensors work directly): inputs, then outputs.

    A CUDA kernel takes torch's CUDA tensors as they are, zero-copy, and runs on ``torch.cuda.current_stream()``
    of their device: for each call with a CUDA tensor, tvm_ffi asks torch for its current stream (torch's DLPack
    exchange API) and sets it as TVM's stream of that device for the call, which TVM's CUDA launches use.
    Nothing here synchronizes: like a torch op, the call returns once the kernel is queued."""

    spec: KernelSpec
    key: str
    path: Path
    layout: dict
    output_shapes: list[tuple[int, ...]]
    provenance: dict  # {"source": "default", "rule": ...}; later {"source": "tuned", ...}
    built_here: bool  # False when it was loaded from a cache entry built by an earlier call or process
    # the compiled function itself; hot paths call it directly (a wrapper frame costs half a microsecond)
    function: Any = field(repr=False, default=None)
    module: Any = field(repr=False, default=None)  # the loaded runtime Module (for time_evaluator)
    # the weight's output-channel block (1: torch's layout); a field, not a property of ``layout``: every
    # conv2d/linear call reads it, and a property with its dict lookup costs 0.2 us
    weight_block: int = 1

    @classmethod
    def load(cls, spec: KernelSpec, entry: CacheEntry, built_here: bool) -> Kernel:
        module = tvm.runtime.load_module(str(entry.so_path))
        omp_pool.attach(entry.so_path)  # its parallel loops run on torch's thread pool (see omp_pool)
        manifest = entry.manifest
        return cls(
            spec=spec,
            key=entry.key,
            path=entry.so_path,
            layout=manifest["layout"],
            output_shapes=[tuple(s) for s in manifest["output_shapes"]],
            provenance=manifest["provenance"],
            built_here=built_here,
            function=module[manifest.get("symbol", SYMBOL)],
            module=module,
            weight_block=int(manifest["layout"].get("weight_block", 1)),
        )

    @property
    def schedule(self) -> str:
        """Where the schedule came from, in a few words: the default rule's name, ``tuned <record>``, or how a
        record of another CPU or a neighbour serves here (``tuned on emeraldrapids, adopted here, 1.40x over
        the default``)."""
        if "summary" in self.provenance:
            return self.provenance["summary"]
        if self.provenance["source"] == "tuned":
            return f"tuned {self.provenance['record'][:8]}"
        return self.provenance["rule"]

    def __call__(self, *tensors: Any) -> None:
        self.function(*tensors)

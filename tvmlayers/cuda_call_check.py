"""GPU check of the CUDA call path: torch's CUDA tensors passed straight to a tvmlayers kernel, as ``Kernel.__call__``
and the modules pass them (no copy, no explicit stream), must be read and written in place and run on torch's
*current* stream.  Needs a GPU, torch with CUDA and TVM's runtime (apache-tvm or a runtime pack): run it on the
GPU machine against a CUDA bundle (``tvmlayers compile ... --target sm_90 -o BUNDLE``, references not needed)::

    python3 cuda_call_check.py BUNDLE [--json OUT.json]      # exit status 0: every kernel passed

It loads TVM's runtime through the bundle's own ``run.py`` and, per kernel, on random inputs:

- ``in_place``: the output tensor torch allocated (filled with NaN) is written by the call, every element;
- ``side_stream``: on a new torch stream, ``torch.cuda._sleep`` (tens of ms) and then a copy that makes the
  kernel's input, then the kernel, with no synchronization in between: it reads the input after the copy only if it
  runs on that stream (on any other stream it would read the input before the copy wrote it);
- ``graph_capture``: the kernel captured into a CUDA graph on a side stream (launches on any other stream fail
  during capture) and replayed.

Each result must equal the kernel's own result on the default stream exactly (same kernel, same inputs).
Correctness against torch is ``run.py``'s check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_SLEEP_CYCLES = 50_000_000  # about 25-35 ms of one SM's clock: far longer than a launch takes to be queued


def _bundle_runner(bundle: Path) -> ModuleType:
    """The bundle's run.py as a module (what loads TVM's runtime on the device)."""
    spec = importlib.util.spec_from_file_location("tvmlayers_bundle_run", bundle / "run.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"{bundle} has no run.py: give a bundle folder written by `tvmlayers compile`")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tensors(torch: Any, specs: list[dict], generator: Any) -> list[Any]:
    out = []
    for spec in specs:
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=generator).to("cuda", dtype))
        else:
            out.append(torch.zeros(spec["shape"], dtype=dtype, device="cuda"))
    return out


def _empty_outputs(torch: Any, specs: list[dict]) -> list[Any]:
    """Outputs filled with NaN (floats) or -1 (indices), so that an element the kernel does not write shows."""
    outputs = []
    for spec in specs:
        dtype = getattr(torch, spec["dtype"])
        fill = float("nan") if dtype.is_floating_point else -1
        outputs.append(torch.full(spec["shape"], fill, dtype=dtype, device="cuda"))
    return outputs


def _same(torch: Any, got: list[Any], want: list[Any]) -> bool:
    return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def check_kernel(torch: Any, function: Any, kernel: dict, seed: int) -> dict:
    """The three checks of one kernel (see the module's doc); each True when it passed."""
    generator = torch.Generator().manual_seed(seed)
    inputs = _tensors(torch, kernel["inputs"], generator)
    expected = _empty_outputs(torch, kernel["outputs"])
    function(*inputs, *expected)  # the default stream; also loads the module's kernels before any capture
    torch.cuda.synchronize()
    written = all(not (t.isnan().any() if t.is_floating_point() else (t == -1).all()) for t in expected)
    row = {"name": kernel["name"], "in_place": bool(written)}

    stream = torch.cuda.Stream()
    source = inputs[0].clone()
    late_input = torch.zeros_like(inputs[0])
    side = _empty_outputs(torch, kernel["outputs"])
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(_SLEEP_CYCLES)
        late_input.copy_(source)
        function(late_input, *inputs[1:], *side)
    torch.cuda.synchronize()
    row["side_stream"] = _same(torch, side, expected)

    captured = _empty_outputs(torch, kernel["outputs"])
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            function(*inputs, *captured)
        graph.replay()
        torch.cuda.synchronize()
        row["graph_capture"] = _same(torch, captured, expected)
    except RuntimeError as err:  # a launch outside the capturing stream invalidates the capture
        torch.cuda.synchronize()
        row["graph_capture"], row["graph_error"] = False, str(err)[:300]
    row["passed"] = row["in_place"] and row["side_stream"] and row["graph_capture"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a CUDA bundle folder (tvmlayers compile --target sm_XX)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runner = _bundle_runner(args.bundle)
    manifest = runner.read_manifest(args.bundle)
    if not manifest.get("cuda_arch"):
        raise SystemExit(f"{args.bundle} is a bundle for {manifest['target_key']}, not a CUDA one")
    import torch  # noqa: PLC0415 - after the arguments: --help works anywhere

    if not torch.cuda.is_available():
        raise SystemExit("this check needs a GPU that torch sees (torch.cuda.is_available() is False)")
    runner.load_runtime(args.bundle, True)
    import tvm_ffi  # noqa: PLC0415 - importable once run.py loaded the runtime

    rows = []
    for kernel in manifest["kernels"]:
        function = tvm_ffi.load_module(str((args.bundle / kernel["library"]).resolve()))[kernel["symbol"]]
        rows.append(check_kernel(torch, function, kernel, args.seed))
        flags = " ".join(f"{k}={'ok' if rows[-1][k] else 'FAIL'}" for k in ("in_place", "side_stream", "graph_capture"))
        print(f"{kernel['name']:16} {flags}  {kernel['describe'][:60]} {rows[-1].get('graph_error', '')}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "kernels": rows}, indent=1) + "\n")
    failed = [row["name"] for row in rows if not row["passed"]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

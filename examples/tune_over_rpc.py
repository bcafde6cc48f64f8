"""Tune a model's layers for a Raspberry Pi 4 over RPC, then compile its bundle with the tuned records.

    python examples/tune_over_rpc.py [--trials 8] [--log-dir build/tuning_logs] [--out build/rpi4-small-cnn-tuned]
    python examples/tune_over_rpc.py --rpc-tracker HOST:9190 --rpc-key rasp4b   # a real board (README)

1. Without ``--rpc-tracker``, an emulated board stands in for the Pi: an RPC tracker on 127.0.0.1 and TVM's
   RPC server on an aarch64 Python under qemu-aarch64, registered as ``rasp4b``
   (``tvmlayers.tuning.qemu_board``; the ARM environment is set up once by tvmlayers.emulation).
2. ``tl.tune`` tunes every kernel of the example CNN (examples/models/small_cnn.py, converted: relu fused)
   for the ``rasp4b`` preset: candidates are compiled and linked here with aarch64-linux-gnu-gcc, measured
   on the board, and the chosen records are checked there against torch.  Records go to the rasp4b log
   under ``--log-dir``.
3. ``tl.compile_bundle`` compiles the model for ``rasp4b`` with those records, and the bundle's run.py checks
   every kernel against torch under qemu-aarch64 (on a real board: copy the bundle there and run it).

Under qemu the measured times are emulated and mean nothing: this shows the path and checks the results.
Tuning for speed needs the real board.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import tvmlayers as tl
from tvmlayers.bundle import model_layers
from tvmlayers.emulation import ensure_arm_environment
from tvmlayers.model_bench import load_model_file
from tvmlayers.tuning.qemu_board import QemuBoard

MODEL = Path(__file__).resolve().parent / "models" / "small_cnn.py"
TARGET = "rasp4b"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="measured candidates per kernel (default: 8)")
    parser.add_argument("--rpc-tracker", help="HOST:PORT of the tracker of a real board (default: a qemu board)")
    parser.add_argument("--rpc-key", default=TARGET, help="the key the board registered with (default: rasp4b)")
    parser.add_argument("--log-dir", default="build/tuning_logs", help="the tuning-log root to write")
    parser.add_argument("--out", default="build/rpi4-small-cnn-tuned", help="the bundle folder to write")
    args = parser.parse_args()

    model, input_shape = load_model_file(MODEL)
    specs = [call.spec for call in model_layers(model, input_shape, TARGET)]
    with contextlib.ExitStack() as stack:
        tracker = args.rpc_tracker
        if tracker is None:
            print(f"starting a qemu board registered as {args.rpc_key!r} (about 20 s)", flush=True)
            tracker = stack.enter_context(QemuBoard(args.rpc_key)).tracker
        results = tl.tune(
            specs, TARGET, trials=args.trials, log_dir=args.log_dir, trials_per_iter=args.trials,
            rpc_tracker=tracker, rpc_key=args.rpc_key,
        )  # fmt: skip
    emulated = " (emulated: meaningless)" if args.rpc_tracker is None else ""
    print(f"\n{'kernel':64} {'trials':>6} {'us' + emulated:>12}  record checked on the board")
    for result in results:
        best = f"{result.best.seconds * 1e6:12.1f}  {result.best.id}" if result.best else f"{'-':>12}  none"
        print(f"{result.spec.describe()[:64]:64} {result.trials:6d} {best}")

    os.environ["TVMLAYERS_TUNING_LOGS"] = args.log_dir  # where compile_bundle (as kernel_for) finds records
    manifest = tl.compile_bundle(model, TARGET, args.out, input_shape=input_shape)
    print(f"\nbundle: {manifest.parent}")
    for kernel in json.loads(manifest.read_text())["kernels"]:
        schedule = kernel["schedule"]
        source = f"tuned record {schedule['record']}" if schedule["source"] == "tuned" else schedule["rule"]
        print(f"  {kernel['describe'][:64]:64} {source}")
    if args.rpc_tracker is not None:
        print(f"copy it to the board and run it there: python3 {Path(args.out).name}/run.py")
        return 0
    print("running the bundle's run.py under qemu-aarch64 (correctness only)", flush=True)
    emulator = ensure_arm_environment()
    return subprocess.run([*emulator.python_argv(), str(manifest.parent / "run.py")], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

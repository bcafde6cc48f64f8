"""Compile a model's layers for a Raspberry Pi 4 and check the bundle with the real ARM build.

    python examples/compile_for_raspberry_pi.py [--out build/rpi4-small-cnn]

1. ``tl.compile_bundle`` converts the example CNN (examples/models/small_cnn.py), cross-compiles its kernels
   for the ``rasp4b`` preset (Cortex-A72, NEON) with aarch64-linux-gnu-gcc, and writes the bundle: libraries,
   torch's reference inputs and outputs, manifest.json and run.py.
2. The bundle's own run.py runs as it would on the board, here with an aarch64 Python and TVM's aarch64
   runtime under qemu-aarch64 (set up once by tvmlayers.emulation: Debian packages as root, then ~75 s).
   It checks every kernel against torch's outputs; the times it prints are emulated and mean nothing.

On a real Pi: ``scp -r build/rpi4-small-cnn pi@board:`` then ``ssh pi@board python3 rpi4-small-cnn/run.py``
(the board needs ``pip install apache-tvm numpy``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import tvmlayers as tl
from tvmlayers.emulation import ensure_arm_environment
from tvmlayers.model_bench import load_model_file

MODEL = Path(__file__).resolve().parent / "models" / "small_cnn.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/rpi4-small-cnn", help="the bundle folder to write")
    args = parser.parse_args()

    model, input_shape = load_model_file(MODEL)
    manifest = tl.compile_bundle(model, "rasp4b", args.out, input_shape=input_shape)
    print(f"bundle: {manifest.parent} ({sum(1 for _ in manifest.parent.rglob('*.so'))} kernel libraries)")

    emulator = ensure_arm_environment()
    print("running the bundle's run.py under qemu-aarch64 (correctness only: emulated times mean nothing)")
    return subprocess.run([*emulator.python_argv(), str(manifest.parent / "run.py")], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())

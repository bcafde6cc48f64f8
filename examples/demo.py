"""tvmlayers demo: the four layers compiled for the host CPU, checked against torch and timed.

Run by ``make demo``.  The script then starts itself again in a fresh process to show that the second
process loads every kernel from the on-disk cache instead of compiling it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

import tvmlayers as tl
from tvmlayers.cache import default_cache_dir

LAYERS = [
    ("Conv2d 64->64 3x3", lambda: torch.nn.Conv2d(64, 64, 3, padding=1), (1, 64, 56, 56)),
    (
        "Conv2d 16->33 (3,5)/(2,1) dil(3,1)",
        lambda: torch.nn.Conv2d(16, 33, (3, 5), (2, 1), (4, 2), (3, 1)),
        (2, 16, 50, 100),
    ),
    ("Conv2d depthwise 32 3x3", lambda: torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), (1, 32, 56, 56)),
    ("MaxPool2d 3/2 pad 1", lambda: torch.nn.MaxPool2d(3, 2, 1), (1, 64, 112, 112)),
    ("Linear 512->1000", lambda: torch.nn.Linear(512, 1000), (1, 512)),
    ("ReLU", lambda: torch.nn.ReLU(), (1, 64, 112, 112)),
]


def median_ms(fn, x: torch.Tensor, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(second_process: bool) -> None:
    rows = []
    for name, make, shape in LAYERS:
        torch.manual_seed(0)
        reference = make().eval()
        ours = tl.convert(reference)
        x = torch.randn(shape)
        start = time.perf_counter()
        with torch.no_grad():
            out = ours(x)  # compiles (or loads from the cache) on first use
        first_call = time.perf_counter() - start
        kernel = next(iter(ours.kernels.values()))
        with torch.no_grad():
            expected = reference(x)
            error = (out - expected).abs().max().item()
            t_ours, t_torch = median_ms(ours, x), median_ms(reference, x)
        origin = "compiled" if kernel.built_here else "cache"
        rows.append((name, "x".join(map(str, shape)), error, t_ours, t_torch, origin, first_call, kernel))
    if second_process:
        print("second process:")
        for name, _, _, _, _, origin, first_call, _ in rows:
            print(f"  {name:36} first call {first_call * 1e3:8.1f} ms, kernel from {origin}")
        return
    threads = f"{tl.get_num_threads()} on {tl.get_thread_pool()}'s pool, torch {torch.get_num_threads()}"
    print(f"target: {tl.resolve_target('host')}; kernel threads: {threads}")
    print(f"kernel cache: {default_cache_dir()}\n")
    header = f"{'layer':36} {'input':14} {'max abs err':>11} {'tvmlayers ms':>12} {'torch ms':>9} {'speedup':>7}"
    print(f"{header}  schedule")
    for name, shape, error, t_ours, t_torch, _, _, kernel in rows:
        print(
            f"{name:36} {shape:14} {error:11.2e} {t_ours:12.3f} {t_torch:9.3f} {t_torch / t_ours:6.2f}x  "
            f"{kernel.schedule}"
        )
    print("\nspeedup = torch time / tvmlayers time (above 1: faster than torch)\n")


def main() -> None:
    if "--second-process" in sys.argv:
        run(second_process=True)
        return
    run(second_process=False)
    subprocess.run([sys.executable, __file__, "--second-process"], check=True)


if __name__ == "__main__":
    main()

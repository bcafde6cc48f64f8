"""Default-schedule speed of the ResNet-18 layers against torch, on the host CPU.

Times the user path (module called with torch tensors), torch and tvmlayers interleaved in one
process with the same thread count; prints the median of many repeats and the ratio
tvmlayers time / torch time (lower is better; 1.0 = as fast as torch).

    python examples/bench_defaults.py [--repeat 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch

import tvmlayers as tl

# (name, torch module, input shape): every distinct conv of ResNet-18 at 224x224, its pool, relu and fc
LAYERS = [
    ("conv1 7x7/2 3->64", lambda: torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), (1, 3, 224, 224)),
    ("layer1 3x3 64->64", lambda: torch.nn.Conv2d(64, 64, 3, 1, 1, bias=False), (1, 64, 56, 56)),
    ("layer2 3x3/2 64->128", lambda: torch.nn.Conv2d(64, 128, 3, 2, 1, bias=False), (1, 64, 56, 56)),
    ("layer2 3x3 128->128", lambda: torch.nn.Conv2d(128, 128, 3, 1, 1, bias=False), (1, 128, 28, 28)),
    ("layer2 1x1/2 64->128", lambda: torch.nn.Conv2d(64, 128, 1, 2, 0, bias=False), (1, 64, 56, 56)),
    ("layer3 3x3/2 128->256", lambda: torch.nn.Conv2d(128, 256, 3, 2, 1, bias=False), (1, 128, 28, 28)),
    ("layer3 3x3 256->256", lambda: torch.nn.Conv2d(256, 256, 3, 1, 1, bias=False), (1, 256, 14, 14)),
    ("layer3 1x1/2 128->256", lambda: torch.nn.Conv2d(128, 256, 1, 2, 0, bias=False), (1, 128, 28, 28)),
    ("layer4 3x3/2 256->512", lambda: torch.nn.Conv2d(256, 512, 3, 2, 1, bias=False), (1, 256, 14, 14)),
    ("layer4 3x3 512->512", lambda: torch.nn.Conv2d(512, 512, 3, 1, 1, bias=False), (1, 512, 7, 7)),
    ("layer4 1x1/2 256->512", lambda: torch.nn.Conv2d(256, 512, 1, 2, 0, bias=False), (1, 256, 14, 14)),
    ("maxpool 3x3/2", lambda: torch.nn.MaxPool2d(3, 2, 1), (1, 64, 112, 112)),
    ("relu", lambda: torch.nn.ReLU(), (1, 64, 112, 112)),
    ("fc 512->1000", lambda: torch.nn.Linear(512, 1000), (1, 512)),
]


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tl.set_num_threads(args.threads)
    print(f"threads: torch {torch.get_num_threads()}, TVM {tl.get_num_threads()}; median of {args.repeat}")
    print(f"{'layer':24} {'input':18} {'rule':22} {'tvmlayers ms':>12} {'torch ms':>9} {'ratio':>6}")
    ratios = []
    for name, make, shape in LAYERS:
        torch.manual_seed(0)
        reference = make().eval()
        ours = tl.convert(reference)
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)
            # interleave the two so that machine noise hits both alike
            ours_ms, torch_ms = [], []
            for _ in range(3):
                ours_ms.append(median_ms(partial(ours, x), args.repeat))
                torch_ms.append(median_ms(partial(reference, x), args.repeat))
        t_ours, t_torch = min(ours_ms), min(torch_ms)
        ratio = t_ours / t_torch
        ratios.append(ratio)
        rule = next(iter(ours.kernels.values())).provenance["rule"]
        print(f"{name:24} {'x'.join(map(str, shape)):18} {rule:22} {t_ours:12.3f} {t_torch:9.3f} {ratio:6.2f}")
    print(f"geometric mean ratio: {statistics.geometric_mean(ratios):.2f} (tvmlayers time / torch time)")


if __name__ == "__main__":
    main()

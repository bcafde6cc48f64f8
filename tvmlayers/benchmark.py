"""Benchmark tvmlayers against torch, layer by layer, in one process with the same thread count.

For every workload: the output is checked against torch first (a wrong kernel is reported, never
timed); then tvmlayers' user path (a call with torch tensors) and torch are timed interleaved, after a
warm-up, and the bare kernel is timed with TVM's time_evaluator, so the call overhead shows.  Rows carry
GFLOP/s (conv2d, linear) or GB/s (max_pool2d, relu) and the percentage of the machine's measured peak.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import tvm

from . import functional as tf
from . import schedules
from .formats import REPORT_FORMAT
from .layer_specs import CHANNEL_BLOCKS
from .nn import ReLU
from .ops import SYMBOL
from .ops.relu import ACTIVATIONS, spec_activation
from .reference import unblock_channels
from .spec import KernelSpec
from .targets import TargetLike, resolve_target, target_key
from .threads import get_num_threads, set_num_threads
from .verify import kernel_inputs, random_inputs, torch_reference
from .workloads import Workload, load_workloads


@dataclass
class BenchRow:
    layer: str  # one-line description of the spec
    op: str
    input_shape: list[int]
    provenance: str  # "tuned <record>" or "default <rule>"
    correct: bool
    max_error: float
    ours_ms: float | None = None  # user path: median of the interleaved repeats
    ours_spread_ms: float | None = None  # interquartile range
    kernel_ms: float | None = None  # TVM time_evaluator, no Python in the loop
    torch_ms: float | None = None
    torch_spread_ms: float | None = None
    speedup: float | None = None  # torch time / tvmlayers time: above 1 is faster than torch
    rate: float | None = None  # GFLOP/s or GB/s of the user path
    unit: str = "GFLOP/s"
    percent_of_peak: float | None = None


@dataclass
class BenchReport:
    target: str
    threads: int
    repeat: int
    peak_gflops: float
    peak_gbps: float
    # the Python call overhead: a module call of ReLU on 1x16x8x8, tvmlayers and torch, in microseconds
    overhead_us: float
    torch_overhead_us: float
    rows: list[BenchRow] = field(default_factory=list)
    format: int = REPORT_FORMAT

    def geomean_speedups(self) -> dict[str, float]:
        """Geometric-mean speedup per op and overall ("all"), over correct rows."""
        groups: dict[str, list[float]] = {}
        for row in self.rows:
            if row.speedup:
                groups.setdefault(row.op, []).append(row.speedup)
                groups.setdefault("all", []).append(row.speedup)
        return {op: statistics.geometric_mean(values) for op, values in groups.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> BenchReport:
        data = json.loads(text)
        rows = [BenchRow(**row) for row in data.pop("rows")]
        return cls(**data, rows=rows)

    def _table(self) -> tuple[list[str], list[list[str]]]:
        header = ["layer", "schedule", "tvmlayers ms", "kernel ms", "torch ms", "speedup", "rate", "% peak"]
        lines = []
        for r in self.rows:
            if not r.correct:
                lines.append([r.layer, r.provenance, f"WRONG (max error {r.max_error:.3g})", "", "", "", "", ""])
                continue
            lines.append(
                [
                    r.layer,
                    r.provenance,
                    f"{r.ours_ms:.3f} ± {r.ours_spread_ms:.3f}",
                    f"{r.kernel_ms:.3f}",
                    f"{r.torch_ms:.3f} ± {r.torch_spread_ms:.3f}",
                    f"{r.speedup:.2f}x",
                    f"{r.rate:.1f} {r.unit}",
                    f"{r.percent_of_peak:.0f}%",
                ]
            )
        return header, lines

    def summary(self) -> str:
        means = self.geomean_speedups()
        parts = [f"{op} {value:.2f}x" for op, value in sorted(means.items()) if op != "all"]
        overall = f"overall {means['all']:.2f}x" if "all" in means else "no correct rows"
        wrong = sum(not r.correct for r in self.rows)
        return f"geometric-mean speedup over torch: {', '.join(parts)}; {overall}" + (
            f"; {wrong} WRONG kernel(s)" if wrong else ""
        )

    def header(self) -> str:
        return (
            f"target {self.target}, {self.threads} threads (TVM and torch), median of {self.repeat} interleaved "
            f"repeats; measured peak {self.peak_gflops:.0f} GFLOP/s (matmul), {self.peak_gbps:.1f} GB/s (copy); "
            f"call overhead (ReLU module on {'x'.join(map(str, OVERHEAD_SHAPE))}) {self.overhead_us:.1f} us vs "
            f"torch's {self.torch_overhead_us:.1f} us ({self.overhead_us / self.torch_overhead_us:.2f}x)"
        )

    def to_text(self) -> str:
        return "\n".join([self.header(), render_table(*self._table()), self.summary()])

    def to_markdown(self) -> str:
        return "\n\n".join([self.header(), render_table(*self._table(), markdown=True), self.summary()]) + "\n"

    def plot(self, path: str | Path) -> None:
        """A bar chart of the speedup per layer, log scale, 1.0 (torch) marked."""
        import matplotlib  # noqa: PLC0415 - only the chart needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        rows = [r for r in self.rows if r.speedup]
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
        labels = [r.layer for r in rows]
        colors = ["tab:green" if r.speedup >= 1 else "tab:red" for r in rows]
        ax.barh(range(len(rows)), [r.speedup for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlabel("speedup over torch (torch time / tvmlayers time), log scale")
        ax.set_title(f"tvmlayers vs torch on {self.target}, {self.threads} threads")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def render_table(header: list[str], lines: list[list[str]], markdown: bool = False) -> str:
    """Columns padded to their widest cell, or a Markdown table."""
    if markdown:
        rows = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    rows = [header, *lines]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _label(spec: KernelSpec) -> str:
    """A short name of a layer call, e.g. ``conv2d+add+relu 1x64x56x56 64->64 k3x3 s1 p1`` (or ``+relu6``)."""
    p = dict(spec.params)
    shape = "x".join(map(str, spec.input_shape))
    activation = spec_activation(p)
    op = spec.op + ("+add" if p.get("residual") else "") + (f"+{activation}" if activation else "")
    blocks = [p.get(name) for name in CHANNEL_BLOCKS]
    layouts = " " + "->".join(f"NCHW{b}c" if b else "NCHW" for b in blocks) if any(blocks) else ""
    if spec.op == "conv2d":
        out_channels, in_per_group, kh, kw = p["weight_shape"]
        groups = f" g{p['groups']}" if p["groups"] != 1 else ""
        channels = f"{in_per_group * p['groups']}->{out_channels}"
        return f"{op} {shape} {channels} k{kh}x{kw} s{p['stride'][0]} p{p['padding'][0]}{groups}{layouts}"
    if spec.op == "max_pool2d":
        return f"{op} {shape} k{p['kernel_size'][0]} s{p['stride'][0]} p{p['padding'][0]}{layouts}"
    if spec.op == "linear":
        return f"{op} {shape} ->{p['weight_shape'][0]}"
    return f"{op} {shape}"


def _work(spec: KernelSpec, out_shape: tuple[int, ...]) -> tuple[float, str]:
    """Work of one call: FLOPs for conv2d/linear, bytes moved for max_pool2d/relu."""
    p = dict(spec.params)
    itemsize = 8 if spec.dtype == "float64" else 4
    if spec.op == "conv2d":
        _, in_per_group, kh, kw = p["weight_shape"]
        return 2.0 * math.prod(out_shape) * in_per_group * kh * kw, "GFLOP/s"
    if spec.op == "linear":
        return 2.0 * math.prod(out_shape) * spec.input_shape[-1], "GFLOP/s"
    return float(itemsize * (math.prod(spec.input_shape) + math.prod(out_shape))), "GB/s"


def _calls(spec: KernelSpec, target: tvm.target.Target) -> tuple[Callable, Callable, list[torch.Tensor]]:
    """(tvmlayers call through the public functional API, torch call, the bare kernel's input arguments).  A
    channel-blocked conv2d or max_pool2d (a recorded program's) has no public call: its kernel is called as the
    program calls it, on blocked inputs into a buffer it reuses."""
    x, w, b, r = random_inputs(spec, torch.Generator().manual_seed(0))
    p = dict(spec.params)
    fused = {f"fuse_{name}": bool(p.get(name, False)) for name in ACTIVATIONS}
    layout = schedules.weight_layout(spec)
    if any(spec.get(name) is not None for name in CHANNEL_BLOCKS):
        from .build import kernel_for  # noqa: PLC0415 - as _checked_row's

        kernel, inputs = kernel_for(spec), kernel_inputs(spec, layout, x, w, b, r)
        out = torch.empty(kernel.output_shapes[0], dtype=x.dtype)
        ours = lambda: kernel.function(*inputs, out) or out  # noqa: E731
    elif spec.op == "conv2d":
        top, left, bottom, right = p["padding"]
        padding = (top, left) if (top, left) == (bottom, right) else "same"  # only 'same' pads unevenly
        args = (p["stride"], padding, p["dilation"], p["groups"])
        ours = lambda: tf.conv2d(  # noqa: E731
            x, w, b, *args, padding_mode=p["padding_mode"], **fused, residual=r, target=target
        )
    elif spec.op == "max_pool2d":
        args = (p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"], p["return_indices"])
        ours = lambda: tf.max_pool2d(x, *args, target=target)  # noqa: E731
    elif spec.op == "linear":
        ours = lambda: tf.linear(x, w, b, **fused, target=target)  # noqa: E731
    else:
        ours = lambda: tf.relu(x, target=target)  # noqa: E731
    return ours, lambda: torch_reference(spec, x, w, b, r)[0], kernel_inputs(spec, layout, x, w, b, r)


def _first(value: torch.Tensor | tuple) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _interleaved(
    calls: Sequence[Callable], repeat: int, warmup: int, block: int = 5, settle_s: float = 0.005
) -> list[list[float]]:
    """Time ``calls`` in turn, ``block`` calls at a time, ``repeat`` calls each in all: seconds per call.

    With ``settle_s`` each block starts with that many seconds (at least one call) of untimed calls: TVM's
    thread pool and torch's OpenMP threads both spin for milliseconds after their work, and while the
    other library's threads spin, a small kernel on all cores runs up to twice as long.  Then every
    library is timed in its steady state; a model that mixes them pays that switch on top.  With
    ``settle_s=0`` and ``block=1`` the calls alternate with nothing in between: what a user's loop sees.
    """
    for _ in range(warmup):
        for fn in calls:
            fn()
    times: list[list[float]] = [[] for _ in calls]
    while len(times[-1]) < repeat:
        for fn, out in zip(calls, times, strict=True):
            if settle_s:
                fn()
                settled = time.perf_counter() + settle_s
                while time.perf_counter() < settled:
                    fn()
            for _ in range(min(block, repeat - len(out))):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
    return times


def settled_and_alternating(
    settled_calls: Sequence[Callable],
    alternating_calls: Sequence[Callable],
    repeat: int,
    warmup: int,
    block: int = 5,
    settle_s: float = 0.02,
    twins: Sequence[Callable] = (),
) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """Time the candidates both ways in the same rounds, ``repeat`` calls each per way (seconds per call).

    Each round times every ``settled_calls[i]`` in a block of ``block`` calls after ``settle_s`` of untimed
    ones (its steady state: its own threads awake, its own data in cache), then ``block`` calls of each of
    ``alternating_calls`` in turn, one by one with nothing in between.  Both ways so see the same moments
    of a shared machine, and their ratio measures what switching costs, not what the load did meanwhile.
    The two lists are the same functions except where a candidate is set up differently for alternating
    (ONNX Runtime's pool: see :mod:`tvmlayers.model_bench`).

    ``twins`` (none, or one per settled call: the same call on data of its own) adds a third way, the control
    for the alternating one: each settled call timed right after its twin, one by one, in the same rounds.  A
    call after its twin finds its own data out of the way as it does after another library's call, but its own
    code and thread pool where it left them; what alternating costs beyond that is the switch between libraries.
    Returns (settled, alternating, after the twin: empty without twins).
    """
    for fn in (*settled_calls, *alternating_calls, *twins):
        for _ in range(warmup):
            fn()
    settled: list[list[float]] = [[] for _ in settled_calls]
    alternating: list[list[float]] = [[] for _ in alternating_calls]
    after_twin: list[list[float]] = [[] for _ in twins]
    pairs = list(zip(settled_calls, twins, after_twin, strict=True)) if twins else []
    while len(settled[-1]) < repeat:
        count = min(block, repeat - len(settled[-1]))
        for fn, out in zip(settled_calls, settled, strict=True):
            fn()
            end = time.perf_counter() + settle_s
            while time.perf_counter() < end:
                fn()
            out += _timed(fn, count)
        for _ in range(count):
            for fn, out in zip(alternating_calls, alternating, strict=True):
                out += _timed(fn, 1)
        for _ in range(count):
            for fn, twin, out in pairs:
                twin()
                out += _timed(fn, 1)
    return settled, alternating, after_twin


def _timed(fn: Callable, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_and_spread(times: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times) * 1e3, (quartiles[2] - quartiles[0]) * 1e3


def measure_peak(threads: int) -> tuple[float, float]:
    """The machine's peak as torch reaches it: GFLOP/s of a 2048^3 float32 matmul, GB/s of a 256 MB copy."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = min(_interleaved([lambda: a @ b], 5, 2)[0])
    source, destination = torch.randn(1 << 26), torch.empty(1 << 26)
    copy = min(_interleaved([lambda: destination.copy_(source)], 5, 2)[0])
    return 2 * 2048**3 / matmul / 1e9, 2 * source.numel() * 4 / copy / 1e9


OVERHEAD_SHAPE = (1, 16, 8, 8)


def measure_overhead(target: tvm.target.Target, repeat: int) -> tuple[float, float]:
    """Microseconds per module call of ReLU on a tiny tensor (the kernel itself takes well under a
    microsecond): tvmlayers' and torch's, each the median over ``repeat`` interleaved batches of 100 calls."""
    x = torch.randn(OVERHEAD_SHAPE)
    ours, theirs = ReLU(target=target), torch.nn.ReLU()

    def batch(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            for _ in range(100):
                module(x)

        return run

    times = _interleaved([batch(ours), batch(theirs)], repeat, 2)
    return statistics.median(times[0]) * 1e4, statistics.median(times[1]) * 1e4


def bench_spec(
    spec: KernelSpec,
    target: tvm.target.Target,
    repeat: int,
    warmup: int,
    peak: tuple[float, float],
    ours: Callable | None = None,
) -> BenchRow:
    """One row, each library timed in its steady state (blocks after untimed calls: no switch cost);
    ``ours`` replaces the tvmlayers call (the harness's own tests use it)."""
    row, ours_call, torch_call, timing = _checked_row(spec, target, ours)
    if row.correct:
        with torch.no_grad():
            ours_times, torch_times = _interleaved([ours_call, torch_call], repeat, warmup)
        timing(row, ours_times, torch_times, repeat, peak)
    return row


def bench_spec_settled_and_alternating(
    spec: KernelSpec, target: tvm.target.Target, repeat: int, warmup: int, peak: tuple[float, float]
) -> tuple[BenchRow, BenchRow, BenchRow]:
    """Three rows timed in the same rounds (:func:`settled_and_alternating`): settled; the two calls alternating
    one by one with nothing in between, as they do inside a converted model; and each call right after its twin
    (the same call on inputs of its own), the control that tells the switch between libraries from the rest."""
    settled, ours_call, torch_call, timing = _checked_row(spec, target, None)
    alternating, after_twin = copy.copy(settled), copy.copy(settled)
    if settled.correct:
        calls = [ours_call, torch_call]
        ours_twin, torch_twin, _ = _calls(spec, target)  # fresh inputs (and packed weights) of their own
        with torch.no_grad():
            (ours_settled, torch_settled), (ours_alternating, torch_alternating), (ours_after, torch_after) = (
                settled_and_alternating(calls, calls, repeat, warmup, twins=[ours_twin, torch_twin])
            )
        timing(settled, ours_settled, torch_settled, repeat, peak)
        timing(alternating, ours_alternating, torch_alternating, repeat, peak)
        timing(after_twin, ours_after, torch_after, repeat, peak)
    return settled, alternating, after_twin


def _checked_row(
    spec: KernelSpec, target: tvm.target.Target, ours: Callable | None
) -> tuple[BenchRow, Callable, Callable, Callable]:
    """The row with its correctness against torch, the two calls, and the function that fills in the times."""
    ours_call, torch_call, inputs = _calls(spec, target)
    ours_call = ours or ours_call
    with torch.no_grad():
        got, want = _first(ours_call()), torch_call()
    if spec.get("out_block") is not None:
        got = unblock_channels(got)
    from .build import kernel_for  # noqa: PLC0415 - the kernel the call above just built or loaded

    kernel = kernel_for(spec)
    error = (got - want).abs().max().item() if got.shape == want.shape else math.inf
    tolerance = (
        1e-3 * (1 + want.abs().max().item()) if spec.dtype == "float32" else 1e-9 * (1 + want.abs().max().item())
    )
    row = BenchRow(_label(spec), spec.op, list(spec.input_shape), kernel.schedule, bool(error <= tolerance), error)

    def timing(row: BenchRow, ours_times: list[float], torch_times: list[float], repeat: int, peak: tuple) -> None:
        row.ours_ms, row.ours_spread_ms = _median_and_spread(ours_times)
        row.torch_ms, row.torch_spread_ms = _median_and_spread(torch_times)
        row.speedup = row.torch_ms / row.ours_ms
        dtypes = (want.dtype, torch.int64)  # values, then max_pool2d's indices
        outputs = [torch.empty(shape, dtype=d) for shape, d in zip(kernel.output_shapes, dtypes, strict=False)]
        args = [tvm.runtime.from_dlpack(t) for t in (*inputs, *outputs)]
        timer = kernel.module.time_evaluator(SYMBOL, tvm.cpu(), number=10, repeat=max(3, repeat // 10))
        row.kernel_ms = float(statistics.median(timer(*args).results)) * 1e3
        work, row.unit = _work(spec, tuple(want.shape))
        row.rate = work / (row.ours_ms / 1e3) / 1e9
        row.percent_of_peak = 100 * row.rate / (peak[0] if row.unit == "GFLOP/s" else peak[1])

    return row, ours_call, torch_call, timing


def bench(
    workloads: str | Path | Sequence[str | Path | Workload | KernelSpec],
    target: TargetLike = "host",
    repeat: int = 50,
    warmup: int = 5,
    threads: int | None = None,
) -> BenchReport:
    """Benchmark every workload (files, Workload or KernelSpec objects) against torch."""
    tgt = resolve_target(target)
    if tgt.kind.name != "llvm":
        raise ValueError("tvmlayers bench runs kernels on this machine's CPU: use a CPU target such as 'host'")
    items = [workloads] if isinstance(workloads, str | Path) else list(workloads)
    specs: list[KernelSpec] = []
    for item in items:
        if isinstance(item, str | Path):
            specs += [w.spec(tgt) for w in load_workloads(item)[0]]
        else:
            specs.append(item.spec(tgt) if isinstance(item, Workload) else item)
    threads = threads or torch.get_num_threads()
    set_num_threads(threads)
    peak = measure_peak(threads)
    report = BenchReport(target_key(tgt), get_num_threads(), repeat, *peak, *measure_overhead(tgt, repeat))
    for spec in dict.fromkeys(specs):
        report.rows.append(bench_spec(spec, tgt, repeat, warmup, peak))
    return report

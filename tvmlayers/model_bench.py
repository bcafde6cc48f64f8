"""Benchmark a whole model: tvmlayers-converted against torch eager, torch.compile and ONNX Runtime.

One process, one thread count for every candidate, random weights with randomized BatchNorm statistics
(so folding them matters), ``eval()`` and ``torch.inference_mode()``.  Correctness comes first: every
candidate's output is compared with torch eager's, scaled by its magnitude (random-weight logits are
tiny), and the converted model's leaf outputs are matched against the original's module outputs, so a
wrong model says where it went wrong; a wrong candidate is reported WRONG and not timed.  Then each
candidate is timed two ways in the same rounds (:func:`tvmlayers.benchmark.settled_and_alternating`): in a
loop of the model alone (what an inference loop sees) and alternating call by call with the other
candidates: median and interquartile range, speedup over torch eager.  The per-layer breakdown times
every kernel the converted model calls against torch's twin layer the same two ways: settled, and
alternating with no settling, as the layers of a model that mixes both libraries run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import math
import platform
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

from .benchmark import (
    BenchRow,
    _first,
    _median_and_spread,
    bench_spec_settled_and_alternating,
    measure_peak,
    render_table,
    settled_and_alternating,
)
from .convert import convert
from .executor import Program, programs
from .extract import extract_workloads
from .formats import REPORT_FORMAT
from .nn._base import CompiledLayer
from .targets import resolve_target, target_key
from .threads import get_num_threads, set_num_threads

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

# The classifiers ``--model all`` runs.
CLASSIFIERS = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "vgg11",
    "squeezenet1_0",
    "densenet121",
    "googlenet",
    "shufflenet_v2_x1_0",
    "efficientnet_b0",
    "regnet_x_400mf",
    "alexnet",
)
PEERS = ("eager", "compile", "onnxruntime")
# float32 tolerance of the largest difference, relative to the reference output's largest magnitude
TOLERANCE = 1e-3
# The loop protocol: each candidate runs LOOP_BLOCK timed calls in a row after settling (the previous
# candidate's threads stop spinning, this one's caches hold its own weights), rounds interleaved.
LOOP_BLOCK = 5
INSTALL_HINT = "pip install 'tvmlayers[models]'"

# torchvision's import registers fake kernels for these two ops of its C++ library; its only wheel for
# torch 2.13 here is a CUDA build whose library does not load beside CPU torch, and then the import fails
# with "operator torchvision::nms does not exist".  Its models need neither op.
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_torchvision_library: list[torch.library.Library] = []  # kept alive: the schemas live as long as it does


def import_torchvision() -> ModuleType:
    """``import torchvision``, first defining the op schemas its import needs when its C++ library cannot load."""
    if sys.modules.get("torchvision") is not None:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"torchvision is not installed: {INSTALL_HINT}, or pass a Python file with model()")
    library = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        if library is None:
            raise OSError("torchvision has no _C library")
        torch.ops.load_library(str(library))
    except OSError:
        missing = [name for name in _TORCHVISION_SCHEMAS if not hasattr(torch.ops.torchvision, name)]
        if missing and not _torchvision_library:
            _torchvision_library.append(torch.library.Library("torchvision", "FRAGMENT"))
        for name in missing:
            _torchvision_library[0].define(_TORCHVISION_SCHEMAS[name])
    return importlib.import_module("torchvision")


def load_model_file(path: str | Path, input_shape: Sequence[int] | None = None) -> tuple[torch.nn.Module, tuple]:
    """The model of a Python file that defines ``model()`` (and optionally ``INPUT_SHAPE``), and its input shape."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "model"):
        raise ValueError(f"{path} must define model() returning a torch.nn.Module")
    shape = tuple(input_shape) if input_shape else getattr(module, "INPUT_SHAPE", None)
    if shape is None:
        raise ValueError("--input-shape is required (the model file has no INPUT_SHAPE)")
    return module.model(), tuple(int(d) for d in shape)


def load_model(source: str, input_shape: Sequence[int] | None = None) -> tuple[torch.nn.Module, tuple, str]:
    """(model, input shape, where it came from) of a Python file or a torchvision classifier name."""
    if source.endswith(".py") or Path(source).exists():
        return (*load_model_file(source, input_shape), source)
    torchvision = import_torchvision()
    if source not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"{source!r} is neither a Python file nor a torchvision classifier such as {CLASSIFIERS[0]}")
    with warnings.catch_warnings():  # googlenet warns that its default initialization will change
        warnings.simplefilter("ignore", FutureWarning)
        model = torchvision.models.get_model(source, weights=None)
    return model, tuple(input_shape or (1, 3, 224, 224)), f"torchvision {torchvision.__version__}"


def randomize_batchnorm(model: ModuleT, seed: int = 0) -> ModuleT:
    """Random running statistics and affine parameters, in place (``model`` is returned): fresh ones (mean
    0, variance 1, identity affine) would let a conv that skipped its BatchNorm pass as correct."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                for tensor, low, high in (
                    (module.running_mean, -0.2, 0.2),
                    (module.running_var, 0.5, 2.0),
                    (module.weight, 0.5, 1.5),
                    (module.bias, -0.2, 0.2),
                ):
                    if tensor is not None:
                        tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    return model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``want`` (inf when the shapes differ)."""
    if got.shape != want.shape:
        return float("inf")
    scale = max(want.abs().max().item(), torch.finfo(torch.float32).tiny) if want.numel() else 1.0
    return (got.float() - want.float()).abs().max().item() / scale if want.numel() else 0.0


def _outputs(model: torch.nn.Module, x: torch.Tensor, leaves_only: bool) -> list[tuple[str, torch.Tensor]]:
    """(module name, a copy of its float output) in the order the calls finish: copies, because an
    in-place ReLU overwrites the BatchNorm output it was given."""
    outputs: list[tuple[str, torch.Tensor]] = []

    def hook(name: str) -> Callable:
        def record(module: torch.nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                outputs.append((name, output.detach().clone()))

        return record

    modules = [(n, m) for n, m in model.named_modules() if n and not (leaves_only and any(m.children()))]
    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


# How far ahead in the original's module outputs a converted leaf's output is looked for: a fused layer
# skips the outputs of what it swallowed (a BatchNorm, a ReLU, a residual add's container).
_WINDOW = 32


def match_leaves(original: torch.nn.Module, converted: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, str]:
    """(leaf outputs of ``converted``, how many equal an output of a module of ``original`` in call order,
    the first one that does not).  A fused layer's output equals the output of the last module it
    fused; a leaf with no twin there (one that fused a functional op) is unmatched without being wrong."""
    want = _outputs(original, x, leaves_only=False)
    got = _outputs(converted, x, leaves_only=True)
    position, matched, first_unmatched = 0, 0, ""
    for name, output in got:
        found = next(
            (
                index
                for index in range(position, min(position + _WINDOW, len(want)))
                if relative_error(output, want[index][1]) <= TOLERANCE
            ),
            None,
        )
        if found is None:
            first_unmatched = first_unmatched or name
        else:
            position, matched = found, matched + 1  # not found + 1: an Identity left by fusion repeats it
    return len(got), matched, first_unmatched


def fusion_summary(converted: torch.nn.Module) -> dict[str, int]:
    """What ``convert`` made of the model: tvmlayers layer types, and the torch leaf types it left."""
    counts: Counter[str] = Counter()
    for module in converted.modules():
        if isinstance(module, CompiledLayer):
            counts[f"tvmlayers.{type(module).__name__}"] += 1
        elif not any(module.children()):
            counts[f"torch.{type(module).__name__}"] += 1
    return dict(sorted(counts.items()))


@dataclass
class Candidate:
    name: str  # tvmlayers, eager, compile, onnxruntime
    status: str  # "ok", "WRONG", "skipped: <why>", "failed: <why>"
    max_error: float | None = None  # relative to eager's output magnitude
    # in a loop that runs only this model (blocks of calls after settling, the blocks of all candidates
    # interleaved): what an inference loop sees
    ms: float | None = None  # median
    spread_ms: float | None = None  # interquartile range
    speedup: float | None = None  # eager's time / this one's: above 1 is faster than torch eager
    # calls alternating one by one with the other candidates' (each after another model's call): caches
    # hold the other model's weights and activations
    alternating_ms: float | None = None
    alternating_spread_ms: float | None = None
    alternating_speedup: float | None = None


@dataclass
class ModelReport:
    model: str
    origin: str  # "torchvision <version>" or the model file
    input_shape: list[int]
    target: str
    cpu: str
    threads: int
    repeat: int
    candidates: list[Candidate] = field(default_factory=list)
    leaves: int = 0  # leaf outputs of the converted model
    leaves_matched: int = 0  # that equal an original module's output, in call order
    first_unmatched: str = ""
    conversion: str = ""  # convert's own summary (converted.tvmlayers_report): what was folded and fused
    fused: dict[str, int] = field(default_factory=dict)  # tvmlayers layer types in the converted model
    program: str = ""  # what the converted model's recorded inference program runs (tvmlayers.executor)
    # the converted model's kernels against torch's twin layers: settled, then alternating without settling, and
    # each library's call right after its own twin (inputs of its own): what alternating costs beyond the switch
    layers_settled: list[BenchRow] = field(default_factory=list)
    layers_alternating: list[BenchRow] = field(default_factory=list)
    layers_after_twin: list[BenchRow] = field(default_factory=list)
    layer_counts: list[int] = field(default_factory=list)  # calls of each layer per forward
    format: int = REPORT_FORMAT

    def candidate(self, name: str) -> Candidate | None:
        return next((c for c in self.candidates if c.name == name), None)

    @property
    def correct(self) -> bool:
        return all(c.status != "WRONG" for c in self.candidates)

    @classmethod
    def from_dict(cls, data: dict) -> ModelReport:
        data = dict(data)
        candidates = [Candidate(**c) for c in data.pop("candidates")]
        settled = [BenchRow(**r) for r in data.pop("layers_settled")]
        alternating = [BenchRow(**r) for r in data.pop("layers_alternating")]
        after_twin = [BenchRow(**r) for r in data.pop("layers_after_twin", [])]
        return cls(
            **data,
            candidates=candidates,
            layers_settled=settled,
            layers_alternating=alternating,
            layers_after_twin=after_twin,
        )

    def header(self) -> str:
        peers = ", ".join(f"{c.name} {c.status}" for c in self.candidates if c.name not in ("tvmlayers", "eager"))
        shape = "x".join(map(str, self.input_shape))
        return (
            f"{self.model} ({self.origin}), input {shape} float32; CPU {self.cpu} ({self.target}); "
            f"{self.threads} threads for every candidate; median of {self.repeat} calls in a loop of the model "
            f"alone (blocks of {LOOP_BLOCK}, interleaved) and of {self.repeat} calls alternating with the others; "
            f"peers: eager ran, {peers}"
        )

    def _candidate_table(self) -> tuple[list[str], list[list[str]]]:
        header = ["candidate", "status", "max rel. error", "loop: ms (median ± IQR)", "speedup vs eager"]
        header += ["alternating: ms", "speedup"]
        lines = [
            [
                c.name,
                c.status,
                "" if c.max_error is None else f"{c.max_error:.2g}",
                "" if c.ms is None else f"{c.ms:.2f} ± {c.spread_ms:.2f}",
                "" if c.speedup is None else f"{c.speedup:.2f}x",
                "" if c.alternating_ms is None else f"{c.alternating_ms:.2f} ± {c.alternating_spread_ms:.2f}",
                "" if c.alternating_speedup is None else f"{c.alternating_speedup:.2f}x",
            ]
            for c in self.candidates
        ]
        return header, lines

    def _layer_table(self) -> tuple[list[str], list[list[str]]]:
        header = ["layer", "calls", "settled: ours ms", "torch ms", "speedup"]
        header += ["alternating: ours ms", "torch ms", "speedup", "after own twin: speedup", "switch us: ours", "torch"]
        lines = []
        for count, settled, alternating, after_twin in zip(
            self.layer_counts, self.layers_settled, self.layers_alternating, self._after_twin(), strict=True
        ):
            cells = [settled.layer, str(count)]
            for row in (settled, alternating):
                if row.speedup is None:
                    cells += [f"WRONG (max error {row.max_error:.3g})", "", ""]
                else:
                    cells += [f"{row.ours_ms:.3f}", f"{row.torch_ms:.3f}", f"{row.speedup:.2f}x"]
            if after_twin is None or after_twin.speedup is None or alternating.speedup is None:
                cells += ["", "", ""]
            else:
                ours_switch = (alternating.ours_ms - after_twin.ours_ms) * 1e3
                torch_switch = (alternating.torch_ms - after_twin.torch_ms) * 1e3
                cells += [f"{after_twin.speedup:.2f}x", f"{ours_switch:.1f}", f"{torch_switch:.1f}"]
            lines.append(cells)
        return header, lines

    def _after_twin(self) -> list[BenchRow | None]:
        """The control rows, one per layer (None for each in a report written before they were timed)."""
        return list(self.layers_after_twin) or [None] * len(self.layers_settled)

    def layer_geomeans(self) -> dict[str, float]:
        """The geometric mean over the layers of the speedup each way ("settled", "alternating", "after own
        twin"), weighted by calls per forward; ways without a time for every layer are left out."""
        ways = {"settled": self.layers_settled, "alternating": self.layers_alternating}
        ways["after own twin"] = self.layers_after_twin
        means = {}
        for way, rows in ways.items():
            if rows and all(row.speedup for row in rows):
                logs = [count * math.log(row.speedup) for count, row in zip(self.layer_counts, rows, strict=True)]
                means[way] = math.exp(sum(logs) / sum(self.layer_counts))
        return means

    def _notes(self) -> list[str]:
        fused = ", ".join(f"{name} {count}" for name, count in self.fused.items()) or "nothing converted"
        unmatched = f" (first unmatched: {self.first_unmatched})" if self.first_unmatched else ""
        notes = [
            f"leaf outputs: {self.leaves_matched} of {self.leaves} equal an original module's output{unmatched}",
            f"conversion: {self.conversion or 'no report from convert'}; modules: {fused}",
        ]
        if self.program:
            notes.append(f"inference program: {self.program}")
        geomeans = self.layer_geomeans()
        if geomeans:
            speedups = ", ".join(f"{way} {value:.2f}x" for way, value in geomeans.items())
            notes.append(f"per-layer speedup over torch (geomean, weighted by calls): {speedups}")
        return notes

    def render(self, markdown: bool = False) -> str:
        parts = [self.header(), render_table(*self._candidate_table(), markdown), *self._notes()]
        if self.layers_settled:
            parts += [
                "per layer, settled (no switch cost), alternating one by one with torch's twin layer, and each "
                "library's call right after its own twin (inputs of its own: the control); switch = alternating "
                "minus after own twin, what a call pays for following the other library's:"
            ]
            parts += [render_table(*self._layer_table(), markdown)]
        return ("\n\n" if markdown else "\n").join(parts) + "\n"


def summary(reports: Sequence[ModelReport], markdown: bool = False) -> str:
    """One line per model: each candidate's median and speedup over torch eager in a loop of the model alone
    (the alternating calls are in each model's own table)."""
    names = ["tvmlayers", *PEERS]
    header = ["model", *(f"{name} ms" for name in names), *(f"{name} speedup" for name in names if name != "eager")]
    lines = []
    for report in reports:
        found = [report.candidate(name) for name in names]
        # a candidate that was not timed shows its status's first word: WRONG, skipped, failed
        times = [c.status.split(":")[0] if c and c.ms is None else f"{c.ms:.2f}" if c else "" for c in found]
        speedups = [f"{c.speedup:.2f}x" if c and c.speedup else "" for c in found[:1] + found[2:]]
        lines.append([report.model, *times, *speedups])
    return render_table(header, lines, markdown)


def to_json(reports: Sequence[ModelReport]) -> str:
    return json.dumps([asdict(r) for r in reports], indent=1)


def from_json(text: str) -> list[ModelReport]:
    return [ModelReport.from_dict(data) for data in json.loads(text)]


def plot(reports: Sequence[ModelReport], path: str | Path) -> None:
    """Grouped bars: each candidate's speedup over torch eager per model, log scale, 1.0 marked."""
    import matplotlib  # noqa: PLC0415 - only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = ["tvmlayers", "compile", "onnxruntime"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(reports) + 2), 4))
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        values = [(r.candidate(name).speedup or 0) if r.candidate(name) else 0 for r in reports]
        ax.bar([i + offset * width for i in range(len(reports))], values, width, label=name)
    ax.set_xticks([i + width for i in range(len(reports))], [r.model for r in reports], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylabel("speedup over torch eager, log scale")
    ax.set_title(f"{reports[0].cpu}, {reports[0].threads} threads" if reports else "")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@dataclass
class Calls:
    """A candidate's call for each timing protocol (the same function, except ONNX Runtime's sessions)."""

    loop: Callable[[], torch.Tensor]
    alternating: Callable[[], torch.Tensor]


def _onnxruntime_calls(model: torch.nn.Module, x: torch.Tensor, threads: int) -> Calls:
    """Calls of the model exported to ONNX, on ONNX Runtime CPU sessions with ``threads`` intra-op threads."""
    import onnxruntime  # noqa: PLC0415 - an optional extra

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's progress lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    proto = program.model_proto.SerializeToString()

    def session_call(spinning: bool) -> Callable[[], torch.Tensor]:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        session = onnxruntime.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        return lambda: torch.from_numpy(session.run(None, feed)[0])

    # ORT's pool spins after each run by default, its best in a loop of its own (the settling before each
    # block lets the spinning end before another candidate runs); alternating, the spinning threads would
    # take the cores from the next candidate, so there they sleep and ORT pays its own wake-up
    return Calls(loop=session_call(spinning=True), alternating=session_call(spinning=False))


def _peer_calls(name: str, model: torch.nn.Module, x: torch.Tensor, threads: int) -> Calls:
    if name == "eager":
        return Calls(lambda: model(x), lambda: model(x))
    if name == "compile":
        compiled = torch.compile(model)
        return Calls(lambda: compiled(x), lambda: compiled(x))
    return _onnxruntime_calls(model, x, threads)


def bench_model(
    source: str | torch.nn.Module,
    input_shape: Sequence[int] | None = None,
    threads: int | None = None,
    repeat: int = 50,
    warmup: int = 3,
    peers: Sequence[str] = PEERS,
    layers: bool = True,
) -> ModelReport:
    """Benchmark one model: a torchvision classifier name, a Python file, or a module with ``input_shape`` (its
    BatchNorm statistics are randomized in place).  ``peers`` besides tvmlayers; eager always runs."""
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer(s) {sorted(unknown)}: choose from {', '.join(PEERS)}")
    if isinstance(source, torch.nn.Module):
        if input_shape is None:
            raise ValueError("a module needs its input_shape")
        model, shape, origin = source, tuple(input_shape), type(source).__name__
    else:
        model, shape, origin = load_model(source, input_shape)
    set_num_threads(threads or torch.get_num_threads())
    target = resolve_target("host")
    model = model.eval()
    randomize_batchnorm(model)
    report = ModelReport(
        Path(source).stem if isinstance(source, str) else origin,
        origin,
        list(shape),
        target_key(target),
        cpu_name(),
        get_num_threads(),
        repeat,
    )
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    # converted and exported before inference mode, as a user would set a model up
    converted = None
    try:
        converted = convert(model, target=target)
    except Exception as err:  # noqa: BLE001 - a model convert cannot handle is a failed candidate; peers still run
        report.candidates.append(Candidate("tvmlayers", f"failed: {_one_line(err)}"))
    calls: dict[str, Calls] = {}
    if converted is not None:
        calls["tvmlayers"] = Calls(lambda: converted(x), lambda: converted(x))
    for peer in ("eager", *(p for p in PEERS if p in peers and p != "eager")):
        try:
            calls[peer] = _peer_calls(peer, model, x, report.threads)
        except ImportError as err:
            report.candidates.append(Candidate(peer, f"skipped: {err.name or err} not installed ({INSTALL_HINT})"))
        except Exception as err:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
            report.candidates.append(Candidate(peer, f"failed: {_one_line(err)}"))
    with torch.inference_mode():
        want = _first(model(x))
        if converted is not None:
            report.fused = fusion_summary(converted)
            conversion = getattr(converted, "tvmlayers_report", None)
            report.conversion = conversion.summary() if conversion is not None else ""
            report.leaves, report.leaves_matched, report.first_unmatched = match_leaves(model, converted, x)
        timed = _check(calls, want, report)
        loop, alternating, _ = settled_and_alternating(
            [calls[n].loop for n in timed], [calls[n].alternating for n in timed], repeat, warmup, LOOP_BLOCK
        )
        for candidate_name, loop_s, alternating_s in zip(timed, loop, alternating, strict=True):
            candidate = report.candidate(candidate_name)
            candidate.ms, candidate.spread_ms = _median_and_spread(loop_s)
            candidate.alternating_ms, candidate.alternating_spread_ms = _median_and_spread(alternating_s)
        eager = report.candidate("eager")
        for candidate in report.candidates:
            if candidate.ms:
                candidate.speedup = eager.ms / candidate.ms
                candidate.alternating_speedup = eager.alternating_ms / candidate.alternating_ms
        report.candidates.sort(key=lambda c: ["tvmlayers", *PEERS].index(c.name))
        recorded = programs(converted) if converted is not None else []
        report.program = recorded[-1].summary() if recorded else ""
        if layers and report.candidate("tvmlayers").status == "ok":
            _bench_layers(converted, recorded[-1] if recorded else None, x, target, repeat, warmup, report)
    return report


def _check(calls: dict[str, Calls], want: torch.Tensor, report: ModelReport) -> list[str]:
    """Run each candidate once (torch.compile compiles here) and compare with eager: the names to time."""
    timed = []
    for name, call in calls.items():
        try:
            error = max(relative_error(_first(c()), want) for c in (call.loop, call.alternating))
        except Exception as err:  # noqa: BLE001 - e.g. inductor without a working C++ compiler
            report.candidates.append(Candidate(name, f"failed: {_one_line(err)}"))
            continue
        ok = error <= TOLERANCE
        report.candidates.append(Candidate(name, "ok" if ok else "WRONG", error))
        timed += [name] if ok else []
    if "eager" not in timed:
        raise RuntimeError(f"torch eager does not run {report.model}: see the candidates' status")
    return timed


def _bench_layers(
    converted: torch.nn.Module,
    program: Program | None,
    x: torch.Tensor,
    target: object,
    repeat: int,
    warmup: int,
    report: ModelReport,
) -> None:
    """Every distinct kernel the converted model runs against torch's twin layer: those of its recorded program
    (channel-blocked convs among them), else of its layer calls."""
    peak = measure_peak(report.threads)
    if program is not None:
        counts = Counter(program.kernel_specs)
    else:
        counts = Counter({workload.spec(target): workload.count for workload in extract_workloads(converted, x)})
    for spec, count in counts.items():
        report.layer_counts.append(count)
        settled, alternating, after_twin = bench_spec_settled_and_alternating(spec, target, repeat, warmup, peak)
        report.layers_settled.append(settled)
        report.layers_alternating.append(alternating)
        report.layers_after_twin.append(after_twin)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:200]

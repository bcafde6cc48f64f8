"""The model benchmark on a tiny CNN file: correctness checks, peers that are missing, the CLI, JSON.
No timing is asserted: these machines are shared and noisy."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tvmlayers import model_bench
from tvmlayers.cli import main
from tvmlayers.model_bench import bench_model, from_json, load_model, match_leaves, relative_error, to_json
from tvmlayers.schedules.cpu import cpu_config
from tvmlayers.targets import resolve_target

TINY = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def model():
    return Tiny().eval()
'''


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return path


def test_converted_model_is_checked_timed_and_broken_down(tiny: Path) -> None:
    report = bench_model(str(tiny), threads=1, repeat=3, warmup=1, peers=["eager"])
    assert report.model == "tiny" and report.input_shape == [1, 3, 16, 16] and report.threads == 1
    assert [c.name for c in report.candidates] == ["tvmlayers", "eager"]
    for candidate in report.candidates:
        assert candidate.status == "ok" and candidate.max_error <= model_bench.TOLERANCE
        assert candidate.ms > 0 and candidate.spread_ms >= 0 and candidate.speedup > 0  # a loop of it alone
        assert candidate.alternating_ms > 0 and candidate.alternating_spread_ms >= 0
        assert candidate.alternating_speedup > 0
    assert report.candidate("eager").speedup == 1.0 == report.candidate("eager").alternating_speedup
    # the final output matches, and so does every leaf that has a twin among the original's module outputs
    assert report.leaves > 0 and report.leaves_matched > 0
    assert any(name.startswith("tvmlayers.") for name in report.fused)
    # the timed calls ran the recorded program: conv1 (+relu), conv2 (+x, relu), pool and fc call their kernels
    # directly (conv2's module, fetched for no one else, by no step); conv1's and conv2's outputs, read only by
    # kernels, live in the arena (pool's goes to flatten)
    assert report.program.startswith("4 of 5 steps call kernels directly, 2 arena buffers")
    assert report.layers_settled and len(report.layers_settled) == len(report.layers_alternating)
    assert len(report.layer_counts) == len(report.layers_settled)
    rows = zip(report.layers_settled, report.layers_alternating, report.layers_after_twin, strict=True)
    for settled, alternating, after_twin in rows:
        assert settled.layer == alternating.layer == after_twin.layer
        assert settled.speedup and alternating.speedup and after_twin.speedup
    assert set(report.layer_geomeans()) == {"settled", "alternating", "after own twin"}
    text = report.render()
    assert "inference program: 4 of 5 steps" in text
    assert "1 threads for every candidate" in text and "peers: eager ran" in text and "alternating" in text
    assert "after own twin: speedup" in text and "per-layer speedup over torch (geomean, weighted by calls)" in text
    assert from_json(to_json([report])) == [report]
    # a report written before the control rows were timed still reads and renders, without them
    older = json.loads(to_json([report]))
    del older[0]["layers_after_twin"]
    (read,) = from_json(json.dumps(older))
    assert read.layers_after_twin == [] and "after own twin 0" not in read.render()


def test_the_breakdown_times_the_programs_channel_blocked_kernels(tmp_path: Path) -> None:
    """With 16 channels conv1's output, read only by conv2, is channel-blocked in the program: the breakdown times
    the two kernels the program calls (NCHW in, blocked out; blocked in, NCHW out), each checked against torch."""
    path = tmp_path / "wide.py"
    path.write_text(TINY.replace("8, 3, padding=1, bias=False)", "16, 3, padding=1, bias=False)")
                    .replace("BatchNorm2d(8)", "BatchNorm2d(16)").replace("Conv2d(8, 8,", "Conv2d(16, 8,")
                    .replace("x = self.relu(self.conv2(x) + x)", "x = self.relu(self.conv2(x))"))  # fmt: skip
    report = bench_model(str(path), threads=1, repeat=3, warmup=1, peers=["eager"])
    assert report.candidate("tvmlayers").status == "ok"
    assert report.program.endswith("1 channel-blocked")
    labels = [row.layer for row in report.layers_settled]
    block = f"NCHW{cpu_config(resolve_target('host')).vector_lanes('float32')}c"
    assert any(label.startswith("conv2d+relu 1x3x16x16") and label.endswith(f"NCHW->{block}") for label in labels)
    assert any(label.startswith("conv2d+relu 1x16x16x16") and label.endswith(f"{block}->NCHW") for label in labels)
    assert all(row.correct for row in report.layers_settled + report.layers_alternating)


def test_missing_peers_are_skipped_with_the_reason(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    report = bench_model(str(tiny), threads=1, repeat=2, warmup=1, peers=["eager", "onnxruntime"], layers=False)
    skipped = report.candidate("onnxruntime")
    assert skipped.status.startswith("skipped: onnxruntime not installed") and "tvmlayers[models]" in skipped.status
    assert skipped.ms is None and report.correct
    assert "onnxruntime skipped" in report.render() and "skipped" in model_bench.summary([report])
    with pytest.raises(ValueError, match="unknown peer"):
        bench_model(str(tiny), peers=["tensorrt"])


def test_a_wrong_conversion_is_reported_where_it_goes_wrong_and_not_timed(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: torch.nn.Module, target: object = None) -> torch.nn.Module:
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.conv2.weight.mul_(2)
        return wrong

    monkeypatch.setattr(model_bench, "convert", broken)
    report = bench_model(str(tiny), threads=1, repeat=2, warmup=1, peers=["eager"])
    ours = report.candidate("tvmlayers")
    assert ours.status == "WRONG" and ours.max_error > model_bench.TOLERANCE and ours.ms is None
    assert report.first_unmatched == "conv2" and not report.correct
    assert not report.layers_settled  # a wrong model's layers are not timed either
    assert "WRONG" in report.render()


def test_leaves_match_through_in_place_relus(tiny: Path) -> None:
    model, shape = model_bench.load_model_file(tiny)
    model_bench.randomize_batchnorm(model)
    x = torch.randn(shape)
    with torch.inference_mode():
        leaves, matched, first_unmatched = match_leaves(model, copy.deepcopy(model), x)
    assert leaves == matched == 7 and first_unmatched == ""  # conv1, bn1, relu, conv2, relu again, pool, fc
    assert relative_error(torch.ones(2), torch.ones(3)) == float("inf")
    assert relative_error(torch.tensor([1e-6, 2e-6]), torch.tensor([1e-6, 2.0000001e-6])) < 1e-3


def test_cli_writes_json_markdown_and_plot(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    status = main(
        ["bench", "--model", str(tiny), "--repeat", "2", "--threads", "1", "--peers", "eager", "--no-layers"]
        + ["--json", f"{out}.json", "--markdown", f"{out}.md", "--plot", f"{out}.png"]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "tvmlayers speedup" in printed
    (report,) = from_json(Path(f"{out}.json").read_text())
    assert report.candidate("tvmlayers").status == "ok"
    assert Path(f"{out}.md").read_text().startswith("| model |")
    assert Path(f"{out}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--model", str(tiny), str(tiny)]) == 2  # workload files and --model


def test_torchvision_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(model_bench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"tvmlayers\[models\]"):
        load_model("resnet18")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
def test_torchvision_classifiers_load() -> None:
    model, shape, origin = load_model("squeezenet1_0")
    assert shape == (1, 3, 224, 224) and origin.startswith("torchvision")
    with pytest.raises(ValueError, match="neither a Python file nor a torchvision classifier"):
        load_model("no_such_net")


def test_a_conversion_that_fails_is_reported_and_the_peers_still_run(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(model: torch.nn.Module, target: object = None) -> torch.nn.Module:
        raise NotImplementedError("no twin for this layer\nsecond line")

    monkeypatch.setattr(model_bench, "convert", unsupported)
    report = bench_model(str(tiny), threads=1, repeat=2, warmup=1, peers=["eager"])
    assert report.candidate("tvmlayers").status == "failed: NotImplementedError: no twin for this layer"
    assert report.candidate("eager").ms > 0 and not report.layers_settled

"""The benchmark harness on tiny shapes: every field is filled, a wrong kernel is flagged, JSON round-trips.
No timing is asserted: these machines are shared and noisy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import conv3x3_spec
from tvmlayers.benchmark import BenchReport, bench, bench_spec, settled_and_alternating
from tvmlayers.cli import main
from tvmlayers.spec import KernelSpec
from tvmlayers.targets import resolve_target
from tvmlayers.workloads import Workload, save_workloads

HOST = resolve_target("host")
SPECS = [
    conv3x3_spec((1, 4, 8, 8), 16),
    KernelSpec.make(
        "max_pool2d",
        (1, 4, 8, 8),
        "float32",
        HOST,
        kernel_size=(2, 2),
        stride=(2, 2),
        padding=(0, 0),
        dilation=(1, 1),
        ceil_mode=False,
        return_indices=True,
    ),
    KernelSpec.make("linear", (3, 10), "float32", HOST, bias=False, weight_shape=(16, 10)),
    KernelSpec.make("relu", (64,), "float32", HOST),
]


def test_report_has_every_field_and_round_trips(tmp_path: Path) -> None:
    report = bench(SPECS, repeat=3, warmup=1, threads=1)
    assert report.threads == 1 and report.peak_gflops > 0 and report.peak_gbps > 0
    assert report.overhead_us > 0 and report.torch_overhead_us > 0 and "call overhead" in report.to_text()
    assert [row.op for row in report.rows] == ["conv2d", "max_pool2d", "linear", "relu"]
    for row in report.rows:
        assert row.correct and row.max_error < 1e-4
        for value in (
            row.ours_ms,
            row.ours_spread_ms,
            row.kernel_ms,
            row.torch_ms,
            row.speedup,
            row.rate,
            row.percent_of_peak,
        ):
            assert value is not None and value >= 0
        assert row.unit == ("GFLOP/s" if row.op in ("conv2d", "linear") else "GB/s")
        assert row.provenance
    assert set(report.geomean_speedups()) == {"conv2d", "max_pool2d", "linear", "relu", "all"}
    assert BenchReport.from_json(report.to_json()) == report
    markdown = report.to_markdown()
    assert markdown.count("\n|") == len(SPECS) + 2 and "geometric-mean speedup" in markdown
    report.plot(tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_wrong_kernel_is_flagged_not_timed() -> None:
    peak = (100.0, 10.0)
    row = bench_spec(SPECS[3], HOST, repeat=3, warmup=1, peak=peak, ours=lambda: torch.zeros(64) - 1)
    assert not row.correct and row.max_error > 0.5
    assert row.ours_ms is None and row.speedup is None


def test_cli_writes_json_markdown_and_plot(tmp_path: Path, capsys) -> None:
    workloads = tmp_path / "tiny.toml"
    save_workloads([Workload.from_spec(SPECS[3])], workloads)
    status = main(
        [
            "bench",
            str(workloads),
            "--repeat",
            "3",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "r.json"),
            "--markdown",
            str(tmp_path / "r.md"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    assert status == 0
    assert "relu 64" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["op"] == "relu"
    assert (tmp_path / "r.md").read_text().startswith("target ")
    assert (tmp_path / "r.png").exists()


def test_settled_and_alternating_time_both_ways_in_the_same_rounds() -> None:
    order: list[str] = []
    settled_a, settled_b = (lambda: order.append("A")), (lambda: order.append("B"))
    alternating_a, alternating_b = (lambda: order.append("a")), (lambda: order.append("b"))
    settled, alternating, after_twin = settled_and_alternating(
        [settled_a, settled_b], [alternating_a, alternating_b], repeat=7, warmup=1, block=3, settle_s=0.0
    )
    assert [len(t) for t in settled + alternating] == [7, 7, 7, 7] and after_twin == []
    assert all(t >= 0 for times in settled + alternating for t in times)
    calls = "".join(order[4:])  # after the warm-up call of each
    # a round: A's settling call and block, B's, then the alternating calls one by one; three rounds (3, 3, 1)
    assert calls == "AAAABBBBababab" * 2 + "AABBab", calls
    # with twins, each round then times every settled call right after its twin (untimed), one by one
    order.clear()
    twin_a, twin_b = (lambda: order.append("x")), (lambda: order.append("y"))
    settled, alternating, after_twin = settled_and_alternating(
        [settled_a, settled_b], [alternating_a, alternating_b], repeat=2, warmup=1, block=2, settle_s=0.0,
        twins=[twin_a, twin_b],
    )  # fmt: skip
    assert [len(t) for t in after_twin] == [2, 2]
    assert "".join(order[6:]) == "AAABBBababxAyBxAyB", order
    with pytest.raises(ValueError):
        settled_and_alternating([settled_a, settled_b], [alternating_a], 1, 0, twins=[twin_a])

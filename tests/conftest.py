"""Shared test setup: one kernel cache for the whole run (shared by the xdist workers, so each kernel
is compiled once per run), and helpers that compare with torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Kernels are keyed by a hash of the op and schedule sources, so a cache kept between runs never serves a
# kernel of older code; tests about building and caching use their own empty directories.
os.environ.setdefault("TVMLAYERS_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "kernels"))

TOLERANCES = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


def assert_matches_torch(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty kernel cache for this test only."""
    monkeypatch.setenv("TVMLAYERS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"

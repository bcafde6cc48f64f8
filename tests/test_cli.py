"""The tvmlayers command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import tvmlayers.functional as tf
from tvmlayers.cli import main


def test_targets_lists_the_host(capsys) -> None:
    assert main(["targets", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host ") and "llvm-x86_64-linux-gnu-" in out and '"mtriple": "x86_64-linux-gnu"' in out


def test_cache_ls_and_clear(fresh_cache: Path, capsys) -> None:
    tf.relu(torch.randn(3, 7, 5))
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "1 kernel(s)" in out and "relu" in out and "3x7x5" in out and "cpu.relu" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 kernel(s)" in capsys.readouterr().out
    assert main(["cache", "ls"]) == 0
    assert "0 kernel(s)" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    tool = Path(sys.executable).with_name("tvmlayers")
    result = subprocess.run([str(tool), "--help"], capture_output=True, text=True, check=True)
    assert "targets" in result.stdout and "cache" in result.stdout
    bad = subprocess.run([str(tool), "cache"], capture_output=True, text=True)
    assert bad.returncode == 2 and "required" in bad.stderr

"""`make demo`'s script runs end to end: every layer matches torch, and a second process loads every
kernel from the cache instead of compiling it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_runs_and_the_second_process_uses_the_cache(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        env={**os.environ, "TVMLAYERS_CACHE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table, second = result.stdout.split("second process:")
    for line in table.splitlines():
        if line.startswith(("Conv2d", "MaxPool2d", "Linear", "ReLU")):
            error = re.search(r"\s(\d\.\d\de[+-]\d\d)\s", line)  # the max abs error column
            assert error and float(error.group(1)) < 1e-4, line
    assert second.count("kernel from cache") == 6

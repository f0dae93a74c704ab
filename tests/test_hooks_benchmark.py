"""`python -m benchmarks.hooks --smoke` runs, so it cannot rot (its figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_hooks_benchmark_smoke_reports_every_row() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.hooks", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("inotify floor", "| bus |", "action run started", "webhook receiver"):
        assert row in result.stdout
    assert "50 credentials rotated at once, one webhook: all 50 delivered" in result.stdout

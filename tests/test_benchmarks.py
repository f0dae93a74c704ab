"""The benchmarks' --smoke mode, so they cannot rot. Their numbers are not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Every benchmark in turn, each starting daemons and servers: over the suite's 120 s default
# on a loaded 2-core machine.
@pytest.mark.timeout(420)
def test_make_bench_smoke_runs_and_reports_every_section() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sections = ("## Latency", "## Scale", "## Memory", "## Idle", "## Engine CPU",
                "## Fan-out", "## Side by side", "## Targets")
    for section in sections:
        assert section in result.stdout
    assert '"delivery"' in result.stdout  # the JSON document

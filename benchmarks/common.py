"""Shared helpers for the benchmarks: credential trees, percentiles, /proc readings, tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_tree(root: Path, count: int, directories: int) -> list[Path]:
    """``count`` token files (0600) spread over ``directories`` directories."""
    paths = []
    for i in range(count):
        directory = root / f"d{i % directories:05d}"
        if i < directories:
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"token{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, f"token-{i}-{os.urandom(8).hex()}".encode())
        os.close(fd)
        paths.append(path)
    return paths


def rotate(path: Path, data: bytes) -> None:
    """An atomic rename, as most credential writers do it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data)
    os.close(fd)
    os.replace(tmp, path)


def config_toml(state_dir: Path, paths: list[Path], extra: str = "") -> str:
    lines = [f'[broker]\nstate_dir = "{state_dir}"\nhost_id = "bench"\n', extra]
    for i, path in enumerate(paths):
        lines.append(f'[[credentials]]\nname = "c{i}"\nfiles = {{ token = "{path}" }}\n')
    return "\n".join(lines)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(ordered[-1], 3),
    }


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> dict[str, float]:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            status[key] = round(int(value.split()[0]) / 1024, 1)
    return status


def inotify_watches(pid: int) -> int:
    """Watches held by a process: ``inotify wd:`` lines in its fdinfo."""
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) != "anon_inode:inotify":
                continue
            text = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
        except OSError:
            continue
        total += sum(1 for line in text.splitlines() if line.startswith("inotify wd:"))
    return total


def idle_cpu_percent(pid: int, seconds: float) -> float:
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    used, elapsed = cpu_seconds(pid) - before, time.monotonic() - start
    return round(100 * used / elapsed, 3)


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def start_daemon(config: Path) -> subprocess.Popen[str]:
    """``credbroker run -c config`` as a subprocess, returned once it logged "broker started"
    (its stderr is left open: the caller reads or drains it, and terminates the process)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        if not line:
            proc.wait(timeout=30)
            raise RuntimeError("the daemon exited before it started")
        if json.loads(line).get("message") == "broker started":
            return proc

"""The daemon's idle CPU at scale, and what it is spent on.

    python -m benchmarks.idle [--count 10000] [--seconds 60] [--layout 100|each|both]
                              [--smoke] [--json]

Per layout (10,000 credentials in 100 directories, and one directory each): a real
``credbroker run`` with ``[mqtt]`` pointing at a loopback mosquitto (fleet settings, as
``benchmarks.scale``) and a ``mosquitto_sub`` subscribed to everything. Once every retained
state and first-sight event has reached the subscriber and the daemon has gone quiet (a 1 s
window under 1 % of a core), its CPU is read over ``--seconds``:

- ``idle_cpu_percent``: all of the process's CPU over the window (``/proc/PID/stat``), as
  :func:`benchmarks.common.idle_cpu_percent` measures it for the scale benchmark;
- ``loop_thread_ms`` and ``other_threads_ms``: the event loop's thread (nanoseconds, from
  its ``schedstat``) and the rest (worker threads that stat files for the resync; threads
  that ended during the window count here too);
- ``loop_wakeups_per_s``: how often the event loop's thread was scheduled in (its
  ``schedstat`` timeslices): each is one wake-up, with nothing to do or not;
- ``busiest_s_ms``: the process's busiest 1 s sample (a resync lands in one);
  ``quiet_loop_us_per_s``: the event loop thread's median 1 s sample (the timers that fire
  when there is nothing to do).

Then, in-process and without MQTT, on the same tree: the CPU of one resync (the stat of
every file, nothing changed) and of one full re-hash, as ``time.process_time`` (every
thread of the process) around ``Engine.resync``, the median of ``--rounds``; and what those
two cost per minute at the default ``resync_interval`` (30 s) and ``full_rehash_every``
(10), the share of the idle budget (0.3 % of a core: 180 ms a minute) that they take.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from benchmarks.common import config_toml, cpu_seconds, make_tree, markdown, rss_mb
from benchmarks.scale import FLEET_SETTINGS, IDLE_THRESHOLD, PREFIX, Counter, Received
from broker import Broker
from broker.config import load_config
from broker.engine.tuning import EngineTuning

if TYPE_CHECKING:
    from tests.mosquitto import Mosquitto

#: The target: 0.3 % of a core.
TARGET_PERCENT = 0.3
#: ``[broker] resync_interval``'s default (SPEC), seconds.
RESYNC_INTERVAL = 30.0


def _thread_ns(pid: int, tid: int) -> tuple[int, int]:
    """(ns on a CPU, timeslices) of one thread, from its ``schedstat``."""
    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return int(fields[0]), int(fields[2])


class Sampler:
    """CPU of a process (clock ticks) and of its event loop's thread (ns), once a second."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.process_s: list[float] = []  # process CPU seconds of each 1 s sample
        self.loop_ns: list[int] = []  # the loop thread's CPU ns of each 1 s sample

    def window(self, seconds: float) -> dict[str, Any]:
        pid = self.pid
        cpu0, (loop0, slices0), start = cpu_seconds(pid), _thread_ns(pid, pid), time.monotonic()
        cpu, loop, slices, deadline = cpu0, loop0, slices0, start + seconds
        while (now := time.monotonic()) < deadline:
            time.sleep(min(1.0, deadline - now))
            cpu_now, (loop_now, slices) = cpu_seconds(pid), _thread_ns(pid, pid)
            self.process_s.append(cpu_now - cpu)
            self.loop_ns.append(loop_now - loop)
            cpu, loop = cpu_now, loop_now
        elapsed = time.monotonic() - start
        total_ms = 1000 * (cpu - cpu0)
        loop_ms = (loop - loop0) / 1e6
        return {
            "window_s": round(elapsed, 1),
            "idle_cpu_percent": round(100 * (cpu - cpu0) / elapsed, 3),
            "cpu_ms_per_minute": round(total_ms * 60 / elapsed, 1),
            "loop_thread_ms": round(loop_ms, 1),
            # /proc/PID/stat counts in clock ticks (10 ms), schedstat in ns: the difference
            # can come out a tick negative.
            "other_threads_ms": round(max(0.0, total_ms - loop_ms), 1),
            "loop_wakeups_per_s": round((slices - slices0) / elapsed, 1),
            "busiest_s_ms": round(1000 * max(self.process_s, default=0.0), 1),
            "quiet_loop_us_per_s": round(statistics.median(self.loop_ns or [0]) / 1e3),
            # Where the bursts fell (the JSON only): the loop thread's ms in each second.
            "loop_ms_by_second": [round(ns / 1e6, 1) for ns in self.loop_ns],
        }


def daemon_figures(
    root: Path, paths: list[Path], server: Mosquitto, seconds: float
) -> dict[str, Any]:
    count = len(paths)
    config = root / "broker.toml"
    extra = f'[mqtt]\nurl = "{server.url}"\nbuffer = {4 * count}\n'
    config.write_text(config_toml(root / "state", paths, extra))
    sub = Counter(server.port, f"{PREFIX}/#")
    sub.wait_subscribed()
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        stderr=subprocess.DEVNULL,
    )
    try:
        def complete(records: list[Received]) -> bool:
            return (len({r.name for r in records if r.kind == "state"}) >= count
                    and len({r.name for r in records if r.kind == "event"}) >= count)

        if not sub.wait(complete, 300):
            raise RuntimeError("start-up delivery did not complete within 300 s")
        delivered = time.monotonic() - started
        while True:  # the first 1 s window under the threshold
            before = cpu_seconds(proc.pid)
            time.sleep(1)
            if cpu_seconds(proc.pid) - before < IDLE_THRESHOLD:
                break
            if time.monotonic() - started > 300:
                raise RuntimeError("the daemon did not go idle within 300 s")
        figures = {"delivered_s": round(delivered, 1),
                   "idle_after_s": round(time.monotonic() - started, 1)}
        figures.update(Sampler(proc.pid).window(seconds))
        figures["vmrss_mb"] = rss_mb(proc.pid)["VmRSS"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sub.close()
    return figures


async def resync_figures(root: Path, paths: list[Path], rounds: int) -> dict[str, Any]:
    """CPU of one resync and one full re-hash, in-process (no MQTT)."""
    config_path = root / "broker-inproc.toml"
    config_path.write_text(config_toml(root / "state-inproc", paths))
    broker = Broker(load_config(config_path))
    async with broker:
        engine = broker.engine
        await engine.quiesce()
        stat, full = [], []
        for _ in range(rounds):
            cpu = time.process_time()
            await engine.resync()
            await engine.quiesce()
            stat.append(time.process_time() - cpu)
        for _ in range(max(1, rounds // 2)):
            cpu = time.process_time()
            await engine.resync(full=True)
            await engine.quiesce()
            full.append(time.process_time() - cpu)
    resync_ms = 1000 * statistics.median(stat)
    full_ms = 1000 * statistics.median(full)
    every = EngineTuning().full_rehash_every
    # A minute holds 60 / interval resyncs; one in `every` of them is a full re-hash instead.
    per_minute = 60 / RESYNC_INTERVAL * ((every - 1) * resync_ms + full_ms) / every
    return {
        "resync_cpu_ms": round(resync_ms, 2),
        "full_rehash_cpu_ms": round(full_ms, 1),
        "resync_us_per_file": round(1000 * resync_ms / len(paths), 2),
        "resyncs_ms_per_minute": round(per_minute, 1),
        "resyncs_share_of_budget": f"{100 * per_minute / (600 * TARGET_PERCENT):.0f} %",
    }


def run(count: int, seconds: float, layouts: list[str], rounds: int = 5) -> dict[str, Any]:
    """Each layout: a daemon's idle window, then the in-process resync figures."""
    from tests.mosquitto import Mosquitto

    results: dict[str, Any] = {"count": count, "seconds": seconds, "layouts": {}}
    for layout in layouts:
        directories = min(100, count) if layout == "100" else count
        with tempfile.TemporaryDirectory(prefix="credbroker-idle-") as tmp:
            root = Path(tmp)
            paths = make_tree(root / "creds", count, directories)
            server = Mosquitto(root / "mqtt", extra=list(FLEET_SETTINGS)).start()
            try:
                row = daemon_figures(root, paths, server, seconds)
            finally:
                server.kill()
            row.update(anyio.run(resync_figures, root, paths, rounds))
        label = "100 dirs" if layout == "100" else "a dir each"
        results["layouts"][f"{count} in {label}"] = row
    return results


COLUMNS = [
    "layout",
    "idle_cpu_percent",
    "cpu_ms_per_minute",
    "loop_thread_ms",
    "other_threads_ms",
    "loop_wakeups_per_s",
    "busiest_s_ms",
    "quiet_loop_us_per_s",
    "resync_cpu_ms",
    "resync_us_per_file",
    "full_rehash_cpu_ms",
    "resyncs_ms_per_minute",
    "resyncs_share_of_budget",
    "idle_after_s",
    "vmrss_mb",
]


def table(results: dict[str, Any]) -> str:
    rows = [{"layout": k, **v} for k, v in results["layouts"].items()]
    return markdown(rows, COLUMNS) + (
        f"\n\nwindow: {results['seconds']:g} s; target: idle_cpu_percent <= {TARGET_PERCENT} "
        f"({600 * TARGET_PERCENT:g} ms a minute); load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="the idle window")
    parser.add_argument("--layout", choices=("100", "each", "both"), default="both",
                        help="100 directories, one directory per file, or both")
    parser.add_argument("--rounds", type=int, default=5, help="in-process resyncs timed")
    parser.add_argument("--smoke", action="store_true", help="200 credentials, a 2 s window")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    layouts = ["100", "each"] if args.layout == "both" else [args.layout]
    count, seconds, rounds = (200, 2.0, 2) if args.smoke else (args.count, args.seconds,
                                                              args.rounds)
    results = run(count, seconds, layouts, rounds)
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

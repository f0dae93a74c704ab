"""Where the daemon's memory goes at N credentials, and its peak RSS.

    python -m benchmarks.memory [--count 10000] [--frames 5] [--top 12] [--no-mqtt] [--no-trace]
                               [--smoke]

For each layout (N credentials in 100 directories, and in N directories), with ``[mqtt]``
pointing at a loopback mosquitto (fleet settings) when one can be started:

- **the daemon**: ``credbroker run`` as a subprocess, from an empty state directory (first
  start) and again on the store that run left (restart). Each is stopped (SIGTERM) once it is
  idle (the first 1 s window under 1 % of a core after every credential's retained state
  and first-sight event reached a ``mosquitto_sub``, or after "broker started" without MQTT).
  Printed: RSS when idle, the high-water mark before the stop (``VmHWM``) and the peak over
  its whole life, the clean stop included (``ru_maxrss``, from ``wait4`` in a small
  launcher: see ``_LAUNCHER``);
- **tracemalloc**, in a fresh interpreter that imports what the daemon imports, then loads
  the config and runs the broker the same way: the traced size of the loaded config (and
  per credential), the traced peak of loading it, the traced peak of the broker's start-up
  (every file read, the first events committed and published, MQTT drained), and the
  allocation sites at that peak, each attributed to the innermost frame in ``broker/`` (or
  the innermost frame when none is), largest first.

Tracemalloc sees Python's allocations only (not a C library's own, nor the interpreter's
and libraries' code): the RSS figures are the truth, the traced ones say where it goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter as Tally
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from benchmarks.common import config_toml, cpu_seconds, make_tree, markdown, rss_mb

if TYPE_CHECKING:
    from benchmarks.scale import Counter
    from tests.mosquitto import Mosquitto

#: "Idle" once a 1 s window of the daemon's CPU stays under this share of a core.
IDLE_THRESHOLD = 0.01
#: The broker's own source files, where an allocation is attributed when one is on its stack.
_BROKER_DIR = str(Path(__file__).resolve().parent.parent / "broker") + os.sep
_MB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# The daemon, from outside


def _wait_idle(pid: int, started: float, limit: float = 120.0) -> float:
    """Seconds from ``started`` to the first 1 s window under the idle threshold."""
    while True:
        before, at = cpu_seconds(pid), time.time()
        time.sleep(1)
        if cpu_seconds(pid) - before < IDLE_THRESHOLD or time.time() - started > limit:
            return round(at - started, 3)


#: Runs argv[1:] under this interpreter and reports its ``ru_maxrss``. Linux folds the
#: high-water RSS of the address space a process execs *from* into its ``ru_maxrss``: the
#: daemon spawned straight from this (large) process would report at least our size. So a
#: small launcher (no site, no imports beyond the builtins) forks and execs it, and reports.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
print(pid, flush=True)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}),
      flush=True)
"""


def daemon_run(
    config: Path, count: int, sub: Counter | None, *, events: bool = True
) -> dict[str, Any]:
    """One ``credbroker run`` from start to a clean stop once idle: its memory figures.

    ``events``: first-sight events are expected at the subscriber (a first start; a restart
    on unchanged files publishes only the retained states).
    """
    if sub is not None:
        with sub.changed:
            sub.received.clear()
    started = time.time()
    launcher = subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, "-m", "broker", "run", "-c", str(config),
         "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert launcher.stdout is not None and launcher.stderr is not None
    pid = int(launcher.stdout.readline())
    up = threading.Event()

    def drain() -> None:
        assert launcher.stderr is not None
        for line in launcher.stderr:
            if '"broker started"' in line:
                up.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    figures: dict[str, Any] = {}
    try:
        if not up.wait(300):
            raise RuntimeError("the daemon did not start")
        figures["started_s"] = round(time.time() - started, 3)
        if sub is not None:
            def complete(records: list[Any]) -> bool:
                states = {r.name for r in records if r.kind == "state"}
                seen = {r.name for r in records if r.kind == "event"}
                return len(states) >= count and (not events or len(seen) >= count)

            figures["mqtt_complete"] = sub.wait(complete, 300)
        figures["idle_after_s"] = _wait_idle(pid, started)
        status = rss_mb(pid)
        figures["idle_rss_mb"] = status["VmRSS"]
        figures["hwm_mb"] = status["VmHWM"]
    finally:
        os.kill(pid, signal.SIGTERM)
        try:
            report = launcher.stdout.readline()
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            launcher.wait()
            raise
        reader.join(timeout=10)
    done = json.loads(report)
    # Linux reports ru_maxrss in KiB.
    figures["peak_rss_mb"] = round(done["maxrss_kb"] / 1024, 1)
    figures["exit_code"] = done["code"]
    return figures


# --------------------------------------------------------------------------------------------
# tracemalloc, in a fresh interpreter (``--trace``)


def _site(traceback: tracemalloc.Traceback) -> str:
    """Where an allocation is charged: the innermost frame in broker/, else the innermost."""
    frames = list(reversed(traceback))  # a Traceback runs from the oldest frame
    mine = next((f for f in frames if f.filename.startswith(_BROKER_DIR)), frames[0])
    name = mine.filename
    if name.startswith(_BROKER_DIR):
        name = "broker/" + name[len(_BROKER_DIR):]
    elif "site-packages" + os.sep in name:
        name = name.split("site-packages" + os.sep, 1)[1]
    else:
        name = os.path.basename(name)
    return f"{name}:{mine.lineno}"


def top_sites(snapshot: tracemalloc.Snapshot, top: int) -> list[dict[str, Any]]:
    """The ``top`` allocation sites of ``snapshot`` by size, as attributed by :func:`_site`."""
    # Grouped by traceback first (a few thousand distinct ones among a million blocks),
    # then by site.
    by_traceback = snapshot.statistics("traceback")
    size: Tally[str] = Tally()
    count: Tally[str] = Tally()
    for stat in by_traceback:
        site = _site(stat.traceback)
        size[site] += stat.size
        count[site] += stat.count
    return [
        {"site": site, "mb": round(bytes_ / _MB, 2), "blocks": count[site]}
        for site, bytes_ in size.most_common(top)
    ]


class PeakSampler:
    """A thread that keeps, per phase, a snapshot of the largest traced heap seen.

    A snapshot is taken whenever the traced size grew past the phase's last one by ``step``:
    the one kept is within that of the phase's true peak, and says what was in memory then.
    """

    def __init__(self, step: float = 1.15, interval: float = 0.05) -> None:
        self._step = step
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._phase = ""
        #: phase -> (traced bytes, the snapshot at that size)
        self.peaks: dict[str, tuple[int, tracemalloc.Snapshot]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def phase(self, name: str) -> None:
        """From now on, peaks count for ``name``."""
        with self._lock:
            self._phase = name

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                current, _ = tracemalloc.get_traced_memory()
                best = self.peaks.get(self._phase, (0, None))[0]
                if self._phase and current > best * self._step:
                    self.peaks[self._phase] = (current, tracemalloc.take_snapshot())


def _import_like_the_daemon(with_mqtt: bool) -> None:
    """What ``credbroker run`` imports before it reads the config, and its sinks."""
    import broker.cli.main

    if with_mqtt:
        import broker.sinks.consumer_reports
        import broker.sinks.mqtt  # noqa: F401


def trace_child(config_path: Path, frames: int, top: int) -> dict[str, Any]:
    """Child: the tracemalloc figures of one load and one start-up of the broker."""
    text = config_path.read_text()
    _import_like_the_daemon("[mqtt]" in text)
    from broker import Broker
    from broker.config import load_config

    # VmHWM, not ru_maxrss: that one starts at the size of the process that spawned us.
    figures: dict[str, Any] = {"imports_rss_mb": rss_mb(os.getpid())["VmHWM"]}
    tracemalloc.start(frames)
    base, _ = tracemalloc.get_traced_memory()
    config = load_config(config_path)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    count = len(config.credentials)
    figures["config_mb"] = round((current - base) / _MB, 2)
    figures["config_bytes_per_credential"] = round((current - base) / count)
    figures["config_load_peak_mb"] = round((peak - base) / _MB, 2)
    figures["config_sites"] = top_sites(tracemalloc.take_snapshot(), top)
    tracemalloc.reset_peak()

    sampler = PeakSampler()

    async def serve() -> None:
        broker = Broker(config)
        sampler.phase("start-up")
        async with broker:
            await broker.engine.quiesce()
            mqtt = broker.sinks.get("mqtt")
            deadline = time.monotonic() + 300
            # Until the publisher has every event acknowledged (or there is none): polled,
            # as a benchmark looks from outside.
            while mqtt is not None and mqtt.health().pending and time.monotonic() < deadline:  # noqa: ASYNC110
                await anyio.sleep(0.1)
            await anyio.sleep(0.5)
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
            figures["startup_peak_mb"] = round((peak - base) / _MB, 2)
            figures["running_mb"] = round((current - base) / _MB, 2)
            tracemalloc.reset_peak()
            sampler.phase("stop")
        _, peak = tracemalloc.get_traced_memory()
        figures["stop_peak_mb"] = round((peak - base) / _MB, 2)

    with sampler:
        anyio.run(serve)
    for phase, (size, snapshot) in sampler.peaks.items():
        figures[f"{phase}_sites"] = top_sites(snapshot, top)
        figures[f"{phase}_snapshot_mb"] = round((size - base) / _MB, 2)
    figures["hwm_mb"] = rss_mb(os.getpid())["VmHWM"]
    return figures


def traced(config: Path, frames: int, top: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--trace", str(config),
         "--frames", str(frames), "--top", str(top)],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the tracemalloc child failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------


def _start_mosquitto(directory: Path) -> Mosquitto | None:
    try:
        from benchmarks.scale import FLEET_SETTINGS
        from tests.mosquitto import Mosquitto

        return Mosquitto(directory, extra=list(FLEET_SETTINGS)).start()
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"no mosquitto ({exc}); measuring without MQTT", file=sys.stderr)
        return None


def run_layout(
    count: int, directories: int, *, mqtt: bool, frames: int, top: int, trace: bool = True
) -> dict[str, Any]:
    """Every figure of one layout (see the module docstring)."""
    from benchmarks.scale import PREFIX, Counter

    with tempfile.TemporaryDirectory(prefix="credbroker-memory-") as tmp:
        root = Path(tmp)
        paths = make_tree(root / "creds", count, directories)
        server = _start_mosquitto(root / "mqtt") if mqtt else None
        sub: Counter | None = None
        try:
            extra = ""
            if server is not None:
                extra = f'[mqtt]\nurl = "{server.url}"\nbuffer = {4 * count}\n'
                sub = Counter(server.port, f"{PREFIX}/#")
                sub.wait_subscribed()
            config = root / "broker.toml"
            config.write_text(config_toml(root / "state", paths, extra))
            row: dict[str, Any] = {"mqtt": server is not None}
            row["first_start"] = daemon_run(config, count, sub)
            row["restart"] = daemon_run(config, count, sub, events=False)
            if trace:
                fresh = root / "broker-traced.toml"
                fresh.write_text(config_toml(root / "state-traced", paths, extra))
                row["traced"] = traced(fresh, frames, top)
        finally:
            if sub is not None:
                sub.close()
            if server is not None:
                server.kill()
    return row


def run(
    count: int,
    *,
    mqtt: bool = True,
    frames: int = 5,
    top: int = 12,
    smoke: bool = False,
    trace: bool = True,
) -> dict[str, Any]:
    """Both layouts (``smoke``: the 100-directory one only; ``trace``: tracemalloc too)."""
    layouts = [("100 dirs", min(100, count)), (f"{count} dirs", count)][: 1 if smoke else 2]
    results: dict[str, Any] = {"count": count, "layouts": {}}
    for label, directories in layouts:
        print(f"memory: {label} ...", file=sys.stderr)
        results["layouts"][label] = run_layout(
            count, directories, mqtt=mqtt, frames=frames, top=top, trace=trace
        )
    return results


COLUMNS = [
    "layout",
    "mqtt",
    "run",
    "idle_rss_mb",
    "hwm_mb",
    "peak_rss_mb",
    "started_s",
    "idle_after_s",
]
TRACED_COLUMNS = [
    "layout",
    "imports_rss_mb",
    "config_mb",
    "config_bytes_per_credential",
    "config_load_peak_mb",
    "startup_peak_mb",
    "running_mb",
    "stop_peak_mb",
]


def table(results: dict[str, Any]) -> str:
    rows, traced_rows, sites = [], [], []
    for layout, row in results["layouts"].items():
        for run_name in ("first_start", "restart"):
            rows.append({"layout": layout, "mqtt": row["mqtt"], "run": run_name,
                         **row[run_name]})
        t = row.get("traced")
        if t is not None:
            traced_rows.append({"layout": layout, **t})
            for when in ("config", "start-up", "stop"):
                for s in t.get(f"{when}_sites", []):
                    sites.append({"layout": layout, "when": when, **s})
    out = [
        f"{results['count']} credentials; RSS in MB (peak_rss_mb: ru_maxrss over the "
        "daemon's life, its clean stop included)",
        "",
        markdown(rows, COLUMNS),
        "",
        "tracemalloc (MB of Python allocations; imports_rss_mb is RSS before the config)",
        "",
        markdown(traced_rows, TRACED_COLUMNS),
        "",
        "allocation sites: of the loaded config, and at the traced peaks of start-up and stop",
        "",
        markdown(sites, ["layout", "when", "site", "mb", "blocks"]),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=5, help="tracemalloc frames per trace")
    parser.add_argument("--top", type=int, default=12, help="allocation sites printed")
    parser.add_argument("--no-mqtt", action="store_true", help="no [mqtt] (no mosquitto)")
    parser.add_argument("--no-trace", action="store_true", help="the daemon's RSS only")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trace", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trace:
        print(json.dumps(trace_child(args.trace, args.frames, args.top)))
        return 0
    count = 200 if args.smoke else args.count
    results = run(count, mqtt=not args.no_mqtt, frames=args.frames, top=args.top,
                  smoke=args.smoke, trace=not args.no_trace)
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine's own CPU, in process and without MQTT: start-up, then mass rotations.

    python -m benchmarks.engine_cpu [--count 10000] [--dirs 100] [--rounds 3]
                                    [--gc default|cli] [--log json|text|none]
                                    [--writer paced|burst] [--resync-interval SECONDS]
                                    [--profile startup|rotate] [--smoke] [--json]

A :class:`~broker.app.Broker` with no sinks but the bus watches ``--count`` token files in
``--dirs`` directories. Measured with ``getrusage`` (CPU seconds of this process, every
thread, so the reads offloaded to worker threads count too; the writer is another process
and does not):

* the config load;
* start-up: from entering the broker to every first-sight event on the bus (every file
  read, fingerprinted and evaluated once);
* ``--rounds`` mass rotations: a child process rewrites every file by atomic rename, as
  fast as it can; from its start to every ``refreshed`` event on the bus. ``--writer
  burst`` writes every temporary file first (not measured), then renames them all.

Each rotation also reports how many batches the engine committed it in. That number
decides much of the cost: a batch has a fixed cost (two thread hand-offs, an fsync'ed
journal line, a dozen event-loop turns) of several credentials' worth, so an engine that
keeps pace with the writer (small batches) spends up to twice the CPU per credential of
one that fell behind (a few large batches); which one a run gets depends on the machine's
load. Compare runs with similar batch counts. The resync (``--resync-interval``, an hour
by default here against the daemon's 30 s) is kept out of the rotations: it re-stats
every file and marks the changed ones as scans (a /proc walk per batch).

The path measured is inotify event -> watcher -> work queue -> read -> observe ->
transition -> commit (sequence, journal, fsync) -> event payload -> bus; the MQTT
publisher's share is measured by ``benchmarks.scale`` and ``benchmarks.mqtt_clients``.

Logging is configured as ``credbroker run --log-format json`` (what ``benchmarks.scale``
runs) at ``info``, into a file: one line per event is part of the daemon's cost;
``--log none`` leaves logging unconfigured (an embedding application's default).

Garbage collection is timed through ``gc.callbacks`` (its seconds are inside the CPU
figures). ``--gc cli`` applies the heap policy of ``credbroker run``
(:func:`broker.cli.heap.building`) around the same phases the CLI does: the config load and
entering the broker (no automatic collection while each builds, then a settle);
``default`` leaves the interpreter's collector as it is (what an application embedding
:class:`~broker.app.Broker` gets). ``--profile`` prints a
pyinstrument profile (``pip install -e '.[bench]'``) of one phase; profiling inflates
the CPU figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, AsyncExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import anyio

from benchmarks.common import config_toml, make_tree
from broker.app import Broker
from broker.cli import heap, logs
from broker.config import load_config

#: The writer: every path rewritten by atomic rename (temporary file, then ``rename``).
#: ``burst``: every temporary file is written first, then (once told on stdin) all renamed.
ROTATE = r"""
import os, sys
mode, tag, paths = sys.argv[1], sys.argv[2].encode(), sys.argv[3:]
def write(i, p):
    fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"rotated-%s-%d" % (tag, i))
    os.close(fd)
if mode == "burst":
    for i, p in enumerate(paths):
        write(i, p)
    print("ready", flush=True)
    sys.stdin.readline()
for i, p in enumerate(paths):
    if mode != "burst":
        write(i, p)
    os.replace(p + ".tmp", p)
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class GcClock:
    """Seconds spent in each generation's collections, through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.perf_counter() - self._started
            self.count[generation] += 1

    @contextmanager
    def installed(self) -> Iterator[GcClock]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)

    def snapshot(self) -> tuple[list[float], list[int]]:
        return list(self.seconds), list(self.count)


def _since(clock: GcClock, before: tuple[list[float], list[int]]) -> dict[str, Any]:
    seconds, count = clock.snapshot()
    return {
        "gc_s": round(sum(seconds) - sum(before[0]), 3),
        "gc_gen2_s": round(seconds[2] - before[0][2], 3),
        "gc_collections": [c - b for c, b in zip(count, before[1], strict=True)],
    }


class _Profile:
    def __init__(self, wanted: bool) -> None:
        self._profiler: Any = None
        if wanted:
            import pyinstrument

            self._profiler = pyinstrument.Profiler(interval=0.0005, async_mode="disabled")

    def __enter__(self) -> None:
        if self._profiler is not None:
            self._profiler.start()

    def __exit__(self, *exc: object) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            print(self._profiler.output_text(unicode=False, color=False), file=sys.stderr)


def _heap_policy(gc_policy: str) -> AbstractContextManager[None]:
    """What ``credbroker run`` does around building its heap (``cli``), or nothing."""
    return heap.building() if gc_policy == "cli" else nullcontext()


async def measure(
    count: int,
    dirs: int,
    rounds: int,
    gc_policy: str,
    log: str,
    profile: str | None,
    writer: str = "paced",
    resync_interval: float = 3600.0,
) -> dict[str, Any]:
    clock = GcClock()
    with tempfile.TemporaryDirectory(prefix="credbroker-engine-cpu-") as tmp, clock.installed():
        root = Path(tmp)
        if log != "none":
            log_file = (root / "broker.log").open("w", encoding="utf-8")
            logs.configure("info", "json" if log == "json" else "text", stream=log_file)
        paths = make_tree(root / "tree", count, dirs)
        config_path = root / "broker.toml"
        extra = f'resync_interval = "{resync_interval:g}s"\n'
        config_path.write_text(config_toml(root / "state", paths, extra))
        result: dict[str, Any] = {
            "count": count, "dirs": dirs, "gc": gc_policy, "log": log, "writer": writer,
            "resync_interval_s": resync_interval,
        }

        gc_before, c0 = clock.snapshot(), cpu()
        with _heap_policy(gc_policy):
            config = load_config(config_path)
        result["load_config"] = {"cpu_s": round(cpu() - c0, 3), **_since(clock, gc_before)}

        broker = Broker(config)
        events = broker.subscribe(buffer=4 * count)
        gc_before, c1, t1 = clock.snapshot(), cpu(), time.perf_counter()
        with _Profile(profile == "startup"):
            async with AsyncExitStack() as stack:
                with _heap_policy(gc_policy):
                    await stack.enter_async_context(broker)
                with anyio.fail_after(600):
                    for _ in range(count):
                        await events.get()
                result["startup"] = {
                    "cpu_s": round(cpu() - c1, 3),
                    "wall_s": round(time.perf_counter() - t1, 3),
                    **_since(clock, gc_before),
                }
                await broker.engine.quiesce()
                batches = _count_batches(broker)
                result["rounds"] = []
                for n in range(rounds):
                    await anyio.sleep(0.5)  # the journal's and the store's own settling
                    while events.get_nowait() is not None:
                        pass
                    with _Profile(profile == "rotate" and n == rounds - 1):
                        batches.clear()
                        rotated = await _rotate(broker, events, paths, n, clock, writer)
                        rotated["batches"] = len(batches)
                        result["rounds"].append(rotated)
        if log != "none":
            logs.configure("warning", stream=sys.stderr)
            log_file.close()
    if gc_policy == "cli":
        gc.unfreeze()  # what runs after this in the process starts from a plain collector
    cpus = [r["cpu_us_per_credential"] for r in result["rounds"]]
    result["cpu_us_per_credential"] = min(cpus) if cpus else None
    return result


def _count_batches(broker: Broker) -> list[int]:
    """Count the store's journal writes (one per committed batch) from now on."""
    store = broker.store
    record = store.record
    batches: list[int] = []

    def counted(changed: Any, sequence: int, *rest: Any) -> None:
        batches.append(sequence)
        record(changed, sequence, *rest)

    store.record = counted  # type: ignore[method-assign]
    return batches


async def _rotate(
    broker: Broker, events: Any, paths: list[Path], n: int, clock: GcClock, writer_mode: str
) -> dict[str, Any]:
    # Popen returns once the child is forked: nothing here waits for it to run.
    writer = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-c", ROTATE, writer_mode, str(n), *map(str, paths)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    if writer_mode == "burst":
        assert await anyio.to_thread.run_sync(writer.stdout.readline) == "ready\n"
        await anyio.sleep(0.5)  # the temporary files' events are not what is measured
    gc_before, c0, t0 = clock.snapshot(), cpu(), time.perf_counter()
    overflows = broker.engine.watcher.overflows
    writer.stdin.close()
    want = {f"c{i}" for i in range(len(paths))}
    try:
        with anyio.fail_after(600):
            while want:
                event = await events.get()
                if event.type == "credentials.refreshed":
                    want.discard(event.subject)
    finally:
        await anyio.to_thread.run_sync(writer.wait)
    used = cpu() - c0
    return {
        "cpu_s": round(used, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
        "cpu_us_per_credential": round(used / len(paths) * 1e6, 1),
        # Each one makes every credential a scan (a /proc walk for writers): worth knowing.
        "inotify_overflows": broker.engine.watcher.overflows - overflows,
        **_since(clock, gc_before),
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"| {r['count']:,} credentials, {r['dirs']} dirs, gc {r['gc']}, log {r['log']} "
        "| CPU s | wall s "
        "| of which GC s (gen 2) | collections gen 0/1/2 | batches | inotify overflows |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, p: dict[str, Any]) -> str:
        wall = p.get("wall_s", "")
        collections = "/".join(map(str, p["gc_collections"]))
        return (f"| {name} | {p['cpu_s']} | {wall} | {p['gc_s']} ({p['gc_gen2_s']}) "
                f"| {collections} | {p.get('batches', '')} | {p.get('inotify_overflows', '')} |")

    lines.append(row("load_config", r["load_config"]))
    lines.append(row("start-up -> every first-sight event on the bus", r["startup"]))
    for n, p in enumerate(r["rounds"], 1):
        lines.append(row(f"rotation {n} -> every refreshed on the bus "
                         f"({p['cpu_us_per_credential']} µs/credential)", p))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gc", choices=("default", "cli"), default="cli", dest="gc_policy")
    parser.add_argument("--log", choices=("json", "text", "none"), default="json")
    parser.add_argument("--writer", choices=("paced", "burst"), default="paced")
    parser.add_argument("--resync-interval", type=float, default=3600.0, metavar="SECONDS")
    parser.add_argument("--profile", choices=("startup", "rotate"))
    parser.add_argument("--smoke", action="store_true", help="seconds: 200 credentials, 1 round")
    parser.add_argument("--json", action="store_true", help="print the JSON document too")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.dirs, args.rounds = 200, 10, 1
    r = anyio.run(
        measure, args.count, args.dirs, args.rounds, args.gc_policy, args.log, args.profile,
        args.writer, args.resync_interval,
    )
    print(table(r))
    if args.json:
        print(json.dumps(r, indent=2))
    return 0


def run(count: int, dirs: int = 100, rounds: int = 3, gc_policy: str = "cli") -> dict[str, Any]:
    """For ``python -m benchmarks``: the figures as ``credbroker run`` would have them."""
    return anyio.run(measure, count, dirs, rounds, gc_policy, "json", None)


if __name__ == "__main__":
    sys.exit(main())

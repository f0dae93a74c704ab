"""10,000 credentials: start-up, memory, idle CPU, inotify watches, resync, mass rotation.

    python -m benchmarks.scale [--count 10000] [--idle 60] [--smoke]

The daemon runs as a subprocess (``credbroker run``) for start-up, RSS, idle CPU and
watches, read from /proc; resync cost and mass rotation are measured in-process, where
the subscriber can count every event.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from aiomqtt import Client
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from benchmarks.common import (
    config_toml,
    idle_cpu_percent,
    inotify_watches,
    make_tree,
    markdown,
    rotate,
    rss_mb,
)
from broker import Broker
from broker.config import load_config
from tests.mosquitto import Mosquitto


def daemon_figures(root: Path, count: int, directories: int, idle: float) -> dict[str, Any]:
    paths = make_tree(root / "creds", count, directories)
    config = root / "broker.toml"
    config.write_text(config_toml(root / "state", paths))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        while True:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError("the daemon exited before it started")
            if json.loads(line).get("message") == "broker started":
                break
        startup = time.monotonic() - started
        # Let start-up work (the first snapshot write) finish before measuring idle.
        time.sleep(1)
        figures = {
            "startup_s": round(startup, 3),
            "inotify_watches": inotify_watches(proc.pid),
            "idle_cpu_percent": idle_cpu_percent(proc.pid, idle),
            **{f"{k.lower()}_mb": v for k, v in rss_mb(proc.pid).items()},
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return figures


async def in_process_figures(root: Path, count: int, directories: int) -> dict[str, Any]:
    paths = make_tree(root / "creds", count, directories)
    server = Mosquitto(root / "mqtt").start()
    try:
        return await _in_process(root, paths, server)
    finally:
        server.kill()


class _Child:
    """A helper process that talks in lines: ``ready``, then answers to what it is told."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None and process.stdin is not None
        self.process = process
        self._lines = TextReceiveStream(process.stdout)
        self._buffer = ""

    @classmethod
    async def start(cls, *args: str) -> _Child:
        process = await anyio.open_process([sys.executable, "-m", "benchmarks.scale", *args])
        child = cls(process)
        assert await child.line() == "ready"
        return child

    async def line(self) -> str:
        while "\n" not in self._buffer:
            self._buffer += await self._lines.receive()
        line, self._buffer = self._buffer.split("\n", 1)
        return line

    async def say(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((text + "\n").encode())


async def _in_process(root: Path, paths: list[Path], server: Mosquitto) -> dict[str, Any]:
    count = len(paths)
    config_path = root / "broker.toml"
    extra = f'[mqtt]\nurl = "{server.url}"\nbuffer = {4 * count}\n'
    config_path.write_text(config_toml(root / "state", paths, extra))
    config = load_config(config_path)
    broker = Broker(config)
    events = broker.subscribe(buffer=4 * count)
    # The writer and the MQTT subscriber are other processes, as in real life: in this one
    # they would compete with the broker for its event loop.
    subscriber = await _Child.start("--count-mqtt", str(server.port), str(count))
    writer = await _Child.start("--rotate", str(root / "creds"))
    async with broker:
        publisher = broker.sinks["mqtt"]
        with anyio.fail_after(60):
            # The start-up states are on their way to MQTT; let them drain first. The
            # publisher has no "drained" event to await, and this is a benchmark's setup.
            while getattr(publisher, "buffered", 0) or not getattr(publisher, "connected", False):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        while events.get_nowait() is not None:
            pass
        await subscriber.say(f"after {broker.engine.sequence}")
        t = time.perf_counter()
        await broker.engine.resync()
        await broker.engine.quiesce()
        resync = time.perf_counter() - t
        t = time.perf_counter()
        await broker.engine.resync(full=True)
        await broker.engine.quiesce()
        full = time.perf_counter() - t

        await writer.say("go")
        started = float((await writer.line()).split()[1])
        seen: dict[str, int] = {}
        with anyio.fail_after(120):
            while len(seen) < count:
                event = await events.get()
                seen[event.subject] = seen.get(event.subject, 0) + 1
        delivered = time.perf_counter() - started
        written = float((await writer.line()).split()[1]) - started
        await broker.engine.quiesce()
        while (event := events.get_nowait()) is not None:
            seen[event.subject] = seen.get(event.subject, 0) + 1
        with anyio.fail_after(120):
            _, last, distinct, duplicated = (await subscriber.line()).split()
    for child in (writer, subscriber):
        await child.process.aclose()
    return {
        "rotation_to_mqtt_s": round(float(last) - started, 3),
        "mqtt_lost": count - int(distinct),
        "mqtt_duplicated": int(duplicated),
        "resync_s": round(resync, 3),
        "full_rehash_s": round(full, 3),
        "rotation_write_s": round(written, 3),
        "rotation_to_bus_s": round(delivered, 3),
        "lost": count - len(seen),
        "duplicated": sum(n - 1 for n in seen.values()),
    }


async def _count_mqtt(port: int, count: int) -> None:
    """Child: count the rotation's events on MQTT; ``done <last> <distinct> <duplicated>``."""
    seen: dict[str, int] = {}
    last = 0.0
    async with Client("127.0.0.1", port, max_queued_incoming_messages=0) as client:
        await client.subscribe("credbroker/bench/events/+/credentials.refreshed", qos=1)
        print("ready", flush=True)
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        after = int(line.split()[1])
        with anyio.move_on_after(120):
            async for message in client.messages:
                doc = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if doc["data"]["sequence"] <= after:
                    continue  # start-up events still draining, not the rotation's
                seen[doc["id"]] = seen.get(doc["id"], 0) + 1
                last = time.perf_counter()
                if len(seen) == count:
                    break
        # Anything sent twice would arrive right behind.
        with anyio.move_on_after(0.5):
            async for message in client.messages:
                doc = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if doc["id"] in seen:
                    seen[doc["id"]] += 1
    print(f"done {last:.6f} {len(seen)} {sum(n - 1 for n in seen.values())}", flush=True)


def _rotate_all(tree: Path) -> None:
    """Child: on ``go``, rename a new version over every file; ``started``, then ``wrote``."""
    paths = sorted(tree.glob("*/*"))
    print("ready", flush=True)
    sys.stdin.readline()
    print(f"started {time.perf_counter():.6f}", flush=True)
    for i, path in enumerate(paths):
        rotate(path, f"rotated-{i}".encode())
    print(f"wrote {time.perf_counter():.6f}", flush=True)


def run(count: int, idle: float) -> dict[str, Any]:
    results: dict[str, Any] = {"count": count, "layouts": {}}
    for label, directories in (("100 dirs", min(100, count)), (f"{count} dirs", count)):
        with tempfile.TemporaryDirectory(prefix="credbroker-scale-") as tmp:
            daemon = daemon_figures(Path(tmp), count, directories, idle)
        with tempfile.TemporaryDirectory(prefix="credbroker-scale-") as tmp:
            inproc = anyio.run(in_process_figures, Path(tmp), count, directories)
        results["layouts"][label] = {**daemon, **inproc}
    return results


COLUMNS = [
    "layout",
    "startup_s",
    "vmhwm_mb",
    "vmrss_mb",
    "idle_cpu_percent",
    "inotify_watches",
    "resync_s",
    "full_rehash_s",
    "rotation_to_bus_s",
    "lost",
    "duplicated",
    "rotation_to_mqtt_s",
    "mqtt_lost",
    "mqtt_duplicated",
]


def table(results: dict[str, Any]) -> str:
    rows = [{"layout": k, **v} for k, v in results["layouts"].items()]
    return markdown(rows, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--count-mqtt", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rotate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_mqtt:
        anyio.run(_count_mqtt, *args.count_mqtt)
        return 0
    if args.rotate:
        _rotate_all(args.rotate)
        return 0
    count, idle = (200, 1.0) if args.smoke else (args.count, args.idle)
    results = run(count, idle)
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


async def _in_process(root: Path, paths: list[Path], server: Mosquitto) -> dict[str, Any]:
    count = len(paths)
    config_path = root / "broker.toml"
    extra = f'[mqtt]\nurl = "{server.url}"\nbuffer = {4 * count}\n'
    config_path.write_text(config_toml(root / "state", paths, extra))
    config = load_config(config_path)
    broker = Broker(config)
    events = broker.subscribe(buffer=4 * count)
    mqtt_seen: dict[str, int] = {}
    mqtt_done = anyio.Event()
    mqtt_last = [0.0]
    first_sequence = [2**63]
    subscribed = anyio.Event()

    async def mqtt_subscriber() -> None:
        async with Client("127.0.0.1", server.port, max_queued_incoming_messages=0) as client:
            await client.subscribe("credbroker/bench/events/+/credentials.refreshed", qos=1)
            subscribed.set()
            async for message in client.messages:
                doc = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if doc["data"]["sequence"] <= first_sequence[0]:
                    continue  # start-up events still draining, not the rotation's
                mqtt_seen[doc["id"]] = mqtt_seen.get(doc["id"], 0) + 1
                mqtt_last[0] = time.perf_counter()
                if len(mqtt_seen) == count:
                    mqtt_done.set()

    async with broker, anyio.create_task_group() as tg:
        tg.start_soon(mqtt_subscriber)
        await subscribed.wait()
        publisher = broker.sinks["mqtt"]
        with anyio.fail_after(60):
            # The start-up states are on their way to MQTT; let them drain first. The
            # publisher has no "drained" event to await, and this is a benchmark's setup.
            while getattr(publisher, "buffered", 0) or not getattr(publisher, "connected", False):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        while events.get_nowait() is not None:
            pass
        first_sequence[0] = broker.engine.sequence
        t = time.perf_counter()
        await broker.engine.resync()
        await broker.engine.quiesce()
        resync = time.perf_counter() - t
        t = time.perf_counter()
        await broker.engine.resync(full=True)
        await broker.engine.quiesce()
        full = time.perf_counter() - t

        t = time.perf_counter()
        for i, path in enumerate(paths):
            rotate(path, f"rotated-{i}".encode())
        written = time.perf_counter() - t
        seen: dict[str, int] = {}
        with anyio.fail_after(120):
            while len(seen) < count:
                event = await events.get()
                seen[event.subject] = seen.get(event.subject, 0) + 1
        delivered = time.perf_counter() - t
        await broker.engine.quiesce()
        while (event := events.get_nowait()) is not None:
            seen[event.subject] = seen.get(event.subject, 0) + 1
        with anyio.fail_after(120):
            await mqtt_done.wait()
        to_mqtt = mqtt_last[0] - t
        tg.cancel_scope.cancel()
    return {
        "rotation_to_mqtt_s": round(to_mqtt, 3),
        "mqtt_lost": count - len(mqtt_seen),
        "mqtt_duplicated": sum(n - 1 for n in mqtt_seen.values()),
        "resync_s": round(resync, 3),
        "full_rehash_s": round(full, 3),
        "rotation_write_s": round(written, 3),
        "rotation_to_bus_s": round(delivered, 3),
        "lost": count - len(seen),
        "duplicated": sum(n - 1 for n in seen.values()),
    }


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
    args = parser.parse_args(argv)
    count, idle = (200, 1.0) if args.smoke else (args.count, args.idle)
    results = run(count, idle)
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

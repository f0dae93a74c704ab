"""What a user writes without credbroker, measured the same way, in the same run.

    python -m benchmarks.baseline [--changes 200] [--count 10000] [--idle 60] [--smoke]

1. ``watchdog + paho``: a watchdog Observer thread watches the credential's directory; on
   any event for the file it re-reads it and publishes it with paho-mqtt (QoS 1). Latency
   is file change -> an MQTT subscriber; idle CPU is with ``--count`` files watched.
2. ``re-read loop``: every ``period`` seconds, re-read every file and publish what changed
   (what many SDKs do with a 60 s period). Its latency is uniform over the period: measured
   with a short period and reported scaled to 60 s; idle CPU is measured at the real 60 s.

Both serve modes run in a subprocess so their CPU can be read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from benchmarks.common import cpu_seconds, make_tree, markdown, rotate, summarize
from tests.mosquitto import Mosquitto

TOPIC = "baseline/token"


def paho_client(port: int) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


class Republish(FileSystemEventHandler):
    """The handler a user would write: on created/modified/moved-in, re-read and publish."""

    def __init__(self, client: paho.Client, names: set[str]) -> None:
        self.client = client
        self.names = names

    def _republish(self, path: str | bytes) -> None:
        if os.path.basename(str(path)) not in self.names:
            return
        try:
            data = Path(str(path)).read_bytes()
        except OSError:
            return
        self.client.publish(TOPIC, data, qos=1)

    def on_created(self, event: FileSystemEvent) -> None:
        self._republish(event.src_path)

    def on_modified(self, event: FileSystemEvent) -> None:
        self._republish(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        self._republish(event.dest_path)


def serve_watchdog(paths: list[Path], port: int) -> Any:
    client = paho_client(port)
    observer = Observer()
    handler = Republish(client, {p.name for p in paths})
    for directory in sorted({p.parent for p in paths}):
        observer.schedule(handler, str(directory), recursive=False)
    observer.start()
    return observer, client


def serve_reread(paths: list[Path], port: int, period: float, stop: threading.Event) -> None:
    client = paho_client(port)
    last: dict[Path, bytes] = {}
    while not stop.is_set():
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if last.get(path) != data:
                if path in last:
                    client.publish(TOPIC, data, qos=1)
                last[path] = data
        stop.wait(period)


def write_truncate(path: Path, data: bytes) -> None:
    """``cmd > file``: truncate at open, write in two chunks, close."""
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(0.001)
        fh.write(data[len(data) // 2 :])


def measure_latency(
    path: Path, port: int, changes: int, *, writer: Any = rotate, jitter: float = 0.0
) -> dict[str, Any]:
    """Change ``path`` and time each change until a paho subscriber has the final bytes.

    Also counts what a consumer would have to cope with: messages per change, and
    messages carrying something other than a complete version (empty or half written).
    """
    received = threading.Event()
    expected: list[bytes] = [b""]
    payloads: list[bytes] = []

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        payloads.append(message.payload)
        if message.payload == expected[0]:
            received.set()

    subscriber = paho.Client(CallbackAPIVersion.VERSION2)
    subscriber.on_message = on_message
    subscriber.connect("127.0.0.1", port)
    subscriber.subscribe(TOPIC, qos=1)
    subscriber.loop_start()
    time.sleep(0.2)  # let the subscription land (paho has no awaitable for SUBACK here)
    samples = []
    versions: set[bytes] = set()
    try:
        for i in range(changes):
            if jitter:
                time.sleep(random.uniform(0, jitter))  # a change at a random moment
            data = f"token-{i}-{os.urandom(6).hex()}".encode()
            versions.add(data)
            expected[0] = data
            received.clear()
            writer(path, data)
            started = time.perf_counter()
            if not received.wait(120):
                raise RuntimeError("the baseline never delivered")
            samples.append((time.perf_counter() - started) * 1000)
        time.sleep(0.5)  # stragglers: extra messages after the last change
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    row: dict[str, Any] = summarize(samples)
    row["messages_per_change"] = round(len(payloads) / changes, 2)
    row["partial_messages"] = sum(1 for p in payloads if p not in versions)
    return row


def latency_rows(changes: int, reread_period: float) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="credbroker-baseline-") as tmp,
        Mosquitto(Path(tmp) / "mqtt") as server,
    ):
        server.start()
        path = make_tree(Path(tmp) / "creds", 1, 1)[0]
        observer, client = serve_watchdog([path], server.port)
        try:
            for label, writer in (("atomic rename", rotate), ("cmd > file", write_truncate)):
                rows[f"watchdog + paho -> MQTT, {label}"] = measure_latency(
                    path, server.port, changes, writer=writer
                )
        finally:
            observer.stop()
            observer.join()
            client.loop_stop()
        stop = threading.Event()
        loop = threading.Thread(
            target=serve_reread, args=([path], server.port, reread_period, stop)
        )
        loop.start()
        try:
            few = max(5, changes // 20)
            measured = measure_latency(path, server.port, few, jitter=reread_period)
        finally:
            stop.set()
            loop.join()
        scale = 60.0 / reread_period
        rows[f"re-read loop, {reread_period:g} s period -> MQTT"] = measured
        rows["re-read loop, 60 s period -> MQTT (scaled)"] = {
            k: (round(v * scale, 1) if k.endswith("_ms") else v) for k, v in measured.items()
        }
    return rows


def idle_rows(count: int, idle: float) -> dict[str, Any]:
    """Both approaches serve ``count`` files; their CPU is read over the same window."""
    rows: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="credbroker-baseline-") as tmp,
        Mosquitto(Path(tmp) / "mqtt") as server,
    ):
        server.start()
        make_tree(Path(tmp) / "creds", count, min(100, count))
        procs = {}
        try:
            for mode in ("watchdog + paho", "re-read loop (60 s)"):
                serve_mode = "watchdog" if mode.startswith("watchdog") else "reread"
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.baseline",
                        "--serve",
                        serve_mode,
                        "--tree",
                        str(Path(tmp) / "creds"),
                        "--port",
                        str(server.port),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                procs[mode] = proc
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "ready"
            time.sleep(1)
            before = {mode: cpu_seconds(p.pid) for mode, p in procs.items()}
            started = time.monotonic()
            time.sleep(idle)
            elapsed = time.monotonic() - started
            for mode, p in procs.items():
                used = cpu_seconds(p.pid) - before[mode]
                rows[mode] = {"idle_cpu_percent": round(100 * used / elapsed, 3)}
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(timeout=30)
    return rows


def run(changes: int, count: int, idle: float, reread_period: float) -> dict[str, Any]:
    return {
        "latency": latency_rows(changes, reread_period),
        "idle": idle_rows(count, idle),
        "count": count,
    }


def serve(mode: str, tree: Path, port: int) -> None:
    paths = sorted(tree.glob("*/*"))
    if mode == "watchdog":
        serve_watchdog(paths, port)
        print("ready", flush=True)
        threading.Event().wait()
    else:
        stop = threading.Event()
        thread = threading.Thread(target=serve_reread, args=(paths, port, 60.0, stop), daemon=True)
        thread.start()
        print("ready", flush=True)
        threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--reread-period", type=float, default=2.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", choices=["watchdog", "reread"], help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.tree, args.port)
        return 0
    if args.smoke:
        results = run(10, 200, 1.0, 0.5)
    else:
        results = run(args.changes, args.count, args.idle, args.reread_period)
    if args.json:
        print(json.dumps(results, indent=2))
    rows = [{"path": k, **v} for k, v in results["latency"].items()]
    columns = ["path", "n", "p50_ms", "p99_ms", "max_ms", "messages_per_change", "partial_messages"]
    print(markdown(rows, columns))
    idle = [{"approach": k, **v} for k, v in results["idle"].items()]
    print(markdown(idle, ["approach", "idle_cpu_percent"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

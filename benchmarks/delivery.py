"""File change -> every consumer: in-process bus, MQTT subscriber, SSE client, with floors.

    python -m benchmarks.delivery [--changes 200] [--smoke]

One broker (in this process) with MQTT (a mosquitto this script starts on a free loopback
port) and the HTTP API. The MQTT subscriber and the SSE client run in a *separate process*,
as consumers do, and report receive times on CLOCK_MONOTONIC (``time.perf_counter`` on
Linux), which both processes share. Each change is timed from the moment the writer is done
(rename returned; close() returned for ``cmd > file``).

Floors on the same machine: a bare inotify reader (benchmarks.latency) and a raw MQTT
publish -> subscriber round trip through the same mosquitto, without the broker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from aiomqtt import Client
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from benchmarks.common import markdown, rotate, summarize
from broker import Broker
from broker.config import parse_config
from broker.sinks.http import HttpApi
from tests.mosquitto import Mosquitto

RAW_TOPIC = "bench/raw"


def write_truncate(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        fh.write(data[len(data) // 2 :])


# -- the consumer process ------------------------------------------------------------------


async def consume(mqtt_port: int, events_topic: str, sse_url: str) -> None:
    """Print ``<kind> <id> <monotonic>`` per message received, ``ready`` once subscribed."""
    subscribed = anyio.Event()
    sse_open = anyio.Event()

    def report(kind: str, ident: str) -> None:
        print(f"{kind} {ident} {time.perf_counter():.9f}", flush=True)

    async def mqtt() -> None:
        async with Client("127.0.0.1", mqtt_port) as client:
            await client.subscribe(events_topic, qos=1)
            await client.subscribe(RAW_TOPIC, qos=1)
            subscribed.set()
            async for message in client.messages:
                payload = bytes(message.payload)  # type: ignore[arg-type]
                if str(message.topic) == RAW_TOPIC:
                    report("raw", payload.decode())
                else:
                    report("mqtt", str(json.loads(payload)["data"]["sequence"]))

    async def sse() -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(sse_url) as resp:
            sse_open.set()
            async for line in resp.content:
                if line.startswith(b"id:"):
                    report("sse", line[3:].strip().decode())

    async with anyio.create_task_group() as tg:
        tg.start_soon(mqtt)
        tg.start_soon(sse)
        await subscribed.wait()
        await sse_open.wait()
        print("ready", flush=True)


# -- the measuring side --------------------------------------------------------------------


class Reports:
    """Lines from the consumer process, awaited by (kind, id)."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        self._lines = TextReceiveStream(process.stdout)
        self._buffer = ""
        self._seen: dict[tuple[str, str], float] = {}

    async def wait(self, kind: str, ident: str, limit: float = 10) -> float:
        with anyio.fail_after(limit):
            while (kind, ident) not in self._seen:
                chunk = await self._lines.receive()
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split("\n")
                for line in lines:
                    parts = line.split()
                    if len(parts) == 3:
                        self._seen[(parts[0], parts[1])] = float(parts[2])
                    elif parts == ["ready"]:
                        self._seen[("ready", "")] = time.perf_counter()
        return self._seen.pop((kind, ident))


async def measure(changes: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="credbroker-delivery-") as tmp:
        root = Path(tmp)
        server = Mosquitto(root / "mqtt").start()
        try:
            token = root / "creds" / "token"
            token.parent.mkdir()
            rotate(token, b"initial")
            config = parse_config(
                {
                    "broker": {"state_dir": str(root / "state"), "host_id": "bench"},
                    "mqtt": {"url": server.url},
                    "http": {"listen": "127.0.0.1:0"},
                    "credentials": [{"name": "svc", "files": {"token": str(token)}}],
                }
            )
            async with Broker(config) as broker, broker.subscribe(credential="svc") as bus:
                api = broker.sinks["http"]
                assert isinstance(api, HttpApi)
                topic = "credbroker/bench/events/svc/credentials.refreshed"
                sse_url = f"{api.url}/v1/events?credential=svc&type=credentials.refreshed"
                argv = [
                    sys.executable,
                    "-m",
                    "benchmarks.delivery",
                    "--consume",
                    str(server.port),
                    topic,
                    sse_url,
                ]
                async with await anyio.open_process(argv) as consumer:
                    reports = Reports(consumer)
                    await reports.wait("ready", "", limit=30)
                    writers: dict[str, Callable[[Path, bytes], None]] = {
                        "atomic rename": rotate,
                        "cmd > file": write_truncate,
                    }
                    # One unmeasured change first: the publisher's connect-time flush (online,
                    # retained states) and first-use imports would otherwise land on sample 0.
                    rotate(token, b"warm-up")
                    with anyio.fail_after(10):
                        warm = await bus.get()
                    await reports.wait("mqtt", str(warm.sequence))
                    await reports.wait("sse", str(warm.sequence))
                    for label, writer in writers.items():
                        bus_ms, mqtt_ms, sse_ms = [], [], []
                        for i in range(changes):
                            writer(token, f"{label}-{i}-{os.urandom(8).hex()}".encode())
                            started = time.perf_counter()
                            with anyio.fail_after(10):
                                event = await bus.get()
                            bus_ms.append((time.perf_counter() - started) * 1000)
                            seq = str(event.sequence)
                            mqtt_ms.append((await reports.wait("mqtt", seq) - started) * 1000)
                            sse_ms.append((await reports.wait("sse", seq) - started) * 1000)
                        rows[f"bus, {label}"] = summarize(bus_ms)
                        rows[f"MQTT subscriber, {label}"] = summarize(mqtt_ms)
                        rows[f"SSE client, {label}"] = summarize(sse_ms)
                    raw_ms = []
                    async with Client("127.0.0.1", server.port) as publisher:
                        for i in range(changes):
                            started = time.perf_counter()
                            await publisher.publish(RAW_TOPIC, str(i).encode(), qos=1)
                            raw_ms.append((await reports.wait("raw", str(i)) - started) * 1000)
                    rows["floor: raw MQTT publish -> subscriber"] = summarize(raw_ms)
                    consumer.terminate()
        finally:
            server.kill()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--consume", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consume:
        port, topic, url = args.consume
        anyio.run(consume, int(port), topic, url)
        return 0
    rows = anyio.run(measure, 10 if args.smoke else args.changes)
    if args.json:
        print(json.dumps(rows, indent=2))
    table = [{"path": k, **v} for k, v in rows.items()]
    print(markdown(table, ["path", "n", "p50_ms", "p99_ms", "max_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

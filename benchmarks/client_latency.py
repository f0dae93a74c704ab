"""Event -> callback in a consumer's worker process, through ``broker.client``, HTTP and MQTT.

    python -m benchmarks.client_latency [--changes 200] [--smoke] [--json]

Starts a real daemon (``credbroker run``, a subprocess) with its HTTP API and MQTT (a
mosquitto this script starts on a free loopback port). Two worker processes follow it, one
per transport, each as a synchronous service would: ``BrokerClient(url).follow_in_thread()``
with an ``on_event`` callback. Each change (an atomic rename) is timed from the rename to
the moment the callback ran in the worker (CLOCK_MONOTONIC, shared by the processes on
Linux); the clock starts just before the rename, so a writer preempted after it cannot make
a sample negative.

The floor, measured in the same run and the same worker process: a bare reader of the same
transport (raw aiohttp SSE lines; a raw aiomqtt subscription to the same topics) that does
no parsing, deduplication or ordering. The ratio client / floor is the client's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from benchmarks.common import markdown, rotate, summarize
from benchmarks.delivery import Reports
from broker.core.events import Event

COLUMNS = ["path", "n", "p50_ms", "p99_ms", "max_ms", "ratio_p50", "ratio_p99"]


# -- the worker process ----------------------------------------------------------------------


def follow(url: str, prefix: str) -> None:
    """Print ``<kind> <generation> <monotonic>`` once per change: the client's callback and a
    bare reader of the same transport; ``ready`` once both receive."""
    from broker.client import BrokerClient

    printed: set[tuple[str, int]] = set()
    lock = threading.Lock()  # two threads report: whole lines only

    def report(kind: str, generation: int) -> None:
        now = time.perf_counter()
        with lock:
            if (kind, generation) not in printed:  # MQTT: the state and the event topic
                printed.add((kind, generation))
                sys.stdout.write(f"{kind} {generation} {now:.9f}\n")
                sys.stdout.flush()

    def on_event(event: Event) -> None:
        if event.subject == "svc" and event.type == "credentials.refreshed":
            report("client", event.data.generation)

    client = BrokerClient(url, prefix=prefix)
    client.on_event(on_event)
    follower = client.follow_in_thread()
    try:
        anyio.run(_bare_reader, url, prefix, report, client)
    finally:
        follower.stop()


async def _bare_reader(url: str, prefix: str, report: Any, client: Any) -> None:
    async def announce_ready() -> None:
        if not await anyio.to_thread.run_sync(client.wait_ready, 50):
            raise SystemExit(f"the client never connected to {url}")
        print("ready", flush=True)

    async with anyio.create_task_group() as tg:
        if url.startswith("mqtt"):
            from aiomqtt import Client

            port = int(url.rsplit(":", 1)[1])
            async with Client("127.0.0.1", port) as mqtt:
                await mqtt.subscribe(f"{prefix}/+/state/svc", qos=1)
                await mqtt.subscribe(f"{prefix}/+/events/svc/credentials.refreshed", qos=1)
                tg.start_soon(announce_ready)
                async for message in mqtt.messages:
                    payload = message.payload
                    if isinstance(payload, bytes) and payload and not message.retain:
                        report("raw", _generation(payload))
        else:
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                f"{url}/v1/events"
            ) as response:
                tg.start_soon(announce_ready)
                async for line in response.content:
                    if line.startswith(b"data:") and b"credentials.refreshed" in line:
                        report("raw", _generation(line))


def replace_file(path: Path, text: str) -> float:
    """An atomic rename; returns the moment just before the rename, where the change is."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    started = time.perf_counter()
    os.replace(tmp, path)
    return started


def _generation(payload: bytes) -> int:
    # Found without a JSON parse: the floor does no decoding.
    at = payload.index(b'"generation":') + 13
    return int(payload[at:payload.index(b",", at)])


# -- the measuring side ----------------------------------------------------------------------


async def measure(changes: int) -> dict[str, Any]:
    from tests.client_daemon import Daemon
    from tests.mosquitto import Mosquitto

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="credbroker-client-") as tmp:
        root = Path(tmp)
        server = Mosquitto(root / "mqtt").start()
        token = root / "creds" / "token"
        token.parent.mkdir()
        rotate(token, b"initial")
        daemon = Daemon(root / "daemon", {"svc": token},
                        mqtt={"url": server.url, "topic_prefix": "bench"})
        try:
            daemon.start()
            for transport, url in (("HTTP", daemon.url), ("MQTT", server.url)):
                argv = [sys.executable, "-m", "benchmarks.client_latency", "--follow", url,
                        "bench"]
                worker = await anyio.open_process(argv, stderr=None)
                try:
                    reports = Reports(worker)
                    try:
                        # Generous: under a loaded test run (four workers on two cores),
                        # the worker's own start-up (imports, two connects) has taken most
                        # of 30 s, and twice more than 60.
                        await reports.wait("ready", "", limit=150)
                    except TimeoutError:
                        raise SystemExit(f"{transport}: the worker never became ready") from None
                    client_ms, raw_ms = [], []
                    # One content change = one generation: known without asking again.
                    last = daemon.states()["svc"]["generation"]
                    for i in range(changes + 1):
                        started = replace_file(token, f"{transport}-{i}-{os.urandom(8).hex()}")
                        last += 1
                        client_at = await reports.wait("client", str(last))
                        raw_at = await reports.wait("raw", str(last))
                        if i:  # the first change warms both paths up, unmeasured
                            client_ms.append((client_at - started) * 1000)
                            raw_ms.append((raw_at - started) * 1000)
                    floor = summarize(raw_ms)
                    ours = summarize(client_ms)
                    ours["ratio_p50"] = round(ours["p50_ms"] / max(floor["p50_ms"], 1e-9), 2)
                    ours["ratio_p99"] = round(ours["p99_ms"] / max(floor["p99_ms"], 1e-9), 2)
                    rows[f"{transport}: BrokerClient callback in a worker"] = ours
                    rows[f"{transport}: floor, bare reader in the same worker"] = floor
                finally:
                    worker.kill()
                    await worker.aclose()
        finally:
            daemon.stop()
            server.kill()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--follow", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.follow:
        follow(*args.follow)
        return 0
    rows = anyio.run(measure, 10 if args.smoke else args.changes)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown([{"path": k, **v} for k, v in rows.items()], COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

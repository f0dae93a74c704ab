"""MQTT delivery: change-to-subscriber latency, and the outbox flush after an outage.

    .venv/bin/python -m benchmarks.mqtt_latency [--changes 200] [--buffered 5000]

Starts its own mosquitto on a free loopback port (never 1883) and an in-process broker.

1. latency: a credential file is replaced (atomic rename) ``--changes`` times; for each, the
   time until the in-process bus has the event, and until an MQTT subscriber has it.
2. flush: with the MQTT server down, ``--buffered`` events are put on the bus; the server
   comes back and the time from ``online`` to the last buffered event at a subscriber is
   measured, pipelined (the publisher's window) and one publish at a time (window 1).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import anyio
from aiomqtt import Client

from broker import Broker
from broker.config import Config, MqttSettings, parse_config
from broker.core.backoff import Backoff
from broker.core.events import Event, make_event
from broker.core.topics import Topics
from broker.port import SinkContext
from broker.sinks.mqtt import WINDOW, MqttPublisher
from tests.mosquitto import Mosquitto


class FixedBackoff(Backoff):
    """Retry every ``delay`` seconds: leaves the subscriber time to connect first."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.failed = anyio.Event()

    def next(self) -> float:
        self.failed.set()
        self.failed = anyio.Event()
        return self.delay


def _config(directory: Path, server: Mosquitto, prefix: str) -> tuple[Config, MqttSettings]:
    token = directory / "token"
    token.write_text("initial")
    raw = {
        "broker": {"host_id": "bench", "state_dir": str(directory / "state")},
        "credentials": [{"name": "svc", "files": {"token": str(token)}}],
    }
    settings = parse_config({**raw, "mqtt": {"url": server.url, "topic_prefix": prefix}}).mqtt
    assert settings is not None
    return parse_config(raw), settings


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _ms(values: list[float]) -> str:
    values = sorted(values)

    def pct(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] * 1000

    return (
        f"p50 {statistics.median(values) * 1000:6.2f} ms  p95 {pct(0.95):6.2f} ms  "
        f"p99 {pct(0.99):6.2f} ms  max {values[-1] * 1000:6.2f} ms"
    )


async def wait_online(server: Mosquitto, topics: Topics) -> None:
    """Until the publisher's retained ``online`` is on the server."""
    async with Client("127.0.0.1", server.port) as client:
        await client.subscribe(topics.status, qos=1)
        with anyio.fail_after(30):
            async for message in client.messages:
                if message.payload == b"online":
                    return


async def latency(directory: Path, server: Mosquitto, changes: int) -> None:
    prefix = "bench-latency"
    config, settings = _config(directory, server, prefix)
    topic = Topics(prefix, "bench").event("svc", "credentials.refreshed")
    token = directory / "token"
    bus_times: list[float] = []
    mqtt_times: list[float] = []

    def sink(context: SinkContext) -> MqttPublisher:
        return MqttPublisher(context, settings=settings)

    async with (
        Broker(config, sinks=[sink]) as b,
        b.subscribe(credential="svc") as bus,
        Client("127.0.0.1", server.port) as sub,
    ):
        await sub.subscribe(topic, qos=1)
        messages = sub.messages
        await wait_online(server, Topics(prefix, "bench"))
        for i in range(changes):
            start = time.perf_counter()
            _atomic_write(token, f"value-{i}")
            event = await bus.get()
            bus_times.append(time.perf_counter() - start)
            with anyio.fail_after(10):
                async for message in messages:
                    got = Event.from_json(bytes(message.payload))
                    if got.id == event.id:
                        break
            mqtt_times.append(time.perf_counter() - start)
    print(f"latency over {changes} changes (file rename -> ...)")
    print(f"  in-process bus   {_ms(bus_times)}")
    print(f"  MQTT subscriber  {_ms(mqtt_times)}")


async def flush(directory: Path, server: Mosquitto, buffered: int, window: int) -> float:
    prefix = f"bench-flush-{window}"
    config, settings = _config(directory, server, prefix)
    topics = Topics(prefix, "bench")
    backoff = FixedBackoff(1.0)

    def sink(context: SinkContext) -> MqttPublisher:
        return MqttPublisher(context, settings=settings, backoff=backoff, window=window)

    async with Broker(config, sinks=[sink]) as b:
        publisher = b.sinks["mqtt"]
        assert isinstance(publisher, MqttPublisher)
        await wait_online(server, topics)
        server.kill()
        await backoff.failed.wait()
        base = b.state("svc")
        for i in range(1, buffered + 1):
            state = replace(base, sequence=base.sequence + i, generation=base.generation + i)
            event = make_event("credentials.refreshed", state, source=b.source, now=time.time())
            b.bus.publish(event)
        await anyio.sleep(0.1)  # let the pump move them
        assert publisher.buffered == buffered, publisher.buffered
        await backoff.failed.wait()  # an attempt just failed: the next is 1 s away
        server.start()
        async with Client("127.0.0.1", server.port) as sub:
            await sub.subscribe(f"{prefix}/#", qos=1)
            received = 0
            online_at = 0.0
            with anyio.fail_after(120):
                async for message in sub.messages:
                    if message.topic.value == topics.status:
                        online_at = time.perf_counter()
                    elif "/events/" in message.topic.value:
                        received += 1
                        if received == buffered:
                            break
            elapsed = time.perf_counter() - online_at
    print(
        f"flush of {buffered} buffered events, window {window:2d}: {elapsed:6.3f} s "
        f"({buffered / elapsed:8.0f} events/s)"
    )
    return elapsed


async def main(changes: int, buffered: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Mosquitto(root / "mosquitto") as server:
            server.start()
            (root / "latency").mkdir()
            await latency(root / "latency", server, changes)
            for window in (WINDOW, 1):
                (root / f"flush-{window}").mkdir()
                await flush(root / f"flush-{window}", server, buffered, window)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--buffered", type=int, default=5000)
    args = parser.parse_args()
    anyio.run(main, args.changes, args.buffered)

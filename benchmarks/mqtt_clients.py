"""MQTT clients side by side: CPU per QoS 1 publish of the publishing process.

    python -m benchmarks.mqtt_clients [--count 20000] [--size 900] [--gmqtt-path DIR] [--smoke]

One loopback mosquitto on a free port (fleet settings, so that the server loses nothing and
the count is exact), a ``mosquitto_sub`` counting in another process, and for each client a
fresh publishing process that connects (MQTT 5), publishes ``--count`` messages of
``--size`` bytes, half of them retained, each with a content type, at most the server's
Receive Maximum unacknowledged at once, and waits for every PUBACK. Printed: the CPU
(user + system, from ``getrusage``) of the publishing process per message, the wall time,
and how many messages the subscriber counted.

Clients: ``aiomqtt`` driven the way the broker drives it (a task per publish under a
window), ``paho`` driven from asyncio directly (socket callbacks on the event loop, no
aiomqtt), and ``gmqtt`` (PUBACK seen through a subclass; gmqtt ships a top-level ``tests``
package that shadows this project's, so it is measured only from ``--gmqtt-path``, a
directory made by ``pip install --target DIR gmqtt==0.8.0``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import markdown

CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
CLIENTS = ("aiomqtt", "paho", "gmqtt", "credbroker")
#: What a fleet's mosquitto needs (see the README): no silent drop of queued QoS 1 messages.
FLEET_SETTINGS = ("max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 100")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _messages(prefix: str, count: int, size: int) -> list[tuple[str, bytes, bool]]:
    body = b"x" * size
    return [
        (f"{prefix}/{'state' if i % 2 else 'events'}/c{i // 2}", body, bool(i % 2))
        for i in range(count)
    ]


# --------------------------------------------------------------------------------------------
# Publishers (each runs in its own process: ``--child NAME``)


async def _aiomqtt(port: int, messages: list[tuple[str, bytes, bool]], window: int) -> int:
    from aiomqtt import Client, ProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = CONTENT_TYPE
    async with Client("127.0.0.1", port, protocol=ProtocolVersion.V5) as client:
        client.pending_calls_threshold = window + 5
        gate = asyncio.Semaphore(window)

        async def one(topic: str, payload: bytes, retain: bool) -> None:
            try:
                await client.publish(topic, payload, qos=1, retain=retain, properties=props)
            finally:
                gate.release()

        async with asyncio.TaskGroup() as tg:
            for topic, payload, retain in messages:
                await gate.acquire()
                tg.create_task(one(topic, payload, retain))
    return window


async def _paho(port: int, messages: list[tuple[str, bytes, bool]], window: int) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    loop = asyncio.get_running_loop()
    connected = asyncio.Event()
    acked = asyncio.Event()
    inflight = 0
    receive_maximum = [window]

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, properties: Any) -> None:
        receive_maximum[0] = int(getattr(properties, "ReceiveMaximum", 65535))
        connected.set()

    def on_publish(c: Any, u: Any, mid: int, rc: Any, properties: Any) -> None:
        nonlocal inflight
        inflight -= 1
        acked.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_socket_open = lambda c, u, s: loop.add_reader(s, c.loop_read)
    client.on_socket_close = lambda c, u, s: loop.remove_reader(s)
    client.on_socket_register_write = lambda c, u, s: loop.add_writer(s, c.loop_write)
    client.on_socket_unregister_write = lambda c, u, s: loop.remove_writer(s)

    async def misc() -> None:  # keepalive and retries: paho's loop_misc, once a second
        while True:
            await asyncio.sleep(1)
            client.loop_misc()

    client.max_inflight_messages_set(window)  # only before connecting; ours bounds it anyway
    client.connect("127.0.0.1", port)
    ticker = asyncio.create_task(misc())
    await asyncio.wait_for(connected.wait(), 10)
    window = min(window, receive_maximum[0])
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = CONTENT_TYPE
    for topic, payload, retain in messages:
        while inflight >= window:
            acked.clear()
            await acked.wait()
        inflight += 1
        client.publish(topic, payload, qos=1, retain=retain, properties=props)
    while inflight:
        acked.clear()
        await acked.wait()
    client.disconnect()
    ticker.cancel()
    return window


async def _gmqtt(port: int, messages: list[tuple[str, bytes, bool]], window: int) -> int:
    from gmqtt import Client  # type: ignore[import-not-found]
    from gmqtt.mqtt.constants import MQTTv50  # type: ignore[import-not-found]

    acked = asyncio.Event()
    state = {"inflight": 0}

    class Acking(Client):  # type: ignore[misc]
        """gmqtt has no public PUBACK hook: its handler calls this private one on a PUBACK."""

        def _remove_message_from_queue(self, mid: int) -> None:
            super()._remove_message_from_queue(mid)
            state["inflight"] -= 1
            acked.set()

    client = Acking("bench-gmqtt")
    await client.connect("127.0.0.1", port, version=MQTTv50)
    # gmqtt 0.8 sizes its packet ids to the server's Receive Maximum, less one.
    window = min(window, client._package_handler.id_generator._max - 1)
    for topic, payload, retain in messages:
        while state["inflight"] >= window:
            acked.clear()
            await acked.wait()
        state["inflight"] += 1
        client.publish(topic, payload, qos=1, retain=retain, content_type=CONTENT_TYPE)
    while state["inflight"]:
        acked.clear()
        await acked.wait()
    await client.disconnect()
    return window


async def _credbroker(port: int, messages: list[tuple[str, bytes, bool]], window: int) -> int:
    import logging

    from aiomqtt import ProtocolVersion

    from broker.aio.mqtt_link import MqttLink, WillMessage
    from broker.sinks.mqtt.material import publish_properties
    from broker.sinks.mqtt.outbox import Pipeline

    link = await MqttLink.open(
        "127.0.0.1", port, client_id="bench-credbroker", protocol=ProtocolVersion.V5,
        username=None, password=None, tls_context=None,
        will=WillMessage("bench/status", b"offline", None), keepalive=60,
        logger=logging.getLogger("bench"),
    )
    pipe = Pipeline(link, min(window, link.receive_maximum), ack_timeout=60)
    props = publish_properties(ProtocolVersion.V5, CONTENT_TYPE)
    for topic, payload, retain in messages:
        await pipe.send(topic, payload, retain, props)
    await pipe.drain()
    await link.close(5)
    return pipe.size


PUBLISHERS: dict[str, Callable[[int, list[tuple[str, bytes, bool]], int], Any]] = {
    "aiomqtt": _aiomqtt,
    "paho": _paho,
    "gmqtt": _gmqtt,
    "credbroker": _credbroker,
}


def _child(name: str, port: int, prefix: str, count: int, size: int, window: int) -> None:
    messages = _messages(prefix, count, size)
    cpu, wall = _cpu(), time.perf_counter()
    used = asyncio.run(PUBLISHERS[name](port, messages, window))
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "window": used}), flush=True)


# --------------------------------------------------------------------------------------------
# The run


def measure(
    name: str, port: int, count: int, size: int, window: int, gmqtt_path: Path | None
) -> dict[str, Any]:
    prefix = f"bench/{name}{window}"
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-q", "1",
         "-t", f"{prefix}/#", "-C", str(count), "-W", "120", "-F", "%t"],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.3)  # mosquitto_sub says nothing when subscribed; it needs a moment
    env = dict(os.environ)
    if name == "gmqtt" and gmqtt_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gmqtt_path), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.mqtt_clients", "--child", name, str(port), prefix,
         str(count), str(size), str(window)],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        received, _ = sub.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # messages lost: it waits for more; count what came
        sub.kill()
        received, _ = sub.communicate()
    got = len(received.splitlines())
    return {
        "client": name,
        "window": figures["window"],
        "cpu_us_per_msg": round(1e6 * figures["cpu_s"] / count, 1),
        "wall_s": round(figures["wall_s"], 3),
        "received": got,
        "lost": count - got,
    }


def run(count: int, size: int, gmqtt_path: Path | None, windows: tuple[int, ...]) -> dict[str, Any]:
    from tests.mosquitto import Mosquitto  # the parent only: gmqtt's ``tests`` stays out

    rows = []
    with tempfile.TemporaryDirectory(prefix="credbroker-clients-") as tmp:
        server = Mosquitto(Path(tmp), extra=list(FLEET_SETTINGS)).start()
        try:
            for name in CLIENTS:
                if name == "gmqtt" and gmqtt_path is None:
                    continue
                for window in windows:
                    rows.append(measure(name, server.port, count, size, window, gmqtt_path))
        finally:
            server.kill()
    floor = min(r["cpu_us_per_msg"] for r in rows)
    for r in rows:
        r["x_fastest"] = round(r["cpu_us_per_msg"] / floor, 2) if floor else None
    return {"count": count, "size": size, "server": list(FLEET_SETTINGS), "clients": rows}


COLUMNS = ["client", "window", "cpu_us_per_msg", "x_fastest", "wall_s", "received", "lost"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=900)
    parser.add_argument("--gmqtt-path", type=Path)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, port, prefix, count, size, window = args.child
        _child(name, int(port), prefix, int(count), int(size), int(window))
        return 0
    count, windows = (200, (20,)) if args.smoke else (args.count, (20, 100))
    results = run(count, args.size, args.gmqtt_path, windows)
    if args.json:
        print(json.dumps(results, indent=2))
    print(f"{count} QoS 1 messages of {args.size} bytes, half retained, MQTT 5 content type; "
          f"mosquitto: {', '.join(FLEET_SETTINGS)}")
    print(markdown(results["clients"], COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Another MQTT server implementation than mosquitto: amqtt (MQTT 3.1.1, from PyPI).

The publish / retained state / consumer report (with a Last Will) / fleet view flow, end to
end, with the daemon's publisher told to speak MQTT 3.1.1 (amqtt does not answer its
MQTT 5 CONNECT: see the README). (nats-server's MQTT gateway is covered in test_mqtt.py:
it refuses the "." of every event topic. RabbitMQ 3.x, by its documentation, delivers
retained messages only to exact topic filters, so the wildcard subscriptions of consumer
reports and ``credbroker fleet`` get no retained messages there: see the README.)
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiomqtt import Client, ProtocolVersion

from broker.core.events import Event
from broker.sinks.mqtt import MqttPublisher
from tests.conftest import SecretRegistry, write_atomic
from tests.mosquitto import free_port
from tests.test_consumers import ids, next_of_type, report, until, will_consumer

pytestmark = pytest.mark.anyio

HOST = "test-host"
PREFIX = "other"


@pytest.fixture
def amqtt_port(tmp_path: Path) -> Iterator[int]:
    exe = shutil.which("amqtt", path=str(Path(sys.executable).parent)) or shutil.which("amqtt")
    if exe is None:
        pytest.skip("amqtt is not installed (pip install -e '.[dev]')")
    port = free_port()
    config = tmp_path / "amqtt.yaml"
    config.write_text(
        "listeners:\n  default:\n    type: tcp\n"
        f"    bind: 127.0.0.1:{port}\n"
        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )
    with open(tmp_path / "amqtt.log", "wb") as log:
        proc = subprocess.Popen([exe, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("amqtt did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_amqtt_passes_publish_retained_consumer_report_and_fleet(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, amqtt_port: int
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    mqtt = {"url": f"mqtt://127.0.0.1:{amqtt_port}", "topic_prefix": PREFIX}
    creds = [{"name": "svc", "files": {"token": str(path)}}]
    # amqtt 0.12 neither accepts nor refuses the publisher's MQTT 5 CONNECT (with its Will):
    # it waits for bytes that never come, so the publisher never learns to fall back (see
    # the README). Told to speak 3.1.1, everything else works.
    publisher = partial(MqttPublisher, protocols=(ProtocolVersion.V311,))
    async with harness_factory(creds, mqtt=mqtt, sinks=[publisher]) as h:
        await h.fence()
        reports = h.broker.sinks["consumer-reports"]
        await until(lambda: getattr(reports, "connected", False), timeout=20)
        state = h.broker.state("svc")
        # A late subscriber gets the retained state (the publisher fell back to 3.1.1).
        async with Client("127.0.0.1", amqtt_port, protocol=ProtocolVersion.V311) as sub:
            await sub.subscribe(f"{PREFIX}/+/state/+", qos=1)
            await sub.subscribe(f"{PREFIX}/{HOST}/events/svc/+", qos=1)
            with anyio.fail_after(20):
                message = await anext(sub.messages)
            retained = Event.from_json(bytes(message.payload))
            assert message.retain and retained.data.fingerprint == state.fingerprint
            # A consumer with a Last Will reports; the broker sees it and converges.
            topic = f"{PREFIX}/{HOST}/consumers/svc/far"
            with will_consumer(amqtt_port, topic, "amqtt-consumer") as consumer:
                await anyio.to_thread.run_sync(consumer.send, report(state, "far"))
                converged = await next_of_type(h, "svc", "credentials.converged")
                assert ids(converged.data) == {"far": state.generation}
                # A rotation reaches the subscriber as an event.
                write_atomic(path, secrets.token())
                with anyio.fail_after(20):
                    while True:
                        event = Event.from_json(bytes((await anext(sub.messages)).payload))
                        # (the first-sight event may still be on its way: under load
                        # the publisher can connect after this subscriber did)
                        if (event.type == "credentials.refreshed"
                                and event.data.generation > state.generation):
                            break
                assert event.data.generation == state.generation + 1
                consumer.kill()
                await until(lambda: not h.broker.state("svc").consumers, timeout=20)
        # The fleet view works against this server too (its sentinel included).
        done = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "broker", "fleet", "--mqtt", f"mqtt://127.0.0.1:{amqtt_port}",
             "--prefix", PREFIX, "--json"], capture_output=True, text=True, timeout=60))
        assert done.returncode == 0, done.stderr
        [row] = [r for r in json.loads(done.stdout)["credentials"] if r["credential"] == "svc"]
        assert (row["host"], row["credential"], row["generation"]) == (
            HOST, "svc", state.generation + 1)

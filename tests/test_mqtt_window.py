"""The publisher's window: the server's Receive Maximum, wire order, and the link under it."""

from __future__ import annotations

import logging
import secrets as pysecrets
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError

from broker.aio.mqtt_link import LinkLost, MqttLink, WillMessage, close_client, open_client
from broker.core.events import Event
from broker.core.topics import Topics
from broker.sinks.mqtt import WINDOW, MqttPublisher
from tests.conftest import SecretRegistry, write_atomic
from tests.mosquitto import (
    Mosquitto,
    Received,
    Subscriber,
    make_password_file,
    mosquitto_fixture,  # noqa: F401 - fixture "mosquitto"
)

pytestmark = pytest.mark.anyio

HOST = "test-host"  # make_config's host_id
WAIT = 10.0


def _creds(tmp_path: Path, count: int, secrets: SecretRegistry) -> list[dict[str, Any]]:
    creds = []
    for i in range(count):
        path = tmp_path / "creds" / f"c{i}" / "token"
        path.parent.mkdir(parents=True)
        write_atomic(path, secrets.token(f"c{i}"))
        creds.append({"name": f"c{i}", "files": {"token": str(path)}})
    return creds


def _events(messages: list[Received], prefix: str) -> list[Event]:
    return [Event.from_json(m.payload) for m in messages if m.topic.startswith(f"{prefix}/")
            and "/events/" in m.topic]


@pytest.mark.parametrize("receive_maximum", [2, 7])
async def test_a_burst_stays_within_the_servers_receive_maximum_and_in_order(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto: Mosquitto,
    caplog: pytest.LogCaptureFixture, receive_maximum: int,
) -> None:
    # mosquitto advertises max_inflight_messages as its Receive Maximum and drops a client
    # that has more QoS 1 publishes unacknowledged: a publisher ignoring it would reconnect
    # over and over (and a 3.1.1-only view of the window would hide it).
    mosquitto.extra = [f"max_inflight_messages {receive_maximum}", "max_queued_messages 0"]
    mosquitto.start()
    prefix = f"t{pysecrets.token_hex(4)}"
    topics = Topics(prefix, HOST)
    count = 40  # first-sight events + states + online: several windows' worth
    creds = _creds(tmp_path, count, secrets)
    names = [c["name"] for c in creds]
    caplog.set_level(logging.INFO, logger="broker.mqtt")
    async with Subscriber(mosquitto.port, [f"{prefix}/#"], secrets) as sub:
        async with harness_factory(creds, mqtt={"url": mosquitto.url, "topic_prefix": prefix}) as h:
            publisher = h.broker.sinks["mqtt"]
            assert isinstance(publisher, MqttPublisher)

            def all_events(messages: list[Received]) -> bool:
                return {e.subject for e in _events(messages, prefix)} >= set(names)

            await sub.wait_for(all_events)
            # Then a burst while connected: every credential rotated at once.
            for cred in creds:
                write_atomic(Path(cred["files"]["token"]), secrets.token(cred["name"]))
            rotated = {c["name"]: h.broker.state(c["name"]).generation + 1 for c in creds}

            def all_rotated(messages: list[Received]) -> bool:
                got = {e.subject for e in _events(messages, prefix)
                       if e.data.generation == rotated.get(e.subject)}
                return got >= set(names)

            await sub.wait_for(all_rotated, timeout=30)
            assert publisher.connects == 1  # never dropped for exceeding the window
            assert publisher.publish_failures == 0
        windows = [r.window for r in caplog.records if r.getMessage() == "mqtt connected"]
        assert windows == [min(WINDOW, receive_maximum)]
        assert publisher.in_flight_peak == min(WINDOW, receive_maximum)  # filled, never more
        events = _events(sub.messages, prefix)
        sequences = [e.sequence for e in events]
        assert sequences == sorted(sequences)  # wire order = publish order
        assert len({e.id for e in events}) == len(events)  # nothing twice
        for name in names:  # the retained state ends on the latest event
            assert sub.on(topics.state(name))[-1].payload == h.of(name)[-1].payload


async def test_the_link_reports_refusal_and_loss(
    tmp_path: Path, secrets: SecretRegistry, mosquitto: Mosquitto
) -> None:
    secret = secrets.token("mqtt-password")
    mosquitto.allow_anonymous = False
    mosquitto.password_file = make_password_file(tmp_path / "passwd", {"svc": secret})
    mosquitto.start()
    will = WillMessage("t/status", b"offline", None)

    async def link(password: str) -> MqttLink:
        with anyio.fail_after(WAIT):
            return await MqttLink.open(
                "127.0.0.1", mosquitto.port, client_id=f"c{pysecrets.token_hex(3)}",
                protocol=ProtocolVersion.V5, username="svc", password=password,
                tls_context=None, will=will, keepalive=5,
                logger=logging.getLogger("test.link"),
            )

    with pytest.raises(MqttConnectError) as refused:
        await link("wrong")
    assert "Not authorized" in str(refused.value) or "Bad user" in str(refused.value)

    ok = await link(secret)
    assert ok.receive_maximum == 20  # mosquitto's default max_inflight_messages
    acked: list[int] = []
    all_acked = anyio.Event()
    lost: list[BaseException] = []

    def on_ack(mid: int) -> None:
        acked.append(mid)
        if len(acked) == 5:
            all_acked.set()

    ok.on_ack, ok.on_lost = on_ack, lost.append
    mids = [ok.publish("t/x", b"%d" % i, False, None) for i in range(5)]
    with anyio.fail_after(WAIT):
        await all_acked.wait()
    assert acked == mids  # in order
    mosquitto.kill()
    with anyio.fail_after(WAIT):
        reason = await ok.wait_lost()
    assert lost == [reason] and isinstance(reason, LinkLost)
    with pytest.raises(LinkLost):
        ok.publish("t/x", b"late", False, None)


async def test_the_link_reports_a_server_that_closes_before_connack(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        async def accept_and_close() -> None:
            conn, _ = await anyio.to_thread.run_sync(listener.accept)
            conn.recv(1024)
            conn.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(accept_and_close)
            with pytest.raises(LinkLost), anyio.fail_after(WAIT):
                await MqttLink.open(
                    "127.0.0.1", port, client_id="x", protocol=ProtocolVersion.V5,
                    username=None, password=None, tls_context=None,
                    will=WillMessage("t/status", b"offline", None), keepalive=5,
                    logger=logging.getLogger("test.link"),
                )


async def test_the_subscribers_client_looks_at_its_timers_every_quarter_keepalive(
    mosquitto: Mosquitto,
) -> None:
    # aiomqtt's own loop would look at paho's keepalive timers every second; ours every
    # keepalive / 4, so an idle daemon's consumer-report subscriber is not woken once a second.
    mosquitto.start()
    keepalive = 12  # a look every 3 s
    with anyio.fail_after(WAIT):
        client = await open_client(
            "127.0.0.1", mosquitto.port, protocol=ProtocolVersion.V5, username=None,
            password=None, tls_context=None, client_id=f"s{pysecrets.token_hex(3)}",
            keepalive=keepalive, logger=logging.getLogger("test.client"),
        )
    looks = 0
    paho_client = client._client  # the paho client under aiomqtt's loop
    real = paho_client.loop_misc

    def loop_misc() -> Any:
        nonlocal looks
        looks += 1
        return real()

    paho_client.loop_misc = loop_misc  # type: ignore[method-assign]
    try:
        await anyio.sleep(4.5)
    finally:
        await close_client(client)
    # Every second would be 4 or 5 looks; every 3 s, 1 (2 if the loop ran late).
    assert 1 <= looks <= 2, looks

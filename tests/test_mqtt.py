"""MQTT delivery and the consumer client, against real mosquitto servers the tests start."""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from aiomqtt import Client, ProtocolVersion
from aiomqtt.exceptions import MqttConnectError
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from broker import Broker
from broker.aio.mqtt_material import describe_connect_error, is_auth_refusal, is_protocol_refusal
from broker.client import BrokerClient, CredentialCache
from broker.config import MqttSettings
from broker.core.backoff import BACKOFF_CAP, Backoff
from broker.core.events import CONTENT_TYPE, Event, make_event
from broker.core.state import State, Status
from broker.core.topics import Topics, join_topic
from broker.port import SinkContext
from broker.sinks.mqtt import MqttPublisher, Outbox
from tests.conftest import SecretRegistry, make_config, write_atomic
from tests.mosquitto import (
    Mosquitto,
    Received,
    Subscriber,
    free_port,
    make_password_file,
    make_tls,
    mosquitto_fixture,  # noqa: F401 - fixture "mosquitto"
    mosquitto_server_fixture,  # noqa: F401 - fixture "mosquitto_server"
)

pytestmark = pytest.mark.anyio

HOST = "test-host"  # make_config's host_id
WAIT = 10.0
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# helpers


def new_prefix() -> str:
    """Tests sharing one server never see each other's topics."""
    return f"t{pysecrets.token_hex(4)}"


def token_cred(tmp_path: Path, name: str, secrets: SecretRegistry) -> dict[str, Any]:
    directory = tmp_path / "creds" / name
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "token", secrets.token(name))
    return {"name": name, "files": {"token": str(directory / "token")}}


def token_path(cred: dict[str, Any]) -> Path:
    return Path(cred["files"]["token"])


def decoded(messages: list[Received], topic: str) -> list[Event]:
    return [Event.from_json(m.payload) for m in messages if m.topic == topic and m.payload]


def has_states(topics: Topics, names: list[str]) -> Callable[[list[Received]], bool]:
    def check(messages: list[Received]) -> bool:
        seen = {m.topic for m in messages}
        return topics.status in seen and all(topics.state(n) in seen for n in names)

    return check


def mqtt_settings(tmp_path: Path, **mqtt: Any) -> MqttSettings:
    settings = make_config(tmp_path, [{"name": "x", "files": {"token": "/x"}}], mqtt=mqtt).mqtt
    assert settings is not None
    return settings


async def next_event(subscription: Any, credential: str) -> Event:
    with anyio.fail_after(WAIT):
        while True:
            event: Event = await subscription.get()
            if event.subject == credential:
                return event


def observed(client: BrokerClient, registry: SecretRegistry) -> BrokerClient:
    """Every event the client takes in goes past the leak guard too."""
    client.on_event(lambda e: registry.observe(f"mqtt via BrokerClient {e.subject}", e.payload))
    return client


class SpyBackoff(Backoff):
    """The real backoff, observable, and never shorter than ``floor`` (see the outage test)."""

    def __init__(self, floor: float = 0.0) -> None:
        super().__init__()
        self.floor = floor
        self.calls = 0
        self.delays: list[float] = []
        self._called = anyio.Event()

    def next(self) -> float:
        delay = max(super().next(), self.floor)
        self.calls += 1
        self.delays.append(delay)
        self._called.set()
        self._called = anyio.Event()
        return delay

    async def wait_calls(self, count: int) -> None:
        with anyio.fail_after(WAIT):
            while self.calls < count:
                await self._called.wait()


@asynccontextmanager
async def running_broker(
    config: Any, sink: Callable[[SinkContext], MqttPublisher]
) -> AsyncIterator[tuple[Broker, MqttPublisher, Any]]:
    """A broker with one MQTT publisher made by ``sink``, and a bus subscription to all."""
    broker = Broker(config, sinks=[sink])
    # Subscribed after the start: first-sight events are not in it.
    async with broker, broker.subscribe("*") as events:
        publisher = broker.sinks["mqtt"]
        assert isinstance(publisher, MqttPublisher)
        yield broker, publisher, events


# -- the daemon as a subprocess -----------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings and numbers: JSON's syntax is valid TOML


def write_daemon_config(
    tmp_path: Path, host_id: str, credentials: list[dict[str, Any]], **mqtt: Any
) -> Path:
    lines = ["[broker]", f"host_id = {toml_value(host_id)}",
             f"state_dir = {toml_value(str(tmp_path / 'state'))}", "", "[mqtt]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in mqtt.items()]
    for cred in credentials:
        lines += ["", "[[credentials]]"] + [f"{k} = {toml_value(v)}" for k, v in cred.items()]
    path = tmp_path / "broker.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """``credbroker run`` in a subprocess; its JSON log lines, parsed, in ``logs``."""

    def __init__(self, process: anyio.abc.Process, registry: SecretRegistry) -> None:
        self.process = process
        self.registry = registry
        self.logs: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    async def read(self, stream: anyio.abc.ByteReceiveStream | None, where: str) -> None:
        assert stream is not None
        buffer = b""
        async for chunk in stream:
            self.registry.observe(where, chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self.registry.observe(where, line)
                try:
                    self.logs.append(json.loads(line))
                except ValueError:
                    self.logs.append({"message": line.decode("utf-8", "replace")})
            self._changed.set()
            self._changed = anyio.Event()

    def messages(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line.get("message") == message]

    async def wait_log(self, message: str, count: int = 1, timeout: float = WAIT) -> list[Any]:
        with anyio.fail_after(timeout):
            while len(self.messages(message)) < count:
                await self._changed.wait()
        return self.messages(message)


@asynccontextmanager
async def daemon(config: Path, registry: SecretRegistry) -> AsyncIterator[Daemon]:
    process = await anyio.open_process(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        cwd=REPO,
    )
    d = Daemon(process, registry)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.read, process.stdout, "daemon stdout")
            tg.start_soon(d.read, process.stderr, "daemon stderr")
            try:
                yield d
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.fail_after(WAIT):
                    await process.wait()
    finally:
        await process.aclose()


# --------------------------------------------------------------------------------------------
# units: topics, backoff, outbox, error classification


def test_topics_are_built_safely() -> None:
    topics = Topics("credbroker/prod", "web-1")
    assert topics.status == "credbroker/prod/web-1/status"
    assert topics.state("nebius") == "credbroker/prod/web-1/state/nebius"
    assert topics.event("nebius", "credentials.refreshed") == (
        "credbroker/prod/web-1/events/nebius/credentials.refreshed"
    )
    for bad in ["a/b", "+", "#", "x\0", "", "a+", "b#"]:
        with pytest.raises(ValueError, match="invalid MQTT topic"):
            topics.state(bad)
        with pytest.raises(ValueError, match="invalid MQTT topic"):
            Topics("credbroker", bad)
    for prefix in ["", "/a", "a/", "a//b", "a/+", "#"]:
        with pytest.raises(ValueError, match="invalid MQTT topic"):
            join_topic(prefix, "x")
    assert join_topic("p", "+", "state", "+", wildcards=True) == "p/+/state/+"
    with pytest.raises(ValueError, match="invalid MQTT topic"):
        join_topic("p", "#", wildcards=True)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    backoff = Backoff()
    ceilings = []
    for _ in range(12):
        ceiling = backoff.ceiling()
        delay = backoff.next()
        assert ceiling / 10 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings[:7] == [0.5, 1, 2, 4, 8, 16, 30]
    assert set(ceilings[6:]) == {BACKOFF_CAP}
    backoff.attempt = 10_000  # a month-long outage does not overflow
    assert backoff.ceiling() == BACKOFF_CAP
    backoff.reset()
    assert backoff.ceiling() == 0.5
    # Jittered: two publishers restarted together do not retry in lock-step.
    assert len({Backoff().next() for _ in range(20)}) > 1


def _event(credential: str, sequence: int) -> Event:
    state = State(credential, Status.VALID, generation=sequence, sequence=sequence)
    return make_event("credentials.refreshed", state, source="urn:credbroker:h", now=1e9)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=12),
    ops=st.lists(st.one_of(st.sampled_from("abcd"), st.just("ack"), st.just("rewind")),
                 max_size=80),
)
def test_outbox_keeps_order_and_the_latest_of_each_credential(limit: int, ops: list[str]) -> None:
    outbox = Outbox(limit)
    sequence = 0
    latest: dict[str, Event] = {}
    handed: list[int] = []
    for op in ops:
        if op == "ack":
            item = outbox.next_unsent()
            if item is not None:
                handed.append(item[1].sequence)
                outbox.ack(item[0])
                if latest.get(item[1].subject) is item[1]:
                    del latest[item[1].subject]
        elif op == "rewind":
            outbox.rewind()
        else:
            sequence += 1
            event = _event(op, sequence)
            outbox.put(event)
            latest[op] = event
        pending = outbox.events()
        assert [e.sequence for e in pending] == sorted(e.sequence for e in pending)
        for event in latest.values():  # the latest of a credential is never dropped
            assert event in pending
        # Bounded by the limit, or (more credentials than it) by one per credential.
        assert len(outbox) <= max(limit, len({e.subject for e in pending}))
    outbox.rewind()
    rest = []
    while (item := outbox.next_unsent()) is not None:
        rest.append(item[1].sequence)
    assert rest == [e.sequence for e in outbox.events()]
    assert handed == sorted(handed)  # in arrival order, every one handed out once per rewind


def test_outbox_coalesces_in_batches_and_resends_unacknowledged() -> None:
    outbox = Outbox(100)
    for i in range(100):
        assert outbox.put(_event("flappy", i)) == 0
    dropped = outbox.put(_event("flappy", 100))
    assert dropped == 11 and len(outbox) == 90  # down to 90%, not one per event
    assert outbox.coalesced == 11
    first = outbox.next_unsent()
    second = outbox.next_unsent()
    assert first is not None and second is not None
    outbox.ack(second[0])
    outbox.rewind()  # reconnect: the unacknowledged first one comes again, then the rest
    again = outbox.next_unsent()
    assert again is not None and again[0] == first[0]
    assert len(outbox) == 89


def test_connect_errors_are_classified() -> None:
    def connack(name: str) -> ReasonCode:
        return ReasonCode(PacketTypes.CONNACK, aName=name)

    refused_v5 = MqttConnectError(connack("Unsupported protocol version"))
    assert is_protocol_refusal(refused_v5)
    assert is_protocol_refusal(MqttConnectError(1))
    assert not is_auth_refusal(refused_v5)
    bad_password = MqttConnectError(connack("Bad user name or password"))
    assert is_auth_refusal(bad_password) and is_auth_refusal(MqttConnectError(5))
    assert not is_protocol_refusal(bad_password)
    assert "Bad user name or password" in describe_connect_error(bad_password)
    assert not is_protocol_refusal(OSError("Connection refused"))
    assert describe_connect_error(TimeoutError()) == "timed out waiting for the server"


def test_client_module_does_not_import_the_engine() -> None:
    # Services import broker.client; it must not drag in the engine, watcher or inotify.
    # The package __init__ is bypassed: this checks broker.client's own import graph.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('broker'); pkg.__path__ = [{str(REPO / 'broker')!r}]\n"
        "sys.modules['broker'] = pkg\n"
        "import broker.client\n"
        "bad = sorted(m for m in sys.modules if m in ('broker.engine.engine',\n"
        "    'broker.engine.watcher', 'broker.app', 'broker.config', 'asyncinotify', 'pydantic'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=True)
    assert result.stdout.strip() == ""


# --------------------------------------------------------------------------------------------
# publishing


async def test_late_subscriber_gets_online_and_every_retained_state(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    creds = [token_cred(tmp_path, "svc", secrets), token_cred(tmp_path, "other", secrets)]
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    async with harness_factory(creds, mqtt=mqtt) as h:
        topics = Topics(prefix, HOST)
        names = [s.credential for s in h.broker.states()]
        assert names == ["svc", "other", "fence"]
        # The first subscriber only waits until the broker has published everything.
        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as first:
            await first.wait_for(has_states(topics, names))
        publisher = h.broker.sinks["mqtt"]
        assert isinstance(publisher, MqttPublisher)
        assert publisher.connected and publisher.state == "connected"
        assert publisher.connects == 1 and publisher.protocol == "5"

        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as late:
            messages = await late.wait_for(has_states(topics, names))
        [status] = late.on(topics.status)
        assert status.text == "online" and status.retain
        assert status.content_type == "text/plain; charset=utf-8"
        assert status.payload_format == 1  # UTF-8 text
        for name in names:
            [message] = late.on(topics.state(name))
            assert message.retain and message.content_type == CONTENT_TYPE
            assert message.payload_format == 1
            event = Event.from_json(message.payload)
            assert message.payload == event.payload  # the event's one encoding, as is
            assert event.subject == name and event.source == f"urn:credbroker:{HOST}"
            assert event.data.to_dict() == h.broker.state(name).to_dict()
            assert event.type == "credentials.refreshed"  # valid
        assert not [m for m in messages if "/events/" in m.topic]  # events are not retained


async def test_early_subscriber_sees_each_event_once_on_its_topic(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    svc = token_cred(tmp_path, "svc", secrets)
    topics = Topics(prefix, HOST)
    async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub:
        mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
        async with harness_factory([svc], mqtt=mqtt) as h:
            await sub.wait_for(has_states(topics, ["svc", "fence"]))
            await h.fence()  # past the first-sight events
            changes = []
            for _ in range(2):
                write_atomic(token_path(svc), secrets.token("svc"))
                changes.append(await h.next("svc"))
            # A fence event over MQTT: the publisher sends in order, so once it is here
            # every earlier event (or a duplicate of one) would have arrived before it.
            await h.fence()
            fence = h.of("fence")[-1]
            fence_topic = topics.event("fence", fence.type)
            await sub.wait_for(lambda m: fence.id in {e.id for e in decoded(m, fence_topic)})
            publisher = h.broker.sinks["mqtt"]
            assert isinstance(publisher, MqttPublisher)

        svc_events = [
            (m.topic, Event.from_json(m.payload)) for m in sub.messages
            if m.topic.startswith(f"{prefix}/{HOST}/events/svc/")
        ]
        ids = [e.id for _, e in svc_events]
        assert len(ids) == len(set(ids))  # nothing twice
        assert ids[-2:] == [c.id for c in changes]  # both changes, in order, once each
        assert set(ids) <= {e.id for e in h.seen}
        for topic, event in svc_events:
            assert topic == topics.event("svc", event.type)
        for m in sub.messages:
            if "/events/" in m.topic:
                assert not m.retain and m.content_type == CONTENT_TYPE
                assert m.payload_format == 1
        # The retained state followed: its last message is the latest event, byte for byte.
        assert sub.on(topics.state("svc"))[-1].payload == changes[-1].payload
        assert publisher.published >= 3
        # Stopping said goodbye: retained offline, after everything else.
        assert sub.texts(topics.status)[-1] == "offline"


@pytest.mark.parametrize("encoded_ahead", [None, 0])
async def test_outage_buffers_events_and_reconnect_delivers_them_in_order(
    tmp_path: Path, secrets: SecretRegistry, mosquitto: Mosquitto,
    monkeypatch: pytest.MonkeyPatch, encoded_ahead: int | None,
) -> None:
    if encoded_ahead is not None:
        # Every queued event kept without its payload (as in a burst): sent encoded again.
        monkeypatch.setattr("broker.sinks.mqtt.publisher.ENCODED_AHEAD", encoded_ahead)
    mosquitto.start()
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc, other = token_cred(tmp_path, "svc", secrets), token_cred(tmp_path, "other", secrets)
    settings = mqtt_settings(tmp_path, url=mosquitto.url, topic_prefix=prefix)
    # At least 1.5 s between attempts: after a failed attempt the test restarts the server
    # and subscribes well before the publisher's next try, so the subscriber sees it all.
    spy = SpyBackoff(floor=1.5)
    config = make_config(tmp_path, [svc, other])

    def sink(context: SinkContext) -> MqttPublisher:
        return MqttPublisher(context, settings=settings, backoff=spy)

    async with running_broker(config, sink) as (broker, publisher, bus):
        async with Subscriber(mosquitto.port, [f"{prefix}/#"], secrets) as first:
            await first.wait_for(has_states(topics, ["svc", "other"]))
        # The first-sight events follow the states; one still unacknowledged at the kill
        # would stay buffered and go again (at-least-once). The PUBACK has no event to
        # await: poll the outbox, bounded.
        with anyio.fail_after(WAIT):
            while publisher.buffered:
                await anyio.sleep(0.01)
        generation = broker.state("svc").generation

        mosquitto.kill()
        await spy.wait_calls(1)  # the publisher noticed
        assert not publisher.connected and publisher.state == "disconnected"
        changes = []
        for _ in range(2):
            write_atomic(token_path(svc), secrets.token("svc"))
            # The bus keeps flowing while MQTT is down: an in-process subscriber gets them.
            changes.append(await next_event(bus, "svc"))
        assert [c.data.generation for c in changes] == [generation + 1, generation + 2]

        await spy.wait_calls(spy.calls + 1)  # an attempt just failed: the next is >= 1.5 s off
        assert publisher.buffered == 2 and publisher.connect_failures >= 1
        restarted = time.monotonic()
        mosquitto.start()  # same port
        async with Subscriber(mosquitto.port, [f"{prefix}/#"], secrets) as fresh:
            event_topics = {topics.event("svc", c.type) for c in changes}

            def delivered(messages: list[Received]) -> bool:
                got = {e.id for t in event_topics for e in decoded(messages, t)}
                return all(c.id in got for c in changes)

            messages = await fresh.wait_for(delivered, timeout=BACKOFF_CAP + 5)
        online_at = next(m.at for m in messages if m.topic == topics.status)
        assert online_at - restarted < BACKOFF_CAP
        assert (publisher.connected, publisher.connects) == (True, 2)  # (mypy narrowed it)

        order = [m.topic for m in messages]
        texts = fresh.texts(topics.status)
        assert texts == ["online"]
        first_state = min(order.index(topics.state(n)) for n in ("svc", "other"))
        first_event = min(i for i, t in enumerate(order) if t in event_topics)
        assert order.index(topics.status) < first_state < first_event  # online, states, events
        [svc_state] = decoded(messages, topics.state("svc"))
        assert svc_state.id == changes[-1].id and svc_state.data.generation == generation + 2
        assert decoded(messages, topics.state("other"))
        events = [Event.from_json(m.payload) for m in messages if m.topic in event_topics]
        assert [e.id for e in events] == [c.id for c in changes]  # both, in order, once
        # Byte for byte what the bus carried, whether the outbox kept the payload or not.
        sent = [m.payload for m in messages if m.topic in event_topics]
        assert sent == [c.payload for c in changes]
        assert fresh.on(topics.state("svc"))[-1].payload == changes[-1].payload


async def test_restart_delivers_a_change_made_while_stopped(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc = token_cred(tmp_path, "svc", secrets)
    config = make_config(tmp_path, [svc],
                         mqtt={"url": mosquitto_server.url, "topic_prefix": prefix})
    async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub:
        async with Broker(config) as first:
            generation = first.state("svc").generation
            await sub.wait_for(has_states(topics, ["svc"]))
        write_atomic(token_path(svc), secrets.token("svc"))  # while stopped
        async with Broker(config) as second:
            assert second.state("svc").generation == generation + 1
            await sub.wait_for(lambda m: any(
                e.data.generation == generation + 1 for e in decoded(m, topics.state("svc"))))
            # A later change as a fence: the outbox is ordered, so once this one is out on
            # the events topic, the change made while stopped would have gone before it.
            write_atomic(token_path(svc), secrets.token("svc"))
            fence_topic = topics.event("svc", "credentials.refreshed")
            await sub.wait_for(lambda m: any(
                e.data.generation == generation + 2 for e in decoded(m, fence_topic)))
    # Not only the retained state: the event itself went out (the publisher subscribes to
    # the bus before the engine's first read). The first run's first-sight event was still
    # pending when it stopped: the goodbye flushed it (at-least-once: a publish in flight at
    # the stop may come twice, hence the dedupe by id that consumers do).
    refreshed = decoded(sub.messages, topics.event("svc", "credentials.refreshed"))
    unique: dict[str, Event] = {}
    for event in refreshed:
        unique.setdefault(event.id, event)  # first occurrence, in arrival order
    assert [e.data.generation for e in unique.values()] == [
        generation, generation + 1, generation + 2
    ]


@pytest.fixture
def fleet_server(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto set up as the README says a fleet needs: it never drops a subscriber's
    queued messages (with the defaults it drops past 1,000)."""
    server = Mosquitto(tmp_path / "fleet-mqtt", extra=[
        "max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 100"]).start()
    try:
        yield server
    finally:
        server.kill()


async def test_start_up_publishes_each_pass_as_it_commits_then_every_other_state_once(
    tmp_path: Path, secrets: SecretRegistry, fleet_server: Mosquitto
) -> None:
    # Three passes of start-up (1,000 credentials at most each): the publisher starts before the
    # first, so first-sight events reach a subscriber while later passes are still read;
    # at a restart the credentials the first pass left unchanged get their retained state
    # once that pass is done, the changed one its event and state, and nothing twice.
    count = 2500
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    pool = [secrets.token() for _ in range(4)]  # the leak guard checks every payload
    directory = tmp_path / "creds"
    directory.mkdir()
    creds = []
    for i in range(count):
        write_atomic(directory / f"t{i}", f"{pool[i % 4]}-{i}")
        creds.append({"name": f"c{i}", "files": {"token": str(directory / f"t{i}")}})
    config = make_config(tmp_path, creds,
                         mqtt={"url": fleet_server.url, "topic_prefix": prefix})
    names = [c["name"] for c in creds]

    async def watch_ready(broker: Broker, sub: Subscriber, at_ready: list[int]) -> None:
        """How many messages ``sub`` had when ``broker``'s engine was ready."""
        while broker._engine is None:
            await anyio.sleep(0)
        await broker._engine.ready.wait()
        at_ready.append(len(sub.messages))

    def seen_all(wanted: set[str], start: int = 0, *, retained: bool | None = None
                 ) -> Callable[[list[Received]], bool]:
        """Every topic of ``wanted`` among the messages from ``start`` on (``retained``:
        only those flagged so, or not); incremental, as the condition is asked for every
        message."""
        missing, looked = set(wanted), [start]

        def check(messages: list[Received]) -> bool:
            for message in messages[looked[0]:]:
                if retained is None or message.retain is retained:
                    missing.discard(message.topic)
            looked[0] = len(messages)
            return not missing

        return check

    state_topics = {topics.state(n) for n in names}
    at_ready: list[int] = []
    async with Subscriber(fleet_server.port, [f"{prefix}/#"], secrets) as sub, \
            anyio.create_task_group() as tg:
        first = Broker(config)
        tg.start_soon(watch_ready, first, sub, at_ready)
        async with first:
            await sub.wait_for(seen_all(state_topics | {topics.status}), timeout=60)
            events_of = f"{prefix}/{HOST}/events/"
            early = [m for m in sub.messages[:at_ready[0]] if m.topic.startswith(events_of)]
            assert early, "no first-sight event was out before the last pass was done"
            generations = {n: first.state(n).generation for n in names}

    write_atomic(directory / "t0", f"{pool[1]}-changed")  # while stopped
    async with Subscriber(fleet_server.port, [f"{prefix}/#"], secrets) as sub:
        # What the server retains comes first, flagged: every state and the status.
        await sub.wait_for(seen_all(state_topics | {topics.status}, retained=True), timeout=60)
        replayed = len(sub.messages)
        async with Broker(config) as second:
            await sub.wait_for(seen_all(state_topics, replayed, retained=False), timeout=60)
            await second.engine.quiesce()
            # A later change as a fence: once it is out, everything before it is too.
            write_atomic(directory / "t1", f"{pool[2]}-fence")
            fence = topics.event("c1", "credentials.refreshed")
            await sub.wait_for(lambda m: any(x.topic == fence for x in m[replayed:]))
        live = [m for m in sub.messages[replayed:] if not m.retain]
    states: dict[str, list[int]] = {}
    for message in live:
        if message.topic.startswith(f"{prefix}/{HOST}/state/") and message.payload:
            event = Event.from_json(message.payload)
            states.setdefault(event.subject, []).append(event.data.generation)
    # Each state once (c1 twice: then the fence); c0's the new generation, never the old.
    assert states["c0"] == [generations["c0"] + 1]
    assert states["c1"] == [generations["c1"], generations["c1"] + 1]
    assert all(states[n] == [generations[n]] for n in names[2:])
    event_messages = [m.topic for m in live if "/events/" in m.topic]
    assert event_messages == [topics.event("c0", "credentials.refreshed"), fence]


async def test_a_credential_held_back_at_start_up_gets_no_made_up_state(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    # Seen for the first time while a writer holds it open: nothing is published for it
    # until its content is read whole, not a "missing, not read yet" made up meanwhile.
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    other = token_cred(tmp_path, "other", secrets)
    held_path = tmp_path / "held-token"
    fd = os.open(held_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secrets.token("held").encode())
        config = make_config(
            tmp_path, [other, {"name": "held", "files": {"token": str(held_path)}}],
            mqtt={"url": mosquitto_server.url, "topic_prefix": prefix},
        )
        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub, \
                Broker(config) as broker:
            publisher = broker.sinks["mqtt"]
            assert isinstance(publisher, MqttPublisher)
            await sub.wait_for(has_states(topics, ["other"]))
            with anyio.fail_after(WAIT):  # past the retained states of the connect
                while publisher.buffered or not publisher.connected:
                    await anyio.sleep(0.01)
            await broker.engine.quiesce()
            os.close(fd)
            fd = -1
            await sub.wait_for(lambda m: any(x.topic == topics.state("held") for x in m))
    finally:
        if fd >= 0:
            os.close(fd)
    # Its content, read whole (once it held still or once the writer closed it): one state.
    states = decoded(sub.messages, topics.state("held"))
    assert [e.data.status for e in states] == [Status.VALID]


async def test_broker_starts_and_serves_while_the_mqtt_server_is_down(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto: Mosquitto
) -> None:
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc = token_cred(tmp_path, "svc", secrets)
    mqtt = {"url": mosquitto.url, "topic_prefix": prefix}  # nothing listens there yet
    started = time.monotonic()
    async with harness_factory([svc], mqtt=mqtt) as h:
        assert time.monotonic() - started < 5  # start does not wait for MQTT
        publisher = h.broker.sinks["mqtt"]
        assert isinstance(publisher, MqttPublisher)
        assert publisher.state == "disconnected"
        await h.fence()  # past the first-sight events; the bus flows without MQTT
        write_atomic(token_path(svc), secrets.token("svc"))
        change = await h.next("svc")
        mosquitto.start()
        async with Subscriber(mosquitto.port, [f"{prefix}/#"], secrets) as sub:
            await sub.wait_for(
                lambda m: change.id in {e.id for e in decoded(m, topics.state("svc"))},
                timeout=BACKOFF_CAP + 5,
            )
        assert publisher.connected and publisher.connect_failures >= 1


async def test_forced_mqtt_311_publishes_without_properties(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc = token_cred(tmp_path, "svc", secrets)
    settings = mqtt_settings(tmp_path, url=mosquitto_server.url, topic_prefix=prefix)

    def sink(context: SinkContext) -> MqttPublisher:
        return MqttPublisher(context, settings=settings, protocols=[ProtocolVersion.V311])

    async with running_broker(make_config(tmp_path, [svc]), sink) as (_, publisher, _bus):
        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub:
            await sub.wait_for(has_states(topics, ["svc"]))
        assert publisher.protocol == "3.1.1"
        assert [m.content_type for m in sub.messages] == [None, None]
        assert [m.text for m in sub.on(topics.status)] == ["online"]


@pytest.fixture
def nats_mqtt(tmp_path: Path) -> Iterator[int]:
    """A real MQTT 3.1.1-only server: NATS with its MQTT gateway (it refuses MQTT 5)."""
    nats = shutil.which("nats-server")
    if nats is None:
        pytest.skip("nats-server is not installed")
    port = free_port()
    directory = tmp_path / "nats"
    directory.mkdir()
    (directory / "nats.conf").write_text(
        "listen: 127.0.0.1:-1\nserver_name: credbroker-test\n"
        f'jetstream {{ store_dir: "{directory / "js"}" }}\n'
        f"mqtt {{ listen: 127.0.0.1:{port} }}\n"
    )
    with open(directory / "nats.log", "wb") as logfile:
        proc = subprocess.Popen([nats, "-c", str(directory / "nats.conf")],
                                stdout=logfile, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_falls_back_to_mqtt_311_when_the_server_refuses_5(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, nats_mqtt: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc = token_cred(tmp_path, "svc", secrets)
    settings = mqtt_settings(tmp_path, url=f"mqtt://127.0.0.1:{nats_mqtt}", topic_prefix=prefix)
    async with Subscriber(nats_mqtt, [f"{prefix}/#"], secrets,
                          protocol=ProtocolVersion.V311) as sub:
        async with harness_factory([svc]) as h:
            # Started after the first-sight events, so it publishes status and retained
            # states only: nats-server's MQTT gateway refuses a "." in a topic level, which
            # every event topic has (credentials.refreshed), and drops the connection.
            publisher = MqttPublisher(h.broker.sink_context(), settings=settings)
            async with anyio.create_task_group() as tg:
                await tg.start(publisher.run)
                await sub.wait_for(has_states(topics, ["svc"]))
                assert publisher.protocol == "3.1.1" and publisher.connected
                assert publisher.connect_failures == 0  # a refusal of 5 is not a failure
                tg.cancel_scope.cancel()
            publisher.close()
        assert sub.texts(topics.status) == ["online", "offline"]
    fallbacks = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(fallbacks) == 1 and getattr(fallbacks[0], "refused", None) == "5"


# -- the daemon process ---------------------------------------------------------------------


async def test_sigkilled_daemon_leaves_its_last_will_offline(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix, host = new_prefix(), f"kill-{pysecrets.token_hex(3)}"
    topics = Topics(prefix, host)
    config = write_daemon_config(tmp_path, host, [token_cred(tmp_path, "svc", secrets)],
                                 url=mosquitto_server.url, topic_prefix=prefix)
    async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub:
        async with daemon(config, secrets) as d:
            await sub.wait_for(has_states(topics, ["svc"]))  # ready: online is out
            d.process.send_signal(signal.SIGKILL)
            with anyio.fail_after(WAIT):
                await d.process.wait()
        await sub.wait_for(lambda m: sub.texts(topics.status)[-1:] == ["offline"])
    assert sub.texts(topics.status) == ["online", "offline"]
    async with Subscriber(mosquitto_server.port, [topics.status], secrets) as late:
        [offline] = await late.wait_for(lambda m: len(m) >= 1)
    assert offline.text == "offline" and offline.retain
    assert offline.payload_format == 1  # the Will says UTF-8 too


async def test_sigterm_publishes_offline_then_disconnects_cleanly(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix, host = new_prefix(), f"term-{pysecrets.token_hex(3)}"
    topics = Topics(prefix, host)
    config = write_daemon_config(tmp_path, host, [token_cred(tmp_path, "svc", secrets)],
                                 url=mosquitto_server.url, topic_prefix=prefix)
    async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub:
        async with daemon(config, secrets) as d:
            await sub.wait_for(has_states(topics, ["svc"]))
            d.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(WAIT):
                assert await d.process.wait() == 0
        await sub.wait_for(lambda m: sub.texts(topics.status)[-1:] == ["offline"])
        assert d.messages("mqtt offline published")
        # A clean DISCONNECT (the server then discards the Will): the offline seen was ours.
        clean = f"Client credbroker-{host} disconnected."
        with anyio.fail_after(WAIT):
            while clean not in mosquitto_server.log_text():
                await anyio.sleep(0.02)  # mosquitto's log file: nothing to await
        assert sub.texts(topics.status) == ["online", "offline"]


# -- fleets, consumers ----------------------------------------------------------------------


async def test_two_brokers_on_one_server_are_both_visible(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    configs = []
    for host in ("alpha", "beta"):
        directory = tmp_path / host
        configs.append(make_config(directory, [token_cred(directory, "svc", secrets)],
                                   broker={"host_id": host}, mqtt=mqtt))
    raw_filter = f"{prefix}/+/state/#"
    async with (
        Subscriber(mosquitto_server.port, [raw_filter], secrets) as raw,
        observed(BrokerClient(mosquitto_server.url, host_id="+", prefix=prefix), secrets) as client,
        Broker(configs[0]) as alpha,
        Broker(configs[1]),
    ):
        stream = client.events()
        with anyio.fail_after(WAIT):
            while set(client.states) != {("alpha", "svc"), ("beta", "svc")}:
                await stream.get()
        await raw.wait_for(lambda m: {x.topic for x in m} == {
            Topics(prefix, "alpha").state("svc"), Topics(prefix, "beta").state("svc")})
        # A live change of one host comes through, tagged with its host.
        write_atomic(Path(configs[0].credentials[0].files["token"]), secrets.token())
        with anyio.fail_after(WAIT):
            while (event := await stream.get()).data.generation <= 1:
                pass
        assert event.source == "urn:credbroker:alpha"
        assert client.states[("alpha", "svc")] is event
        assert event.data.to_dict() == alpha.state("svc").to_dict()
        assert client.status == {"alpha": "online", "beta": "online"}
        stream.close()


async def test_broker_client_dedupes_orders_and_ignores_hostile_payloads(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc = token_cred(tmp_path, "svc", secrets)
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    async with (
        harness_factory([svc], mqtt=mqtt) as h,
        observed(BrokerClient(mosquitto_server.url, host_id=HOST, prefix=prefix,
                              credential="svc"), secrets) as client,
        client.events() as stream,
    ):
        with anyio.fail_after(WAIT):
            first = await stream.get()  # the retained state comes first
        assert first.subject == "svc" and first.data.to_dict() == h.broker.state("svc").to_dict()
        await client.wait_connected()

        older = make_event("credentials.expired", replace(first.data, sequence=first.sequence - 1),
                           source=f"urn:credbroker:{HOST}", now=time.time() - 3600)
        foreign = make_event("credentials.refreshed", first.data, source="urn:credbroker:evil",
                             now=time.time())
        hostile = [
            (topics.state("svc"), b"not json " + secrets.token().encode()),
            (topics.state("svc"), b"\xff\xfe\x00"),
            (topics.state("svc"), b"[]"),
            (topics.state("svc"),
             json.dumps({"specversion": "1.0", "secret": secrets.token()}).encode()),
            (topics.state("svc"), b"[" * 100_000),  # deep nesting: RecursionError in the parser
            (topics.state("svc"), json.dumps({**first.to_dict(), "time": "yesterday"}).encode()),
            (topics.state("svc"), b"x" * (1024 * 1024 + 1)),
            (topics.state("svc"), foreign.payload),  # another host's event on this host's topic
            (topics.event("svc", "credentials.expired"), first.payload),  # type != topic
            (topics.status, b"maybe"),
            (topics.state("svc"), first.payload),  # a duplicate: same id
            (topics.event("svc", older.type), older.payload),  # older than what was delivered
        ]
        async with Client("127.0.0.1", mosquitto_server.port) as evil:
            for topic, payload in hostile:
                await evil.publish(topic, payload, qos=1)
        await h.fence()  # past the first-sight events
        write_atomic(token_path(svc), secrets.token("svc"))
        change = await h.next("svc")
        with anyio.fail_after(WAIT):
            got = await stream.get()
        assert got.id == change.id  # nothing hostile, duplicated or stale came out first
        assert client.ignored == 10
        assert client.states[(HOST, "svc")].id == change.id
        assert client.status == {HOST: "online"}
    # Hostile content never reached a log line: the autouse leak guard checks every record.


async def test_credential_cache_reloads_once_after_a_refresh_in_process(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    svc = token_cred(tmp_path, "svc", secrets)
    path = token_path(svc)
    cache = CredentialCache(path.read_text, credential="svc")  # a sync loader
    observed: list[Event] = []
    passed = anyio.Event()

    async def tap(events: Any) -> AsyncIterator[Event]:
        # cache.follow observes each event before it asks for the next one: once the next is
        # asked for, the previous one has been observed.
        nonlocal passed
        async for event in events:
            yield event
            observed.append(event)
            passed.set()
            passed = anyio.Event()

    async with (
        harness_factory([svc]) as h,
        h.broker.subscribe(credential="svc") as events,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(cache.follow, tap(events))
        await h.fence()  # past the first-sight events
        first = await cache.aget()
        assert cache.loads == 1 and await cache.aget() == first and cache.loads == 1
        new = secrets.token("svc")
        write_atomic(path, new)
        change = await h.next("svc")
        assert change.type == "credentials.refreshed"
        with anyio.fail_after(WAIT):
            while change not in observed:
                await passed.wait()
        assert cache.stale
        assert await cache.aget() == new and cache.loads == 2
        assert await cache.aget() == new and cache.loads == 2
        assert cache.observe(change) is False  # the same refresh again changes nothing
        tg.cancel_scope.cancel()


async def test_credential_cache_on_a_broker_client(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    svc = token_cred(tmp_path, "svc", secrets)
    path = token_path(svc)

    async def load() -> str:  # an async loader
        return await anyio.Path(path).read_text()

    cache = CredentialCache(load, credential="svc")
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    async with (
        harness_factory([svc], mqtt=mqtt) as h,
        observed(BrokerClient(mosquitto_server.url, host_id=HOST, prefix=prefix),
                 secrets) as client,
        client.events() as stream,
    ):
        client.on_event(cache.observe)
        await h.fence()  # past the first-sight events
        with anyio.fail_after(WAIT):
            # Its state first: a refresh observed during the first load would (rightly)
            # make the next get load again.
            while (await stream.get()).subject != "svc":
                pass
        first = await cache.aget()
        assert await cache.aget() == first and cache.loads == 1
        new = secrets.token("svc")
        write_atomic(path, new)
        change = await h.next("svc")
        with anyio.fail_after(WAIT):
            while (await stream.get()).id != change.id:
                pass
        # on_event ran before the stream had it: whoever reacts to the event reloads.
        assert cache.stale
        assert await cache.aget() == new and cache.loads == 2
        assert await cache.aget() == new and cache.loads == 2
        # The same refresh again (its retained copy, a reconnect) changes nothing.
        assert not cache.observe(client.states[(HOST, "svc")])


# -- security -------------------------------------------------------------------------------


@pytest.fixture
def auth_server(
    tmp_path: Path, secrets: SecretRegistry, mosquitto: Mosquitto
) -> tuple[Mosquitto, dict[str, str]]:
    """A mosquitto with a password file and an ACL: ``broker`` writes, ``reader`` reads."""
    passwords = {"broker": secrets.token("pw"), "reader": secrets.token("pw")}
    mosquitto.allow_anonymous = False
    mosquitto.password_file = make_password_file(tmp_path / "passwd", passwords)
    mosquitto.acl_file = tmp_path / "acl"
    mosquitto.acl_file.write_text(
        "user broker\ntopic readwrite secure/#\n\nuser reader\ntopic read secure/#\n"
    )
    mosquitto.start()
    return mosquitto, passwords


async def test_password_file_authenticates_under_an_acl(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
    auth_server: tuple[Mosquitto, dict[str, str]],
) -> None:
    server, passwords = auth_server
    password_file = tmp_path / "broker-password"
    write_atomic(password_file, passwords["broker"] + "\n")
    topics = Topics("secure", HOST)
    mqtt = {"url": server.url, "topic_prefix": "secure", "username": "broker",
            "password_file": str(password_file)}
    async with harness_factory([token_cred(tmp_path, "svc", secrets)], mqtt=mqtt):
        async with Subscriber(server.port, ["secure/#"], secrets, username="reader",
                              password=passwords["reader"]) as sub:
            await sub.wait_for(has_states(topics, ["svc", "fence"]))
        assert sub.texts(topics.status) == ["online"]


async def test_wrong_password_is_logged_and_retried_with_backoff(
    tmp_path: Path, secrets: SecretRegistry, auth_server: tuple[Mosquitto, dict[str, str]]
) -> None:
    server, _ = auth_server
    password_file = tmp_path / "broker-password"
    write_atomic(password_file, secrets.token("wrong"))
    config = write_daemon_config(
        tmp_path, HOST, [token_cred(tmp_path, "svc", secrets)], url=server.url,
        topic_prefix="secure", username="broker", password_file=str(password_file),
    )
    async with daemon(config, secrets) as d:
        failures = await d.wait_log("mqtt connect failed", count=3, timeout=15)
        started = d.messages("broker started")
        assert started and d.process.returncode is None  # serving, not crashed
        for line in failures:
            assert line["level"] == "error"
            assert "refused by the server" in line["error"]
            assert "password" in line["hint"]
            assert line["retry_in"] > 0
        assert [line["attempt"] for line in failures[:3]] == [1, 2, 3]
        # Spaced by the backoff delay each announced: no tight loop.
        times = [_epoch(line["time"]) for line in failures]
        for before, after, line in zip(times, times[1:], failures, strict=False):
            assert after - before >= line["retry_in"] - 0.002
        d.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(WAIT):
            assert await d.process.wait() == 0


def _epoch(text: str) -> float:
    from broker.core.timefmt import parse_time

    return parse_time(text)


async def test_tls_with_ca_and_client_certificate(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto: Mosquitto
) -> None:
    tls = make_tls(tmp_path / "pki")
    mosquitto.tls = tls
    mosquitto.require_certificate = True
    mosquitto.start()
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    mqtt = {"url": mosquitto.url, "topic_prefix": prefix, "ca_file": str(tls.ca),
            "cert_file": str(tls.client_cert), "key_file": str(tls.client_key)}
    assert mqtt["url"].startswith("mqtts://")
    async with harness_factory([token_cred(tmp_path, "svc", secrets)], mqtt=mqtt) as h:
        async with Subscriber(mosquitto.port, [f"{prefix}/#"], secrets,
                              tls_context=tls.client_context()) as sub:
            await sub.wait_for(has_states(topics, ["svc", "fence"]))
        publisher = h.broker.sinks["mqtt"]
        assert isinstance(publisher, MqttPublisher) and publisher.connected
    assert os.path.exists(tls.ca)


def test_a_retained_state_sent_is_kept_without_its_payload_and_sent_again_identical() -> None:
    from broker.sinks.mqtt.retained import RetainedStates

    state = State("db", Status.VALID, generation=2, sequence=7, fingerprint="hmac-sha256:00")
    retained = RetainedStates(lambda name: state, source="s", clock=lambda: 1.0)
    event = make_event("credentials.refreshed", state, source="s", now=1.0, id="e-1")
    retained.take(event)
    assert retained.owed(event) and retained.latest["db"].payload == event.payload
    sent = retained.payload(event)
    retained.sending(event)
    assert sent == event.payload
    kept = retained.latest["db"]
    assert kept.payload == b"" and kept.id == "e-1"  # the bytes are let go once sent
    assert not retained.owed(event)
    # A new connection owes every state again: the same id, the same bytes.
    retained.connected()
    assert retained.owed(event)
    (again,) = retained.unsent()
    assert again.id == "e-1" and retained.payload(again) == event.payload
    assert [e.id for e in retained.all_latest([state])] == ["e-1"]
    # A newer event replaces it; the older one is no longer owed.
    newer = make_event("credentials.expiring", state, source="s", now=2.0, id="e-2")
    retained.take(newer)
    assert not retained.owed(event) and retained.owed(newer)


def test_a_retained_state_made_up_from_a_state_is_encoded_only_when_sent() -> None:
    from broker.core.events import payload_of
    from broker.sinks.mqtt.retained import RetainedStates

    state = State("db", Status.VALID, generation=2, sequence=7, fingerprint="hmac-sha256:00")
    retained = RetainedStates(lambda name: state, source="s", clock=lambda: 1.0)
    (made,) = retained.all_latest([state])
    assert made.payload == b"" and made.type == "credentials.refreshed"
    sent = retained.payload(made)
    assert Event.from_json(sent).id == made.id and sent == payload_of(made)
    assert retained.latest_of("db") is made  # the same event, id and time, next time too

"""MQTT delivery (SPEC section 4): retained state, online/offline status, QoS 1 events.

Topics, under ``<prefix>/<host_id>``:

- ``status``: ``online`` (retained, after every connect) / ``offline`` (retained: the Last Will,
  and published explicitly before a clean disconnect);
- ``state/<credential>``: the latest event of the credential (retained, QoS 1);
- ``events/<credential>/<type>``: every event (QoS 1, not retained).

How delivery works:

- A *pump* moves events from the bus subscription into the :class:`Outbox` as they come, so the
  bus never waits for the network; the outbox is bounded and coalesces older events of a
  credential when full, so the latest event of every credential always survives.
- A *connection loop* connects (MQTT 5, falling back to 3.1.1 when the server refuses 5),
  publishes ``online``, the retained state of every credential, then the outbox in order.
  An event leaves the outbox only when the server acknowledged it (PUBACK): anything
  unacknowledged when a connection drops is sent again (at-least-once; consumers dedupe by
  CloudEvent ``id``). Failed connects retry with capped exponential backoff and full jitter.
- Stopping (cancellation), it flushes pending events, publishes ``offline`` and disconnects
  cleanly, each step bounded; killed, the server publishes the Last Will ``offline``.

This module also holds the pieces the consumer client (:mod:`broker.client`) shares: topic
building, :class:`Backoff`, TLS contexts and the classification of connect errors. It must not
import the engine or the watcher at runtime (the client is used outside the daemon).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc
from aiomqtt import Client, MqttCodeError, MqttError, ProtocolVersion
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.aio.mqtt_link import LinkLost, MqttLink, WillMessage
from broker.core.backoff import BACKOFF_CAP, BACKOFF_INITIAL, Backoff
from broker.core.events import CONTENT_TYPE, Event, make_event
from broker.core.state import Status

if TYPE_CHECKING:
    from broker.app import Broker
    from broker.config import MqttSettings

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_INITIAL",
    "Backoff",
    "MqttPublisher",
    "Outbox",
    "Topics",
    "connect_material",
    "describe_connect_error",
    "is_auth_refusal",
    "is_protocol_refusal",
    "join_topic",
    "mqtt_text_problem",
    "read_password_file",
    "tls_context",
]

log = logging.getLogger("broker.mqtt")

ONLINE = b"online"
OFFLINE = b"offline"
STATUS_CONTENT_TYPE = "text/plain; charset=utf-8"

#: Unacknowledged publishes in flight at once, at most (the server's Receive Maximum, when
#: lower, wins): a few PUBACK round trips then cover a burst.
WINDOW = 20
#: Waiting for a CONNACK.
CONNECT_TIMEOUT = 10.0
#: At shutdown: pending events, then ``offline``, then DISCONNECT, each bounded, so that a
#: stopping daemon never hangs on a dead server and a backlog cannot crowd out ``offline``.
FLUSH_TIMEOUT = 2.0
SHUTDOWN_TIMEOUT = 1.0
#: Protocols in the order they are tried.
PROTOCOLS: tuple[ProtocolVersion, ...] = (ProtocolVersion.V5, ProtocolVersion.V311)

_TYPE_FOR_STATUS = {
    Status.VALID: "credentials.refreshed",
    Status.EXPIRING: "credentials.expiring",
    Status.EXPIRED: "credentials.expired",
    Status.INVALID: "credentials.invalid",
    Status.MISSING: "credentials.missing",
}
_PROTOCOL_NAMES = {
    ProtocolVersion.V5: "5",
    ProtocolVersion.V311: "3.1.1",
    ProtocolVersion.V31: "3.1",
}
# CONNACK codes: 1 = "unacceptable protocol version" (3.1.1), 0x84 = "unsupported protocol
# version" (5; paho also maps a 3.1.1-style refusal of a v5 CONNECT to it).
_PROTOCOL_REFUSED = frozenset({1, 0x84})
# 4/5 = bad user name or password / not authorised (3.1.1); 0x86/0x87 the same in MQTT 5.
_AUTH_REFUSED = frozenset({4, 5, 0x86, 0x87})
_MAX_TOPIC_BYTES = 65535


# --------------------------------------------------------------------------------------------
# Topics


def mqtt_text_problem(text: str) -> str | None:
    """Why an MQTT server would refuse ``text`` in a topic, client id or user name, or None.

    MQTT strings must not hold NUL, control characters (C0, DEL, C1) or Unicode
    non-characters; mosquitto drops the connection of a client that sends one, so a topic
    with one would never be delivered. Checked in config (``topic_prefix``, ``client_id``,
    ``username``) and again for every topic built here.
    """
    for char in text:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"control character U+{code:04X}"
        if 0xD800 <= code <= 0xDFFF:
            return f"surrogate U+{code:04X}"
        if 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE:
            return f"Unicode non-character U+{code:04X}"
    return None


def _check_segment(segment: str, *, wildcard: bool = False) -> str:
    if wildcard and segment == "+":
        return segment
    if not segment or any(c in segment for c in "/+#\0"):
        raise ValueError(f"invalid MQTT topic segment {segment!r}")
    problem = mqtt_text_problem(segment)
    if problem is not None:
        raise ValueError(f"invalid MQTT topic segment {segment!r}: {problem}")
    return segment


# Topics repeat (one per credential and event type) and checking one walks every character:
# a burst of 10,000 events spent half a second here before the cache. Bounded, so a flood
# of distinct names cannot grow it.
@functools.lru_cache(maxsize=16384)
def join_topic(prefix: str, *segments: str, wildcards: bool = False) -> str:
    """``prefix/seg/seg``, refusing anything that could widen or split the topic.

    Every topic the broker publishes is built here, so a name can never inject a wildcard
    (``+``, ``#``), a NUL or an extra level (``/``). With ``wildcards=True`` (subscription
    filters of the client), a segment may be exactly ``+``.
    """
    if not prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"invalid MQTT topic prefix {prefix!r}")
    for level in prefix.split("/"):
        _check_segment(level)
    topic = "/".join([prefix, *(_check_segment(s, wildcard=wildcards) for s in segments)])
    if len(topic.encode()) > _MAX_TOPIC_BYTES:
        raise ValueError("MQTT topic too long")
    return topic


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one broker (``host_id``) under ``prefix``."""

    prefix: str
    host_id: str

    def __post_init__(self) -> None:
        join_topic(self.prefix, self.host_id)  # validate once, up front

    @property
    def status(self) -> str:
        return join_topic(self.prefix, self.host_id, "status")

    def state(self, credential: str) -> str:
        return join_topic(self.prefix, self.host_id, "state", credential)

    def event(self, credential: str, event_type: str) -> str:
        return join_topic(self.prefix, self.host_id, "events", credential, event_type)


# --------------------------------------------------------------------------------------------
# Backoff, TLS, passwords, connect errors


async def connect_material(
    password_file: Path | str | None,
    tls: bool,
    ca_file: Path | str | None,
    cert_file: Path | str | None,
    key_file: Path | str | None,
) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and TLS context of one connect (the publisher's and the client's).

    Read at every connect, so a rotated password or certificate is picked up.
    """
    password = None if password_file is None else await read_password_file(password_file)
    context = None
    if tls:
        context = await anyio.to_thread.run_sync(tls_context, ca_file, cert_file, key_file)
    return password, context


async def read_password_file(path: str | os.PathLike[str]) -> str:
    """An MQTT password from its file (the publisher's and the client's): one line, UTF-8."""
    raw = await anyio.Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # The codec's own message would quote the offending byte of the password.
        raise ValueError(f"{path}: the password is not valid UTF-8") from None
    return text.rstrip("\r\n")


def tls_context(
    ca_file: Path | str | None = None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> ssl.SSLContext:
    """A client TLS context that verifies the server (against ``ca_file``, else system CAs).

    Blocking (reads files): call it in a worker thread. Building it anew on every connect
    picks up rotated certificates.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def _rc_value(exc: BaseException) -> int | None:
    if not isinstance(exc, MqttCodeError):
        return None
    rc = exc.rc
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc


def is_protocol_refusal(exc: BaseException) -> bool:
    """True when the server refused the connection because of the protocol version."""
    return isinstance(exc, MqttConnectError) and _rc_value(exc) in _PROTOCOL_REFUSED


def is_auth_refusal(exc: BaseException) -> bool:
    """True when the server refused the credentials (user name, password, certificate)."""
    return isinstance(exc, MqttConnectError) and _rc_value(exc) in _AUTH_REFUSED


def describe_connect_error(exc: BaseException) -> str:
    """A one-line, secret-free description of why a connection failed."""
    if isinstance(exc, MqttConnectError):
        rc = exc.rc
        reason = str(rc) if isinstance(rc, ReasonCode) else str(exc)
        return f"refused by the server: {reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def protocol_name(protocol: ProtocolVersion) -> str:
    return _PROTOCOL_NAMES.get(protocol, str(int(protocol)))


class _PackedOnce(Properties):
    """Properties that encode themselves once: every publish carries the same ones, and
    paho would otherwise encode them anew each time (a sixth of its cost per publish)."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()  # type: ignore[no-untyped-call]
            self.__dict__["_packed"] = packed  # past Properties.__setattr__, which checks names
        return packed


def publish_properties(protocol: ProtocolVersion, content_type: str) -> Properties | None:
    """MQTT 5 publish properties carrying ``content_type``; ``None`` for 3.1.1.

    Set up once per connection and never changed: they are encoded at the first publish.
    """
    if protocol != ProtocolVersion.V5:
        return None
    props = _PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = content_type
    # Every payload we publish is UTF-8 text (JSON or ``online``/``offline``): saying so
    # lets MQTT 5 consumers and bridges treat it as text without sniffing.
    props.PayloadFormatIndicator = 1
    return props


def _will_properties(protocol: ProtocolVersion) -> Properties | None:
    if protocol != ProtocolVersion.V5:
        return None
    props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
    props.ContentType = STATUS_CONTENT_TYPE
    props.PayloadFormatIndicator = 1
    return props


async def close_client(client: Client, wait: float = 1.0) -> None:
    """Disconnect ``client`` if it is still connected, never waiting long, even if cancelled."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(wait), suppress(MqttError):
        await client.__aexit__(None, None, None)  # MqttError: already gone, nothing to close


# --------------------------------------------------------------------------------------------
# Outbox


class Outbox:
    """Events waiting for the MQTT server: ordered, bounded, at-least-once.

    Each event gets a key in arrival order. ``next_unsent`` hands them out in order; an event
    leaves only when ``ack``-ed, and ``rewind`` (on reconnect) hands out everything not yet
    acknowledged again. Past ``limit`` events, the oldest events that have a newer event of the
    same credential are dropped (down to 90% of the limit, so that a full outbox does not pay a
    pass per event). The latest event of each credential is never dropped: with more distinct
    credentials than ``limit`` the bound becomes one event per credential.

    Invariant: ``len(outbox) <= max(limit, credentials in it)``.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._entries: dict[int, Event] = {}  # insertion (= key) order
        self._counts: dict[str, int] = {}
        self._unsent: deque[int] = deque()
        self._next_key = 0
        #: Events dropped by coalescing, over the outbox's life.
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Outbox(pending={len(self)}, limit={self.limit}, coalesced={self.coalesced})"

    def events(self) -> list[Event]:
        """Everything not yet acknowledged, oldest first."""
        return list(self._entries.values())

    def put(self, event: Event) -> int:
        """Queue ``event``; returns how many older events were coalesced away to make room."""
        key = self._next_key
        self._next_key += 1
        self._entries[key] = event
        self._counts[event.subject] = self._counts.get(event.subject, 0) + 1
        self._unsent.append(key)
        # Over the limit and something can go (more events than credentials): coalesce.
        if len(self._entries) > self.limit and len(self._entries) > len(self._counts):
            return self._coalesce()
        return 0

    def next_unsent(self) -> tuple[int, Event] | None:
        """The oldest event not handed out since the last ``rewind``, with its key."""
        while self._unsent:
            key = self._unsent.popleft()
            event = self._entries.get(key)
            if event is not None:  # else acknowledged or coalesced meanwhile
                return key, event
        return None

    def ack(self, key: int) -> None:
        """The server has the event: forget it (a no-op if it was coalesced meanwhile)."""
        event = self._entries.pop(key, None)
        if event is not None:
            self._forget(event)

    def rewind(self) -> None:
        """Hand out every unacknowledged event again, in order (a new connection)."""
        self._unsent = deque(self._entries)

    def _forget(self, event: Event) -> None:
        left = self._counts[event.subject] - 1
        if left:
            self._counts[event.subject] = left
        else:
            del self._counts[event.subject]

    def _coalesce(self) -> int:
        excess = len(self._entries) - (self.limit - self.limit // 10)
        dropped = 0
        # Oldest first: the first event met of a credential with count > 1 has a newer one.
        for key, event in list(self._entries.items()):
            if dropped >= excess:
                break
            if self._counts[event.subject] > 1:
                del self._entries[key]
                self._forget(event)
                dropped += 1
        self.coalesced += dropped
        return dropped


# --------------------------------------------------------------------------------------------
# The publisher sink


class _SessionLost(Exception):
    """Raised inside a session's task group when the connection is unusable."""


class _Pipeline:
    """QoS 1 publishes over one link: at most ``size`` unacknowledged, in the order sent.

    ``send`` waits only while the window is full; a PUBACK runs what it completes (``done``)
    as a plain call from the link's reader, so a publish costs no task and no future.
    """

    def __init__(self, link: MqttLink, size: int, *, ack_timeout: float) -> None:
        self.size = size
        self._link = link
        self._ack_timeout = ack_timeout
        self._pending: dict[int, Callable[[], None] | None] = {}
        #: The most publishes unacknowledged at once, over the pipeline's life.
        self.peak = 0
        self._wake = anyio.Event()
        link.on_ack = self._acked
        link.on_lost = self._lost

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"_Pipeline(size={self.size}, in_flight={len(self)})"

    async def send(
        self,
        topic: str,
        payload: bytes,
        retain: bool,
        props: Properties | None,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Publish (QoS 1) once the window has room; ``done()`` runs on the PUBACK."""
        if len(self._pending) >= self.size:
            await self._wait(lambda: len(self._pending) < self.size)
        try:
            mid = self._link.publish(topic, payload, retain, props)
        except LinkLost as exc:
            raise _SessionLost(describe_connect_error(exc)) from exc
        self._pending[mid] = done
        self.peak = max(self.peak, len(self._pending))

    async def drain(self) -> None:
        """Wait until everything sent is acknowledged."""
        await self._wait(lambda: not self._pending)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        try:
            with anyio.fail_after(self._ack_timeout):
                while not ready():
                    if self._link.lost is not None:
                        raise _SessionLost(describe_connect_error(self._link.lost))
                    # No await between the check and the new Event: no wake-up is lost.
                    wake = self._wake = anyio.Event()
                    await wake.wait()
        except TimeoutError:
            raise _SessionLost(f"no PUBACK within {self._ack_timeout:g} s") from None

    def _acked(self, mid: int) -> None:
        done = self._pending.pop(mid, None)
        if done is not None:
            done()
        self._wake.set()

    def _lost(self, exc: BaseException) -> None:
        self._wake.set()


class MqttPublisher:
    """The MQTT sink of a :class:`~broker.app.Broker` (SPEC section 4).

    Started by the broker when ``[mqtt]`` is configured; ``run`` reports itself started at
    once and never waits for the server: the daemon serves with MQTT down. For health and
    metrics: ``connected``/``state``, the counters ``connects``, ``published`` (events
    acknowledged by the server on their events topic), ``publish_failures`` (publishes not
    acknowledged, to be sent again), ``connect_failures``, and ``buffered`` (events waiting).

    ``settings`` defaults to the broker's ``[mqtt]``; ``backoff`` and ``protocols`` (tried in
    order, sticking to the first the server accepts) are there for embedding and tests.
    """

    name = "mqtt"

    def __init__(
        self,
        broker: Broker,
        *,
        settings: MqttSettings | None = None,
        backoff: Backoff | None = None,
        protocols: Sequence[ProtocolVersion] = PROTOCOLS,
    ) -> None:
        settings = settings if settings is not None else broker.config.mqtt
        if settings is None:
            raise ValueError("MQTT is not configured ([mqtt] is missing)")
        if not protocols:
            raise ValueError("need at least one protocol")
        self._broker = broker
        self._settings = settings
        self._host_id = broker.config.broker.host_id
        self.topics = Topics(settings.topic_prefix, self._host_id)
        self.client_id = settings.client_id or f"credbroker-{self._host_id}"
        self._backoff = backoff if backoff is not None else Backoff()
        self._protocols = tuple(protocols)
        self._protocol_index = 0
        self._outbox = Outbox(settings.buffer)
        #: The latest event of each credential: what goes retained on its state topic.
        self._latest: dict[str, Event] = {}
        #: Per connection: the event id last acknowledged on each state topic.
        self._state_sent: dict[str, str] = {}
        #: Removed credentials whose retained state topic is still to be cleared (an empty
        #: retained message) on this connection; refilled from the tombstones at every connect.
        self._to_clear: set[str] = set()
        #: Added credentials whose retained state is to be published once they have one.
        self._resync: set[str] = set()
        self._clearing: set[str] = set()
        self._changed = anyio.Event()
        # Subscribed now rather than in ``run``: no event published from here on is missed
        # (a broker that makes its sinks before the engine's first pass gets the first-sight
        # events, and changes made while it was stopped, on the events topics too).
        self._subscription = broker.subscribe("*", buffer=settings.buffer)
        self.connected = False
        self.connects = 0
        self.connect_failures = 0
        self.published = 0
        self.publish_failures = 0
        #: The most publishes ever unacknowledged at once (bounded by the server's limit).
        self.in_flight_peak = 0

    def __repr__(self) -> str:
        return (
            f"MqttPublisher(server={self.server!r}, state={self.state!r}, "
            f"buffered={self.buffered}, published={self.published})"
        )

    @property
    def server(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    @property
    def state(self) -> Literal["connected", "disconnected"]:
        """``connected`` or ``disconnected`` (for ``/healthz``)."""
        return "connected" if self.connected else "disconnected"

    @property
    def buffered(self) -> int:
        """Events not yet acknowledged by the MQTT server."""
        return len(self._outbox)

    @property
    def coalesced(self) -> int:
        """Events dropped from a full outbox (a newer event of the credential was kept)."""
        return self._outbox.coalesced

    @property
    def protocol(self) -> str:
        """The MQTT protocol version in use (or to be tried next): ``5`` or ``3.1.1``."""
        return protocol_name(self._protocols[self._protocol_index])

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the bus subscription: for a publisher made but never ``run``."""
        self._subscription.close()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver events until cancelled; publishes ``offline`` on the way out."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, name="mqtt pump")
                task_status.started()
                await self._connect_loop()
        finally:
            self.close()
            self.connected = False

    async def _pump(self) -> None:
        """Move events from the bus into the outbox as they come: the bus never waits on us."""
        async for event in self._subscription:
            self._take(event)

    def reconfigured(self, removed: Iterable[str], added: Iterable[str]) -> None:
        """A reload removed or added credentials: clear the removed ones' retained state.

        An added credential's retained state is published by the next connect, or by its
        first event; one re-added with unchanged content (silent) gets it from the reconnect
        sync below.
        """
        for name in removed:
            self._latest.pop(name, None)
            self._to_clear.add(name)
        for name in added:
            self._to_clear.discard(name)
            self._resync.add(name)
        self._changed.set()

    def _take(self, event: Event) -> None:
        self._latest[event.subject] = event
        dropped = self._outbox.put(event)
        if dropped:
            log.warning(
                "mqtt outbox full; coalesced older events",
                extra={
                    "coalesced": dropped,
                    "buffered": len(self._outbox),
                    "limit": self._outbox.limit,
                },
            )
        self._changed.set()

    async def _connect_loop(self) -> None:
        while True:
            protocol = self._protocols[self._protocol_index]
            try:
                client = await self._connect(protocol)
            except (MqttError, OSError, ValueError) as exc:
                if is_protocol_refusal(exc) and self._protocol_index + 1 < len(self._protocols):
                    self._protocol_index += 1
                    log.info(
                        "mqtt server refused the protocol version; falling back",
                        extra={
                            "server": self.server,
                            "refused": protocol_name(protocol),
                            "next": self.protocol,
                        },
                    )
                    continue  # a refusal is instant and final: no point waiting
                await self._wait_before_retry(exc)
                continue
            lost = await self._serve(client, protocol)
            log.warning(
                "mqtt disconnected",
                extra={
                    "server": self.server,
                    "error": describe_connect_error(lost),
                    "buffered": len(self._outbox),
                },
            )
            await self._wait_before_retry(None)

    async def _wait_before_retry(self, exc: BaseException | None) -> None:
        delay = self._backoff.next()
        if exc is not None:
            self.connect_failures += 1
            extra: dict[str, object] = {
                "server": self.server,
                "error": describe_connect_error(exc),
                "attempt": self._backoff.attempt,
                "retry_in": round(delay, 3),
                "protocol": self.protocol,
            }
            if is_auth_refusal(exc):
                extra["hint"] = "check mqtt.username and the password in mqtt.password_file"
            log.error("mqtt connect failed", extra=extra)
        await anyio.sleep(delay)

    async def _connect(self, protocol: ProtocolVersion) -> MqttLink:
        settings = self._settings
        password, context = await connect_material(
            settings.password_file,
            settings.tls,
            settings.ca_file,
            settings.cert_file,
            settings.key_file,
        )
        with anyio.fail_after(CONNECT_TIMEOUT):
            return await MqttLink.open(
                settings.host,
                settings.port,
                # A fixed client id makes a restarted daemon take over its old session: the
                # server then sends the old session's Will (``offline``) *before* accepting
                # us, so it can never land after our ``online``.
                client_id=self.client_id,
                protocol=protocol,
                username=settings.username,
                password=password,
                tls_context=context,
                will=WillMessage(self.topics.status, OFFLINE, _will_properties(protocol)),
                keepalive=max(1, math.ceil(settings.keepalive)),
                logger=logging.getLogger("broker.mqtt.paho"),
            )

    async def _serve(self, link: MqttLink, protocol: ProtocolVersion) -> BaseException:
        """Run one connection; returns why it ended. On cancellation, says ``offline`` first."""
        self.connected = True
        self.connects += 1
        self._state_sent.clear()  # a new connection: the server's retained state is unknown
        # Never more in flight than the server takes (mosquitto advertises 20): past its
        # Receive Maximum an MQTT 5 server may drop the connection.
        pipe = _Pipeline(
            link,
            max(1, min(WINDOW, link.receive_maximum)),
            ack_timeout=max(10.0, 2 * self._settings.keepalive),
        )
        log.info(
            "mqtt connected",
            extra={
                "server": self.server,
                "protocol": protocol_name(protocol),
                "tls": self._settings.tls,
                "client_id": self.client_id,
                "buffered": len(self._outbox),
                "window": pipe.size,
            },
        )
        ended_by_loss = False
        try:
            lost = await self._session(link, pipe, protocol)
            ended_by_loss = True
            return lost
        finally:
            self.connected = False
            self.in_flight_peak = max(self.in_flight_peak, pipe.peak)
            if ended_by_loss:
                self.publish_failures += len(pipe)  # not acknowledged: they go again
                link.abort()
            else:
                with anyio.CancelScope(shield=True):
                    await self._goodbye(link, pipe, protocol)

    async def _goodbye(self, link: MqttLink, pipe: _Pipeline, protocol: ProtocolVersion) -> None:
        """Pending events, retained ``offline``, then a clean DISCONNECT (the Will is dropped).

        Runs shielded from the cancellation that stops the broker; every step is bounded.
        """
        props = publish_properties(protocol, CONTENT_TYPE)
        try:
            with anyio.move_on_after(FLUSH_TIMEOUT):
                # What is in flight is acknowledged first, so that the rewind below hands out
                # only what never reached the server: nothing goes twice.
                await pipe.drain()
                # Events the engine published before the stop go out too, in order.
                while (event := self._subscription.get_nowait()) is not None:
                    self._take(event)
                self._outbox.rewind()
                while (item := self._outbox.next_unsent()) is not None:
                    await self._send_event(pipe, item[0], item[1], props)
                for event in list(self._latest.values()):  # a state publish cut short
                    if self._state_sent.get(event.subject) != event.id:
                        await self._send_state(pipe, event, props)
                await pipe.drain()
            with anyio.fail_after(SHUTDOWN_TIMEOUT):
                await pipe.send(
                    self.topics.status,
                    OFFLINE,
                    True,
                    publish_properties(protocol, STATUS_CONTENT_TYPE),
                )
                await pipe.drain()
            log.info(
                "mqtt offline published",
                extra={"server": self.server, "buffered": len(self._outbox)},
            )
        except (_SessionLost, TimeoutError) as exc:
            log.warning(
                "mqtt could not publish offline; the server's Last Will says it",
                extra={
                    "server": self.server,
                    "error": describe_connect_error(exc),
                    "buffered": len(self._outbox),
                },
            )
        await link.close(SHUTDOWN_TIMEOUT)

    async def _session(
        self, link: MqttLink, pipe: _Pipeline, protocol: ProtocolVersion
    ) -> BaseException:
        lost: list[BaseException] = []

        def fail(exc: BaseException) -> None:
            if not lost:
                lost.append(exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            # Keepalive, and noticing a dropped connection while nothing waits on a PUBACK.
            fail(await link.run())

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, name="mqtt keepalive")
            tg.start_soon(self._deliver, pipe, protocol, fail, name="mqtt deliver")
        return lost[0] if lost else _SessionLost("connection ended")

    async def _deliver(
        self, pipe: _Pipeline, protocol: ProtocolVersion, fail: Callable[[BaseException], None]
    ) -> None:
        props = publish_properties(protocol, CONTENT_TYPE)
        try:
            await pipe.send(
                self.topics.status, ONLINE, True, publish_properties(protocol, STATUS_CONTENT_TYPE)
            )
            configured = set(self._broker.engine.names)
            self._to_clear = {n for n in self._broker.store.tombstones if n not in configured}
            self._clearing.clear()  # in flight on a connection that is gone
            for event in self._snapshot():
                await self._send_state(pipe, event, props)
            for name in sorted(self._to_clear):
                await self._clear_state(pipe, name)
            await pipe.drain()
        except _SessionLost as exc:
            fail(exc)
            return
        self._backoff.reset()  # this server works: the next outage starts from 0.5 s again
        log.info(
            "mqtt retained state published",
            extra={"credentials": len(self._latest), "buffered": len(self._outbox)},
        )

        self._outbox.rewind()
        try:
            while True:
                for name in sorted(self._to_clear - self._clearing):
                    await self._clear_state(pipe, name)
                for name in sorted(self._resync):
                    self._resync.discard(name)
                    latest = self._state_event(name)
                    if latest is not None and self._state_sent.get(name) != latest.id:
                        await self._send_state(pipe, latest, props)
                item = self._outbox.next_unsent()
                if item is None:
                    # No await between the check and the new Event: no wake-up is lost.
                    changed = self._changed = anyio.Event()
                    await changed.wait()
                    continue
                await self._send_event(pipe, item[0], item[1], props)
        except _SessionLost as exc:
            fail(exc)

    async def _send_state(self, pipe: _Pipeline, event: Event, props: Properties | None) -> None:
        # Marked when sent, not when acknowledged: it is in flight on this connection, and a
        # connection that drops forgets every mark (the next one republishes every state).
        self._state_sent[event.subject] = event.id
        await pipe.send(self.topics.state(event.subject), event.payload, True, props)

    async def _clear_state(self, pipe: _Pipeline, name: str) -> None:
        # SPEC section 4: an empty retained message removes the topic's retained state. The
        # name leaves ``_to_clear`` only on the PUBACK: a connection lost before it clears
        # it again on the next connect (from the tombstones).
        self._clearing.add(name)
        self._state_sent.pop(name, None)

        def cleared() -> None:
            self._to_clear.discard(name)
            self._clearing.discard(name)

        await pipe.send(self.topics.state(name), b"", True, None, cleared)

    def _state_event(self, name: str) -> Event | None:
        """The latest event of ``name``, made up from its state if it has none yet."""
        event = self._latest.get(name)
        if event is None:
            try:
                state = self._broker.engine.state(name)
            except KeyError:
                return None
            event = make_event(_TYPE_FOR_STATUS[state.status], state,
                               source=self._broker.source, now=time.time())
            self._latest[name] = event
        return event

    async def _send_event(
        self, pipe: _Pipeline, key: int, event: Event, props: Properties | None
    ) -> None:
        topic = self.topics.event(event.subject, event.type)
        await pipe.send(topic, event.payload, False, props, partial(self._delivered, key))
        # The state topic gets an event only while it is the credential's latest (a newer one
        # will set it: in a burst, only the last of a credential's events goes there), and
        # only once per connection (the reconnect sync may have sent it).
        if (
            self._latest.get(event.subject) is event
            and self._state_sent.get(event.subject) != event.id
        ):
            await self._send_state(pipe, event, props)

    def _delivered(self, key: int) -> None:
        """The server acknowledged the event: it leaves the outbox."""
        self._outbox.ack(key)
        self.published += 1

    def _snapshot(self) -> list[Event]:
        """The latest event of every configured credential, made up from its state if none.

        A restarted broker with unchanged credentials publishes no event, and the MQTT server
        may have lost its retained messages: every connect republishes them all.
        """
        states = self._broker.states()
        names = {s.credential for s in states}
        for gone in [n for n in self._latest if n not in names]:
            del self._latest[gone]  # removed by a reload
        events: list[Event] = []
        for state in states:
            event = self._latest.get(state.credential)
            if event is None:
                event = make_event(
                    _TYPE_FOR_STATUS[state.status],
                    state,
                    source=self._broker.source,
                    now=time.time(),
                )
                self._latest[state.credential] = event
            events.append(event)
        return events

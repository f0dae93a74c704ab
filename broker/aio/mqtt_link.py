"""Connections to an MQTT server: the one connect-with-fallback, and the publisher's link.

:class:`ProtocolFallback` is how every connect is made (the publisher's, the consumer-report
subscriber's, the consumer client's): MQTT 5 first, falling back to 3.1.1 when the server
refuses the version, sticking to the version that worked, and (``connect_retrying``) retrying
other failures with backoff. :func:`open_client` opens an aiomqtt client (for subscribers).

:class:`MqttLink` is the publisher's connection: an asyncio protocol speaking the packets of
:mod:`broker.core.mqtt_codec`, no MQTT library. A publisher needs only CONNECT, QoS 1
PUBLISH, PUBACK and the keepalive, and at 10,000 credentials the libraries' per-packet cost
was most of the daemon's CPU: aiomqtt spends a future, a ``wait_for`` and a task per publish;
paho (which the link drove before) three ``recv`` calls and three objects per PUBACK. Here a
publish is one buffer append (the writes of one loop iteration leave in one ``send``) and a
PUBACK a call of ``on_ack`` with the packet id, from one ``recv`` of many acknowledgements.

The link is only the wire: what is sent, when, and what a PUBACK completes is the publisher's
business (``broker.sinks.mqtt``). Nothing here knows of credentials.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from aiomqtt import Client, MqttError, ProtocolVersion, Will
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from broker.aio.mqtt_material import (
    CONNECT_TIMEOUT,
    PROTOCOLS,
    is_protocol_refusal,
    protocol_name,
)
from broker.core import mqtt_codec as wire
from broker.core.backoff import Backoff
from broker.core.errors import BrokerError
from broker.core.mqtt_codec import MessageProperties

__all__ = [
    "LinkLost",
    "MqttLink",
    "ProtocolFallback",
    "WillMessage",
    "close_client",
    "open_client",
]

T = TypeVar("T")

#: What a failed connect raises: refused or lost (``MqttError``), unreachable or timed out
#: (``OSError``), a password file that is not UTF-8 (``ValueError``).
CONNECT_ERRORS = (MqttError, OSError, ValueError)

#: Receive Maximum when the server sends none (MQTT 5 default; 3.1.1 has no such limit).
DEFAULT_RECEIVE_MAXIMUM = 65535

_LEVEL = {ProtocolVersion.V5: wire.V5, ProtocolVersion.V311: wire.V311}
#: 3.1.1 CONNACK return codes as the MQTT 5 reason codes that mean the same (as paho maps
#: them), so a refusal reads and classifies alike in both versions.
_V311_REFUSALS = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}


class ProtocolFallback:
    """Connect with the first of ``protocols`` the server accepts, and keep to it.

    A refusal of the protocol version is instant and final, so the next version is tried at
    once (not a failure, and no backoff); any other failure is the caller's, or, with
    :meth:`connect_retrying`, retried after a backoff delay.
    """

    def __init__(self, protocols: Sequence[ProtocolVersion] = PROTOCOLS) -> None:
        if not protocols:
            raise ValueError("need at least one protocol")
        self._protocols = tuple(protocols)
        self._index = 0

    def __repr__(self) -> str:
        return f"ProtocolFallback(protocol={self.name!r})"

    @property
    def protocol(self) -> ProtocolVersion:
        """The version in use (or to be tried next)."""
        return self._protocols[self._index]

    @property
    def name(self) -> str:
        """:attr:`protocol` as people write it (``5``, ``3.1.1``)."""
        return protocol_name(self.protocol)

    async def connect(
        self,
        attempt: Callable[[ProtocolVersion], Awaitable[T]],
        *,
        on_fallback: Callable[[ProtocolVersion], None] | None = None,
    ) -> T:
        """``await attempt(protocol)``, falling back past refused versions; raises the rest.

        ``on_fallback(refused)`` is told of each refused version before the next is tried.
        """
        while True:
            protocol = self.protocol
            try:
                return await attempt(protocol)
            except CONNECT_ERRORS as exc:
                if not (is_protocol_refusal(exc) and self._index + 1 < len(self._protocols)):
                    raise
                self._index += 1
                if on_fallback is not None:
                    on_fallback(protocol)

    async def connect_retrying(
        self,
        attempt: Callable[[ProtocolVersion], Awaitable[T]],
        backoff: Backoff,
        *,
        on_failure: Callable[[BaseException, float], None],
        on_fallback: Callable[[ProtocolVersion], None] | None = None,
    ) -> T:
        """:meth:`connect` until it succeeds, waiting ``backoff.next()`` after each failure.

        ``on_failure(exc, delay)`` is told of each failure before the wait. The backoff is
        not reset here: the caller does, once the connection has proved itself.
        """
        while True:
            try:
                return await self.connect(attempt, on_fallback=on_fallback)
            except CONNECT_ERRORS as exc:
                delay = backoff.next()
                on_failure(exc, delay)
            await anyio.sleep(delay)


async def open_client(
    host: str,
    port: int,
    *,
    protocol: ProtocolVersion,
    username: str | None,
    password: str | None,
    tls_context: ssl.SSLContext | None,
    client_id: str | None,
    keepalive: int,
    logger: logging.Logger,
    will: Will | None = None,
) -> Client:
    """A connected aiomqtt client (for subscribers), within :data:`CONNECT_TIMEOUT`."""
    client = _Client(
        host,
        port,
        username=username,
        password=password,
        identifier=client_id,
        protocol=protocol,
        keepalive=keepalive,
        timeout=CONNECT_TIMEOUT + 5,
        tls_context=tls_context,
        will=will,
        logger=logger,
    )
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            await client.__aenter__()
    except MqttError:
        raise  # refused or unreachable: aiomqtt has let go of it
    except BaseException:
        await close_client(client, wait=0.2)
        raise
    return client


#: The subscribers' aiomqtt client looks at paho's keepalive timers (the PINGREQ, the
#: missing-PINGRESP check) every quarter keepalive, at least this far apart: a PINGREQ then
#: leaves within 1.25 keepalives of the last packet, inside the 1.5 the server waits.
MISC_TICK = 1.0
MISC_TICKS_PER_KEEPALIVE = 4


class _Client(Client):
    """aiomqtt's client, looking at paho's keepalive timers every quarter keepalive instead
    of every second: an idle subscriber (the consumer reports) is then not woken once a
    second for a 30 s keepalive. (:class:`MqttLink` wakes exactly when its keepalive says.)

    This overrides aiomqtt's private ``_misc_loop`` (same body, another interval); aiomqtt is
    pinned below 3, and a test fails if the override stops being the loop that runs.
    """

    def __init__(self, hostname: str, port: int, *, keepalive: int, **kwargs: Any) -> None:
        super().__init__(hostname, port, keepalive=keepalive, **kwargs)
        self._misc_tick = max(MISC_TICK, keepalive / MISC_TICKS_PER_KEEPALIVE)

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(self._misc_tick)


async def close_client(client: Client, wait: float = 1.0) -> None:
    """Disconnect ``client`` if it is still connected, never waiting long, even if cancelled."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(wait), suppress(MqttError):
        await client.__aexit__(None, None, None)  # MqttError: already gone, nothing to close


class LinkLost(MqttError, BrokerError):
    """The connection ended (or never came up); ``str()`` says why, without secrets."""


@dataclass(frozen=True, slots=True)
class WillMessage:
    """The Last Will the server publishes when the connection dies."""

    topic: str
    payload: bytes
    properties: MessageProperties | None


def _reason(code: int, packet: int = PacketTypes.CONNACK) -> ReasonCode:
    """A reason code with its name (paho's table of names, nothing else of paho)."""
    try:
        return ReasonCode(packet, identifier=code)
    except Exception:  # a code paho does not know: still a failure, by number
        return ReasonCode(packet, identifier=0x80)


class MqttLink:
    """One connected MQTT session; make it with :meth:`open`, end it with :meth:`close`.

    ``publish`` queues a QoS 1 PUBLISH and returns its packet id; ``on_ack(mid)`` is called
    when the server acknowledges it, ``on_lost(exc)`` once when the connection ends. Packets
    leave in the order ``publish`` was called. The caller keeps at most
    ``receive_maximum`` unacknowledged (the server's limit, from its CONNACK).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, level: int, keepalive: int, logger: logging.Logger
    ) -> None:
        self._loop = loop
        self._level = level
        self._v5 = level == wire.V5
        self.keepalive = keepalive
        self._log = logger
        self._transport: asyncio.Transport | None = None
        self._reader = wire.PacketReader()
        #: Packets of this loop iteration not yet handed to the transport (one write each).
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._last_sent = time.monotonic()
        self._ping_sent: float | None = None
        self._next_mid = 0
        self._in_flight: set[int] = set()
        self.receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        #: PUBACKs with a failure reason code (MQTT 5: e.g. not authorised, quota exceeded).
        self.refused = 0
        self.on_ack: Callable[[int], None] = lambda mid: None
        self.on_lost: Callable[[BaseException], None] = lambda exc: None
        self.lost: BaseException | None = None
        self._lost_event = anyio.Event()
        self._connack: wire.Connack | None = None
        self._connack_event = anyio.Event()

    def __repr__(self) -> str:
        return f"MqttLink(connected={self.lost is None}, receive_maximum={self.receive_maximum})"

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        protocol: ProtocolVersion,
        username: str | None,
        password: str | None,
        tls_context: ssl.SSLContext | None,
        will: WillMessage,
        keepalive: int,
        logger: logging.Logger,
    ) -> MqttLink:
        """Connect and wait for the CONNACK (the caller bounds the wait).

        Raises ``MqttConnectError`` when the server refuses (its reason code says why),
        ``OSError`` (``ssl.SSLError`` included) when it cannot be reached, ``LinkLost`` when
        it closes the connection before answering.
        """
        level = _LEVEL.get(protocol)
        if level is None:
            raise ValueError(f"the publisher speaks MQTT 5 and 3.1.1, not {protocol!r}")
        # Built before connecting: a value MQTT cannot carry fails here, not half-way.
        connect = wire.connect_packet(
            protocol=level,
            client_id=client_id,
            keepalive=keepalive,
            # Every connection starts a clean session: the outbox, not the server, holds
            # what is unacknowledged.
            clean=True,
            username=username,
            password=password,
            will_topic=will.topic,
            will_payload=will.payload,
            will_qos=1,
            will_retain=True,
            will_properties=will.properties,
        )
        loop = asyncio.get_running_loop()
        link = cls(loop, level, keepalive, logger)
        # Cancellable at every step (the caller's timeout): asyncio closes a socket it was
        # still connecting or handshaking, so nothing is left behind.
        await loop.create_connection(
            lambda: _Protocol(link),
            host,
            port,
            ssl=tls_context,
            server_hostname=host if tls_context is not None else None,
        )
        try:
            link._send(connect)
            await link._connack_event.wait()
        except BaseException:
            link.abort()
            raise
        connack = link._connack
        if connack is None:  # the server closed before answering
            assert link.lost is not None
            raise link.lost
        if not connack.accepted:
            link.abort()
            code = connack.code
            if code < 0x80:
                # A 3.1.1 return code (a 3.1.1-only server answers a v5 CONNECT in its own
                # version, 1 = unacceptable protocol version): read as MQTT 5 says it.
                code = _V311_REFUSALS.get(code, 0x80)
            raise MqttConnectError(_reason(code))
        if connack.receive_maximum:
            link.receive_maximum = connack.receive_maximum
        if connack.server_keep_alive is not None:
            link.keepalive = connack.server_keep_alive  # MQTT 5: the server's word is final
        logger.debug(
            "connected",
            extra={"receive_maximum": link.receive_maximum, "keepalive": link.keepalive},
        )
        return link

    # -- the wire -----------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, retain: bool, props: MessageProperties | None
    ) -> int:
        """Queue a QoS 1 PUBLISH; returns its packet id. ``LinkLost`` if the link is gone."""
        if self.lost is not None:
            raise LinkLost(str(self.lost))
        mid = self._take_mid()
        packed = (props.packed if props is not None else b"\x00") if self._v5 else None
        self._queue(wire.publish_packet(wire.topic_field(topic), mid, payload, retain, packed))
        return mid

    def disconnect(self) -> None:
        """Send DISCONNECT (the server then drops the Will) and close once it is written."""
        if self.lost is None and self._transport is not None:
            self._send(wire.DISCONNECT_PACKET)
            self._transport.close()  # flushes what is buffered first

    async def wait_lost(self) -> BaseException:
        """Wait until the connection has ended; returns why."""
        await self._lost_event.wait()
        assert self.lost is not None
        return self.lost

    async def run(self) -> BaseException:
        """Keep the connection alive until it ends; returns why it ended.

        A PINGREQ goes out when nothing else was sent for ``keepalive`` seconds; no PINGRESP
        within another ``keepalive`` ends the link (the server is gone without a word).
        """
        while self.lost is None:
            now = time.monotonic()
            if self._ping_sent is not None and now - self._ping_sent >= self.keepalive:
                self._log.warning("no PINGRESP", extra={"keepalive": self.keepalive})
                self._mark_lost(LinkLost(f"no PINGRESP within {self.keepalive} s"))
                self.abort()
                break
            idle = now - self._last_sent
            if self.keepalive and self._ping_sent is None and idle >= self.keepalive:
                self._ping_sent = now
                self._send(wire.PINGREQ_PACKET)
            wait = self._next_check(now)
            with anyio.move_on_after(wait):
                await self._lost_event.wait()
        assert self.lost is not None
        return self.lost

    def _next_check(self, now: float) -> float:
        if not self.keepalive:
            return math.inf
        if self._ping_sent is not None:
            return max(0.0, self._ping_sent + self.keepalive - now)
        return max(0.0, self._last_sent + self.keepalive - now)

    async def close(self, wait: float) -> None:
        """DISCONNECT cleanly within ``wait`` seconds (shielded), then let go of the socket."""
        with anyio.CancelScope(shield=True):
            self.disconnect()
            with anyio.move_on_after(wait):
                await self._lost_event.wait()
            self.abort()

    def abort(self) -> None:
        """Drop the socket now (no DISCONNECT: the server will publish the Will)."""
        transport, self._transport = self._transport, None
        self._out.clear()
        if transport is not None:
            transport.abort()
        self._mark_lost(LinkLost("connection closed"))

    # -- sending ------------------------------------------------------------------------------

    def _take_mid(self) -> int:
        in_flight = self._in_flight
        if len(in_flight) >= 0xFFFF:
            raise LinkLost("65,535 publishes unacknowledged: the server stopped answering")
        mid = self._next_mid
        while True:
            mid = mid % 0xFFFF + 1  # 1..65535; 0 is not a packet id
            if mid not in in_flight:
                break
        self._next_mid = mid
        in_flight.add(mid)
        return mid

    def _queue(self, packet: bytes) -> None:
        # Everything published in one loop iteration leaves in one write (a burst of
        # 20,000 publishes costs a few hundred send calls, not 20,000).
        self._out.append(packet)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _send(self, packet: bytes) -> None:
        # In order after whatever is queued.
        self._out.append(packet)
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, transport = self._out, self._transport
        if not out or transport is None or transport.is_closing():
            out.clear()
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self._last_sent = time.monotonic()

    # -- receiving (the protocol's callbacks) -------------------------------------------------

    def _connected(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def _received(self, data: bytes) -> None:
        try:
            packets = self._reader.feed(data)
            for kind, _flags, body in packets:
                if kind == wire.PUBACK:
                    mid, code = wire.decode_puback(body)
                    self._in_flight.discard(mid)
                    if code >= 0x80:
                        self.refused += 1
                    self.on_ack(mid)
                elif kind == wire.PINGRESP:
                    self._ping_sent = None
                elif kind == wire.CONNACK and self._connack is None:
                    self._connack = wire.decode_connack(body, self._level)
                    self._connack_event.set()
                elif kind == wire.DISCONNECT:
                    code, text = wire.decode_disconnect(body) if self._v5 else (0, None)
                    reason = text or str(_reason(code, PacketTypes.DISCONNECT))
                    self._mark_lost(LinkLost(f"the server disconnected: {reason}"))
                    self.abort()
                    return
                else:
                    raise wire.ProtocolError(f"unexpected MQTT packet type {kind}")
        except wire.ProtocolError as exc:
            self._log.warning("mqtt protocol error", extra={"error": str(exc)})
            self._mark_lost(LinkLost(f"protocol error: {exc}"))
            self.abort()

    def _connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        if exc is None:
            self._mark_lost(LinkLost("connection closed by the server"))
        elif isinstance(exc, ssl.SSLError):
            self._mark_lost(LinkLost(f"TLS: {exc.reason or exc}"))
        else:
            self._mark_lost(LinkLost(str(exc) or type(exc).__name__))

    def _mark_lost(self, exc: BaseException) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        self._lost_event.set()
        self._connack_event.set()  # lost before the CONNACK: wakes ``open``
        self.on_lost(exc)


class _Protocol(asyncio.Protocol):
    """asyncio's side of the link: bytes in, connection events."""

    def __init__(self, link: MqttLink) -> None:
        self._link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._link._connected(transport)

    def data_received(self, data: bytes) -> None:
        self._link._received(data)

    def eof_received(self) -> bool | None:
        return False  # close our side too: the server is done

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._connection_lost(exc)

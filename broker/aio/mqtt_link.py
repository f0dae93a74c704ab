"""Connections to an MQTT server: the one connect-with-fallback, and the publisher's link.

:class:`ProtocolFallback` is how every connect is made (the publisher's, the consumer-report
subscriber's, the consumer client's): MQTT 5 first, falling back to 3.1.1 when the server
refuses the version, sticking to the version that worked, and (``connect_retrying``) retrying
other failures with backoff. :func:`open_client` opens an aiomqtt client (for subscribers).

:class:`MqttLink` is the publisher's connection, driven by the event loop: paho's protocol, no
aiomqtt. Why not aiomqtt: per QoS 1 publish it costs a future, a ``wait_for`` and (the way a
window must drive it) a task, about twice the CPU of paho itself (``python -m
benchmarks.mqtt_clients``). Here paho's socket is registered with the event loop, paho's
callbacks run inline in the loop's reader callback, and a PUBACK is a plain function call
(``on_ack``) with the packet id. gmqtt was cheaper still, but its wheels install a top-level
``tests`` package that shadows any project's own.

The link is only the wire: what is sent, when, and what a PUBACK completes is the publisher's
business (``broker.sinks.mqtt``). Nothing here knows of credentials.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import paho.mqtt.client as paho
from aiomqtt import Client, MqttError, ProtocolVersion, Will
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker.aio.mqtt_material import (
    CONNECT_TIMEOUT,
    PROTOCOLS,
    is_protocol_refusal,
    protocol_name,
)
from broker.core.backoff import Backoff
from broker.core.errors import BrokerError

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

#: How often paho's timers (keepalive PINGREQ, the missing-PINGRESP check) are looked at.
TICK = 1.0
#: Receive Maximum when the server sends none (MQTT 5 default; 3.1.1 has no such limit).
DEFAULT_RECEIVE_MAXIMUM = 65535

_PAHO_PROTOCOL = {
    ProtocolVersion.V5: paho.MQTTv5,
    ProtocolVersion.V311: paho.MQTTv311,
    ProtocolVersion.V31: paho.MQTTv31,
}


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
    client = Client(
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
    properties: Properties | None


class MqttLink:
    """One connected MQTT session; make it with :meth:`open`, end it with :meth:`close`.

    ``publish`` queues a QoS 1 PUBLISH and returns its packet id; ``on_ack(mid)`` is called
    when the server acknowledges it, ``on_lost(exc)`` once when the connection ends. Packets
    leave in the order ``publish`` was called. The caller keeps at most
    ``receive_maximum`` unacknowledged (the server's limit, from its CONNACK).
    """

    def __init__(self, client: paho.Client, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._sock: socket.socket | None = None
        self._writing = False
        self.receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.on_ack: Callable[[int], None] = lambda mid: None
        self.on_lost: Callable[[BaseException], None] = lambda exc: None
        self.lost: BaseException | None = None
        self._lost_event = anyio.Event()
        self._connack: tuple[ReasonCode | int, Properties | None] | None = None
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
        ``OSError`` (``ssl.SSLError`` included) when it cannot be reached.
        """
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=_PAHO_PROTOCOL[protocol],
            # A refused 3.1.1 CONNECT must come back to us, not be retried as 3.1 by paho.
            reconnect_on_failure=False,
        )
        client.enable_logger(logger)
        if username is not None:
            client.username_pw_set(username, password)
        if tls_context is not None:
            client.tls_set_context(tls_context)
        client.will_set(will.topic, will.payload, qos=1, retain=True, properties=will.properties)
        # We bound what is in flight ourselves (to the server's Receive Maximum); paho must
        # never hold a PUBLISH back, or its queue would decide the wire order.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        link = cls(client, asyncio.get_running_loop())
        client.on_connect = link._on_connect
        client.on_publish = link._on_publish
        client.on_disconnect = link._on_disconnect

        def connect() -> None:
            # Every connection starts a clean session: the outbox, not the server, holds
            # what is unacknowledged.
            if protocol == ProtocolVersion.V5:
                client.connect(host, port, keepalive, clean_start=True)
            else:
                client.connect(host, port, keepalive)

        # paho's connect is blocking (TCP, TLS handshake, bounded by its 5 s connect timeout):
        # a worker thread, waited for even when cancelled, so no socket is left behind. It
        # writes CONNECT itself; only then does the loop take the socket over.
        try:
            await anyio.to_thread.run_sync(connect)
        except BaseException:
            link.abort()  # cancelled while the thread connected: its socket goes too
            raise
        try:
            link._attach()
            await link._connack_event.wait()
        except BaseException:
            link.abort()
            raise
        if link._connack is None:  # the server closed before answering
            assert link.lost is not None
            raise link.lost
        reason, properties = link._connack
        if _failed(reason):
            link.abort()
            raise MqttConnectError(reason)
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if receive_maximum:
            link.receive_maximum = int(receive_maximum)
        return link

    # -- the wire -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, retain: bool, props: Properties | None) -> int:
        """Queue a QoS 1 PUBLISH; returns its packet id. ``LinkLost`` if the link is gone."""
        if self.lost is not None:
            raise LinkLost(str(self.lost))
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise LinkLost(paho.error_string(info.rc))
        return int(info.mid)

    def disconnect(self) -> None:
        """Send DISCONNECT (the server then drops the Will); the server closes the socket."""
        if self.lost is None:
            self._client.disconnect()

    async def wait_lost(self) -> BaseException:
        """Wait until the connection has ended; returns why."""
        await self._lost_event.wait()
        assert self.lost is not None
        return self.lost

    async def run(self) -> BaseException:
        """Drive paho's timers until the connection ends; returns why it ended."""
        while self.lost is None:
            with anyio.move_on_after(TICK):
                await self._lost_event.wait()
            if self.lost is None:
                self._client.loop_misc()  # PINGREQ when due; closes after a missing PINGRESP
        return self.lost

    async def close(self, wait: float) -> None:
        """DISCONNECT cleanly within ``wait`` seconds (shielded), then let go of the socket."""
        with anyio.CancelScope(shield=True):
            self.disconnect()
            with anyio.move_on_after(wait):
                await self._lost_event.wait()
            self.abort()

    def abort(self) -> None:
        """Drop the socket now (no DISCONNECT: the server will publish the Will)."""
        self._detach()
        with suppress(OSError):
            sock = self._client.socket()
            if sock is not None:
                sock.close()
        self._mark_lost(LinkLost("connection closed"))

    # -- event loop registration --------------------------------------------------------------

    def _attach(self) -> None:
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            raise LinkLost("no socket after connect")
        self._sock = sock
        self._loop.add_reader(sock, self._readable)
        self._client.on_socket_register_write = self._want_write
        self._client.on_socket_unregister_write = self._no_write
        self._client.on_socket_close = self._closed
        if self._client.want_write():
            self._want_write(self._client, None, sock)

    def _detach(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with suppress(ValueError, OSError):  # already closed
                self._loop.remove_reader(sock)
                if self._writing:
                    self._loop.remove_writer(sock)
        self._writing = False

    def _readable(self) -> None:
        self._client.loop_read()
        # TLS may hold decrypted bytes the selector cannot see: read them too.
        sock = self._sock
        while isinstance(sock, ssl.SSLSocket) and sock.pending() and self._sock is sock:
            self._client.loop_read()

    def _want_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._writing and self._sock is not None:
            self._writing = True
            self._loop.add_writer(self._sock, self._client.loop_write)

    def _no_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._writing and self._sock is not None:
            self._writing = False
            self._loop.remove_writer(self._sock)

    def _closed(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._detach()

    # -- paho callbacks (inline, on the loop) -------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._connack = (reason, props)
        self._connack_event.set()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self.on_ack(mid)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        text = str(reason) if reason is not None else "connection ended"
        self._detach()
        self._mark_lost(LinkLost(text))

    def _mark_lost(self, exc: BaseException) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        self._lost_event.set()
        self._connack_event.set()  # lost before the CONNACK: wakes ``open``
        self.on_lost(exc)


def _failed(reason: ReasonCode | int) -> bool:
    if isinstance(reason, ReasonCode):
        return bool(reason.is_failure)
    return reason != 0

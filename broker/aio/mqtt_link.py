"""One MQTT connection of the publisher, driven by the event loop: paho's protocol, no aiomqtt.

Why not aiomqtt: per QoS 1 publish it costs a future, a ``wait_for`` and (the way a window
must drive it) a task, about twice the CPU of paho itself (``python -m
benchmarks.mqtt_clients``). Here paho's socket is registered with the event loop, paho's
callbacks run inline in the loop's reader callback, and a PUBACK is a plain function call
(``on_ack``) with the packet id. gmqtt was cheaper still, but its wheels install a top-level
``tests`` package that shadows any project's own.

The link is only the wire: what is sent, when, and what a PUBACK completes is
:class:`broker.sinks.mqtt.MqttPublisher`'s business (see :class:`Pipeline` there).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import anyio
import paho.mqtt.client as paho
from aiomqtt import MqttError, ProtocolVersion
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["LinkLost", "MqttLink", "WillMessage"]

#: How often paho's timers (keepalive PINGREQ, the missing-PINGRESP check) are looked at.
TICK = 1.0
#: Receive Maximum when the server sends none (MQTT 5 default; 3.1.1 has no such limit).
DEFAULT_RECEIVE_MAXIMUM = 65535

_PAHO_PROTOCOL = {
    ProtocolVersion.V5: paho.MQTTv5,
    ProtocolVersion.V311: paho.MQTTv311,
    ProtocolVersion.V31: paho.MQTTv31,
}


class LinkLost(MqttError):
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

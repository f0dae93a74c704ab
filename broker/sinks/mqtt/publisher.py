"""``MqttPublisher``, the MQTT sink (SPEC section 4): retained state, online/offline status,
QoS 1 events.

How delivery works:

- A *pump* moves events from the bus subscription into the :class:`~.outbox.Outbox` as they
  come, so the bus never waits for the network; the outbox is bounded and coalesces older
  events of a credential when full, so the latest event of every credential always survives.
- A *connection loop* connects (:class:`~.connection.Connector`: MQTT 5, falling back to
  3.1.1 when the server refuses 5; failures retried with backoff), publishes
  ``online``, the retained state of every credential, then the outbox in order. The
  publisher starts before the engine's first pass: a connect during that pass sends the
  first-sight events as they are committed (each with its state), then, once the pass is
  done, the retained state of every credential it left unchanged. An event
  leaves the outbox only when the server acknowledged it (PUBACK): anything unacknowledged
  when a connection drops is sent again (at-least-once; consumers dedupe by CloudEvent
  ``id``).
- Stopping (cancellation), it flushes pending events, publishes ``offline`` and disconnects
  cleanly, each step bounded; killed, the server publishes the Last Will ``offline``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc
from aiomqtt import ProtocolVersion

from broker.aio.mqtt_link import MqttLink
from broker.aio.mqtt_material import (
    CONNECT_TIMEOUT,
    PROTOCOLS,
    describe_connect_error,
    protocol_name,
)
from broker.aio.wakeup import Wakeup
from broker.core.backoff import Backoff
from broker.core.events import CONTENT_TYPE, Event, payload_of, without_payload
from broker.core.mqtt_codec import MessageProperties
from broker.core.topics import Topics
from broker.port import SinkContext, SinkHealth

from .connection import Connector
from .material import OFFLINE, ONLINE, STATUS_CONTENT_TYPE, publish_properties
from .outbox import Outbox, Pipeline, SessionLost
from .retained import RetainedStates

if TYPE_CHECKING:
    from broker.config import MqttSettings

__all__ = ["FLUSH_TIMEOUT", "SHUTDOWN_TIMEOUT", "WINDOW", "MqttPublisher"]

log = logging.getLogger("broker.mqtt")

#: Unacknowledged publishes in flight at once, at most, by default (the server's Receive
#: Maximum, when lower, wins: mosquitto's default is 20). A few PUBACK round trips then cover
#: a burst; against a server that allows it, 100 rather than 20 cost each message a third
#: less CPU (fewer wake-ups and larger writes per PUBACK batch: benchmarks.mqtt_clients).
WINDOW = 100
#: At shutdown: pending events, then ``offline``, then DISCONNECT, each bounded, so that a
#: stopping daemon never hangs on a dead server and a backlog cannot crowd out ``offline``.
FLUSH_TIMEOUT = 2.0
SHUTDOWN_TIMEOUT = 1.0
#: Events queued behind this many are kept without their payload and encoded again when
#: sent (11 us each): a burst (start-up's first-sight events, a mass rotation) otherwise
#: held every payload until the server acknowledged it, 6 MB at 10,000 credentials. At
#: least a start-up pass (1,000 events, ``EngineTuning.max_batch``) stays encoded, about
#: 1 MB: with 256, three in four first-sight events were encoded twice.
ENCODED_AHEAD = 1024


class MqttPublisher:
    """The MQTT sink (SPEC section 4), made from a :class:`~broker.port.SinkContext`.

    Started by the broker when ``[mqtt]`` is configured; ``run`` reports itself started at
    once and never waits for the server: the daemon serves with MQTT down. :meth:`health`
    (and the attributes): ``connected``/``state``, the counters ``connects``, ``published``
    (events acknowledged by the server on their events topic), ``publish_failures``
    (publishes not acknowledged, to be sent again), ``connect_failures``, and ``buffered``
    (events waiting).

    ``settings`` defaults to the config's ``[mqtt]``; ``backoff``, ``protocols`` (tried in
    order, sticking to the first the server accepts), ``window`` (publishes in flight at
    most) and the timeouts are there for embedding, benchmarks and tests.
    """

    name = "mqtt"
    #: Started before the engine's first pass (:class:`~broker.port.EarlySink`): the
    #: first-sight events go out as each pass commits them; the retained state of what
    #: had none (unchanged since the last run) follows when the first pass is done.
    starts_early = True

    def __init__(
        self,
        context: SinkContext,
        *,
        settings: MqttSettings | None = None,
        backoff: Backoff | None = None,
        protocols: Sequence[ProtocolVersion] = PROTOCOLS,
        window: int = WINDOW,
        connect_timeout: float = CONNECT_TIMEOUT,
        flush_timeout: float = FLUSH_TIMEOUT,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        settings = settings if settings is not None else context.config.mqtt
        if settings is None:
            raise ValueError("MQTT is not configured ([mqtt] is missing)")
        if window < 1:
            raise ValueError("window must be at least 1")
        port = self._port = context.port
        self._settings = settings
        self.topics = Topics(settings.topic_prefix, port.host_id)
        self.client_id = settings.client_id or f"credbroker-{port.host_id}"
        self._connector = Connector(
            settings,
            client_id=self.client_id,
            status_topic=self.topics.status,
            backoff=backoff if backoff is not None else Backoff(),
            protocols=protocols,
            timeout=connect_timeout,
        )
        self._window = window
        self._flush_timeout = flush_timeout
        self._shutdown_timeout = shutdown_timeout
        self._outbox = Outbox(settings.buffer)
        self._retained = RetainedStates(port.state, source=port.source, clock=port.clock)
        self._changed = Wakeup()
        #: Set once the engine has a state for every credential (at once, but for a
        #: publisher started before the engine's first pass).
        self._started = anyio.Event()
        # Subscribed now rather than in ``run``: no event published from here on is missed
        # (a broker that makes its sinks before the engine's first pass gets the first-sight
        # events, and changes made while it was stopped, on the events topics too).
        self._subscription = port.subscribe("*", buffer=settings.buffer)
        self.connected = False
        self.connects = 0
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
        return self._connector.server

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
        return self._connector.protocol

    @property
    def connect_failures(self) -> int:
        """Failed connection attempts (a refusal of the protocol version is not one)."""
        return self._connector.failures

    def health(self) -> SinkHealth:
        """For ``/health``, ``/metrics`` and ``credbroker check``."""
        return SinkHealth(
            name=self.name,
            connected=self.connected,
            delivered=self.published,
            failures=self.publish_failures,
            pending=self.buffered,
            counters={
                "connects": self.connects,
                "connect_failures": self.connect_failures,
                "coalesced": self.coalesced,
                "in_flight_peak": self.in_flight_peak,
            },
        )

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
                tg.start_soon(self._await_started, name="mqtt start-up")
                task_status.started()
                await self._connect_loop()
        finally:
            self.close()
            self.connected = False

    async def _await_started(self) -> None:
        await self._port.wait_started()
        self._started.set()
        self._changed.poke()

    async def _pump(self) -> None:
        """Move events from the bus into the outbox as they come: the bus never waits on us."""
        async for event in self._subscription:
            self._take(event)

    def reconfigured(self, removed: Collection[str], added: Collection[str]) -> None:
        """A reload removed or added credentials: clear the removed ones' retained state.

        An added credential's retained state is published by the next connect, or by its
        first event; one re-added with unchanged content (silent) gets it from the resync
        in :meth:`_deliver`.
        """
        self._retained.reconfigured(removed, added)
        self._changed.poke()

    def _take(self, event: Event) -> None:
        if len(self._outbox) >= ENCODED_AHEAD:
            event = without_payload(event)
        self._retained.take(event)
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
        self._changed.poke()

    async def _connect_loop(self) -> None:
        while True:
            link, protocol = await self._connector.connect()
            lost = await self._serve(link, protocol)
            log.warning(
                "mqtt disconnected",
                extra={
                    "server": self.server,
                    "error": describe_connect_error(lost),
                    "buffered": len(self._outbox),
                },
            )
            await anyio.sleep(self._connector.backoff.next())

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, link: MqttLink, protocol: ProtocolVersion) -> BaseException:
        """Run one connection; returns why it ended. On cancellation, says ``offline`` first."""
        self.connected = True
        self.connects += 1
        self._retained.connected()
        # Never more in flight than the server takes (mosquitto advertises 20): past its
        # Receive Maximum an MQTT 5 server may drop the connection.
        pipe = Pipeline(
            link,
            max(1, min(self._window, link.receive_maximum)),
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

    async def _goodbye(self, link: MqttLink, pipe: Pipeline, protocol: ProtocolVersion) -> None:
        """Pending events, retained ``offline``, then a clean DISCONNECT (the Will is dropped).

        Runs shielded from the cancellation that stops the broker; every step is bounded.
        """
        props = publish_properties(protocol, CONTENT_TYPE)
        try:
            with anyio.move_on_after(self._flush_timeout):
                # What is in flight is acknowledged first, so that the rewind below hands out
                # only what never reached the server: nothing goes twice.
                await pipe.drain()
                # Events the engine published before the stop go out too, in order.
                while (event := self._subscription.get_nowait()) is not None:
                    self._take(event)
                self._outbox.rewind()
                while (item := self._outbox.next_unsent()) is not None:
                    await self._send_event(pipe, item[0], item[1], props)
                for event in self._retained.unsent():  # a state publish cut short
                    await self._send_state(pipe, event, props)
                await pipe.drain()
            with anyio.fail_after(self._shutdown_timeout):
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
        except (SessionLost, TimeoutError) as exc:
            log.warning(
                "mqtt could not publish offline; the server's Last Will says it",
                extra={
                    "server": self.server,
                    "error": describe_connect_error(exc),
                    "buffered": len(self._outbox),
                },
            )
        await link.close(self._shutdown_timeout)

    async def _session(
        self, link: MqttLink, pipe: Pipeline, protocol: ProtocolVersion
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
        return lost[0] if lost else SessionLost("connection ended")

    async def _deliver(
        self, pipe: Pipeline, protocol: ProtocolVersion, fail: Callable[[BaseException], None]
    ) -> None:
        props = publish_properties(protocol, CONTENT_TYPE)
        retained = self._retained
        synced = False
        try:
            await pipe.send(
                self.topics.status, ONLINE, True, publish_properties(protocol, STATUS_CONTENT_TYPE)
            )
            self._outbox.rewind()
            while True:
                if not synced and self._started.is_set():
                    # Every retained state, then the events in order; at start-up (the engine's
                    # first pass still running) the events as they come, each with its state,
                    # and once the pass is done the states of the credentials it left unchanged.
                    await self._sync_retained(pipe, props)
                    synced = True
                for name in sorted(retained.to_clear - retained.clearing):
                    await self._clear_state(pipe, name)
                for name in sorted(retained.resync):
                    retained.resync.discard(name)
                    latest = retained.latest_of(name)
                    if latest is not None and retained.sent.get(name) != latest.id:
                        await self._send_state(pipe, latest, props)
                item = self._outbox.next_unsent()
                if item is None:
                    await self._changed.wait()  # level-triggered: no wake-up is lost
                    continue
                await self._send_event(pipe, item[0], item[1], props)
        except SessionLost as exc:
            fail(exc)

    async def _sync_retained(self, pipe: Pipeline, props: MessageProperties | None) -> None:
        """Every credential's retained state not yet sent on this connection; the removed
        ones' cleared. Raises :class:`SessionLost`."""
        retained = self._retained
        configured = set(self._port.names())
        retained.to_clear_now(n for n in self._port.removed if n not in configured)
        # Never a made-up "not read yet" state: a credential held back at start-up (a
        # writer holds it) gets its state topic from its first event.
        for event in retained.all_latest(self._port.read_states()):
            if retained.sent.get(event.subject) != event.id:
                await self._send_state(pipe, event, props)
        for name in sorted(retained.to_clear):
            await self._clear_state(pipe, name)
        await pipe.drain()
        self._connector.backoff.reset()  # this server works: the next outage starts afresh
        log.info(
            "mqtt retained state published",
            extra={"credentials": len(retained.latest), "buffered": len(self._outbox)},
        )

    async def _send_state(
        self,
        pipe: Pipeline,
        event: Event,
        props: MessageProperties | None,
        payload: bytes | None = None,
    ) -> None:
        if payload is None:
            payload = self._retained.payload(event)
        self._retained.sending(event)
        await pipe.send(self.topics.state(event.subject), payload, True, props)

    async def _clear_state(self, pipe: Pipeline, name: str) -> None:
        # SPEC section 4: an empty retained message removes the topic's retained state. The
        # name stays to be cleared until the PUBACK: a connection lost before it clears it
        # again on the next connect (from the broker's removed credentials).
        self._retained.clearing_started(name)
        await pipe.send(
            self.topics.state(name), b"", True, None, partial(self._retained.cleared, name)
        )

    async def _send_event(
        self, pipe: Pipeline, key: int, event: Event, props: MessageProperties | None
    ) -> None:
        topic = self.topics.event(event.subject, event.type)
        payload = payload_of(event)  # encoded again if it was queued deep (ENCODED_AHEAD)
        await pipe.send(topic, payload, False, props, partial(self._delivered, key))
        # The state topic gets an event only while it is the credential's latest (a newer one
        # will set it: in a burst, only the last of a credential's events goes there), and
        # only once per connection (the reconnect sync may have sent it).
        if self._retained.owed(event):
            await self._send_state(pipe, event, props, payload)

    def _delivered(self, key: int) -> None:
        """The server acknowledged the event: it leaves the outbox."""
        self._outbox.ack(key)
        self.published += 1

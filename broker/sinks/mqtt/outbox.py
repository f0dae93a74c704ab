"""What the publisher holds for the MQTT server: the :class:`Outbox` of events not yet
acknowledged (ordered, bounded, coalescing), and the :class:`Pipeline` that keeps a window of
QoS 1 publishes in flight over one connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio

from broker.aio.mqtt_link import LinkLost, MqttLink
from broker.aio.mqtt_material import describe_connect_error
from broker.aio.wakeup import Wakeup
from broker.core.errors import BrokerError
from broker.core.events import Event
from broker.core.mqtt_codec import MessageProperties

__all__ = ["Outbox", "Pipeline", "SessionLost"]


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


class SessionLost(BrokerError):
    """Raised inside a session's task group when the connection is unusable (internal: never
    leaves the publisher)."""


class Pipeline:
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
        self._wake = Wakeup()
        link.on_ack = self._acked
        link.on_lost = self._lost

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"Pipeline(size={self.size}, in_flight={len(self)})"

    async def send(
        self,
        topic: str,
        payload: bytes,
        retain: bool,
        props: MessageProperties | None,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Publish (QoS 1) once the window has room; ``done()`` runs on the PUBACK."""
        if len(self._pending) >= self.size:
            await self._wait(lambda: len(self._pending) < self.size)
        try:
            mid = self._link.publish(topic, payload, retain, props)
        except LinkLost as exc:
            raise SessionLost(describe_connect_error(exc)) from exc
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
                        raise SessionLost(describe_connect_error(self._link.lost))
                    await self._wake.wait()  # level-triggered: no wake-up is lost
        except TimeoutError:
            raise SessionLost(f"no PUBACK within {self._ack_timeout:g} s") from None

    def _acked(self, mid: int) -> None:
        done = self._pending.pop(mid, None)
        if done is not None:
            done()
        self._wake.poke()

    def _lost(self, exc: BaseException) -> None:
        self._wake.poke()

"""The in-process event bus: every sink (embedded API, MQTT, SSE) is a subscriber."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections import deque

import anyio

from broker.events import Event
from broker.streams import EventStream

DEFAULT_BUFFER = 1024


class Subscription(EventStream):
    """A subscriber's bounded mailbox; iterate it with ``async for``.

    Publishing never waits for a subscriber. When the mailbox is full, older events of
    each credential are coalesced away so the latest event of every credential survives:
    a slow reader loses intermediate steps, never the current state.
    """

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        credential: str | None,
        buffer: int,
    ) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self._bus = bus
        self._type_re = re.compile(fnmatch.translate(pattern))
        self._credential = credential
        self._buffer = buffer
        self._limit = buffer
        self._queue: deque[Event] = deque()
        self._wakeup = anyio.Event()
        self._closed = False
        self.pattern = pattern
        #: Events dropped by coalescing, over the subscription's life.
        self.coalesced = 0

    def __repr__(self) -> str:
        return (
            f"Subscription(pattern={self.pattern!r}, credential={self._credential!r}, "
            f"queued={len(self._queue)}, coalesced={self.coalesced})"
        )

    def matches(self, event: Event) -> bool:
        if self._credential is not None and event.subject != self._credential:
            return False
        return self._type_re.match(event.type) is not None

    @property
    def pending(self) -> int:
        """Events waiting to be read."""
        return len(self._queue)

    def offer(self, event: Event) -> None:
        """Queue an event without ever blocking (called by the bus)."""
        if self._closed:
            return
        self._queue.append(event)
        if len(self._queue) > self._limit:
            self._coalesce()
        self._wakeup.set()

    def _coalesce(self) -> None:
        latest: dict[str, Event] = {}
        for event in self._queue:
            latest[event.subject] = event
        kept = sorted(latest.values(), key=lambda e: e.sequence)
        self.coalesced += len(self._queue) - len(kept)
        self._queue = deque(kept)
        # More distinct credentials than the buffer: the bound becomes "one per credential"
        # (with headroom, so that every further event does not trigger a full pass).
        self._limit = max(self._buffer, 2 * len(kept))

    def get_nowait(self) -> Event | None:
        """The next queued event, or ``None``."""
        return self._queue.popleft() if self._queue else None

    async def get(self) -> Event:
        """Wait for the next event; ``anyio.EndOfStream`` once the subscription is closed."""
        while not self._queue:
            if self._closed:
                raise anyio.EndOfStream
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        return self._queue.popleft()

    def close(self) -> None:
        """Stop receiving; a reader waiting in ``get`` sees the end of the stream."""
        if not self._closed:
            self._closed = True
            self._bus._unsubscribe(self)
            self._wakeup.set()


class Bus:
    """Fan-out of events to subscriptions, in publish order, never blocking the publisher."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self._closed = False

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscribe(
        self,
        pattern: str = "credentials.*",
        *,
        credential: str | None = None,
        buffer: int = DEFAULT_BUFFER,
    ) -> Subscription:
        """Subscribe to events whose type matches the glob ``pattern`` (and ``credential``)."""
        sub = Subscription(self, pattern, credential, buffer)
        if self._closed:
            sub.close()
        else:
            self._subscriptions.append(sub)
        return sub

    def publish(self, event: Event) -> None:
        for sub in self._subscriptions:
            if sub.matches(event):
                sub.offer(event)

    def close(self) -> None:
        """End every subscription (broker shutdown)."""
        self._closed = True
        for sub in list(self._subscriptions):
            sub.close()

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)

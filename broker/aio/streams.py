"""The shape every event stream has (:class:`EventReceiver`: ``async for``, ``async with``,
``get()``, ``close()``), and the coalescing mailbox behind the bus's subscriptions and the
client's streams."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Self

import anyio

from broker.aio.wakeup import Wakeup
from broker.core.events import Event


class EventReceiver(ABC):
    """An async iterator and context manager over :meth:`get`; :meth:`close` ends it.

    ``get`` raises ``anyio.EndOfStream`` once the stream is closed and drained; iteration
    then stops. Leaving ``async with`` closes the stream.
    """

    @abstractmethod
    async def get(self) -> Event:
        """The next event, waiting for it."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving; a reader waiting in :meth:`get` sees the end of the stream."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CoalescingQueue(EventReceiver):
    """A bounded mailbox that never blocks its writer: the bus's subscriptions, the client's
    streams. When it holds more than ``buffer`` events, older events of each ``key`` (a
    credential) are dropped, so the latest of every key survives: a slow reader loses
    intermediate steps, never the current state.
    """

    def __init__(self, buffer: int, key: Callable[[Event], Hashable]) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self._buffer = buffer
        self._limit = buffer
        self._key = key
        self._queue: deque[Event] = deque()
        self._wakeup = Wakeup()
        self._closed = False
        #: Events dropped by coalescing, over the queue's life.
        self.coalesced = 0

    @property
    def pending(self) -> int:
        """Events waiting to be read."""
        return len(self._queue)

    def offer(self, event: Event) -> None:
        """Queue ``event`` without waiting (called by the writer)."""
        if self._closed:
            return
        self._queue.append(event)
        if len(self._queue) > self._limit:
            self._coalesce()
        self._wakeup.poke()

    def _coalesce(self) -> None:
        latest = {self._key(event): event for event in self._queue}
        kept = [event for event in self._queue if latest[self._key(event)] is event]
        self.coalesced += len(self._queue) - len(kept)
        self._queue = deque(kept)
        # More keys than the buffer: the bound becomes "one per key" (with headroom, so
        # that every further event does not trigger a full pass).
        self._limit = max(self._buffer, 2 * len(kept))

    def get_nowait(self) -> Event | None:
        """The next queued event, or ``None``."""
        return self._queue.popleft() if self._queue else None

    async def get(self) -> Event:
        """Wait for the next event; ``anyio.EndOfStream`` once closed and drained."""
        while not self._queue:
            if self._closed:
                raise anyio.EndOfStream
            await self._wakeup.wait()
        return self._queue.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._detach()
            self._wakeup.poke()

    def _detach(self) -> None:
        """Let go of the writer (called once, on close)."""

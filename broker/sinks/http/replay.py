"""SSE replay: the ring of the last events, from which ``Last-Event-ID`` / ``?since=N`` resume.

The ring follows a bus subscription of its own and holds every event with
``floor < sequence <= head``. A stream asking for an id it no longer holds (or one newer than
the broker's latest: its state was reset) gets ``event: reset`` instead, so the client
knows to re-read the state.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.core.events import Event, stream_reset

if TYPE_CHECKING:
    from broker.engine.bus import Subscription
    from broker.port import BrokerPort

log = logging.getLogger("broker.http")

#: Events kept for replay (``Last-Event-ID``); older ones answer ``event: reset``.
RING_SIZE = 4096


class ReplayRing:
    """The last ``size`` events, fed by a bus subscription made here.

    Subscribed in the constructor rather than when serving starts: a broker that makes its
    sinks before it starts the engine gets the first-sight events into the ring too.
    ``observe`` sees every event that enters the ring (the metrics count them).
    """

    def __init__(
        self, port: BrokerPort, size: int = RING_SIZE, *, observe: Callable[[Event], None]
    ) -> None:
        self._port = port
        self._ring: deque[Event] = deque(maxlen=size)
        self._observe = observe
        self.subscription = port.subscribe("*", buffer=size)
        self._floor = self._head = port.sequence
        self._lost = 0

    @property
    def head(self) -> int:
        """The newest sequence the ring accounts for."""
        return self._head

    async def follow(self) -> None:
        """Take in events until the bus closes (or this is cancelled)."""
        async for event in self.subscription:
            self._append(event)
            self.sync()

    def close(self) -> None:
        """Let go of the ring's subscription."""
        self.subscription.close()

    def sync(self) -> None:
        """Move every event the ring's subscription holds into the ring."""
        sub = self.subscription
        while (event := sub.get_nowait()) is not None:
            self._append(event)
        if sub.coalesced != self._lost:
            # A burst larger than the ring arrived between two reads and our own mailbox
            # coalesced some away: the ring has holes, so vouch only for what comes next.
            self._lost = sub.coalesced
            self._ring.clear()
            self._floor = self._head
            log.warning("event burst overflowed the replay ring; older ids now get a reset")

    def replay(self, sub: Subscription, since: int | None) -> tuple[bytes, int]:
        """The frames for a stream on ``sub`` resuming after ``since``, and the last sequence
        they account for. Call :meth:`sync` first, with no await in between."""
        # The engine numbers an event before it publishes it: a state read over HTTP can
        # carry a sequence the ring has not seen yet. That is not from the future.
        newest = max(self._head, self._port.sequence)
        if since is None:
            return b"", self._head
        if since < self._floor or since > newest:
            if since > newest:
                reason = (f"event {since} is newer than the broker's latest ({newest}): "
                          "its state was reset; re-read the state")
            else:
                reason = (f"events after {since} are no longer kept (the broker keeps the "
                          f"last {self._ring.maxlen} since it started, from {self._floor}); "
                          "re-read the state")
            data = stream_reset({"reason": reason, "requested": since,
                                 "oldest": self._floor, "latest": newest},
                                source=self._port.source, now=self._port.clock())
            log.info("event stream reset", extra={"requested": since, "oldest": self._floor,
                                                  "latest": newest})
            return b"id: %d\nevent: reset\ndata: %s\n\n" % (newest, data), newest
        frames = [frame(e) for e in self._ring if e.sequence > since and sub.matches(e)]
        return b"".join(frames), max(since, self._head)

    def _append(self, event: Event) -> None:
        ring = self._ring
        if len(ring) == ring.maxlen:
            self._floor = ring[0].sequence
        ring.append(event)
        self._head = max(self._head, event.sequence)
        self._observe(event)


def frame(event: Event) -> bytes:
    """``event`` as one SSE message (``id``, ``event``, ``data``)."""
    payload = event.payload
    if b"\n" in payload or b"\r" in payload:  # never from our encoder; stay correct anyway
        payload = b"\ndata: ".join(payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                                   .split(b"\n"))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.sequence, event.type.encode(), payload)

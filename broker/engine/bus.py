"""The in-process event bus: every sink (embedded API, MQTT, SSE) is a subscriber."""

from __future__ import annotations

import contextlib
import fnmatch
import re

from broker.aio.streams import CoalescingQueue
from broker.core.events import Event, without_payload

DEFAULT_BUFFER = 1024


class Subscription(CoalescingQueue):
    """A subscriber's bounded mailbox; iterate it with ``async for``.

    Publishing never waits for a subscriber. When the mailbox is full, older events of
    each credential are coalesced away so the latest event of every credential survives.
    """

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        credential: str | None,
        buffer: int,
    ) -> None:
        super().__init__(buffer, key=_subject)
        self._bus = bus
        self._type_re = re.compile(fnmatch.translate(pattern))
        self._credential = credential
        self.pattern = pattern

    def __repr__(self) -> str:
        return (
            f"Subscription(pattern={self.pattern!r}, credential={self._credential!r}, "
            f"queued={len(self._queue)}, coalesced={self.coalesced})"
        )

    def matches(self, event: Event) -> bool:
        if self._credential is not None and event.subject != self._credential:
            return False
        return self._type_re.match(event.type) is not None

    def _detach(self) -> None:
        self._bus._unsubscribe(self)


class _WithoutPayloads(Subscription):
    """A subscription whose events are queued without their encoded payloads (a class of
    its own, so that every other subscriber's ``offer`` stays the plain one)."""

    def offer(self, event: Event) -> None:
        super().offer(without_payload(event))


def _subject(event: Event) -> str:
    return event.subject


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
        payloads: bool = True,
    ) -> Subscription:
        """Subscribe to events whose type matches the glob ``pattern`` (and ``credential``).

        ``payloads=False``: the events come without their encoded payload (``payload_of``
        encodes it again if ever needed), for a subscriber that reads only their fields and
        may hold thousands queued (at start-up, one per credential: 6 MB at 10,000).
        """
        kind = Subscription if payloads else _WithoutPayloads
        sub = kind(self, pattern, credential, buffer)
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

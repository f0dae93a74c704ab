"""Where a consumer client's event came from, and what a state read back stands for.

Shared by the client and its transports: the broker's ``host_id`` in an event's ``source``,
the event a state document read over HTTP stands for, and which of two events of a
credential is the newer.
"""

from __future__ import annotations

import time

from broker.core.events import EVENT_FOR_STATUS, REFRESHED, Event
from broker.core.state import State
from broker.core.timefmt import format_time, parse_time

__all__ = [
    "REFRESHED",
    "SOURCE_PREFIX",
    "host_of",
    "host_of_source",
    "newer",
    "state_event",
    "with_source",
]

SOURCE_PREFIX = "urn:credbroker:"

def host_of(event: Event) -> str:
    """The broker's ``host_id`` an event came from (its ``source`` without the prefix)."""
    return event.source.removeprefix(SOURCE_PREFIX)


def state_event(state: State, source: str) -> Event:
    """An event standing for a state document read back over HTTP (not a new change).

    Its id is derived from the sequence, so reading the same state twice yields one event.
    """
    event = Event(
        type=EVENT_FOR_STATUS[state.status],
        subject=state.credential,
        data=state,
        source=source,
        id=f"{source}#state-{state.sequence}",
        time=format_time(time.time() if state.changed_at is None else state.changed_at) or "",
    )
    return Event.from_dict(event.to_dict())


def with_source(event: Event, source: str) -> Event:
    return Event.from_dict({**event.to_dict(), "source": source})


def host_of_source(source: str) -> str:
    return source.removeprefix(SOURCE_PREFIX)


def newer(event: Event, previous: Event) -> bool:
    """True if ``event`` supersedes ``previous`` (of the same host and credential)."""
    if event.sequence > previous.sequence:
        return True
    # A lower sequence that is also later in time: the broker's counter restarted (its
    # state_dir was lost). Anything else is an old event delivered late.
    return event.sequence < previous.sequence and parse_time(event.time) > parse_time(previous.time)

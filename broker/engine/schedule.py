"""When the engine must look at a credential again, without a file change telling it to.

Three kinds of deadline: a lifetime one (the state moves to ``expiring`` or ``expired``), a
re-read once a settle window closes, and a retry after a broker fault. One heap holds them
all, with lazy deletion for lifetime deadlines superseded by a newer state.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from enum import StrEnum

from broker.core.machine import next_deadline
from broker.core.state import State

__all__ = ["Deadlines", "Due", "Kind"]


class Kind(StrEnum):
    """Why a deadline was set."""

    LIFE = "life"  # the state machine's next_deadline: tick then
    SETTLE = "settle"  # a settle window closes: read again
    RETRY = "retry"  # a broker fault: read again


@dataclass(slots=True)
class Due:
    """What came due: credentials to tick, and credentials to read again."""

    tick: set[str] = field(default_factory=set)
    reread: set[str] = field(default_factory=set)


class Deadlines:
    """A heap of (when, name, kind). A lifetime entry counts only while it is the one
    recorded for its credential; the others always count."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, Kind]] = []
        self._life: dict[str, float] = {}

    def __len__(self) -> int:
        """Entries in the heap, superseded ones included."""
        return len(self._heap)

    def __contains__(self, entry: object) -> bool:
        """Whether ``(when, name, kind)`` is in the heap."""
        return entry in self._heap

    @property
    def followed(self) -> int:
        """Credentials with a live lifetime deadline."""
        return len(self._life)

    def life(self, name: str) -> float | None:
        """``name``'s live lifetime deadline."""
        return self._life.get(name)

    def at(self, when: float, name: str, kind: Kind) -> None:
        """Look at ``name`` again at ``when`` (a ``SETTLE`` or ``RETRY`` deadline)."""
        heapq.heappush(self._heap, (when, name, kind))

    def follow(self, name: str, state: State | None) -> bool:
        """Set ``name``'s lifetime deadline from ``state``; whether it changed."""
        deadline = next_deadline(state) if state is not None else None
        if deadline is None or not math.isfinite(deadline):
            self._life.pop(name, None)
            return False
        if self._life.get(name) == deadline:
            return False
        self._life[name] = deadline
        heapq.heappush(self._heap, (deadline, name, Kind.LIFE))
        if len(self._heap) > 2 * len(self._life) + 64:
            self._compact()
        return True

    def take_due(self, now: float) -> Due:
        """Remove and return everything due at ``now``."""
        due = Due()
        while self._heap and self._heap[0][0] <= now:
            when, name, kind = heapq.heappop(self._heap)
            if kind is not Kind.LIFE:
                due.reread.add(name)
            elif self._life.get(name) == when:
                del self._life[name]
                due.tick.add(name)
        return due

    def delay(self, now: float, cap: float) -> float:
        """How long to sleep from ``now`` until the next deadline, at most ``cap``."""
        if not self._heap:
            return cap
        return min(cap, max(0.0, self._heap[0][0] - now))

    def _compact(self) -> None:
        """Drop superseded lifetime entries. Lazy deletion alone keeps one per content
        change until its time comes: a credential rotated often within a long lifetime would
        grow the heap without bound. Amortised O(1) per push."""
        self._heap = [
            entry for entry in self._heap
            if entry[2] is not Kind.LIFE or self._life.get(entry[1]) == entry[0]
        ]
        heapq.heapify(self._heap)

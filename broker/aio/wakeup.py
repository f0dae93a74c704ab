"""Wake-ups for loops that sleep until something changed: one waiter (``Wakeup``) or many
(``Broadcast``).

Both replace the hand-made "swap in a fresh ``anyio.Event``" pattern, whose ordering (swap
before looking, or a poke is lost) every caller had to get right.
"""

from __future__ import annotations

import math

import anyio

__all__ = ["Broadcast", "Wakeup"]


class Wakeup:
    """Level-triggered: unlike a fresh ``anyio.Event`` per wait, a poke that comes before
    ``wait`` is not lost. For one waiting loop; it re-checks its condition after each wait."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def poke(self) -> None:
        self._event.set()

    def is_poked(self) -> bool:
        """A poke is pending (the next ``wait`` returns at once)."""
        return self._event.is_set()

    async def wait(self, seconds: float = math.inf) -> None:
        """Return when poked (now or since the last wait) or after ``seconds``."""
        with anyio.move_on_after(seconds):
            await self._event.wait()
        if self._event.is_set():
            self._event = anyio.Event()


class Broadcast:
    """Edge-triggered, for many waiters: ``wait`` returns at the next ``notify`` after it began.

    A waiter checks its condition, then waits (no await in between), then checks again.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        """Wake everyone waiting now; later waiters wait for the next notify."""
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()

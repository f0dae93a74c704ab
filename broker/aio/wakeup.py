"""A level-triggered wake-up for loops that sleep until poked or until a timeout."""

from __future__ import annotations

import math

import anyio


class Wakeup:
    """Unlike a fresh ``anyio.Event`` per wait, a poke that comes before ``wait`` is not lost."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def poke(self) -> None:
        self._event.set()

    async def wait(self, seconds: float = math.inf) -> None:
        """Return when poked (now or since the last wait) or after ``seconds``."""
        with anyio.move_on_after(seconds):
            await self._event.wait()
        if self._event.is_set():
            self._event = anyio.Event()

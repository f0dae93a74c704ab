"""The shape every event stream has: ``async for``, ``async with``, ``get()``, ``close()``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

import anyio

from broker.events import Event


class EventStream(ABC):
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

"""``Follower``: a :class:`~broker.client.BrokerClient` run in a daemon thread of its own, for
synchronous services (``client.follow_in_thread()``).
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any, Generic, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from broker.core.backoff import Backoff

__all__ = ["Follower"]

log = logging.getLogger("broker.client")

#: The client a follower runs: a ``BrokerClient`` (any async context manager that follows).
C = TypeVar("C", bound=AbstractAsyncContextManager[Any])


class Follower(Generic[C]):
    """A daemon thread running a :class:`~broker.client.BrokerClient` (see
    ``follow_in_thread``), restarted with backoff should it fail."""

    def __init__(self, client: C, *, name: str) -> None:
        self.client = client
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._lock = threading.Lock()
        self._stopping = False
        self._scope: anyio.CancelScope | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        #: Times the client failed and was started again.
        self.restarts = 0

    def __repr__(self) -> str:
        return f"Follower({self.client!r}, alive={self._thread.is_alive()})"

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the client and wait (bounded) for the thread to end; idempotent."""
        with self._lock:
            self._stopping = True
            scope, token = self._scope, self._token
        if scope is not None and token is not None:
            with suppress(RuntimeError):  # the loop already ended
                anyio.from_thread.run_sync(scope.cancel, token=token)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _main(self) -> None:
        anyio.run(self._follow)

    async def _follow(self) -> None:
        with anyio.CancelScope() as scope:
            with self._lock:
                if self._stopping:
                    return
                self._scope, self._token = scope, anyio.lowlevel.current_token()
            backoff = Backoff()
            while True:
                try:
                    async with self.client:
                        await anyio.sleep_forever()
                except Exception:
                    self.restarts += 1
                    delay = backoff.next()
                    log.exception("broker client failed; starting it again",
                                  extra={"retry_in": round(delay, 3)})
                    await anyio.sleep(delay)

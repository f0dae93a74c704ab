"""`CredentialCache` (a service's own loader, re-run once per new generation) and `invalidates`.

A load is accepted only if every file of the event that announced the generation has the
announced size and mtime both before and after the loader ran: a read that races the next
writer (``cmd > file`` truncates first) is retried with a bounded backoff and never cached.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import anyio
import anyio.from_thread

from broker.aio.wakeup import Wakeup
from broker.core.backoff import Backoff
from broker.core.events import Event
from broker.core.state import Status
from broker.core.timefmt import format_time

from .origin import SOURCE_PREFIX, host_of
from .reports import REPORT_INTERVAL

if TYPE_CHECKING:
    from .broker_client import BrokerClient

__all__ = ["CredentialCache", "GenerationGate", "invalidates"]

log = logging.getLogger("broker.client")

T = TypeVar("T")
F = TypeVar("F")

#: A generation whose content a consumer can use.
_USABLE = frozenset({Status.VALID, Status.EXPIRING})
#: How long ``get`` waits for a load under way (a new generation announced, not loaded yet).
DEFAULT_WAIT = 5.0
#: Delays between attempts at a read that raced a writer: 10 ms doubling to 0.5 s, ~3 s in all.
RETRY_DELAYS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.5, 0.5)


class GenerationGate:
    """Says yes once per new usable generation of one credential (per broker host)."""

    def __init__(self, credential: str, host_id: str | None = None) -> None:
        self.credential = credential
        self._source = None if host_id is None else SOURCE_PREFIX + host_id
        self._seen: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"GenerationGate({self.credential!r})"

    def new(self, event: Event) -> bool:
        """True when ``event`` brings a generation not acted on yet, with usable content."""
        if event.subject != self.credential or event.data.status not in _USABLE:
            return False
        if self._source is not None and event.source != self._source:
            return False
        host = host_of(event)
        if host and "" in self._seen:
            # States read over HTTP before the daemon's host_id was known (see rehost).
            self._seen.setdefault(host, self._seen.pop(""))
        # The same generation arrives more than once (event and state topics, retained copies
        # after a reconnect, a re-read after a gap): act on each once.
        if self._seen.get(host) == event.data.generation:
            return False
        self._seen[host] = event.data.generation
        return True


def invalidates(
    credential: str,
    target: F | None = None,
    *,
    client: BrokerClient,
    host_id: str | None = None,
) -> Any:
    """Clear ``target`` on each new generation of ``credential``, once per generation.

    ``target`` is anything with ``cache_clear()`` (a ``functools.lru_cache``/``cache``
    function) or else a callback called with the event. Without ``target``, a decorator::

        @invalidates("nebius", client=client)
        @functools.lru_cache
        def nebius_session(): ...

    Returns ``target`` itself. Build what the cached function returns from a
    :class:`CredentialCache` of the same client: its reload is under way before any cache is
    cleared, so the next call gets the new content, never a half-written file.
    """
    gate = GenerationGate(credential, host_id)

    def register(fn: F) -> F:
        clear = getattr(fn, "cache_clear", None)

        def on_event(event: Event) -> None:
            if gate.new(event):
                if callable(clear):
                    clear()
                else:
                    cast(Callable[[Event], object], fn)(event)

        client.on_event(on_event)
        return fn

    return register if target is None else register(target)


def _files_match(event: Event | None) -> bool:
    """Every present file of ``event`` has the announced size and mtime now."""
    if event is None:
        return True  # nothing announced yet (no broker): nothing to compare with
    for info in event.data.files:
        if not info.present or info.size is None:
            continue
        try:
            st = os.stat(info.path)
        except OSError:
            return False
        if st.st_size != info.size or (
            info.mtime is not None and format_time(st.st_mtime) != format_time(info.mtime)
        ):
            return False
    return True


class CredentialCache(Generic[T]):
    """A service's own credential loader, run again once per new generation.

    Given a ``client`` (a :class:`~broker.client.BrokerClient`), the cache reloads eagerly,
    in the client's event loop, as soon as a new generation is announced, and only accepts
    content that matches the announced file metadata (see the module doc). ``get()`` (sync,
    thread-safe) and ``await aget()`` return the value; while a load for a newly announced
    generation is under way they wait for it (at most ``wait`` seconds). A load that fails
    or keeps racing a writer keeps the last good value. With ``consumer_id``, the cache
    reports the generation it holds (SPEC section 3) over the client's transport, every
    ``report_interval`` seconds, and withdraws the report when the client stops.
    ``retry_delays``: the waits between attempts at a load that raced a writer or failed.

    Without a client it works lazily: feed it events with ``observe`` (or ``follow`` over any
    event stream, e.g. an in-process :meth:`broker.Broker.subscribe`) and the next ``get``
    loads. The loader may be sync (run in a worker thread) or async.
    """

    @overload
    def __init__(
        self,
        loader: Callable[[], Any],
        credential: str = "nebius",
        *,
        client: BrokerClient | None = None,
        consumer_id: str | None = None,
        host_id: str | None = None,
        wait: float = DEFAULT_WAIT,
        report_interval: float = REPORT_INTERVAL,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None: ...

    @overload
    def __init__(
        self,
        loader: Callable[[], T],
        credential: str = "nebius",
        *,
        client: BrokerClient | None = None,
        consumer_id: str | None = None,
        host_id: str | None = None,
        wait: float = DEFAULT_WAIT,
        report_interval: float = REPORT_INTERVAL,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None: ...

    def __init__(
        self,
        loader: Callable[[], Any],
        credential: str = "nebius",
        *,
        client: BrokerClient | None = None,
        consumer_id: str | None = None,
        host_id: str | None = None,
        wait: float = DEFAULT_WAIT,
        report_interval: float = REPORT_INTERVAL,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        if consumer_id is not None and client is None:
            raise ValueError("consumer_id needs a client to report over")
        self._loader = loader
        self.credential = credential
        self.consumer_id = consumer_id
        self._client = client
        self._gate = GenerationGate(credential, host_id)
        self._wait = wait
        self._retry_delays = tuple(retry_delays)
        self._report_interval = report_interval
        self._cond = threading.Condition()
        self._alock = anyio.Lock()
        self._value: T | None = None
        self._have = False
        self._version = 0  # bumped by every new generation observed and by invalidate()
        self._loaded_version = -1
        self._wanted: Event | None = None  # the latest usable generation announced
        self._held: Event | None = None  # the one whose content is loaded
        self._given_up: Event | None = None
        self._eager = False
        self._loop_thread: int | None = None
        self._load_wakeup = Wakeup()
        self._report_wakeup = Wakeup()
        self._scope: anyio.CancelScope | None = None
        self._closed = False
        #: Times the loader was called.
        self.loads = 0
        #: Loads not accepted because the files did not match the announcement.
        self.races = 0
        #: Loads that raised.
        self.failures = 0
        #: Reports delivered.
        self.reports = 0
        self._remove: Callable[[], None] | None = None
        if client is not None:
            self._remove = client.on_event(self.observe, first=True)
            client.attach(self._work)

    def __repr__(self) -> str:
        return (
            f"CredentialCache(credential={self.credential!r}, loads={self.loads}, "
            f"generation={self.generation}, stale={self.stale})"
        )

    # -- reading ----------------------------------------------------------------------------

    @property
    def generation(self) -> int | None:
        """The generation of the content held (None before the first accepted load)."""
        held = self._held
        return None if held is None else held.data.generation

    @property
    def stale(self) -> bool:
        """True when the value is missing or older than the latest announced generation."""
        return not self._have or self._loaded_version != self._version

    def _pending(self) -> bool:
        wanted = self._wanted
        return wanted is not None and wanted is not self._held and wanted is not self._given_up

    def _settled(self) -> bool:
        return not self._eager or (self._have and not self._pending())

    def get(self) -> T:
        """The value (sync, from any thread but the client's loop); see the class doc."""
        with self._cond:
            if self._eager:
                self._cond.wait_for(self._settled, timeout=self._wait)
                if self._have:
                    return cast(T, self._value)
            elif not self.stale:
                return cast(T, self._value)
        if inspect.iscoroutinefunction(self._loader):
            raise TypeError("this cache has an async loader: use `await cache.aget()`")
        # No running client: load here, in a loop of our own (the retry waits are async).
        if not anyio.run(self._load_for, self._wanted, self._version) and not self._have:
            raise LookupError(f"{self.credential}: could not load the credential")
        return cast(T, self._value)

    async def aget(self) -> T:
        """The value, from async code; see the class doc."""
        if self._eager:
            if not self._settled():
                await anyio.to_thread.run_sync(self._wait_settled)
            if self._have:
                return cast(T, self._value)
        elif not self.stale:
            return cast(T, self._value)
        async with self._alock:
            if not self.stale:  # another task loaded it while we waited
                return cast(T, self._value)
            if not await self._load_for(self._wanted, self._version) and not self._have:
                raise LookupError(f"{self.credential}: could not load the credential")
            return cast(T, self._value)

    def _wait_settled(self) -> None:
        with self._cond:
            self._cond.wait_for(self._settled, timeout=self._wait)

    # -- events -----------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Make the next ``get`` call the loader."""
        with self._cond:
            self._version += 1

    def observe(self, event: Event) -> bool:
        """Take note of ``event``; True when it announced a new generation to load."""
        if not self._gate.new(event):
            return False
        with self._cond:
            self._wanted = event
            self._version += 1
        if threading.get_ident() == self._loop_thread:
            self._load_wakeup.poke()
        return True

    async def follow(self, events: AsyncIterable[Event]) -> None:
        """Observe every event of ``events`` until it ends (run it in a task group)."""
        async for event in events:
            self.observe(event)

    def close(self) -> None:
        """Stop following and withdraw this consumer's report (from any thread)."""
        self._closed = True
        if self._remove is not None:
            self._remove()
        scope, client = self._scope, self._client
        if scope is None or client is None:
            return
        if threading.get_ident() == self._loop_thread:
            scope.cancel()
        else:
            client.call_in_loop(scope.cancel)

    # -- loading ----------------------------------------------------------------------------

    async def _work(self) -> None:
        if self._closed:
            return
        with anyio.CancelScope() as self._scope:
            self._loop_thread = threading.get_ident()
            self._eager = True
            try:
                async with anyio.create_task_group() as tg:
                    if self.consumer_id is not None:
                        tg.start_soon(self._report)
                    while True:
                        wanted = self._wanted
                        if wanted is not None and self._pending():
                            await self._load_for(wanted, self._version)
                        else:
                            await self._load_wakeup.wait()
            finally:
                with self._cond:
                    self._eager = False
                    self._cond.notify_all()

    def _attempts(self) -> Iterator[float]:
        yield 0.0
        yield from self._retry_delays

    async def _load_for(self, event: Event | None, version: int) -> bool:
        """Load the content ``event`` announced; True when accepted (then it is held)."""
        failed: BaseException | None = None
        for delay in self._attempts():
            await anyio.sleep(delay)
            if event is not None and self._wanted is not event:
                return False  # a newer generation was announced: load that one instead
            if not _files_match(event):
                self.races += 1
                continue
            try:
                value = await self._call_loader()
            except Exception as exc:
                self.failures += 1
                failed = exc
                continue
            if not _files_match(event):
                self.races += 1  # the files changed while the loader read them
                continue
            with self._cond:
                self._value, self._have, self._held = value, True, event
                self._loaded_version = version
                self._cond.notify_all()
            if threading.get_ident() == self._loop_thread:
                self._report_wakeup.poke()
            return True
        extra: dict[str, object] = {"credential": self.credential, "races": self.races}
        if event is not None:
            extra["generation"] = event.data.generation
        if failed is not None:
            # The exception's type only: its message may quote what the loader read.
            extra["error"] = type(failed).__name__
        log.warning("credential load not accepted; keeping the last good value", extra=extra)
        with self._cond:
            self._given_up = event
            self._cond.notify_all()
        return False

    async def _call_loader(self) -> T:
        self.loads += 1
        if inspect.iscoroutinefunction(self._loader):
            return cast(T, await self._loader())
        result = await anyio.to_thread.run_sync(self._loader)
        if inspect.isawaitable(result):
            result = await result
        return cast(T, result)

    # -- reporting --------------------------------------------------------------------------

    async def _report(self) -> None:
        assert self._client is not None and self.consumer_id is not None
        backoff = Backoff(1.0, 60.0)
        while True:
            held = self._held
            if held is None:
                await self._report_wakeup.wait()
                continue
            host = host_of(held)
            try:
                async with self._client.reporter(self.credential, self.consumer_id,
                                                 host) as reporter:
                    while (held := self._held) is not None:
                        now_from = host_of(held)
                        if host and now_from and now_from != host:
                            break  # another broker's generation: report on its channel
                        # "" is the one HTTP daemon before its host_id was known (a state
                        # read back): the same broker, so the report is not withdrawn.
                        host = host or now_from
                        await reporter.send(held.data.generation, held.data.fingerprint,
                                            time.time())
                        self.reports += 1
                        backoff.reset()
                        await self._report_wakeup.wait(self._report_interval)
            except Exception as exc:
                delay = backoff.next()
                log.warning("consumer report failed",
                            extra={"credential": self.credential, "consumer": self.consumer_id,
                                   "error": str(exc) or type(exc).__name__,
                                   "retry_in": round(delay, 3)})
                await anyio.sleep(delay)

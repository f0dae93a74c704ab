"""`BrokerClient`: one event model over either transport, gap detection, the reconnecting loop.

The transports (:mod:`broker.client.sse`, :mod:`broker.client.mqtt_transport`) only move bytes;
everything a consumer relies on is decided here, the same way for both: deduplication by
CloudEvent ``id``, per-credential ordering, the gap rule, callbacks and streams. The thread a
synchronous service runs the client in is :mod:`broker.client.follower`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from broker.aio import streams
from broker.core.backoff import Backoff
from broker.core.events import Event

from .follower import Follower
from .origin import host_of, host_of_source, newer, with_source

if TYPE_CHECKING:
    from aiomqtt import ProtocolVersion

    from .reports import Reporter

__all__ = ["BrokerClient", "EventStream", "Transport"]

log = logging.getLogger("broker.client")

DEFAULT_MAX_PAYLOAD = 1024 * 1024


class Transport(Protocol):
    """What :class:`BrokerClient` needs from a transport."""

    description: str

    async def session(self, client: BrokerClient) -> None:
        """Connect, feed ``client.accept`` until the connection drops; raise why it dropped.

        Calls ``client.connected_now()`` once it is receiving. Must handle
        ``client.take_resync()`` (a gap was seen): re-read the current state.
        """

    def reporter(self, credential: str, consumer_id: str, host: str) -> Reporter:
        """A channel for one consumer's adoption reports (SPEC section 3)."""


def _event_key(event: Event) -> tuple[str, str]:
    return event.source, event.subject


class EventStream(streams.CoalescingQueue):
    """One reader's view of a :class:`BrokerClient`: the current state first, then changes.

    Bounded like a bus subscription: when the reader falls ``buffer`` events behind, older
    events of each (host, credential) are coalesced away, so the latest always survives.
    Use ``async with client.events() as events: async for event in events: ...``.
    """

    def __init__(self, client: BrokerClient, buffer: int) -> None:
        super().__init__(max(1, buffer), key=_event_key)
        self._client = client

    def _detach(self) -> None:
        self._client._streams.discard(self)


class BrokerClient:
    """Follow a broker's events over its HTTP API (SSE) or MQTT; the same events either way.

    ``url`` is ``http://host:port`` or ``unix:/path/to/socket`` (the daemon's HTTP API, with
    ``token`` / ``token_file`` when it asks for a bearer token), or ``mqtt://host[:port]`` /
    ``mqtts://host[:port]`` (``host_id="+"`` follows a whole fleet). Use it as an async
    context manager (``async with client:``) in async code, or start it in a thread of its own
    with :meth:`follow_in_thread` in a synchronous service. While it runs, the client keeps a
    connection (reconnecting with capped, full-jitter backoff) and:

    - ``states`` maps ``(host_id, credential)`` to the latest :class:`~broker.core.events.Event`;
      the current state of every credential is read first (HTTP: ``GET /v1/credentials``,
      MQTT: the retained state topics);
    - each new event is delivered once (deduplicated by ``id``), per credential in order,
      first to the ``on_event`` callbacks, then to every ``events()`` stream;
    - a *gap* (an event whose broker-wide sequence, or whose credential's generation, skips
      one the client never saw: frames lost by a proxy, an MQTT server's full queue) makes
      the client re-read the current state instead of silently missing a change
      (``gaps`` counts them).

    Malformed or hostile input is ignored (counted in ``ignored``, logged without content).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8790",
        *,
        host_id: str = "+",
        prefix: str = "credbroker",
        credential: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        password_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        client_id: str | None = None,
        keepalive: int = 30,
        dedupe: int = 4096,
        buffer: int = 1024,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        backoff: Backoff | None = None,
        protocols: Sequence[ProtocolVersion] | None = None,
    ) -> None:
        scheme = url.split(":", 1)[0].lower()
        self.url = url
        self.host_id = host_id
        self.prefix = prefix
        self.credential = credential
        self._transport: Transport
        if scheme in ("mqtt", "mqtts"):
            if token is not None or token_file is not None:
                raise ValueError("token/token_file are for the HTTP API; MQTT uses username/"
                                 "password_file")
            # Imported here: a service on the HTTP API never loads an MQTT library.
            from broker.client.mqtt_transport import MqttTransport

            self._transport = MqttTransport(
                url, host_id=host_id, prefix=prefix, credential=credential, username=username,
                password=password, password_file=password_file, ca_file=ca_file,
                cert_file=cert_file, key_file=key_file, client_id=client_id,
                keepalive=keepalive, max_payload=max_payload, protocols=protocols,
            )
        elif scheme in ("http", "https", "unix"):
            if username is not None or password is not None or password_file is not None:
                raise ValueError("username/password are for MQTT; the HTTP API uses token_file")
            from broker.client.sse import SseTransport

            self._transport = SseTransport(
                url, host_id=host_id, credential=credential, token=token, token_file=token_file,
                ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                max_payload=max_payload,
            )
        else:
            raise ValueError("expected http://host:port, unix:/path, mqtt://host[:port] or "
                             "mqtts://host[:port]")
        self._dedupe = max(1, dedupe)
        self._buffer = buffer
        self._backoff = backoff if backoff is not None else Backoff()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._streams: set[EventStream] = set()
        self._callbacks: tuple[Callable[[Event], object], ...] = ()
        self._callbacks_lock = threading.Lock()
        self._first: set[Callable[[Event], object]] = set()
        self._workers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread: int | None = None
        self._became_ready = anyio.Event()
        self._ready = threading.Event()
        self._last_sequence: dict[str, int] = {}
        self._resync = False
        self._last_ignored_log = -float("inf")
        #: Latest event per (host_id, credential).
        self.states: dict[tuple[str, str], Event] = {}
        #: ``online`` / ``offline`` per host_id, as last published by each broker (MQTT).
        self.status: dict[str, str] = {}
        #: Receiving (the current state has been read).
        self.connected = False
        self.connects = 0
        #: Gaps detected (each one healed by re-reading the current state).
        self.gaps = 0
        #: Messages ignored as malformed, hostile or inconsistent with where they came from.
        self.ignored = 0

    def __repr__(self) -> str:
        return (
            f"BrokerClient({self._transport.description}, host_id={self.host_id!r}, "
            f"connected={self.connected}, states={len(self.states)})"
        )

    # -- public -----------------------------------------------------------------------------

    def on_event(
        self, callback: Callable[[Event], object], *, first: bool = False
    ) -> Callable[[], None]:
        """Call ``callback(event)`` for each new event, before any stream receives it.

        Callbacks run in the client's event loop (the follower thread under
        :meth:`follow_in_thread`), one at a time and in order; registering and removing them
        is thread-safe. They must not block: clear a cache, set a flag, hand work to a queue.
        A callback that raises is logged, not propagated. Returns a function that removes it.
        ``first``: before the callbacks without it (caches start their reload before any
        ``invalidates`` clears what is built from them).
        """
        with self._callbacks_lock:
            if first:
                position = sum(1 for c in self._callbacks if c in self._first)
                self._first.add(callback)
                callbacks = list(self._callbacks)
                callbacks.insert(position, callback)
                self._callbacks = tuple(callbacks)
            else:
                self._callbacks = (*self._callbacks, callback)

        def remove() -> None:
            with self._callbacks_lock:
                callbacks = list(self._callbacks)
                with suppress(ValueError):
                    callbacks.remove(callback)
                self._callbacks = tuple(callbacks)

        return remove

    def events(self, buffer: int | None = None) -> EventStream:
        """A stream of events: every known credential's latest state first, then changes."""
        stream = EventStream(self, self._buffer if buffer is None else buffer)
        for key in sorted(self.states):
            stream.offer(self.states[key])
        if self._tg is None:
            stream.close()  # not running: the stream holds what is known, then ends
        else:
            self._streams.add(stream)
        return stream

    async def wait_connected(self) -> None:
        """Wait until the client has read the current state and is receiving changes."""
        while not self.connected:
            await self._became_ready.wait()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """From any thread: wait until connected; False on timeout."""
        return self._ready.wait(timeout)

    def follow_in_thread(self, *, name: str = "credbroker-client") -> Follower[BrokerClient]:
        """Run the client in a daemon thread of its own, for synchronous services.

        Returns the :class:`Follower`; ``stop()`` it at shutdown (it also stops with the
        process). The thread restarts the client with backoff if it ever fails.
        """
        follower = Follower(self, name=name)
        follower.start()
        return follower

    async def __aenter__(self) -> BrokerClient:
        if self._tg is not None:
            raise RuntimeError("BrokerClient is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        tg.start_soon(self._run, name="broker client")
        for worker in list(self._workers):
            tg.start_soon(worker)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            self._token = self._loop_thread = None
            self.connected = False
            self._ready.clear()
            for stream in list(self._streams):
                stream.close()

    # -- for caches and transports ----------------------------------------------------------

    def attach(self, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``worker()`` in the client's task group while the client runs (from any thread).

        It is cancelled when the client stops and started again the next time it starts.
        """
        self._workers.append(worker)
        tg, token = self._tg, self._token
        if tg is None or token is None:
            return
        if threading.get_ident() == self._loop_thread:
            tg.start_soon(worker)
        else:
            anyio.from_thread.run_sync(partial(tg.start_soon, worker), token=token)

    def call_in_loop(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` in the client's event loop (from another thread); no-op if stopped."""
        token = self._token
        if token is not None:
            with suppress(RuntimeError):  # the loop ended meanwhile
                anyio.from_thread.run_sync(fn, token=token)

    def reporter(self, credential: str, consumer_id: str, host: str) -> Reporter:
        """A channel for one consumer's adoption reports over this client's transport."""
        return self._transport.reporter(credential, consumer_id, host)

    def connected_now(self) -> None:
        """Called by the transport once the current state is read and changes flow."""
        self.connected = True
        self.connects += 1
        self._backoff.reset()
        became_ready, self._became_ready = self._became_ready, anyio.Event()
        became_ready.set()
        self._ready.set()

    def disconnected(self) -> None:
        self.connected = False
        self._ready.clear()

    def take_resync(self) -> bool:
        """True (once) when a gap was seen and the transport should re-read the state."""
        resync, self._resync = self._resync, False
        return resync

    def wants_resync(self) -> bool:
        return self._resync

    def ignore(self, where: str, reason: str) -> None:
        """Count an input that was not accepted; log it without its content, rate-limited."""
        self.ignored += 1
        now = time.monotonic()
        extra = {"where": where, "reason": reason, "ignored": self.ignored}
        if now - self._last_ignored_log >= 10.0:
            self._last_ignored_log = now
            log.warning("broker client ignored a message", extra=extra)
        else:
            log.debug("broker client ignored a message", extra=extra)

    def accept(self, event: Event, *, live: bool, contiguous: bool = False) -> None:
        """Take an event from the transport.

        ``live`` is False for the current state read back (retained messages, an HTTP
        re-read): those bring the client up to date and are never a gap themselves.
        ``contiguous``: the transport delivers every event of the broker, so a hole in the
        broker-wide sequence is a gap (otherwise only a skipped generation is).
        """
        if event.id in self._seen:
            self._seen.move_to_end(event.id)
            return
        self._seen[event.id] = None
        if len(self._seen) > self._dedupe:
            self._seen.popitem(last=False)
        host = host_of(event)
        key = (host, event.subject)
        previous = self.states.get(key)
        last = self._last_sequence.get(host)
        if live and (
            (contiguous and last is not None and event.sequence > last + 1)
            or (previous is not None
                and event.data.generation > previous.data.generation + 1)
        ):
            self.gaps += 1
            self._resync = True
            log.info(
                "broker client saw a gap; re-reading the current state",
                extra={"credential": event.subject, "host_id": host, "sequence": event.sequence,
                       "after": last, "gaps": self.gaps},
            )
        if last is None or event.sequence > last:
            self._last_sequence[host] = event.sequence
        if self.credential is not None and event.subject != self.credential:
            return
        if previous is not None and not newer(event, previous):
            log.debug(
                "broker client skipped an older event",
                extra={"credential": event.subject, "host_id": host,
                       "sequence": event.sequence, "latest": previous.sequence},
            )
            return
        if previous is not None and event.sequence < previous.sequence:
            self._last_sequence[host] = event.sequence  # the broker's counter restarted
        self.states[key] = event
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:
                log.exception(
                    "broker client event callback failed",
                    extra={"credential": event.subject, "host_id": host},
                )
        for stream in list(self._streams):
            stream.offer(event)

    def rehost(self, source: str) -> None:
        """Give the states read before the broker's ``host_id`` was known (HTTP) their source."""
        host = host_of_source(source)
        for (old, name), event in list(self.states.items()):
            if old == "":
                del self.states[(old, name)]
                self.states.setdefault((host, name), with_source(event, source))
        if "" in self._last_sequence:
            self._last_sequence[host] = self._last_sequence.pop("")

    # -- the connection loop ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._transport.session(self)
            except Exception as exc:
                # Transports raise their own errors described without secrets.
                log.warning(
                    "broker client disconnected",
                    extra={"server": self._transport.description, "error": _describe(exc)},
                )
            finally:
                self.disconnected()
            await anyio.sleep(self._backoff.next())


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__



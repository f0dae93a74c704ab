"""Consume credential events from MQTT, in services that are not the broker.

::

    from broker.client import BrokerClient, CredentialCache

    cache = CredentialCache(load_token, credential="nebius")    # your own loader, sync or async
    async with BrokerClient("mqtt://127.0.0.1:1883", host_id="+") as client:
        client.on_event(cache.observe)             # stale after the next credentials.refreshed
        token = await cache.get()                  # the loader runs once per change
        async for event in client.events():       # every credential's state, then changes
            ...

This module imports neither the engine nor the watcher (only events, state and the MQTT
helpers), so it is cheap to use anywhere; ``CredentialCache`` works the same when fed from an
in-process :meth:`broker.Broker.subscribe`.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar, cast, overload
from urllib.parse import urlsplit

import anyio
import anyio.abc
from aiomqtt import Client, Message, MqttError, ProtocolVersion

from broker import streams
from broker.events import Event
from broker.mqtt import (
    CONNECT_TIMEOUT,
    PROTOCOLS,
    Backoff,
    close_client,
    connect_material,
    describe_connect_error,
    is_auth_refusal,
    is_protocol_refusal,
    join_topic,
    protocol_name,
)
from broker.timefmt import parse_time

__all__ = ["BrokerClient", "CredentialCache", "EventStream"]

log = logging.getLogger("broker.client")

T = TypeVar("T")

REFRESHED = "credentials.refreshed"
SOURCE_PREFIX = "urn:credbroker:"
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# Malformed messages are counted always but logged at most this often: a hostile publisher
# must not be able to flood the service's log.
_IGNORED_LOG_INTERVAL = 10.0


def _split_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise ValueError("expected mqtt://host[:port] or mqtts://host[:port]")
    if "@" in parts.netloc:
        raise ValueError("credentials in the url are not accepted; pass username/password_file")
    if not parts.hostname:
        raise ValueError("the url has no host")
    tls = scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


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
    """Follow one broker's (``host_id``) or a fleet's (``host_id="+"``) events over MQTT.

    An async context manager; inside it, the client keeps a connection (reconnecting with
    capped exponential backoff and jitter, MQTT 5 falling back to 3.1.1) and:

    - ``events()`` gives an :class:`EventStream`: the retained state of every credential
      first, then each new event once (deduplicated by CloudEvent ``id`` with a bounded LRU),
      per credential in order (an event older than one already delivered is skipped: after a
      broker's reconnect its buffered events follow the newer retained state);
    - ``states`` maps ``(host_id, credential)`` to the latest :class:`~broker.events.Event`;
    - ``status`` maps ``host_id`` to ``"online"`` / ``"offline"``.

    Malformed or hostile payloads are ignored (counted in ``ignored``, logged without their
    content); they never end the stream.
    """

    def __init__(
        self,
        url: str = "mqtt://127.0.0.1:1883",
        *,
        host_id: str = "+",
        prefix: str = "credbroker",
        credential: str | None = None,
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
        protocols: Sequence[ProtocolVersion] = PROTOCOLS,
    ) -> None:
        self._host, self._port, self._tls = _split_url(url)
        if password is not None and password_file is not None:
            raise ValueError("pass password or password_file, not both")
        if not protocols:
            raise ValueError("need at least one protocol")
        self.prefix = prefix
        self.host_id = host_id
        self.credential = credential
        # Validated here, so a bad name fails at construction rather than at subscribe.
        self._filters = (
            join_topic(prefix, host_id, "state", credential or "+", wildcards=True),
            join_topic(prefix, host_id, "status", wildcards=True),
            join_topic(prefix, host_id, "events", credential or "+", "+", wildcards=True),
        )
        self._username = username
        self._password = password
        self._password_file = password_file
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self._client_id = client_id
        self._keepalive = keepalive
        self._dedupe = max(1, dedupe)
        self._buffer = buffer
        self._max_payload = max_payload
        self._backoff = backoff if backoff is not None else Backoff()
        self._protocols = tuple(protocols)
        self._protocol_index = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._streams: set[EventStream] = set()
        self._callbacks: list[Callable[[Event], object]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._became_ready = anyio.Event()
        self._last_ignored_log = -math.inf
        #: Latest event per (host_id, credential).
        self.states: dict[tuple[str, str], Event] = {}
        #: ``online`` / ``offline`` per host_id, as last published by each broker.
        self.status: dict[str, str] = {}
        #: Subscribed and receiving.
        self.connected = False
        self.connects = 0
        #: Messages ignored as malformed, hostile or inconsistent with their topic.
        self.ignored = 0

    def __repr__(self) -> str:
        return (
            f"BrokerClient(server={self._host}:{self._port}, prefix={self.prefix!r}, "
            f"host_id={self.host_id!r}, connected={self.connected}, states={len(self.states)})"
        )

    # -- public -----------------------------------------------------------------------------

    def on_event(self, callback: Callable[[Event], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for each new event, before any stream receives it.

        Synchronous and in order, so a :class:`CredentialCache` hooked here
        (``client.on_event(cache.observe)``) is invalidated before anyone reading
        ``events()`` can react to the same event. A callback that raises is logged, not
        propagated. Returns a function that removes the callback.
        """
        self._callbacks.append(callback)

        def remove() -> None:
            with suppress(ValueError):
                self._callbacks.remove(callback)

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
        """Wait until the client is subscribed (and so receiving)."""
        while not self.connected:
            await self._became_ready.wait()

    async def __aenter__(self) -> BrokerClient:
        if self._tg is not None:
            raise RuntimeError("BrokerClient is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._run, name="broker client")
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
            for stream in list(self._streams):
                stream.close()

    # -- connection -------------------------------------------------------------------------

    @property
    def _server(self) -> str:
        return f"{self._host}:{self._port}"

    async def _run(self) -> None:
        while True:
            protocol = self._protocols[self._protocol_index]
            try:
                client = await self._connect(protocol)
            except (MqttError, OSError, ValueError) as exc:
                if is_protocol_refusal(exc) and self._protocol_index + 1 < len(self._protocols):
                    self._protocol_index += 1
                    continue
                delay = self._backoff.next()
                extra: dict[str, object] = {
                    "server": self._server,
                    "error": describe_connect_error(exc),
                    "retry_in": round(delay, 3),
                }
                if is_auth_refusal(exc):
                    extra["hint"] = "check the username and password"
                log.warning("broker client connect failed", extra=extra)
                await anyio.sleep(delay)
                continue
            try:
                await self._receive(client, protocol)
            except MqttError as exc:
                log.warning(
                    "broker client disconnected",
                    extra={"server": self._server, "error": describe_connect_error(exc)},
                )
            finally:
                self.connected = False
                await close_client(client)
            await anyio.sleep(self._backoff.next())

    async def _connect(self, protocol: ProtocolVersion) -> Client:
        from_file, context = await connect_material(
            self._password_file, self._tls, self._ca_file, self._cert_file, self._key_file
        )
        password = self._password if from_file is None else from_file
        client = Client(
            self._host,
            self._port,
            username=self._username,
            password=password,
            identifier=self._client_id,
            protocol=protocol,
            keepalive=self._keepalive,
            timeout=CONNECT_TIMEOUT + 5,
            tls_context=context,
            logger=logging.getLogger("broker.client.paho"),
        )
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                await client.__aenter__()
        except MqttError:
            raise
        except BaseException:
            await close_client(client, wait=0.2)
            raise
        return client

    async def _receive(self, client: Client, protocol: ProtocolVersion) -> None:
        # State first: the server sends a filter's retained messages right after its SUBACK,
        # so subscribing to the state topics before the events puts the current state first.
        for topic in self._filters:
            await client.subscribe(topic, qos=1)
        self.connected = True
        self.connects += 1
        self._backoff.reset()
        became_ready, self._became_ready = self._became_ready, anyio.Event()
        became_ready.set()
        log.info(
            "broker client connected",
            extra={
                "server": self._server,
                "protocol": protocol_name(protocol),
                "filters": ",".join(self._filters),
            },
        )
        async for message in client.messages:
            self._on_message(message)

    # -- messages ---------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        topic = message.topic.value
        payload = message.payload
        rest = topic[len(self.prefix) + 1 :] if topic.startswith(self.prefix + "/") else ""
        parts = rest.split("/")
        if len(parts) == 2 and parts[1] == "status":
            text = bytes(payload).decode("utf-8", "replace")
            if not text:
                self.status.pop(parts[0], None)  # its retained status was cleared
            elif text in ("online", "offline"):
                self.status[parts[0]] = text
            else:
                self._ignore(topic, "status is neither online nor offline")
            return
        if len(parts) == 3 and parts[1] == "state":
            host, credential, event_type = parts[0], parts[2], None
        elif len(parts) == 4 and parts[1] == "events":
            host, credential, event_type = parts[0], parts[2], parts[3]
        else:
            self._ignore(topic, "unexpected topic")
            return
        if not payload:
            return  # an emptied retained message: a credential that was removed
        if len(payload) > self._max_payload:
            self._ignore(topic, f"payload larger than {self._max_payload} bytes")
            return
        event = self._parse(topic, bytes(payload))
        if event is None:
            return
        if (
            event.subject != credential
            or event.source != SOURCE_PREFIX + host
            or (event_type is not None and event.type != event_type)
        ):
            self._ignore(topic, "the event does not match its topic")
            return
        self._accept(host, event)

    def _parse(self, topic: str, payload: bytes) -> Event | None:
        try:
            event = Event.from_json(payload)
            parse_time(event.time)
        except Exception as exc:  # hostile input: nothing may escape
            # Only the kind of problem: parser messages can quote the payload.
            reason = "not JSON" if "not JSON" in str(exc) else "not a credbroker event"
            self._ignore(topic, reason)
            return None
        return event

    def _ignore(self, topic: str, reason: str) -> None:
        self.ignored += 1
        now = time.monotonic()
        if now - self._last_ignored_log >= _IGNORED_LOG_INTERVAL:
            self._last_ignored_log = now
            log.warning(
                "broker client ignored an MQTT message",
                extra={"topic": topic, "reason": reason, "ignored": self.ignored},
            )
        else:
            log.debug(
                "broker client ignored an MQTT message", extra={"topic": topic, "reason": reason}
            )

    def _accept(self, host: str, event: Event) -> None:
        if event.id in self._seen:
            self._seen.move_to_end(event.id)
            return
        self._seen[event.id] = None
        if len(self._seen) > self._dedupe:
            self._seen.popitem(last=False)
        key = (host, event.subject)
        previous = self.states.get(key)
        if previous is not None and not _newer(event, previous):
            log.debug(
                "broker client skipped an older event",
                extra={
                    "credential": event.subject,
                    "host_id": host,
                    "sequence": event.sequence,
                    "latest": previous.sequence,
                },
            )
            return
        self.states[key] = event
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.exception(
                    "broker client event callback failed",
                    extra={"credential": event.subject, "host_id": host},
                )
        for stream in list(self._streams):
            stream.offer(event)


def _newer(event: Event, previous: Event) -> bool:
    if event.sequence > previous.sequence:
        return True
    # A lower sequence that is also later in time: the broker's counter restarted (its
    # state_dir was lost). Anything else is an old event delivered late.
    return event.sequence < previous.sequence and parse_time(event.time) > parse_time(previous.time)


class CredentialCache(Generic[T]):
    """A service's own credential loader, called again only after the credential changed.

    ``await cache.get()`` returns the cached value until a ``credentials.refreshed`` event for
    ``credential`` (of ``host_id``, when given) is observed; the next ``get`` then calls the
    loader once. Feed it events with ``observe``: ``client.on_event(cache.observe)`` for a
    :class:`BrokerClient` (invalidated before any reader of ``events()`` sees the refresh), or
    ``follow`` in a task over any event stream, e.g. an in-process
    :meth:`broker.Broker.subscribe`. The loader may be sync (run in a worker thread) or async.
    A refresh seen while a load is running makes the next ``get`` load again, since the
    running load may have read the old content.
    """

    @overload
    def __init__(
        self,
        loader: Callable[[], Awaitable[T]],
        credential: str = "nebius",
        *,
        host_id: str | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        loader: Callable[[], T],
        credential: str = "nebius",
        *,
        host_id: str | None = None,
    ) -> None: ...

    def __init__(
        self,
        loader: Callable[[], Any],
        credential: str = "nebius",
        *,
        host_id: str | None = None,
    ) -> None:
        self._loader = loader
        self.credential = credential
        self._source = None if host_id is None else SOURCE_PREFIX + host_id
        self._lock = anyio.Lock()
        self._value: T | None = None
        self._loaded = False
        self._version = 0  # bumped by every refresh observed
        self._loaded_version = -1
        self._refreshed: dict[str, int] = {}  # source -> generation of the last refresh acted on
        #: Times the loader was called.
        self.loads = 0

    def __repr__(self) -> str:
        return (
            f"CredentialCache(credential={self.credential!r}, loads={self.loads}, "
            f"stale={self.stale})"
        )

    @property
    def stale(self) -> bool:
        """True when the next ``get`` calls the loader."""
        return self._is_stale()

    def _is_stale(self) -> bool:
        return not self._loaded or self._loaded_version != self._version

    def invalidate(self) -> None:
        """Make the next ``get`` call the loader."""
        self._version += 1

    def observe(self, event: Event) -> bool:
        """Take note of ``event``; True when it invalidated the cached value."""
        if event.subject != self.credential or event.type != REFRESHED:
            return False
        if self._source is not None and event.source != self._source:
            return False
        # The same refresh arrives more than once (events and state topics, retained copies
        # after a reconnect): act on each generation once.
        if self._refreshed.get(event.source) == event.data.generation:
            return False
        self._refreshed[event.source] = event.data.generation
        self.invalidate()
        return True

    async def follow(self, events: AsyncIterable[Event]) -> None:
        """Observe every event of ``events`` until it ends (run it in a task group)."""
        async for event in events:
            self.observe(event)

    async def get(self) -> T:
        """The cached value, loading it first if it is missing or stale."""
        if not self._is_stale():
            return cast(T, self._value)
        async with self._lock:
            if not self._is_stale():  # another task loaded it while we waited
                return cast(T, self._value)
            version = self._version
            value = await self._load()
            self._value, self._loaded, self._loaded_version = value, True, version
            return value

    async def _load(self) -> T:
        self.loads += 1
        if inspect.iscoroutinefunction(self._loader):
            return cast(T, await self._loader())
        result = await anyio.to_thread.run_sync(self._loader)
        if inspect.isawaitable(result):
            result = await result
        return cast(T, result)

"""``Broker``: the embedded async API, and the lifespan that runs engine and sinks."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.abc import TaskGroup, TaskStatus

from broker.config import Config
from broker.core.fingerprint import Fingerprinter
from broker.core.state import State
from broker.engine.bus import DEFAULT_BUFFER, Bus, Subscription
from broker.engine.engine import Clock, Engine
from broker.engine.store import Loaded, Store, StoreError

log = logging.getLogger("broker")


class Sink(Protocol):
    """A delivery path (MQTT, HTTP): started once the engine has a state for everything.

    ``run`` calls ``task_status.started()`` once it is serving and returns when cancelled
    (the broker stopping); cleanup such as MQTT's ``offline`` goes in its ``finally``.
    """

    name: str

    async def run(self, *, task_status: TaskStatus[None]) -> None: ...


SinkFactory = Callable[["Broker"], Sink]


@runtime_checkable
class _Validating(Sink, Protocol):
    async def validate_now(self, name: str) -> State: ...


class Broker:
    """The credential broker, running inside the caller's event loop.

    ::

        async with Broker(load_config("config/broker.toml")) as b:
            b.state("nebius")
            await b.check("nebius")
            async with b.subscribe("credentials.*", credential="nebius") as events:
                async for event in events: ...
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        sinks: list[SinkFactory] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._extra_sinks = list(sinks or [])
        self.bus = Bus()
        self.store = Store(config.broker.state_dir)
        self._engine: Engine | None = None
        self._tg: TaskGroup | None = None
        self.source = f"urn:credbroker:{config.broker.host_id}"
        #: Running sinks by name ("mqtt", "http"), for health and metrics.
        self.sinks: dict[str, Sink] = {}
        #: The states persisted by the last run, as loaded at start (for sinks that recover
        #: what a crash may have kept from them, such as the webhook outbox).
        self.loaded_states: dict[str, State] = {}

    def __repr__(self) -> str:
        host_id, count = self._config.broker.host_id, len(self._config.credentials)
        return f"Broker(host_id={host_id!r}, credentials={count})"

    @property
    def config(self) -> Config:
        return self._config

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the broker is not running (use `async with Broker(...)`)")
        return self._engine

    # -- lifespan ---------------------------------------------------------------------------

    async def __aenter__(self) -> Broker:
        loaded, key = await anyio.to_thread.run_sync(self._open_store)
        for problem in loaded.problems:
            log.warning("state store problem", extra={"problem": problem})
        self.loaded_states = dict(loaded.states)
        self._engine = Engine(
            self._config.credentials,
            bus=self.bus,
            store=self.store,
            fingerprinter=Fingerprinter(key),
            source=self.source,
            resync_interval=self._config.broker.resync_interval,
            settle=self._config.broker.settle,
            states=loaded.states,
            sequence=loaded.sequence,
            clock=self._clock,
        )
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            # Sinks are made (and subscribe) before the engine's first read, so that the
            # first-sight events reach them too; they start serving once the engine has a
            # state for every credential.
            chosen: dict[str, Sink] = {}
            for factory in self._sink_factories():
                sink = factory(self)
                close = getattr(chosen.get(sink.name), "close", None)
                if close is not None:
                    close()  # made but never run: let go of its bus subscription
                chosen[sink.name] = sink  # a caller's sink replaces the built-in of its name
            self.sinks.update(chosen)
            await self._tg.start(self._engine.run)
            for sink in chosen.values():
                await self._tg.start(sink.run)
        except BaseException:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None
            raise
        log.info(
            "broker started",
            extra={
                "host_id": self._config.broker.host_id,
                "credentials": len(self._config.credentials),
                "inotify_watches": self.engine.watcher.watch_count,
                "sequence": self.engine.sequence,
            },
        )
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
            suppress = await tg.__aexit__(exc_type, exc, tb)
        finally:
            self.bus.close()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.engine.flush)
            log.info("broker stopped", extra={"sequence": self.engine.sequence})
        return suppress

    def _open_store(self) -> tuple[Loaded, bytes]:
        try:
            self.store.prepare()
            key = self.store.load_key(self._config.broker.fingerprint_key_file)
        except StoreError as exc:
            # Serve from memory: losing persistence beats refusing to tell anyone anything.
            self.store.error = str(exc)
            log.error("state store unavailable; running from memory", extra={"error": str(exc)})
            return Loaded(problems=[str(exc)]), secrets.token_hex(32).encode()
        loaded = self.store.load()
        self.store.reconcile(loaded, (c.name for c in self._config.credentials))
        return loaded, key

    def _sink_factories(self) -> list[SinkFactory]:
        # Imported here so that an embedded broker without them never loads these modules.
        factories: list[SinkFactory] = []
        credentials = self._config.credentials
        if any(c.refresh is not None for c in credentials):
            from broker.workers.refresh import Refresher

            factories.append(Refresher)
        if any(c.validate_ is not None for c in credentials):
            from broker.workers.validate import Validator

            factories.append(Validator)
        if self._config.mqtt is not None or self._config.http is not None:
            from broker.engine.consumers import ConsumerTracker

            factories.append(ConsumerTracker)
        if self._config.mqtt is not None:
            from broker.sinks.consumer_reports import MqttConsumerReports

            factories.append(MqttConsumerReports)
        if self._config.mqtt is not None:
            from broker.sinks.mqtt import MqttPublisher

            factories.append(MqttPublisher)
        if self._config.http is not None:
            from broker.sinks.http import HttpApi

            factories.append(HttpApi)
        if self._config.actions:
            from broker.sinks.actions import Actions

            factories.append(Actions)
        if self._config.webhooks:
            from broker.sinks.webhooks import Webhooks

            factories.append(Webhooks)
        factories.extend(self._extra_sinks)
        return factories

    def start_soon(
        self, fn: Callable[[], Coroutine[Any, Any, Any]], name: str | None = None
    ) -> None:
        """Run ``fn`` in the broker's task group (for sinks; stops with the broker)."""
        if self._tg is None:
            raise RuntimeError("the broker is not running")
        self._tg.start_soon(fn, name=name)

    # -- the embedded API -------------------------------------------------------------------

    def state(self, name: str) -> State:
        """The current state of credential ``name``, without I/O. ``KeyError`` if unknown."""
        return self.engine.state(name)

    def states(self) -> list[State]:
        """Every credential's state, in config order."""
        return self.engine.states()

    async def check(self, name: str) -> State:
        """Re-read ``name``'s files now (no cache), ask its validator if it has one, publish
        any change, and return the state (what ``sky check`` needs, and HTTP's POST check).
        """
        state = await self.engine.check(name)
        validator = self.sinks.get("validate")
        if isinstance(validator, _Validating):
            state = await validator.validate_now(name)
        return state

    def subscribe(
        self,
        pattern: str = "credentials.*",
        *,
        credential: str | None = None,
        buffer: int = DEFAULT_BUFFER,
    ) -> Subscription:
        """Events whose type matches ``pattern`` (a glob), optionally of one credential.

        Use as ``async with b.subscribe(...) as events: async for event in events``.
        """
        return self.bus.subscribe(pattern, credential=credential, buffer=buffer)

    async def reload(self, config: Config) -> None:
        """Apply a new config's credentials (SIGHUP), keeping every credential's state."""
        for section in ("mqtt", "http", "actions", "webhooks"):
            if getattr(config, section) != getattr(self._config, section):
                log.warning(f"[{section}] changed; restart the broker to apply it")
        for key, sink in (("refresh", "refresh"), ("validate_", "validate")):
            wanted = any(getattr(c, key) is not None for c in config.credentials)
            if wanted and sink not in self.sinks:
                log.warning(f"the first `{sink}` setting needs a restart of the broker to run")
        self._config = config
        removed, added = await self.engine.reconfigure(config.credentials)
        for each in self.sinks.values():
            # Sinks that keep per-credential state outside the engine (MQTT's retained topics).
            reconfigured = getattr(each, "reconfigured", None)
            if callable(reconfigured):
                reconfigured(removed, added)

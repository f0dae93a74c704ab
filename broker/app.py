"""``Broker``: the embedded async API, and the lifespan that runs engine and sinks.

This is the composition root: it makes the store, the bus and the engine, then every sink
from a :class:`~broker.port.SinkContext` whose port (:class:`_BrokerPort`) is the only way a
sink reaches back into the broker.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio
from anyio.abc import TaskGroup

from broker.config import Config, CredentialSettings
from broker.core.events import new_event_id
from broker.core.fingerprint import Fingerprinter
from broker.core.state import Problem, State
from broker.engine.bus import DEFAULT_BUFFER, Bus, Subscription
from broker.engine.consumers import ConsumerTracker
from broker.engine.engine import Engine
from broker.engine.reader import read_credential
from broker.engine.store import Loaded, Store, StoreError
from broker.port import (
    Clock,
    EarlySink,
    EngineHealth,
    IdFactory,
    Reconfigurable,
    Sink,
    SinkContext,
    SinkFactory,
    SinkHealth,
)

if TYPE_CHECKING:
    from broker.engine.reader import FileRead

__all__ = ["Broker", "Sink", "SinkFactory"]

log = logging.getLogger("broker")


@runtime_checkable
class _Validating(Sink, Protocol):
    """The validator worker, as the broker asks it (a forced check, its last verdict)."""

    async def validate_now(self, name: str) -> State: ...

    def last_verdict(self, name: str) -> float | None: ...


class Broker:
    """The credential broker, running inside the caller's event loop.

    ::

        async with Broker(load_config("config/broker.toml")) as b:
            b.state("nebius")
            await b.check("nebius")
            async with b.subscribe("credentials.*", credential="nebius") as events:
                async for event in events: ...

    ``clock`` (wall-clock seconds) and ``new_id`` (event ids) are fed to the engine and to
    every sink through the port; tests pass fakes.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        new_id: IdFactory | None = None,
        sinks: list[SinkFactory] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._new_id = new_id or new_event_id
        self._extra_sinks = list(sinks or [])
        self.bus = Bus()
        self.store = Store(config.broker.state_dir)
        self._engine: Engine | None = None
        self._tg: TaskGroup | None = None
        self.source = f"urn:credbroker:{config.broker.host_id}"
        #: Running sinks by name ("mqtt", "http"), for tests and embedders.
        self.sinks: dict[str, Sink] = {}
        #: The states persisted by the last run, as loaded at start, until every sink has
        #: started (for sinks that recover what a crash may have kept from them, such as the
        #: webhook outbox, which read them before they report started).
        self.loaded_states: dict[str, State] = {}
        self._port = _BrokerPort(self)
        #: The table of consumer reports, run beside the engine when a sink takes reports.
        self.consumers: ConsumerTracker | None = None

    def __repr__(self) -> str:
        host_id, count = self._config.broker.host_id, len(self._config.credentials)
        return f"Broker(host_id={host_id!r}, credentials={count})"

    @property
    def config(self) -> Config:
        return self._config

    @property
    def clock(self) -> Clock:
        """The wall clock of states and events (``time.time`` unless one was given)."""
        return self._clock or time.time

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the broker is not running (use `async with Broker(...)`)")
        return self._engine

    def sink_context(self) -> SinkContext:
        """A context to make a sink by hand with (tests, embedders): this broker's port."""
        return SinkContext(self._port, self._config)

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
            new_id=self._new_id,
        )
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            # Sinks are made (and subscribe) before the engine's first read, so that the
            # first-sight events reach them too; they start serving once the engine has a
            # state for every credential (an EarlySink, MQTT, before its first pass).
            if self._config.mqtt is not None or self._config.http is not None:
                self.consumers = ConsumerTracker(
                    self._port, self._config.broker.state_dir, clock=self.clock
                )
                # Every state document and event shows who reported using it.
                self._engine.consumers_of = self.consumers.consumers_of
            chosen: dict[str, Sink] = {}
            context = self.sink_context()
            for factory in self._sink_factories():
                sink = factory(context)
                replaced = chosen.get(sink.name)
                if replaced is not None:
                    replaced.close()  # made but never run: let go of its bus subscription
                chosen[sink.name] = sink  # a caller's sink replaces the built-in of its name
            self.sinks.update(chosen)
            # A sink that starts early delivers the first-sight events as each pass commits
            # them (MQTT), instead of all of them after the last pass.
            early = [s for s in chosen.values() if isinstance(s, EarlySink) and s.starts_early]
            for sink in early:
                await self._tg.start(sink.run)
            await self._tg.start(self._engine.run)
            if self.consumers is not None:
                await self._tg.start(self.consumers.run)
            for sink in chosen.values():
                if sink not in early:
                    await self._tg.start(sink.run)
            # Read by now by whoever recovers from them; the engine has states of its own.
            # Kept, they would be a second copy of every credential's state for good.
            self.loaded_states = {}
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
        payloads: bool = True,
    ) -> Subscription:
        """Events whose type matches ``pattern`` (a glob), optionally of one credential.

        Use as ``async with b.subscribe(...) as events: async for event in events``.
        ``payloads=False``: without their encoded JSON (see :meth:`Bus.subscribe`).
        """
        return self.bus.subscribe(pattern, credential=credential, buffer=buffer,
                                  payloads=payloads)

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
            if isinstance(each, Reconfigurable):
                each.reconfigured(removed, added)


class _BrokerPort:
    """:class:`broker.port.BrokerPort` over one broker's engine, store, bus and sinks."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    @property
    def _engine(self) -> Engine:
        return self._broker.engine

    @property
    def source(self) -> str:
        return self._broker.source

    @property
    def host_id(self) -> str:
        return self._broker.config.broker.host_id

    @property
    def state_dir(self) -> Path:
        return self._broker.config.broker.state_dir

    @property
    def clock(self) -> Clock:
        return self._broker.clock

    @property
    def new_id(self) -> IdFactory:
        return self._broker._new_id

    @property
    def sequence(self) -> int:
        return self._engine.sequence

    @property
    def loaded_states(self) -> Mapping[str, State]:
        return self._broker.loaded_states

    @property
    def removed(self) -> Collection[str]:
        configured = {c.name for c in self._broker.config.credentials}
        return {n for n in self._broker.store.tombstones if n not in configured}

    @property
    def consumers(self) -> ConsumerTracker | None:
        return self._broker.consumers

    async def wait_started(self) -> None:
        await self._engine.ready.wait()

    def names(self) -> list[str]:
        return self._engine.names

    def state(self, name: str) -> State:
        return self._engine.state(name)

    def states(self) -> list[State]:
        return self._engine.states()

    def read_states(self) -> list[State]:
        return self._engine.read_states()

    def settings(self, name: str) -> CredentialSettings:
        return self._engine.spec(name)

    def subscribe(
        self, pattern: str = "credentials.*", *, credential: str | None = None,
        buffer: int = DEFAULT_BUFFER, payloads: bool = True,
    ) -> Subscription:
        return self._broker.subscribe(pattern, credential=credential, buffer=buffer,
                                      payloads=payloads)

    async def check(self, name: str) -> State:
        return await self._broker.check(name)

    def read_files(self, name: str) -> Sequence[FileRead]:
        return read_credential(self._engine.spec(name)).reads

    def verdict_at(self, name: str) -> float | None:
        validator = self._broker.sinks.get("validate")
        return validator.last_verdict(name) if isinstance(validator, _Validating) else None

    async def report(
        self,
        name: str,
        source: str,
        problem: Problem | None,
        *,
        fingerprint: str | None = None,
        announce: str | None = None,
        scan: bool = False,
    ) -> State:
        return await self._engine.report_finding(
            name, source, problem, fingerprint=fingerprint, event_type=announce, scan=scan
        )

    async def announce(
        self, name: str, event_type: str, reason: str, *, generation: int
    ) -> bool:
        return await self._engine.announce(name, event_type, reason, generation=generation)

    def health(self) -> Sequence[SinkHealth]:
        return [sink.health() for sink in self._broker.sinks.values()]

    def engine_health(self) -> EngineHealth:
        engine = self._engine
        watcher = engine.watcher
        paths = {str(p) for name in engine.names for p in engine.spec(name).files.values()}
        polled = len(paths & watcher.polled)
        return EngineHealth(
            inotify_files=len(paths) - polled,
            polled_files=polled,
            inotify_watches=watcher.watch_count,
            watcher_errors=watcher.errors,
            read_faults=engine.read_faults,
            inotify_overflows=watcher.overflows,
            unrelated_events=watcher.unrelated_total,
            last_resync_seconds=engine.last_resync_seconds,
            sequence=engine.sequence,
            store_error=self._broker.store.error,
        )

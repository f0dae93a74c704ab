"""The port: all a sink or a worker may ask of the running broker, and all it shows back.

Sinks (MQTT, HTTP, actions, webhooks, ...) and workers (refresh, validate) are given a
:class:`SinkContext` when the broker starts: a :class:`BrokerPort` and the loaded config,
from which each takes its own section once. None of them is given the ``Broker``, the
engine or the store, so a new sink cannot reach into them (the import contract in
``pyproject.toml`` forbids the imports too). Each sink shows itself through a typed
:meth:`Sink.health`, which ``/health``, ``/metrics`` and ``credbroker check`` read.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from anyio.abc import TaskStatus

from broker.core.outcome import Outcome
from broker.core.state import Problem, State

if TYPE_CHECKING:
    from broker.config import Config, CredentialSettings
    from broker.engine.bus import Subscription
    from broker.engine.consumers import ConsumerTracker
    from broker.engine.reader import FileRead

__all__ = [
    "BrokerPort",
    "Clock",
    "EarlySink",
    "EngineHealth",
    "IdFactory",
    "Outcome",
    "Reconfigurable",
    "Sink",
    "SinkContext",
    "SinkFactory",
    "SinkHealth",
]

#: Wall-clock time in seconds since the epoch (``time.time``; tests pass a fake one).
Clock = Callable[[], float]
#: A new unique id for an event (``uuid4`` text; tests pass a counter).
IdFactory = Callable[[], str]


@dataclass(frozen=True, slots=True)
class SinkHealth:
    """How one sink is doing, as ``/health``, ``/metrics`` and ``credbroker check`` show it.

    ``connected`` is ``None`` for a sink that holds no connection. ``delivered``,
    ``failures`` and ``pending`` count events; ``counters`` holds the sink's own figures
    (MQTT's connects, ignored consumer reports by code); ``outcomes`` what each action or
    webhook last did. ``delivers`` is ``False`` for a worker or a sink that takes in rather
    than sends out (refresh, validate, consumer reports): its figures are not deliveries.
    """

    name: str
    delivers: bool = True
    connected: bool | None = None
    delivered: int = 0
    failures: int = 0
    pending: int = 0
    counters: Mapping[str, int] = field(default_factory=dict)
    outcomes: tuple[Outcome, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """The engine's own figures (watching, reading, persisting), for metrics and health."""

    inotify_files: int
    polled_files: int
    inotify_watches: int
    watcher_errors: int
    read_faults: int
    inotify_overflows: int
    unrelated_events: int
    last_resync_seconds: float
    sequence: int
    store_error: str | None


class BrokerPort(Protocol):
    """What the running broker offers its sinks and workers (and nothing else)."""

    @property
    def source(self) -> str:
        """The CloudEvents ``source`` of this broker's events (``urn:credbroker:<host_id>``)."""

    @property
    def host_id(self) -> str: ...

    @property
    def state_dir(self) -> Path:
        """Where a sink keeps what must survive a restart (outboxes, outcome files)."""

    @property
    def clock(self) -> Clock: ...

    @property
    def new_id(self) -> IdFactory: ...

    @property
    def sequence(self) -> int:
        """The broker-wide event sequence number of the last event."""

    @property
    def loaded_states(self) -> Mapping[str, State]:
        """The states the last run persisted, as loaded at start (for crash recovery): read
        them before reporting started; once every sink has, they are gone (empty)."""

    @property
    def removed(self) -> Collection[str]:
        """Credentials removed from the config whose retained traces may still be out."""

    @property
    def consumers(self) -> ConsumerTracker | None:
        """The table of consumer reports, when a sink that takes reports is configured."""

    async def wait_started(self) -> None:
        """Return once the engine has a state for every credential: at once for a sink
        started as usual; for one started early (:class:`EarlySink`), when the engine's
        first pass is done. Until then :meth:`state` and :meth:`states` show, for what that
        pass has not read yet, the last run's states (or made-up ``not read yet`` ones)."""

    def names(self) -> list[str]: ...

    def state(self, name: str) -> State:
        """``name``'s current state, without I/O; ``KeyError`` if unknown."""

    def states(self) -> list[State]: ...

    def read_states(self) -> list[State]:
        """:meth:`states` without the ones made up for credentials not read yet: what may
        be published as a credential's state."""

    def settings(self, name: str) -> CredentialSettings:
        """``name``'s settings from the config (files, preset, remedies)."""

    def subscribe(
        self, pattern: str = "credentials.*", *, credential: str | None = None,
        buffer: int = ..., payloads: bool = ...,
    ) -> Subscription: ...

    async def check(self, name: str) -> State:
        """Re-read ``name`` now (and ask its validator), publish any change, return the state."""

    def read_files(self, name: str) -> Sequence[FileRead]:
        """Every file of ``name`` read now, contents included (blocking: run it in a thread).

        For what must see the secrets in use (redaction, a validator's header); nothing is
        published. ``KeyError`` if unknown.
        """

    def verdict_at(self, name: str) -> float | None:
        """When the validator last decided about ``name`` (``None``: no validator or no verdict)."""

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
        """Attach or clear a finding from outside the files (a validator, a refresh)."""

    async def announce(
        self, name: str, event_type: str, reason: str, *, generation: int
    ) -> bool:
        """Publish ``event_type`` with ``name``'s unchanged state while it is at ``generation``."""

    def health(self) -> Sequence[SinkHealth]:
        """Every running sink's health, in start order."""

    def engine_health(self) -> EngineHealth: ...


@runtime_checkable
class Sink(Protocol):
    """A delivery path or worker: started once the engine has a state for everything
    (but for an :class:`EarlySink`, started before the engine's first pass).

    ``run`` calls ``task_status.started()`` once it is serving and returns when cancelled
    (the broker stopping); cleanup such as MQTT's ``offline`` goes in its ``finally``.
    ``close`` lets go of a bus subscription for a sink made but never run.
    """

    name: str

    async def run(self, *, task_status: TaskStatus[None]) -> None: ...

    def health(self) -> SinkHealth: ...

    def close(self) -> None: ...


@runtime_checkable
class EarlySink(Sink, Protocol):
    """A sink started before the engine's first pass, so that it delivers the first-sight
    events while the rest are still being read (MQTT at start-up: 10,000 of them). It says
    so with ``starts_early = True``, and awaits :meth:`BrokerPort.wait_started` before it
    reads any state."""

    starts_early: bool


@runtime_checkable
class Reconfigurable(Protocol):
    """A sink that keeps per-credential state outside the engine (MQTT's retained topics)."""

    def reconfigured(self, removed: Collection[str], added: Collection[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What the broker hands each sink it makes: the port, and the config to take a section of.

    A sink reads its own section (``context.config.http``) once, in its constructor, and
    keeps only that.
    """

    port: BrokerPort
    config: Config


#: Makes a sink; a sink class whose constructor takes a :class:`SinkContext` is one.
SinkFactory = Callable[[SinkContext], Sink]

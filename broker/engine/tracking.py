"""The table of tracked credentials: each one's settings, state and last file signatures,
which credentials each watched path belongs to, and the work queued for each."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice

from broker.aio.wakeup import Wakeup
from broker.config import CredentialSettings
from broker.core.reads import Signature
from broker.core.state import State

__all__ = ["CredentialTable", "Pending", "Tracked", "WorkQueue"]


@dataclass(slots=True)
class Tracked:
    """One credential's runtime record."""

    spec: CredentialSettings
    state: State | None = None
    signatures: dict[str, Signature | None] = field(default_factory=dict)
    #: Until the first evaluation after start has been committed.
    startup: bool = True
    #: The settings the last committed read answered to: ``spec``, or its fallback's
    #: settings while the fallback is in use (``None``: not read since the settings changed).
    settings_in_use: CredentialSettings | None = None
    # ``paths`` as of the settings object it was made from: asked several times per event,
    # and settings are replaced (a reload), never changed, so identity says it is current.
    _paths: tuple[str, ...] = field(default=(), repr=False, compare=False)
    _paths_of: CredentialSettings | None = field(default=None, repr=False, compare=False)

    @property
    def paths(self) -> tuple[str, ...]:
        """Every watched path: the files (patterns as such), then the fallback's."""
        if self._paths_of is not self.spec:
            self._paths = self.spec.watched_path_texts
            self._paths_of = self.spec
        return self._paths


@dataclass(slots=True)
class Pending:
    """What to do at the next evaluation of one credential."""

    #: Found by looking, not by a writer's close: check for open writers.
    scan: bool = False
    #: Read even if a writer seems busy (an explicit check, start-up).
    force: bool = False
    #: The credential's settings changed (config reload).
    settings_changed: bool = False
    #: Also publish (event type, reason) with the resulting state.
    announce: tuple[str, str] | None = None
    #: Publish content a writer still holds open, if it is what the last read saw long
    #: enough ago (see :class:`broker.engine.holdback.WriterHoldBack`).
    publish_held_open: bool = False


class WorkQueue:
    """The credentials marked for the next evaluation, and the wake-up of its loop."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}
        self._wake = Wakeup()

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def mark(self, names: Iterable[str], *, scan: bool) -> None:
        """Queue ``names`` (``scan``: found by looking, so check them for writers)."""
        for name in names:
            self._pending.setdefault(name, Pending()).scan |= scan
        self._wake.poke()

    async def take(self, limit: int | None = None) -> dict[str, Pending]:
        """Wait for work, then take it: all of it, or the ``limit`` longest queued (the rest
        stays queued, and the next ``take`` returns at once)."""
        await self._wake.wait()
        if limit is None or len(self._pending) <= limit:
            batch, self._pending = self._pending, {}
            return batch
        batch = {n: self._pending.pop(n) for n in list(islice(self._pending, limit))}
        self._wake.poke()
        return batch

    def keep_only(self, names: Collection[str]) -> None:
        """Drop queued work for credentials no longer tracked."""
        self._pending = {n: p for n, p in self._pending.items() if n in names}


class CredentialTable:
    """Name -> :class:`Tracked`, in config order, and path -> names."""

    def __init__(self) -> None:
        self._tracked: dict[str, Tracked] = {}
        #: Tuples, not sets: nearly every path has one credential, and 10,000 one-element
        #: sets cost 1.7 MB more than the tuples.
        self._by_path: dict[str, tuple[str, ...]] = {}
        #: Bumped by every :meth:`replace_all`: what was derived from the specs (the resync's
        #: list of paths to stat) is stale once it moves.
        self.version = 0

    def __contains__(self, name: object) -> bool:
        return name in self._tracked

    def __getitem__(self, name: str) -> Tracked:
        return self._tracked[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tracked)

    def __len__(self) -> int:
        return len(self._tracked)

    def get(self, name: str) -> Tracked | None:
        return self._tracked.get(name)

    def items(self) -> Iterable[tuple[str, Tracked]]:
        return self._tracked.items()

    def values(self) -> Iterable[Tracked]:
        return self._tracked.values()

    @property
    def by_path(self) -> Mapping[str, tuple[str, ...]]:
        """Every watched path -> the credentials that watch it."""
        return self._by_path

    def names_at(self, paths: Iterable[str]) -> set[str]:
        """The credentials any of ``paths`` belongs to."""
        names: set[str] = set()
        for path in paths:
            names.update(self._by_path.get(path, ()))
        return names

    def states(self) -> dict[str, State]:
        """Every credential's state, where it has one."""
        return {n: t.state for n, t in self._tracked.items() if t.state is not None}

    def replace_all(
        self, credentials: Iterable[CredentialSettings], states: Mapping[str, State]
    ) -> None:
        """Track exactly ``credentials``: a known one keeps its record, a new one starts
        from ``states`` (persisted or a tombstone), a dropped one goes."""
        tracked: dict[str, Tracked] = {}
        for spec in credentials:
            old = self._tracked.get(spec.name)
            if old is not None:
                if old.spec != spec:
                    old.settings_in_use = None
                old.spec = spec
                tracked[spec.name] = old
            else:
                tracked[spec.name] = Tracked(spec, states.get(spec.name))
        self._tracked = tracked
        self.version += 1
        # Gathered in insertion-ordered dicts (a path many credentials share stays linear).
        gathered: dict[str, dict[str, None]] = {}
        for name, t in tracked.items():
            for path in t.paths:
                gathered.setdefault(path, {})[name] = None
        self._by_path = {path: tuple(names) for path, names in gathered.items()}

"""The engine: file change -> snapshot -> transition -> event -> bus.

Owns the table of tracked credentials, the global sequence counter and the three loops
that feed the pure state machine: evaluation of changed files, the expiry scheduler and
the resync safety net. All mutation of credential state happens in ``_commit``, under one
lock, so a tick of the scheduler never interleaves with an evaluation of the same file.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import anyio
from anyio.abc import TaskStatus

from broker.config import CredentialSettings, is_glob
from broker.core.events import Event, make_event
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import (
    Observation,
    Transition,
    apply_findings,
    next_deadline,
    observe,
    tick,
    transition,
)
from broker.core.state import Consumer, Problem, State, Status
from broker.core.timefmt import format_time
from broker.engine.bus import Bus
from broker.engine.reader import (
    CredentialRead,
    Signature,
    glob_paths,
    read_credential,
    stat_signature,
)
from broker.engine.store import Store
from broker.engine.watcher import Watcher
from broker.engine.writers import open_for_writing

log = logging.getLogger("broker.engine")
event_log = logging.getLogger("broker.events")

Clock = Callable[[], float]

#: ``[broker] settle``'s default: how long a change that leaves a credential invalid or
#: missing waits for a further change that resolves it.
DEFAULT_SETTLE = 1.0
#: The scheduler re-evaluates at least this often, whatever it expects, so a wall-clock
#: jump or a suspend is noticed within this bound.
MAX_SLEEP = 30.0
#: Every this many resyncs, every file is re-hashed even if its stat did not change.
FULL_REHASH_EVERY = 10
#: Paths the kernel would not watch are polled this often (capped by resync_interval).
POLL_INTERVAL = 2.0
#: A read that failed for the broker's own reasons (out of descriptors) is retried this
#: often; the credential keeps its last state meanwhile.
FAULT_RETRY = 0.5
#: Such faults are logged at most once per this many seconds (with a count), never per read.
FAULT_LOG_INTERVAL = 60.0
#: A writer that keeps its file open never closes it: once it has not modified the file
#: for this long, the content is read, and read again this long later; the same both
#: times, it is published even though the writer still holds the file.
WRITER_QUIET = 0.25
#: Content a held-open writer leaves unparsable (``cmd > file`` before the command writes)
#: is far more often half-done than final: it must hold still this long to be published.
WRITER_QUIET_INVALID = 5.0
#: A watched directory with at least this many events a second for names nothing watches,
#: over a resync interval (and at least NOISY_MIN of them), floods the broker.
NOISY_RATE = 200.0
NOISY_MIN = 1000


@dataclass(slots=True)
class Tracked:
    """One credential's runtime record."""

    spec: CredentialSettings
    state: State | None = None
    signatures: dict[str, Signature | None] = field(default_factory=dict)
    #: While a change that leaves the credential invalid or missing waits out ``settle``:
    #: when it was first seen, and the state it would publish (never published meanwhile).
    held_since: float | None = None
    held: State | None = None
    startup: bool = True
    #: The settings the last read answered to (the fallback's while it is in use).
    active: CredentialSettings | None = None

    @property
    def paths(self) -> list[str]:
        """Every watched path: the files (patterns as such), then the fallback's."""
        return [str(p) for p in self.spec.watched_paths]


@dataclass(slots=True)
class _Pending:
    scan: bool = False  # found by looking, not by a writer's close: check for open writers
    force: bool = False  # read even if a writer seems busy (explicit check, start-up)
    respec: bool = False  # the credential's settings changed
    announce: tuple[str, str] | None = None  # also publish (event type, reason) with the state
    held: bool = False  # publish while a writer holds it, if the content is what we read last


class Engine:
    """Tracks credentials and publishes their events. Run ``run`` inside a task group."""

    def __init__(
        self,
        credentials: Iterable[CredentialSettings],
        *,
        bus: Bus,
        store: Store,
        fingerprinter: Fingerprinter,
        source: str,
        resync_interval: float,
        states: Mapping[str, State] | None = None,
        sequence: int = 0,
        clock: Clock = time.time,
        settle: float = DEFAULT_SETTLE,
    ) -> None:
        self._bus = bus
        self._store = store
        self._fp = fingerprinter
        self._source = source
        self._clock = clock
        self.resync_interval = resync_interval
        self.settle = settle
        self.sequence = sequence
        self._tracked: dict[str, Tracked] = {}
        self._by_path: dict[str, set[str]] = {}
        self._pending: dict[str, _Pending] = {}
        # Findings from outside the files (validator, refresh runner): name -> source ->
        # (fingerprint the finding is about, or None for "whatever the content", problem).
        self._external: dict[str, dict[str, tuple[str | None, Problem]]] = {}
        self._wake = anyio.Event()
        self._reschedule = anyio.Event()
        # (when, name, kind) with lazy deletion: an entry counts only while it matches
        # _scheduled[name] (kind "life"); a "settle" entry re-reads a held-back change.
        self._deadlines: list[tuple[float, str, str]] = []
        self._scheduled: dict[str, float] = {}
        self._lock = anyio.Lock()
        self._progress = anyio.Event()
        self._writers = anyio.Event()
        self.watcher = Watcher(self._on_paths, self._on_writing)
        # name -> (fingerprint, when first read, the state it would get) of content a writer
        # holds, not yet published.
        self._held: dict[str, tuple[str | None, float, State]] = {}
        # name -> the noisy directories its files live in (reported as a problem).
        self._noisy: dict[str, frozenset[str]] = {}
        self.ready = anyio.Event()
        self.last_resync_seconds = 0.0
        #: Reads that failed for the broker's own reasons (a metric); see FAULT_RETRY.
        self.read_faults = 0
        self._faults_unlogged = 0
        self._fault_logged_at = -math.inf
        #: Who reported using a credential (the consumer tracker sets it): shown in every
        #: state document and event, never stored with the state.
        self.consumers_of: Callable[[str], tuple[Consumer, ...]] = _no_consumers
        self._set_credentials(credentials, states or {})

    # -- public -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._tracked)

    def state(self, name: str) -> State:
        """The current state of ``name`` (``KeyError`` if unknown). No I/O."""
        tracked = self._tracked[name]
        state = tracked.state or State(name, Status.MISSING, reason="not read yet")
        return self._with_consumers(state)

    def _with_consumers(self, state: State) -> State:
        consumers = self.consumers_of(state.credential)
        return replace(state, consumers=consumers) if consumers else state

    def states(self) -> list[State]:
        return [self.state(name) for name in self._tracked]

    def spec(self, name: str) -> CredentialSettings:
        return self._tracked[name].spec

    async def check(self, name: str) -> State:
        """Re-read every file of ``name`` now, bypassing every cache, and publish any change.

        While a change that leaves the credential invalid or missing waits out ``settle``,
        the answer is that unpublished state with a ``settling`` problem: what the files say
        now, never the published state it is about to replace.

        Likewise while a writer holds a file: the answer carries a ``writer-active``
        problem, and is what the files say now even if it is not published yet (content
        a writer holds is published once it holds still, WRITER_QUIET apart).
        """
        if name not in self._tracked:
            raise KeyError(name)
        await self._evaluate({name: _Pending(scan=True, force=True, held=True)})
        tracked = self._tracked[name]
        unpublished = self._held.get(name)
        if tracked.held is not None and tracked.held_since is not None:
            state = self._with_consumers(settling(tracked.held, tracked.held_since + self.settle))
        elif unpublished is not None:
            state = self._with_consumers(unpublished[2])
        else:
            state = self.state(name)
        present = [f.path for f in state.files if f.present]
        busy = await anyio.to_thread.run_sync(open_for_writing, present)
        if busy and not any(p.code == "writer-active" for p in state.problems):
            problem = writer_active(self._tracked[name].spec, sorted(busy))
            state = replace(state, problems=(*state.problems, problem))
        return state

    async def announce(
        self, name: str, event_type: str, reason: str, *, generation: int
    ) -> bool:
        """Publish ``event_type`` with ``name``'s unchanged state (``credentials.lagging``,
        ``credentials.converged``): numbered, journalled and delivered like every event.

        Only while the credential is still at ``generation``; a decision about an older
        one is stale, and ``False`` says it was not published.
        """
        async with self._lock:
            tracked = self._tracked.get(name)
            if tracked is None or tracked.state is None:
                return False
            if tracked.state.generation != generation:
                return False
            said = replace(tracked.state, reason=reason)
            await self._commit({name: (None, Transition(tracked.state, ((event_type, said),)))})
        self._progressed()
        return True

    async def set_problem(
        self,
        name: str,
        source: str,
        problem: Problem | None,
        *,
        fingerprint: str | None = None,
        announce: str | None = None,
        scan: bool = False,
    ) -> State:
        """Attach (``problem``) or clear (``None``) a finding from outside the files.

        ``source`` names the finder ("validate", "refresh"); each has one slot. A problem
        coded ``rejected-by-validator`` makes unchanged content ``invalid``; others are
        reported without changing the status. ``fingerprint`` ties the finding to one
        version of the content: once the content changes, the finding is dropped.
        ``announce`` publishes an event of that type (``credentials.refresh_failed``) with
        the resulting state. ``scan``: the re-read holds back content a writer still has
        open (for findings that say nothing about the content). Returns the state after the
        re-read.
        """
        if name not in self._tracked:
            raise KeyError(name)
        slots = self._external.setdefault(name, {})
        if problem is None:
            slots.pop(source, None)
        else:
            slots[source] = (fingerprint, problem)
        said = (announce, problem.message if problem else "") if announce else None
        await self._evaluate({name: _Pending(scan=scan, force=True, announce=said)})
        return self.state(name)

    def _with_external(self, name: str, spec: CredentialSettings, obs: Observation) -> Observation:
        slots = self._external.get(name)
        if not slots or obs.outcome is Status.MISSING:
            return obs
        for source, (fingerprint, _) in list(slots.items()):
            if fingerprint is not None and fingerprint != obs.fingerprint:
                del slots[source]  # about content that is gone
        return apply_findings(
            obs,
            (
                p if p.remedy else replace(p, remedy=spec.remedy(p.code, spec.expiry_file))
                for _, p in slots.values()
            ),
        )

    def poke(self) -> None:
        """Look at the clock again now: after a resume from suspend or a clock step.

        Without a poke the scheduler notices within MAX_SLEEP anyway.
        """
        self._reschedule.set()

    async def quiesce(self) -> None:
        """Wait until nothing is queued, evaluating, or waiting out a settle window."""
        while (
            self._pending
            or self._lock.locked()
            or any(t.held_since is not None for t in self._tracked.values())
        ):
            progress = self._progress
            await progress.wait()

    async def reconfigure(
        self, credentials: Iterable[CredentialSettings]
    ) -> tuple[set[str], set[str]]:
        """Apply a reloaded config: add, drop and re-read credentials, keeping their state.

        Returns the names removed and added. A removed credential's state is kept as a
        tombstone in the store, so that re-adding it continues its generation (and unchanged
        content is silent).
        """
        credentials = list(credentials)
        async with self._lock:
            states = {n: t.state for n, t in self._tracked.items() if t.state is not None}
            old_specs = {n: t.spec for n, t in self._tracked.items()}
            wanted = {c.name for c in credentials}
            removed = set(old_specs) - wanted
            added = wanted - set(old_specs)
            gone = [states[n] for n in removed if n in states]
            back = {n for n in added if n in self._store.tombstones}
            if gone or back:
                def tombstones() -> dict[str, State]:
                    found = {n: s for n in back if (s := self._store.exhume(n, save=False))}
                    self._store.bury(gone)
                    return found
                states.update(await anyio.to_thread.run_sync(tombstones))
            self._set_credentials(credentials, states)
            changed = {n for n, t in self._tracked.items() if old_specs.get(n) != t.spec}
            for name in changed:
                self._tracked[name].startup = False
            self.watcher.watch(self._by_path)
        if changed:
            await self._evaluate({n: _Pending(scan=True, force=True, respec=True) for n in changed})
        log.info("configuration applied", extra={"credentials": len(self._tracked)})
        return removed, added

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch, evaluate, schedule and resync until cancelled."""
        with self.watcher:
            self.watcher.watch(self._by_path)
            for name, tracked in self._tracked.items():
                self._push_deadline(name, tracked.state)
            await self._evaluate({n: _Pending(scan=True, force=True) for n in self._tracked})
            for tracked in self._tracked.values():
                tracked.startup = False
            self.ready.set()
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.watcher.run)
                tg.start_soon(self._evaluate_loop)
                tg.start_soon(self._schedule_loop)
                tg.start_soon(self._resync_loop)
                tg.start_soon(self._poll_loop)
                tg.start_soon(self._writer_loop)

    # -- inputs -----------------------------------------------------------------------------

    def _set_credentials(
        self, credentials: Iterable[CredentialSettings], states: Mapping[str, State]
    ) -> None:
        tracked: dict[str, Tracked] = {}
        for spec in credentials:
            old = self._tracked.get(spec.name)
            if old is not None:
                if old.spec != spec:
                    old.active = None
                old.spec = spec
                tracked[spec.name] = old
            else:
                tracked[spec.name] = Tracked(spec, states.get(spec.name))
        self._tracked = tracked
        self._by_path = {}
        for name, t in tracked.items():
            for path in t.paths:
                self._by_path.setdefault(path, set()).add(name)
        self._pending = {n: p for n, p in self._pending.items() if n in tracked}

    def _on_paths(self, paths: set[str], scan: bool) -> None:
        names: set[str] = set()
        for path in paths:
            names |= self._by_path.get(path, set())
        self._mark(names, scan=scan)

    def _on_writing(self) -> None:
        self._writers.set()

    def _mark(self, names: Iterable[str], *, scan: bool) -> None:
        for name in names:
            self._pending.setdefault(name, _Pending()).scan |= scan
        self._wake.set()

    # -- loops ------------------------------------------------------------------------------

    async def _evaluate_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            batch, self._pending = self._pending, {}
            if batch:
                await self._evaluate(batch)

    async def _schedule_loop(self) -> None:
        while True:
            # A fresh event before looking, so a poke or a new deadline that arrives
            # during this pass wakes the next wait instead of being lost.
            self._reschedule = anyio.Event()
            now = self._clock()
            due: set[str] = set()
            settled: set[str] = set()
            while self._deadlines and self._deadlines[0][0] <= now:
                when, name, kind = heapq.heappop(self._deadlines)
                if kind in ("settle", "retry"):
                    settled.add(name)
                elif self._scheduled.get(name) == when:
                    del self._scheduled[name]
                    due.add(name)
            if settled:
                # Read again rather than publish what was held: the files say what is true now.
                self._mark(settled, scan=True)
            if due:
                await self._tick(due, now)
            delay = MAX_SLEEP
            if self._deadlines:
                delay = min(delay, max(0.0, self._deadlines[0][0] - now))
            with anyio.move_on_after(delay):
                await self._reschedule.wait()

    async def _resync_loop(self) -> None:
        rounds = 0
        while True:
            started = time.monotonic()
            await anyio.sleep(self.resync_interval)
            rounds += 1
            await self._report_noise(time.monotonic() - started)
            await self.resync(full=rounds % FULL_REHASH_EVERY == 0)

    async def _writer_loop(self) -> None:
        """Publish what writers that keep their files open have stopped changing."""
        while True:
            if not self.watcher.writing:
                await self._writers.wait()
            self._writers = anyio.Event()
            await anyio.sleep(WRITER_QUIET)
            cutoff = time.monotonic() - WRITER_QUIET
            quiet = {
                p for p in self.watcher.writing if self.watcher.modified_at.get(p, 0.0) <= cutoff
            }
            names = {n for p in quiet for n in self._by_path.get(p, ())}
            if names:
                await self._evaluate({n: _Pending(scan=True, force=True, held=True) for n in names})

    async def _report_noise(self, elapsed: float) -> None:
        """Annotate (once) each credential whose directory floods the broker with events for
        other files, and clear it when the directory calms down. A problem, not a status, so
        it publishes no event: the content did not change."""
        noise = self.watcher.take_noise()
        loud = {
            d: n for d, n in noise.items()
            if n >= NOISY_MIN and n / max(elapsed, 1e-3) >= NOISY_RATE
        }
        flagged: dict[str, set[str]] = {}
        for directory in loud:
            for path in self.watcher.paths_in(directory):
                for name in self._by_path.get(path, ()):
                    flagged.setdefault(name, set()).add(directory)
        for name in set(flagged) | set(self._noisy):
            dirs = frozenset(flagged.get(name, ()))
            if dirs == self._noisy.get(name, frozenset()) or name not in self._tracked:
                continue
            problem = None
            if dirs:
                self._noisy[name] = dirs
                where = ", ".join(sorted(dirs))
                total = sum(loud[d] for d in dirs)
                log.warning(
                    "directory floods the broker with changes to unrelated files",
                    extra={"credential": name, "directory": where, "events": total},
                )
                problem = Problem(
                    "noisy-directory",
                    f"{where} had {total} changes to files no credential watches in "
                    f"{elapsed:.0f}s; they cost the broker work and can overflow its "
                    "inotify queue",
                )
            else:
                del self._noisy[name]
            await self.set_problem(name, "watch", problem, scan=True)

    async def _poll_loop(self) -> None:
        interval = min(POLL_INTERVAL, self.resync_interval)
        while True:
            await anyio.sleep(interval)
            polled = set(self.watcher.polled)
            if polled:
                names = {n for p in polled for n in self._by_path.get(p, ())}
                await self._mark_stat_changes(names)

    async def resync(self, *, full: bool = False) -> None:
        """The safety net: re-stat every file, re-read what changed (``full``: re-read all)."""
        started = time.perf_counter()
        await self._release_gone_writers()
        if full:
            self._mark(self._tracked, scan=True)
        else:
            await self._mark_stat_changes(set(self._tracked))
        self.last_resync_seconds = time.perf_counter() - started

    async def _release_gone_writers(self) -> None:
        # "A writer has it open" came from an event that may be long past (a lost close-write,
        # a writer killed): ask /proc again, or the file would be skipped forever.
        writing = set(self.watcher.writing)
        if not writing:
            return

        def gone() -> set[str]:
            files = {p: glob_paths(p) if is_glob(p) else [p] for p in writing}
            busy = open_for_writing(f for matches in files.values() for f in matches)
            return {p for p, matches in files.items() if not busy.intersection(matches)}

        self.watcher.release(await anyio.to_thread.run_sync(gone))

    async def _mark_stat_changes(self, names: set[str]) -> None:
        known = {n: dict(self._tracked[n].signatures) for n in names if n in self._tracked}
        paths = {n: self._tracked[n].paths for n in known}
        writing = set(self.watcher.writing)

        def changed() -> set[str]:
            out = set()
            for name, name_paths in paths.items():
                for path in name_paths:
                    if path not in writing and stat_signature(path) != known[name].get(path):
                        out.add(name)
                        break
            return out

        stale = await anyio.to_thread.run_sync(changed)
        if stale:
            self._mark(stale, scan=True)

    # -- evaluation -------------------------------------------------------------------------

    async def _evaluate(self, batch: Mapping[str, _Pending]) -> None:
        # Reads happen under the lock too: two evaluations reading at different moments
        # must not commit out of order, or older content would look like a new change.
        async with self._lock:
            specs = {n: self._tracked[n].spec for n in batch if n in self._tracked}
            reads = await anyio.to_thread.run_sync(_read_all, specs)
            now = self._clock()
            polled_dirs = self.watcher.polled_dirs
            results: dict[str, tuple[CredentialRead | None, Transition]] = {}
            for name, read in reads.items():
                tracked = self._tracked[name]
                if not batch[name].force and any(p in self.watcher.writing for p in tracked.paths):
                    continue  # a writer has it open; its close-write brings us back
                if read.fault is not None:
                    self._read_fault(name, read.fault, now)
                    continue
                spec = read.spec  # the fallback's settings while it is in use
                from_files = observe(spec, read.reads, self._fp, note=read.note)
                obs = annotate_polling(from_files, polled_dirs, self.resync_interval)
                obs = self._with_external(name, spec, obs)
                prev = tracked.state
                startup = tracked.startup and prev is not None
                tr = transition(spec, prev, obs, now, startup=startup, respec=batch[name].respec)
                # Leaving the files for the fallback means the expiry file vanished: that waits
                # out the window too, so delete + recreate stays one event.
                to_fallback = read.note is not None and tracked.active is tracked.spec
                held_at = self._hold(tracked, from_files, tr, now, to_fallback=to_fallback)
                if held_at is None:
                    continue
                if held_at != now:
                    # Published after the window: as of the moment it was first observed.
                    tr = transition(
                        spec, prev, obs, held_at, startup=startup, respec=batch[name].respec
                    )
                announce = batch[name].announce
                if announce is not None:
                    said = replace(tr.state, reason=announce[1] or tr.state.reason)
                    tr = replace(tr, events=(*tr.events, (announce[0], said)))
                results[name] = (read, tr)
            # An event can be older than the file: a close-write read late, after the writer's
            # next truncate. So content that became unusable is checked for writers too; the
            # usual case (new content that parses) pays nothing.
            scanned = [
                n for n, (_, tr) in results.items()
                if tr.events and (batch[n].scan or tr.state.status in _UNUSABLE)
            ]
            if scanned:
                # The files actually read: a pattern's matches, the fallback's when in use.
                read_paths = {n: [r.info.path for r in reads[n].reads] for n in scanned}
                busy, moved = await anyio.to_thread.run_sync(
                    _writers_and_moves,
                    [p for n in scanned for p in read_paths[n]],
                    {n: reads[n].signatures for n in scanned},
                )
                for name in scanned:
                    held = sorted(p for p in read_paths[name] if p in busy)
                    tr = results[name][1]
                    if held and batch[name].held and self._held_still(name, tr.state):
                        # Held open, but the content held still: publish it.
                        problem = writer_active(reads[name].spec, held)
                        results[name] = (results[name][0], _with_problem(tr, problem))
                    elif held:
                        # Found by a scan while a writer holds it: its close-write, or the
                        # writer loop once the content holds still, brings it back.
                        log.debug("file open for writing; waiting", extra={"credential": name})
                        seen = self._held.get(name)
                        since = time.monotonic()
                        if seen is not None and seen[0] == tr.state.fingerprint:
                            since = seen[1]
                        self._held[name] = (tr.state.fingerprint, since, tr.state)
                        self.watcher.hold(self._tracked[name].paths)
                        del results[name]
                    elif name in moved:
                        # Changed since it was read (a writer that closed meanwhile): the
                        # event that change made reads it again.
                        del results[name]
            for name in results:
                self._held.pop(name, None)
                if batch[name].held:
                    self.watcher.release(self._tracked[name].paths)
            await self._commit(results)
        self._progressed()

    def _held_still(self, name: str, state: State) -> bool:
        """Whether content a writer holds is what the last read saw, long enough ago."""
        seen = self._held.get(name)
        if seen is None or seen[0] != state.fingerprint:
            return False
        usable = state.status not in _UNUSABLE
        return time.monotonic() - seen[1] >= (WRITER_QUIET if usable else WRITER_QUIET_INVALID)

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    def _read_fault(self, name: str, fault: str, now: float) -> None:
        """Keep the last state, count the fault, log it now and then, and read again soon."""
        self.read_faults += 1
        self._faults_unlogged += 1
        if now - self._fault_logged_at >= FAULT_LOG_INTERVAL:
            log.warning(
                "broker fault reading credential files; their last state is kept and the "
                "read retried",
                extra={"credential": name, "error": fault, "faults": self._faults_unlogged},
            )
            self._fault_logged_at, self._faults_unlogged = now, 0
        heapq.heappush(self._deadlines, (now + FAULT_RETRY, name, "retry"))
        self._reschedule.set()

    def _hold(
        self,
        tracked: Tracked,
        from_files: Observation,
        tr: Transition,
        now: float,
        *,
        to_fallback: bool = False,
    ) -> float | None:
        """Hold back a change the files made invalid or missing, for ``settle``.

        Returns ``None`` while it is held (nothing to commit), else the moment the
        transition is as of: ``now``, or when a change that outlived the window was first
        seen. The window runs from the first bad read and is not restarted by later ones,
        so a writer that keeps failing is reported ``settle`` late at most.
        """
        bad = from_files.outcome is not Status.VALID or to_fallback
        if (
            not bad
            or not tr.events
            or tracked.startup
            or tracked.state is None
            or self.settle <= 0
        ):
            tracked.held_since = tracked.held = None
            return now
        if tracked.held_since is None:
            tracked.held_since = now
        due = tracked.held_since + self.settle
        if now >= due:
            since, tracked.held_since, tracked.held = tracked.held_since, None, None
            return since if from_files.outcome is not Status.VALID else now
        tracked.held = tr.state
        heapq.heappush(self._deadlines, (due, tracked.spec.name, "settle"))
        self._reschedule.set()
        return None

    async def _tick(self, names: set[str], now: float) -> None:
        async with self._lock:
            results: dict[str, tuple[CredentialRead | None, Transition]] = {}
            for name in names:
                tracked = self._tracked.get(name)
                if tracked is not None and tracked.state is not None:
                    spec = tracked.active or tracked.spec
                    results[name] = (None, tick(spec, tracked.state, now))
            await self._commit(results)
        self._progressed()

    async def _commit(
        self, results: Mapping[str, tuple[CredentialRead | None, Transition]]
    ) -> None:
        """Number, persist, then publish. Caller holds the lock."""
        events: list[tuple[str, State]] = []
        changed: list[State] = []
        now = self._clock()
        for name, (read, tr) in results.items():
            tracked = self._tracked[name]
            if read is not None:
                tracked.signatures = dict(read.signatures)
                tracked.active = read.spec
            before, state = tracked.state, tr.state
            for event_type, event_state in tr.events:
                self.sequence += 1
                numbered = replace(event_state, sequence=self.sequence)
                events.append((event_type, numbered))
                state = (
                    numbered if event_state is tr.state else replace(state, sequence=self.sequence)
                )
            tracked.state = state
            # Problems can change without an event (a refresh that now works, a validator
            # reachable again): persist those too, so `credbroker check` never reads stale ones.
            if tr.events or (before is not None and before.problems != state.problems):
                changed.append(state)
            self._push_deadline(name, state)
        if not changed:
            return
        # The numbers are taken: a caller cancelled now (an HTTP client gone) must not
        # leave them recorded but unpublished.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                self._store.record, changed, self.sequence, self._everything
            )
            for event_type, state in events:
                event = make_event(
                    event_type, self._with_consumers(state), source=self._source, now=now
                )
                _log_event(event)
                self._bus.publish(event)

    def _everything(self) -> dict[str, State]:
        return {n: t.state for n, t in self._tracked.items() if t.state is not None}

    def _push_deadline(self, name: str, state: State | None) -> None:
        deadline = next_deadline(state) if state is not None else None
        if deadline is None or not math.isfinite(deadline):
            self._scheduled.pop(name, None)
            return
        if self._scheduled.get(name) != deadline:
            self._scheduled[name] = deadline
            heapq.heappush(self._deadlines, (deadline, name, "life"))
            if len(self._deadlines) > 2 * len(self._scheduled) + 64:
                self._compact_deadlines()
            self._reschedule.set()

    def _compact_deadlines(self) -> None:
        """Drop superseded "life" entries. Lazy deletion alone keeps one per content change
        until its time comes: a credential rotated often within a long lifetime would grow
        the heap without bound. Amortised O(1) per push."""
        self._deadlines = [
            entry for entry in self._deadlines
            if entry[2] != "life" or self._scheduled.get(entry[1]) == entry[0]
        ]
        heapq.heapify(self._deadlines)

    def flush(self) -> None:
        """Write a full snapshot of the store (clean shutdown; blocking)."""
        self._store.flush(self._everything(), self.sequence)


def annotate_polling(
    obs: Observation, polled_dirs: set[str], resync_interval: float
) -> Observation:
    """Add a ``watch-polling`` problem when inotify could not be had for some of the files.

    ``polled_dirs`` is :attr:`Watcher.polled_dirs`: polling is per directory (a watch is per
    directory), and a pattern role's files are its matches, not the pattern that was watched.
    """
    if not polled_dirs:
        return obs
    paths = [r.info.path for r in obs.files if os.path.dirname(r.info.path) in polled_dirs]
    if not paths:
        return obs
    problem = Problem(
        "watch-polling",
        f"inotify is not available for {', '.join(paths)}; polling every "
        f"{min(POLL_INTERVAL, resync_interval):g}s instead",
        "raise the limit: sysctl fs.inotify.max_user_watches=524288",
    )
    return replace(obs, problems=(*obs.problems, problem))


def settling(state: State, until: float) -> State:
    """``state`` marked as held back by the settle window until ``until`` (a timestamp)."""
    problem = Problem(
        "settling",
        f"{state.status.value} since a change moments ago; published at "
        f"{format_time(until)} unless a further change resolves it",
    )
    return replace(state, problems=(*state.problems, problem))


def _no_consumers(name: str) -> tuple[Consumer, ...]:
    return ()


_UNUSABLE = (Status.INVALID, Status.MISSING)


def writer_active(spec: CredentialSettings, paths: Iterable[str]) -> Problem:
    """The problem a state carries while a process holds one of its files open for writing."""
    return Problem(
        "writer-active",
        f"a process has {', '.join(paths)} open for writing; the content may still change",
        spec.remedy("writer-active", spec.expiry_file),
    )


def _with_problem(tr: Transition, problem: Problem) -> Transition:
    def add(state: State) -> State:
        return replace(state, problems=(*state.problems, problem))

    return replace(tr, state=add(tr.state), events=tuple((t, add(s)) for t, s in tr.events))


def _writers_and_moves(
    paths: list[str], signatures: Mapping[str, Mapping[str, Signature | None]]
) -> tuple[set[str], set[str]]:
    """Which ``paths`` a writer holds open, and which credentials' files changed since
    they were read (their ``signatures``)."""
    busy = open_for_writing(paths)
    moved = {
        name for name, sigs in signatures.items()
        if any(stat_signature(p) != sig for p, sig in sigs.items())
    }
    return busy, moved


def _read_all(specs: Mapping[str, CredentialSettings]) -> dict[str, CredentialRead]:
    return {name: read_credential(spec) for name, spec in specs.items()}


def _log_event(event: Event) -> None:
    state = event.data
    event_log.info(
        event.type,
        extra={
            "credential": event.subject,
            "status": state.status.value,
            "generation": state.generation,
            "sequence": state.sequence,
            "fingerprint": state.fingerprint,
            "reason": state.reason,
            "event_id": event.id,  # the CloudEvent id: find this line from a consumer's event
        },
    )

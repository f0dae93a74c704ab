"""The engine: file change -> evaluation -> transition -> commit (persist, then publish).

Runs the loops that feed the pure state machine (evaluation of changed files, the deadline
scheduler, the resync safety net, polling, held-open writers) and offers the operations the
broker needs (state, check, findings, announce, reconfigure). Its parts each have a module:
the table of credentials (:mod:`~broker.engine.tracking`), the pipeline
(:mod:`~broker.engine.evaluation`), the settle window (:mod:`~broker.engine.settle`), writer
hold-back (:mod:`~broker.engine.holdback`), deadlines (:mod:`~broker.engine.schedule`) and
the commit (:mod:`~broker.engine.commit`). All mutation of credential state happens in a
commit, under one lock, so a tick of the scheduler never interleaves with an evaluation of
the same file.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from functools import partial

import anyio
from anyio.abc import TaskStatus

from broker.aio.wakeup import Broadcast, Wakeup
from broker.config import CredentialSettings
from broker.core.events import IdFactory, new_event_id
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import Transition, tick
from broker.core.problems import ProblemCode
from broker.core.state import Consumer, Problem, State, Status
from broker.engine.bus import Bus
from broker.engine.commit import Committer, Result
from broker.engine.evaluation import evaluate, read_all
from broker.engine.faults import ReadFaults
from broker.engine.findings import Findings
from broker.engine.holdback import WriterHoldBack, WriterLook, look_for_writers, writer_active
from broker.engine.readahead import PassPlan, ReadWorker, ReadWorkerError, Request, plan_pass
from broker.engine.reader import CredentialRead
from broker.engine.resync import SafetyNet
from broker.engine.schedule import Deadlines, Kind
from broker.engine.settle import SettleWindow
from broker.engine.store import Store
from broker.engine.tracking import CredentialTable, Pending, WorkQueue
from broker.engine.tuning import DEFAULT_SETTLE, EngineTuning
from broker.engine.watcher import Watcher
from broker.engine.writers import open_for_writing

__all__ = ["DEFAULT_SETTLE", "Clock", "Engine", "EngineTuning"]

log = logging.getLogger("broker.engine")

#: Seconds: wall-clock time (``time.time``) or a monotonic one (``time.monotonic``).
Clock = Callable[[], float]

class Engine:
    """Tracks credentials and publishes their events. Run ``run`` inside a task group.

    ``clock`` is the wall clock of states and events (``None``: ``time.time``),
    ``monotonic`` the clock of intervals (how long a writer's content held still), ``new_id``
    makes event ids. ``tuning`` may be replaced on a running engine (tests shorten it); each
    use reads it afresh.
    """

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
        clock: Clock | None = None,
        monotonic: Clock = time.monotonic,
        new_id: IdFactory = new_event_id,
        settle: float = DEFAULT_SETTLE,
        tuning: EngineTuning | None = None,
    ) -> None:
        self._store = store
        self._fp = fingerprinter
        self._clock = clock = clock or time.time
        self._monotonic = monotonic
        self.tuning = tuning or EngineTuning()
        self.resync_interval = resync_interval
        self._table = CredentialTable()
        self._queue = WorkQueue()
        self._findings = Findings()
        self._window = SettleWindow(settle)
        self._holdback = WriterHoldBack(
            quiet=lambda: (self.tuning.writer_quiet, self.tuning.writer_quiet_invalid),
            monotonic=monotonic,
        )
        self.deadlines = Deadlines()
        self._faults = ReadFaults(self.tuning.fault_log_interval)
        self._committer = Committer(
            bus=bus, store=store, source=source, sequence=sequence, clock=clock,
            new_id=new_id, shown=self._with_consumers,
        )
        self._reschedule = Wakeup()
        self._lock = anyio.Lock()
        self._progress = Broadcast()
        self._writers = Wakeup()
        self._polling = Wakeup()
        #: Changes arrived during the last pass: the engine is taking a burst.
        self._in_burst = False
        #: Start-up's first passes are running (nothing else evaluates meanwhile).
        self._starting = False
        self.watcher = Watcher(
            self._on_paths, self._on_writing, on_polled=self._polling.poke, monotonic=monotonic,
            pace=self._read_pace,
        )
        self._net = SafetyNet(
            table=self._table,
            watcher=self.watcher,
            fingerprinter=fingerprinter,
            polling=self._polling,
            mark=partial(self._queue.mark, scan=True),
            report=partial(self.report_finding, scan=True),
            tuning=lambda: self.tuning,
            resync_interval=lambda: self.resync_interval,
            monotonic=monotonic,
        )
        self.ready = anyio.Event()
        #: Who reported using a credential (the consumer tracker sets it): shown in every
        #: state document and event, never stored with the state.
        self.consumers_of: Callable[[str], tuple[Consumer, ...]] = _no_consumers
        self._set_credentials(credentials, states or {})

    # -- public -----------------------------------------------------------------------------

    @property
    def settle(self) -> float:
        """``[broker] settle``: how long a change to invalid or missing is withheld."""
        return self._window.settle

    @property
    def sequence(self) -> int:
        """The broker-wide sequence number of the last event."""
        return self._committer.sequence

    @sequence.setter
    def sequence(self, value: int) -> None:
        # Taken by hand by a test that publishes events of its own on the bus.
        self._committer.sequence = value

    @property
    def read_faults(self) -> int:
        """Reads that failed for the broker's own reasons (a metric)."""
        return self._faults.count

    @property
    def names(self) -> list[str]:
        return list(self._table)

    def state(self, name: str) -> State:
        """The current state of ``name`` (``KeyError`` if unknown). No I/O."""
        tracked = self._table[name]
        state = tracked.state or State(name, Status.MISSING, reason="not read yet")
        return self._with_consumers(state)

    def _with_consumers(self, state: State) -> State:
        consumers = self.consumers_of(state.credential)
        return replace(state, consumers=consumers) if consumers else state

    def states(self) -> list[State]:
        return [self.state(name) for name in self._table]

    def read_states(self) -> list[State]:
        """The states of the credentials read so far: none made up for one not read yet
        (held back at start-up while a writer holds it, say)."""
        return [self._with_consumers(t.state) for t in self._table.values() if t.state is not None]

    def spec(self, name: str) -> CredentialSettings:
        return self._table[name].spec

    async def check(self, name: str) -> State:
        """Re-read every file of ``name`` now, bypassing every cache, and publish any change.

        While a change that leaves the credential invalid or missing waits out ``settle``,
        the answer is that unpublished state with a ``settling`` problem: what the files say
        now, never the published state it is about to replace.

        Likewise while a writer holds a file: the answer carries a ``writer-active``
        problem, and is what the files say now even if it is not published yet (content
        a writer holds is published once it holds still, ``writer_quiet`` apart).
        """
        if name not in self._table:
            raise KeyError(name)
        await self._evaluate({name: Pending(scan=True, force=True, publish_held_open=True)})
        # What the files say now: withheld by the settle window, or held open by a writer.
        now = self._window.answer(name) or self._holdback.unpublished(name)
        state = self.state(name) if now is None else self._with_consumers(now)
        present = [f.path for f in state.files if f.present]
        busy = await anyio.to_thread.run_sync(open_for_writing, present)
        if busy and not any(p.code == ProblemCode.WRITER_ACTIVE for p in state.problems):
            problem = writer_active(self._table[name].spec, sorted(busy))
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
            tracked = self._table.get(name)
            if tracked is None or tracked.state is None:
                return False
            if tracked.state.generation != generation:
                return False
            said = replace(tracked.state, reason=reason)
            tr = Transition(tracked.state, ((event_type, said),))
            await self._commit({name: Result(None, tr)})
        self._progressed()
        return True

    async def report_finding(
        self,
        name: str,
        source: str,
        problem: Problem | None,
        *,
        fingerprint: str | None = None,
        event_type: str | None = None,
        scan: bool = False,
    ) -> State:
        """Attach (``problem``) or clear (``None``) a finding from outside the files.

        ``source`` names the finder ("validate", "refresh", "watch"); each has one slot. A
        problem coded ``rejected-by-validator`` makes unchanged content ``invalid``; others
        are reported without changing the status. ``fingerprint`` ties the finding to one
        version of the content: once the content changes, the finding is dropped.
        ``event_type`` also publishes an event of that type (``credentials.refresh_failed``)
        with the resulting state. ``scan``: the re-read holds back content a writer still
        has open (for findings that say nothing about the content). Returns the state after
        the re-read.
        """
        if name not in self._table:
            raise KeyError(name)
        self._findings.put(name, source, problem, fingerprint=fingerprint)
        said = (event_type, problem.message if problem else "") if event_type else None
        await self._evaluate({name: Pending(scan=scan, force=True, announce=said)})
        return self.state(name)

    def poke(self) -> None:
        """Look at the clock again now: after a resume from suspend or a clock step.

        Without a poke the scheduler notices within ``tuning.max_sleep`` anyway.
        """
        self._reschedule.poke()

    async def quiesce(self) -> None:
        """Wait until nothing is queued, evaluating, or waiting out a settle window."""
        while self._queue or self._lock.locked() or self._window.open:
            await self._progress.wait()

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
            states = self._table.states()
            old_specs = {n: t.spec for n, t in self._table.items()}
            wanted = {c.name for c in credentials}
            removed = set(old_specs) - wanted
            added = wanted - set(old_specs)
            gone = [states[n] for n in removed if n in states]
            back = {n for n in added if n in self._store.tombstones}
            if gone or back:
                swap = self._store.swap_tombstones
                states.update(await anyio.to_thread.run_sync(swap, gone, back))
            self._set_credentials(credentials, states)
            self._window.forget(removed)
            self._holdback.forget(removed)
            changed = {n for n, t in self._table.items() if old_specs.get(n) != t.spec}
            for name in changed:
                self._table[name].startup = False
            self.watcher.watch(self._table.by_path)
        if changed:
            await self._evaluate_all(
                {n: Pending(scan=True, force=True, settings_changed=True) for n in changed}
            )
        log.info("configuration applied", extra={"credentials": len(self._table)})
        return removed, added

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch, evaluate, schedule and resync until cancelled."""
        with self.watcher:
            # Started before the watches are placed, so that its own start (~40 ms, on the
            # other core) is over when the reads begin; it reads nothing until asked, and
            # is asked only once every watch is in place.
            async with self._read_worker() as worker:
                self.watcher.watch(self._table.by_path)
                for name, tracked in self._table.items():
                    self._follow(name, tracked.state)
                self._starting = True
                try:
                    await self._evaluate_all(
                        {n: Pending(scan=True, force=True) for n in self._table},
                        read_ahead=True, worker=worker,
                    )
                finally:
                    self._starting = False
            for tracked in self._table.values():
                tracked.startup = False
            self.ready.set()
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.watcher.run)
                tg.start_soon(self._evaluate_loop)
                tg.start_soon(self._schedule_loop)
                tg.start_soon(self._net.resync_loop)
                tg.start_soon(self._net.poll_loop)
                tg.start_soon(self._writer_loop)

    async def resync(self, *, full: bool = False) -> None:
        """The safety net: re-stat every file, re-read what changed (``full``: re-hash every
        file, re-read what may differ from its state)."""
        await self._net.resync(full=full)

    @property
    def last_resync_seconds(self) -> float:
        """How long the last resync took (a metric)."""
        return self._net.last_resync_seconds

    def flush(self) -> None:
        """Write a full snapshot of the store (clean shutdown; blocking)."""
        self._committer.flush(self._table)

    # -- inputs -----------------------------------------------------------------------------

    def _set_credentials(
        self, credentials: Iterable[CredentialSettings], states: Mapping[str, State]
    ) -> None:
        self._table.replace_all(credentials, states)
        self._queue.keep_only(self._table)
        self._net.plan()

    def _on_paths(self, paths: set[str], scan: bool) -> None:
        self._queue.mark(self._table.names_at(paths), scan=scan)

    def _read_pace(self) -> float:
        # In a burst the watcher reads a few times per pass, not once per few events.
        return self.tuning.burst_gap / 5 if self._in_burst else 0.0

    def _on_writing(self) -> None:
        self._writers.poke()

    # -- loops ------------------------------------------------------------------------------

    async def _evaluate_loop(self) -> None:
        while True:
            batch = await self._queue.take(self.tuning.max_batch)
            if not batch:
                continue
            started = self._monotonic()
            await self._evaluate(batch)
            if len(self._queue) >= self.tuning.max_batch:
                continue  # a backlog: the next pass is full already
            if self._queue or self._in_burst:
                # Changes arrived during the pass: a burst (a mass rotation, a writer working
                # through a directory). A pass costs about a millisecond of CPU whatever it
                # holds, so the next one gathers what arrives until ``burst_gap`` after this
                # one began instead of chasing the writer a few files at a time; the watcher
                # reads a few times per gap meanwhile. A lone change finds the queue empty
                # after its pass and nothing waits.
                self._in_burst = True
                rest = self.tuning.burst_gap - (self._monotonic() - started)
                if rest > 0:
                    await anyio.sleep(rest)
                # The watcher has read what arrived until a fraction of a gap ago: nothing
                # queued after a whole gap, and the burst is over.
                self._in_burst = bool(self._queue)

    async def _schedule_loop(self) -> None:
        while True:
            # Level-triggered: a poke or a new deadline that arrives during this pass
            # wakes the next wait instead of being lost.
            now = self._clock()
            due = self.deadlines.take_due(now)
            if due.reread:
                # Read again rather than publish what was withheld: the files say what is
                # true now.
                self._queue.mark(due.reread, scan=True)
            if due.tick:
                await self._tick(due.tick, now)
            await self._reschedule.wait(self.deadlines.delay(now, self.tuning.max_sleep))

    async def _writer_loop(self) -> None:
        """Publish what writers that keep their files open have stopped changing."""
        while True:
            if not self.watcher.writing:
                await self._writers.wait()
            quiet = self.tuning.writer_quiet
            await anyio.sleep(quiet)
            cutoff = self._monotonic() - quiet
            still = {
                p for p in self.watcher.writing if self.watcher.modified_at.get(p, 0.0) <= cutoff
            }
            names = self._table.names_at(still)
            if names:
                await self._evaluate(
                    {n: Pending(scan=True, force=True, publish_held_open=True) for n in names}
                )

    # -- evaluation -------------------------------------------------------------------------

    def _read_worker(self) -> AbstractAsyncContextManager[ReadWorker | None]:
        """The start-up read worker, when start-up takes passes enough to read ahead."""
        if self.tuning.read_worker and len(self._table) > self.tuning.max_batch:
            return ReadWorker.started()
        return contextlib.nullcontext(None)

    async def _evaluate_all(
        self, batch: Mapping[str, Pending], *, read_ahead: bool = False,
        worker: ReadWorker | None = None,
    ) -> None:
        """:meth:`_evaluate` in passes of at most ``tuning.max_batch`` credentials, so that
        start-up or a reload of every credential holds one pass's reads at a time.

        ``read_ahead`` (start-up only, while nothing else evaluates): the next pass's files
        are read while this pass is evaluated and committed, instead of the event loop
        waiting for each pass's reads: by the read worker process (:mod:`.readahead`), or
        in a worker thread when it cannot start or fails (``worker``: the one started for
        this start-up, ``None`` for threads). The thread may be two passes ahead:
        its reads wait for the interpreter lock while the loop evaluates and publishes, so
        it keeps pace only on average, and one pass of slack kept the loop from waiting on
        it (start-up 5 % faster at 10,000 credentials). Three passes' reads are held at
        most.
        """
        names = list(batch)
        step = self.tuning.max_batch
        passes = [
            {n: batch[n] for n in names[start : start + step]}
            for start in range(0, len(names), step)
        ]
        if not read_ahead or len(passes) < 2:
            for each in passes:
                await self._evaluate(each)
            return
        # Nothing else reads or commits before start-up is done (the loops, the sinks and
        # every check start after it), so reading outside the lock cannot commit older
        # content after newer; a change made meanwhile is queued by inotify and read again.
        # For credentials seen for the first time (whose read is sure to be published, so
        # screened for writers) the thread also asks at once who holds those files open for
        # writing, and which changed since: asked later, after the evaluation, it would find
        # what it finds now (a change made meanwhile is read again; a writer that opens a
        # file after the read leaves the content read whole), but the loop would wait for it.
        # The others are asked only if their evaluation finds a change, as any scan is.
        if worker is not None:
            passes = passes[await self._evaluate_by_worker(passes, worker):]
        if not passes:
            return
        send, receive = anyio.create_memory_object_stream[_ReadAhead](1)

        async def read_passes() -> None:
            async with send:
                for each in passes:
                    specs, new = self._pass_specs(each)
                    await send.send(await anyio.to_thread.run_sync(_read_and_look, specs, new))

        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(read_passes)
            for each in passes:
                reads, looked = await receive.receive()
                await self._evaluate(each, reads, looked)

    def _pass_specs(
        self, each: Mapping[str, Pending]
    ) -> tuple[dict[str, CredentialSettings], set[str]]:
        """A start-up pass's settings, and which of its credentials are seen for the first
        time (their writers are asked about right after the read)."""
        return (
            {n: self._table[n].spec for n in each},
            {n for n in each if self._table[n].state is None},
        )

    async def _evaluate_by_worker(
        self, passes: list[dict[str, Pending]], worker: ReadWorker
    ) -> int:
        """Start-up's passes, read ahead by the read worker process; how many were done (the
        rest are read in threads: the worker is gone or garbled).

        The worker reads a pass, answers, then reads the next request: it is one pass
        ahead of the loop at most, bounded also by the pipe between them."""
        # One pass is planned ahead of the one evaluated, not all of them: the requests of
        # every pass at once were 1.5 MB of path strings at 10,000 credentials.
        planned: collections.deque[PassPlan] = collections.deque()
        send, requests = anyio.create_memory_object_stream[Request](2)

        def plan(index: int) -> None:
            if index < len(passes):
                planned.append(plan_pass(*self._pass_specs(passes[index])))
                send.send_nowait(planned[-1].request)

        async with anyio.create_task_group() as tg, send:
            tg.start_soon(worker.feed, requests)
            plan(0)
            for index, each in enumerate(passes):
                plan(index + 1)
                try:
                    answer = await worker.answer(len(planned[0].request[0]))
                except ReadWorkerError as exc:
                    log.warning(
                        "the read worker failed; start-up reads the rest in threads",
                        extra={"error": str(exc)},
                    )
                    tg.cancel_scope.cancel()
                    return index
                this = planned.popleft()
                reads, looked = this.reads(*answer)
                if this.thread:
                    more, also = await anyio.to_thread.run_sync(
                        _read_and_look, this.thread, this.new & set(this.thread)
                    )
                    reads.update(more)
                    looked = WriterLook(
                        looked.names | also.names, looked.busy | also.busy,
                        looked.moved | also.moved,
                    )
                await self._evaluate(each, reads, looked)
        return len(passes)

    async def _evaluate(
        self,
        batch: Mapping[str, Pending],
        reads: Mapping[str, CredentialRead] | None = None,
        looked: WriterLook | None = None,
    ) -> None:
        # Reads happen under the lock too: two evaluations reading at different moments
        # must not commit out of order, or older content would look like a new change.
        async with self._lock:
            if reads is None:
                specs = {n: self._table[n].spec for n in batch if n in self._table}
                reads = await anyio.to_thread.run_sync(read_all, specs)
            now = self._clock()
            polled_dirs = self.watcher.polled_dirs
            poll_every = self._net.poll_every
            writing = self.watcher.writing
            results: dict[str, Result] = {}
            yield_every = self.tuning.yield_every
            for index, (name, read) in enumerate(reads.items(), 1):
                if index % yield_every == 0:
                    await anyio.lowlevel.checkpoint()
                tracked = self._table[name]
                wanted = batch[name]
                if not wanted.force and writing and any(p in writing for p in tracked.paths):
                    continue  # a writer has it open; its close-write brings us back
                if read.fault is not None:
                    self._faults.record(name, read.fault, now)
                    self.deadlines.at(now + self.tuning.fault_retry, name, Kind.RETRY)
                    self._reschedule.poke()
                    continue
                startup = tracked.startup and tracked.state is not None
                ev = evaluate(
                    read, self._fp, now,
                    prev=tracked.state,
                    findings=partial(self._findings.about, name, read.spec),
                    polled_dirs=polled_dirs,
                    poll_every=poll_every,
                    startup=startup,
                    settings_changed=wanted.settings_changed,
                )
                # Leaving the files for the fallback means the expiry file vanished: that
                # waits out the window too, so delete + recreate stays one event.
                to_fallback = read.note is not None and tracked.settings_in_use is tracked.spec
                as_of = self._window.consider(
                    name, ev.from_files, ev.transition, now,
                    exempt=tracked.startup or tracked.state is None, to_fallback=to_fallback,
                )
                if as_of is None:
                    due = self._window.due(name)
                    assert due is not None
                    self.deadlines.at(due, name, Kind.SETTLE)
                    self._reschedule.poke()
                    continue
                # Published after the window: as of the moment it was first observed.
                tr = ev.transition if as_of == now else ev.as_of(as_of)
                if wanted.announce is not None:
                    event_type, reason = wanted.announce
                    said = replace(tr.state, reason=reason or tr.state.reason)
                    tr = replace(tr, events=(*tr.events, (event_type, said)))
                results[name] = Result(read, tr)
            await self._holdback.screen(
                batch, results, on_hold=lambda n: self.watcher.hold(self._table[n].paths),
                looked=looked,
            )
            for name in results:
                self._holdback.release(name)
                if batch[name].publish_held_open:
                    self.watcher.release(self._table[name].paths)
            await self._commit(results)
        self._progressed()

    def _progressed(self) -> None:
        self._progress.notify()

    async def _tick(self, names: set[str], now: float) -> None:
        async with self._lock:
            results: dict[str, Result] = {}
            for name in names:
                tracked = self._table.get(name)
                if tracked is not None and tracked.state is not None:
                    rules = tracked.settings_in_use or tracked.spec
                    results[name] = Result(None, tick(rules, tracked.state, now))
            await self._commit(results)
        self._progressed()

    async def _commit(self, results: Mapping[str, Result]) -> None:
        """Number, persist, then publish; then follow each new state's deadline. Caller
        holds the lock."""
        await self._committer.commit(
            self._table, results, yield_every=self.tuning.yield_every if self._starting else None
        )
        for name in results:
            self._follow(name, self._table[name].state)

    def _follow(self, name: str, state: State | None) -> None:
        if self.deadlines.follow(name, state):
            self._reschedule.poke()


#: A start-up pass read ahead: its reads, and what was asked of its new credentials' writers.
_ReadAhead = tuple[dict[str, CredentialRead], WriterLook]


def _read_and_look(specs: Mapping[str, CredentialSettings], new: set[str]) -> _ReadAhead:
    """Read a pass's credentials, then ask at once who holds the ``new`` ones' files open
    for writing and which of them changed since (blocking: a worker thread)."""
    reads = read_all(specs)
    return reads, look_for_writers({n: reads[n] for n in new if n in reads})


def _no_consumers(name: str) -> tuple[Consumer, ...]:
    return ()

"""Consumer tracking, the I/O shell around :mod:`broker.core.convergence`.

:class:`ConsumerTracker` is run by the broker beside the engine (the sinks that take reports
reach it as ``port.consumers``): it keeps the reports consumers send
(HTTP ``PUT/DELETE /v1/credentials/{name}/consumers/{id}``, and MQTT retained messages on
``<prefix>/<host_id>/consumers/<credential>/<id>`` through
:class:`broker.sinks.consumer_reports.MqttConsumerReports`), forgets consumers silent for
``consumer_ttl``, puts them in every state document (``consumers``) and publishes
``credentials.lagging`` / ``credentials.converged`` through the broker, so those events get
sequence numbers, the journal and every sink like any other.

What it knows survives restarts in ``state_dir/consumers.json`` (0600, written atomically;
see :mod:`broker.engine.consumers_file`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import TaskStatus

from broker.aio.atomicfile import atomic_write
from broker.aio.wakeup import Wakeup
from broker.core.convergence import (
    CONVERGED,
    LAGGING,
    ReportError,
    assess,
    check_consumer_id,
    check_report,
    converged_reason,
    forget_silent,
    lagging_of,
    lagging_reason,
    record,
)
from broker.core.durations import format_duration
from broker.core.events import REFRESHED
from broker.core.state import Consumer, State
from broker.core.timefmt import parse_time
from broker.engine.consumers_file import (
    CONSUMERS_FILE,
    Tracked,
    encode_consumers,
    load_consumers,
)

if TYPE_CHECKING:
    from broker.config import CredentialSettings
    from broker.engine.bus import Subscription

log = logging.getLogger("broker.consumers")

#: A report is a few dozen bytes; anything much larger is refused unread.
MAX_REPORT = 4096
#: Fingerprints of this many recent generations are kept to check reports of older ones.
KNOWN_GENERATIONS = 16
#: Consumers per credential; a flood of ids beyond this is refused.
MAX_CONSUMERS = 10_000
#: The tracker looks at the clock at least this often.
MAX_SLEEP = 30.0
#: Writes of consumers.json are at least this far apart (reports can come in bursts).
PERSIST_EVERY = 0.2
#: What the bus alone changed (when each generation was first refreshed: every credential's,
#: so a write costs as much as the whole file) is written once the bus has been quiet this
#: long, or at the latest MAX_SLEEP after the first such change: a burst of 10,000 events is
#: one write just after it, not one every PERSIST_EVERY during it nor one later, when the
#: daemon is otherwise idle.
BUS_QUIET = 1.0

#: HTTP status of each refusal.
HTTP_STATUS = {
    "invalid-report": 400,
    "invalid-consumer-id": 400,
    "unknown-credential": 404,
    "unknown-generation": 409,
    "fingerprint-mismatch": 409,
    "stale-report": 409,
    "too-many-consumers": 409,
    "report-too-large": 413,
}


@dataclass(frozen=True, slots=True)
class Report:
    """A parsed report body: ``{"generation", "fingerprint"}``, optionally ``consumer``,
    ``credential`` and ``time`` (the MQTT form of SPEC section 3)."""

    generation: object
    fingerprint: object
    consumer: str | None = None
    credential: str | None = None
    time: float | None = None


_MQTT_FIELDS = frozenset({"generation", "fingerprint", "consumer", "credential", "time"})
HTTP_FIELDS = frozenset({"generation", "fingerprint"})


def parse_report(body: bytes, fields: frozenset[str] = _MQTT_FIELDS) -> Report:
    """Parse a report body (HTTP: ``HTTP_FIELDS``, MQTT: the full form); raises
    :class:`ReportError`, never echoing the body."""
    if len(body) > MAX_REPORT:
        raise ReportError("report-too-large", f"a report is at most {MAX_REPORT} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ReportError("invalid-report", "the report is not JSON") from None
    if not isinstance(doc, dict):
        raise ReportError("invalid-report", "the report is not a JSON object")
    unknown = set(doc) - fields
    if unknown:
        raise ReportError("invalid-report", f"unknown report field(s): {len(unknown)}")
    consumer, credential, when = doc.get("consumer"), doc.get("credential"), doc.get("time")
    for key, value in (("consumer", consumer), ("credential", credential), ("time", when)):
        if value is not None and not isinstance(value, str):
            raise ReportError("invalid-report", f'"{key}" must be a string')
    at = None
    if when is not None:
        try:
            at = parse_time(when)
        except ValueError:
            raise ReportError("invalid-report", '"time" is not an RFC 3339 time') from None
    generation = doc.get("generation")
    if isinstance(generation, float) and generation.is_integer():
        generation = int(generation)  # JSON has one number type: 3.0 is the integer 3
    return Report(generation, doc.get("fingerprint"), consumer, credential, at)


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """One credential's consumers, for metrics and tables."""

    credential: str
    consumers: int
    lagging: int
    #: Seconds since the oldest lagging consumer reported the generation it holds.
    oldest_lag_seconds: float | None


class Credentials(Protocol):
    """What the tracker needs of the broker (the port offers it): states, settings, events."""

    def names(self) -> list[str]: ...

    def state(self, name: str) -> State: ...

    def settings(self, name: str) -> CredentialSettings: ...

    def subscribe(self, pattern: str = ..., *, payloads: bool = ...) -> Subscription: ...

    async def announce(
        self, name: str, event_type: str, reason: str, *, generation: int
    ) -> bool: ...


class ConsumerTracker:
    """The broker's table of consumer reports.

    The broker makes it before the engine's first pass and shows its :meth:`consumers_of`
    in every state; ``clock`` is the wall clock of reports, ``monotonic`` paces the saves.
    """

    def __init__(
        self,
        credentials: Credentials,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._credentials = credentials
        self._clock = clock
        self._monotonic = monotonic
        self._path: Path = state_dir / CONSUMERS_FILE
        self._creds: dict[str, Tracked] = {}
        self._dirty: set[str] = set()
        self._deadlines: dict[str, float] = {}
        self._wakeup = Wakeup()
        self._unsaved = False
        #: (first, last) monotonic times of bus changes not yet written, or None.
        self._bus_unsaved: tuple[float, float] | None = None
        self._save_failed = False
        # Subscribed now, before the engine's first pass: its first-sight `refreshed`
        # events say when each generation started. It follows them only once start-up is
        # done, so all of them wait in its queue meanwhile: without their payloads, which
        # it never reads (with them, 6 MB at 10,000 credentials, at the start-up peak).
        self._subscription = credentials.subscribe("*", payloads=False)

    def __repr__(self) -> str:
        count = sum(len(c.consumers) for c in self._creds.values())
        return f"ConsumerTracker(consumers={count})"

    def close(self) -> None:
        """Let go of the bus subscription: for a tracker made but never ``run``."""
        self._subscription.close()

    # -- queries (no I/O) --------------------------------------------------------------------

    def consumers_of(self, name: str) -> tuple[Consumer, ...]:
        """``name``'s consumers, by id."""
        cred = self._creds.get(name)
        if cred is None or not cred.consumers:
            return ()
        return tuple(cred.consumers[i] for i in sorted(cred.consumers))

    def lagging(self, name: str, state: State | None = None) -> list[Consumer]:
        """``name``'s consumers lagging now."""
        cred = self._creds.get(name)
        if cred is None or not cred.consumers:
            return []
        state = state or self._credentials.state(name)
        spec = self._credentials.settings(name)
        return lagging_of(
            state, cred.consumers.values(), self._refreshed_at(cred, state), spec.lag_after,
            self._clock(),
        )

    def stats(self) -> list[ConsumerStats]:
        """Per credential: consumers, lagging consumers, age of the oldest lagging report."""
        now = self._clock()
        out = []
        for name in self._credentials.names():
            cred = self._creds.get(name)
            count = len(cred.consumers) if cred else 0
            lagging = self.lagging(name) if count else []
            oldest = min((c.since for c in lagging), default=None)
            out.append(
                ConsumerStats(name, count, len(lagging), None if oldest is None else now - oldest)
            )
        return out

    # -- reports -----------------------------------------------------------------------------

    def report(
        self,
        name: str,
        consumer_id: str,
        generation: object,
        fingerprint: object,
        *,
        via: str,
        at: float | None = None,
    ) -> State:
        """Record that ``consumer_id`` uses ``generation`` of ``name``; returns the state.

        ``at`` is when the consumer says it reported (a retained MQTT report can be old);
        a report older than ``consumer_ttl`` is refused as stale. Raises
        :class:`~broker.core.convergence.ReportError` for anything the broker refuses.
        """
        try:
            state = self._credentials.state(name)
            spec = self._credentials.settings(name)
        except KeyError:
            raise ReportError("unknown-credential", "unknown credential") from None
        check_consumer_id(consumer_id)
        cred = self._creds.setdefault(name, Tracked({}))
        generation, fingerprint = check_report(state, generation, fingerprint, known=cred.known)
        now = self._clock()
        seen = now if at is None else min(at, now)
        if now - seen >= spec.consumer_ttl:
            raise ReportError("stale-report", "the report is older than consumer_ttl")
        if consumer_id not in cred.consumers and len(cred.consumers) >= MAX_CONSUMERS:
            raise ReportError("too-many-consumers", f"at most {MAX_CONSUMERS} consumers")
        cred.consumers = record(
            cred.consumers, consumer_id, generation, fingerprint, via=via, now=seen
        )
        self._touch(name)
        return self._credentials.state(name)

    def remove(self, name: str, consumer_id: str) -> State:
        """Forget ``consumer_id`` (it went away); returns the state. Unknown ids are fine."""
        try:
            self._credentials.state(name)
        except KeyError:
            raise ReportError("unknown-credential", "unknown credential") from None
        check_consumer_id(consumer_id)
        cred = self._creds.get(name)
        if cred is not None and cred.consumers.pop(consumer_id, None) is not None:
            self._touch(name)
        return self._credentials.state(name)

    def _touch(self, name: str) -> None:
        self._dirty.add(name)
        self._unsaved = True
        self._wakeup.poke()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the bus, announce lagging/converged when due, persist; until cancelled."""
        try:
            self._creds = await anyio.to_thread.run_sync(self._load)
            self._dirty.update(self._creds)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._follow)
                task_status.started()
                await self._loop()
        finally:
            self.close()
            with anyio.CancelScope(shield=True):
                if self._unsaved or self._bus_unsaved is not None:
                    await anyio.to_thread.run_sync(self._save, encode_consumers(self._creds))

    async def _follow(self) -> None:
        async for event in self._subscription:
            if event.type in (LAGGING, CONVERGED):
                continue  # our own announcements change nothing
            name, state = event.subject, event.data
            cred = self._creds.get(name)
            if event.type == REFRESHED:
                cred = cred or self._creds.setdefault(name, Tracked({}))
                try:
                    when = parse_time(event.time)
                except ValueError:
                    when = self._clock()
                cred.refreshed = (state.generation, when)
                if state.fingerprint is not None:
                    known = cred.known = cred.known or {}
                    known[state.generation] = state.fingerprint
                    for old in sorted(known)[:-KNOWN_GENERATIONS]:
                        del known[old]
                self._bus_changed()
            if cred is not None and cred.consumers:
                self._touch(name)

    def _bus_changed(self) -> None:
        now = self._monotonic()
        if self._bus_unsaved is None:
            self._bus_unsaved = (now, now)
            self._wakeup.poke()  # the loop sets its wake-up for the write
        else:
            self._bus_unsaved = (self._bus_unsaved[0], now)

    def _save_due(self, last_save: float) -> float | None:
        """When consumers.json is to be written next (monotonic), or None: nothing to write."""
        if self._unsaved:
            return last_save + PERSIST_EVERY
        if self._bus_unsaved is None:
            return None
        first, last = self._bus_unsaved
        return max(last_save + PERSIST_EVERY, min(last + BUS_QUIET, first + MAX_SLEEP))

    async def _loop(self) -> None:
        last_save = -math.inf
        while True:
            now = self._clock()
            due = {n for n, d in self._deadlines.items() if d <= now} | self._dirty
            self._dirty = set()
            for name in sorted(due):
                self._deadlines.pop(name, None)
                await self._assess(name)
            delay = MAX_SLEEP
            if self._deadlines:
                delay = min(delay, max(0.0, min(self._deadlines.values()) - self._clock()))
            save_at = self._save_due(last_save)
            if save_at is not None:
                wait = save_at - self._monotonic()
                if wait <= 0:
                    self._unsaved, self._bus_unsaved = False, None
                    await anyio.to_thread.run_sync(self._save, encode_consumers(self._creds))
                    last_save = self._monotonic()
                else:
                    delay = min(delay, wait)
            if self._dirty:
                continue
            await self._wakeup.wait(delay)

    async def _assess(self, name: str) -> None:
        credentials = self._credentials
        cred = self._creds.get(name)
        if cred is None:
            return
        try:
            state, spec = credentials.state(name), credentials.settings(name)
        except KeyError:  # removed from the config
            del self._creds[name]
            self._unsaved = True
            return
        now = self._clock()
        kept, silent_due = forget_silent(cred.consumers, spec.consumer_ttl, now)
        if len(kept) != len(cred.consumers):
            for gone in sorted(set(cred.consumers) - set(kept)):
                log.info("consumer forgotten after consumer_ttl",
                         extra={"credential": name, "consumer": gone})
            self._unsaved = True
        verdict = assess(
            state,
            kept,
            refreshed_at=self._refreshed_at(cred, state),
            converged_generation=cred.converged,
            lag_after=spec.lag_after,
            now=now,
        )
        cred.consumers = dict(verdict.consumers)
        for consumer in verdict.lagging:
            self._unsaved = True
            said = await credentials.announce(
                name, LAGGING, lagging_reason(consumer, state, spec.lag_after),
                generation=state.generation,
            )
            if not said:  # the credential moved on meanwhile: decide again
                current = cred.consumers.get(consumer.id)
                if current is not None and current.generation == consumer.generation:
                    cred.consumers[consumer.id] = replace(current, lagged=False)
                self._dirty.add(name)
        if verdict.converged:
            said = await credentials.announce(
                name, CONVERGED, converged_reason(state, len(verdict.consumers)),
                generation=state.generation,
            )
            if said:
                cred.converged = state.generation
                self._unsaved = True
            else:
                self._dirty.add(name)
        deadlines = [d for d in (verdict.deadline, silent_due) if d is not None]
        if deadlines:
            self._deadlines[name] = min(deadlines)

    @staticmethod
    def _refreshed_at(cred: Tracked, state: State) -> float | None:
        if cred.refreshed is not None and cred.refreshed[0] == state.generation:
            return cred.refreshed[1]
        return None

    # -- persistence -------------------------------------------------------------------------

    def _save(self, data: bytes) -> None:
        try:
            atomic_write(self._path, data)
        except OSError as exc:
            if not self._save_failed:
                log.error("cannot persist consumer reports; keeping them in memory",
                          extra={"path": str(self._path), "error": exc.strerror or str(exc)})
            self._save_failed = True
        else:
            self._save_failed = False

    def _load(self) -> dict[str, Tracked]:
        return load_consumers(self._path)


def consumer_lines(state: State, now: float, lagging: Iterable[str] = ()) -> list[str]:
    """Lines for the human tables of ``check`` and ``status``: one per consumer.

    A consumer is *current* when it holds the content there is now (same fingerprint),
    which also holds for ``check``, which does not know the daemon's generation numbers.
    """
    marked = set(lagging)
    lines = []
    for c in state.consumers:
        if c.fingerprint == state.fingerprint:
            note = "current"
        else:
            note = f"old content, for {format_duration(now - c.since)}"
        if c.id in marked:
            note += ", LAGGING"
        lines.append(f"    consumer {c.id}: generation {c.generation} ({note}) via {c.via}")
    return lines

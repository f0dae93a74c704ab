"""Writer hold-back: content found while a process still has the file open for writing.

Such content is usually half-written. It is not published until the writer closes the file
(its close-write brings the engine back), or until it has held still: read twice
``writer_quiet`` apart (``writer_quiet_invalid`` for content that does not parse) with the
same fingerprint, when it is published with a ``writer-active`` problem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import anyio

from broker.config import CredentialSettings
from broker.core.globs import is_glob
from broker.core.machine import Transition
from broker.core.problems import ProblemCode
from broker.core.reads import Signature
from broker.core.state import Problem, State, Status
from broker.engine.commit import Result
from broker.engine.reader import CredentialRead, signature_of, stat_signature
from broker.engine.tracking import Pending
from broker.engine.writers import open_for_writing, stat_all

__all__ = [
    "WriterHoldBack",
    "WriterLook",
    "changed_since",
    "look_for_writers",
    "with_problem",
    "writer_active",
    "writers_and_moves",
]

log = logging.getLogger("broker.engine")

_UNUSABLE = frozenset({Status.INVALID, Status.MISSING})


@dataclass(frozen=True, slots=True)
class WriterLook:
    """What :func:`writers_and_moves` said of the files of ``names``, asked right after they
    were read (start-up's read-ahead thread): which a writer holds, which credentials moved."""

    names: frozenset[str]
    busy: set[str]
    moved: set[str]


def look_for_writers(reads: Mapping[str, CredentialRead]) -> WriterLook:
    """:func:`writers_and_moves` for every file of ``reads`` (blocking: a worker thread)."""
    busy, moved = writers_and_moves(
        [r.info.path for read in reads.values() for r in read.reads],
        {n: read.signatures for n, read in reads.items()},
    )
    return WriterLook(frozenset(reads), busy, moved)


@dataclass(frozen=True, slots=True)
class _HeldOpen:
    fingerprint: str | None
    since: float  # monotonic: when this content was first read while held open
    state: State  # what it would publish


class WriterHoldBack:
    """Per credential: the unpublished content a writer holds open, and since when."""

    def __init__(
        self,
        *,
        quiet: Callable[[], tuple[float, float]],
        monotonic: Callable[[], float],
    ) -> None:
        # (quiet for usable content, quiet for unusable content), read at each use so a
        # test may shorten them on a running engine.
        self._quiet = quiet
        self._monotonic = monotonic
        self._held: dict[str, _HeldOpen] = {}

    def unpublished(self, name: str) -> State | None:
        """What ``name``'s files say while a writer holds them (``None``: nothing held)."""
        found = self._held.get(name)
        return None if found is None else found.state

    def held_still(self, name: str, state: State) -> bool:
        """Whether content a writer holds is what the last read saw, long enough ago."""
        found = self._held.get(name)
        if found is None or found.fingerprint != state.fingerprint:
            return False
        usable, unusable = self._quiet()
        wait = usable if state.status not in _UNUSABLE else unusable
        return self._monotonic() - found.since >= wait

    def hold(self, name: str, state: State) -> None:
        """Withhold ``state``: a writer has the file open. The clock keeps running for the
        same content, and restarts for new content."""
        found = self._held.get(name)
        since = self._monotonic()
        if found is not None and found.fingerprint == state.fingerprint:
            since = found.since
        self._held[name] = _HeldOpen(state.fingerprint, since, state)

    def release(self, name: str) -> None:
        """``name`` is being published: nothing of it is held back any more."""
        self._held.pop(name, None)

    async def screen(
        self,
        batch: Mapping[str, Pending],
        results: dict[str, Result],
        *,
        on_hold: Callable[[str], None],
        looked: WriterLook | None = None,
    ) -> None:
        """Drop from ``results`` what a writer still holds open (or changed since it was
        read), unless it held still long enough to publish with a ``writer-active`` problem.

        An event can be older than the file: a close-write read late, after the writer's
        next truncate. So content that became unusable is checked for writers too; the
        usual case (new content that parses) pays nothing. ``on_hold`` is told of each
        credential held back (the watcher then treats its files as held by a writer).
        ``looked``: what was asked already of some credentials, right after their read
        (start-up's read-ahead); only the others are asked now.
        """
        scanned = [
            n for n, r in results.items()
            if r.transition.events
            and (batch[n].scan or r.transition.state.status in _UNUSABLE)
        ]
        if not scanned:
            return
        # The files actually read: a pattern's matches, the fallback's when in use.
        read_paths: dict[str, list[str]] = {}
        to_ask = {}  # the signatures of those not looked at yet
        for n in scanned:
            read = results[n].read
            assert read is not None
            read_paths[n] = [r.info.path for r in read.reads]
            if looked is None or n not in looked.names:
                to_ask[n] = read.signatures
        busy, moved = (looked.busy, looked.moved) if looked is not None else (set(), set())
        if to_ask:
            found_busy, found_moved = await anyio.to_thread.run_sync(
                writers_and_moves, [p for n in to_ask for p in read_paths[n]], to_ask
            )
            busy, moved = busy | found_busy, moved | found_moved
        for name in scanned:
            held = sorted(p for p in read_paths[name] if p in busy)
            result = results[name]
            tr = result.transition
            if held and batch[name].publish_held_open and self.held_still(
                name, tr.state
            ):
                # Held open, but the content held still: publish it.
                assert result.read is not None
                problem = writer_active(result.read.spec, held)
                results[name] = replace(result, transition=with_problem(tr, problem))
            elif held:
                # Found by a scan while a writer holds it: its close-write, or the writer
                # loop once the content holds still, brings it back.
                log.debug("file open for writing; waiting", extra={"credential": name})
                self.hold(name, tr.state)
                on_hold(name)
                del results[name]
            elif name in moved:
                # Changed since it was read (a writer that closed meanwhile): the event that
                # change made reads it again.
                del results[name]

    def forget(self, names: Iterable[str]) -> None:
        """Drop credentials no longer tracked."""
        for name in names:
            self._held.pop(name, None)


def writer_active(spec: CredentialSettings, paths: Iterable[str]) -> Problem:
    """The problem a state carries while a process holds one of its files open for writing."""
    return Problem(
        ProblemCode.WRITER_ACTIVE,
        f"a process has {', '.join(paths)} open for writing; the content may still change",
        spec.remedy(ProblemCode.WRITER_ACTIVE, spec.expiry_file),
    )


def with_problem(tr: Transition, problem: Problem) -> Transition:
    """``tr`` with ``problem`` added to its state and to the state of each of its events."""

    def add(state: State) -> State:
        return replace(state, problems=(*state.problems, problem))

    return replace(tr, state=add(tr.state), events=tuple((t, add(s)) for t, s in tr.events))


def writers_and_moves(
    paths: list[str], signatures: Mapping[str, Mapping[str, Signature | None]]
) -> tuple[set[str], set[str]]:
    """Which ``paths`` a writer holds open, and which credentials' files changed since
    they were read (their ``signatures``). Blocking: run in a thread.

    One ``stat`` of each file serves both questions (a call less per file: each call a
    worker thread makes waits for the interpreter lock while the event loop runs); a
    pattern's signature is taken as :func:`stat_signature` takes it.
    """
    stats = stat_all(paths)
    busy = open_for_writing(paths, stats)

    def now(path: str) -> Signature | None:
        if path in stats and not is_glob(path):
            st = stats[path]
            return None if st is None else signature_of(st)
        return stat_signature(path)

    return busy, changed_since(signatures, now)


def changed_since(
    signatures: Mapping[str, Mapping[str, Signature | None]],
    now: Callable[[str], object],
) -> set[str]:
    """The credentials among ``signatures`` (as read, by path) that some path's ``now``
    signature differs from."""
    return {
        name for name, sigs in signatures.items() if any(now(p) != sig for p, sig in sigs.items())
    }

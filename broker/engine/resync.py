"""The safety nets under inotify: the periodic resync (re-stat every file, now and then
re-hash them all), polling of paths the kernel would not watch, writers that went without
a close-write, and noisy directories.

They only mark credentials for the engine to read again (or report a finding); they never
read content or change a state themselves.

The resync is the daemon's one periodic job that grows with the number of credentials, so
it is kept to what it must do: a stat of every watched file in one loop in a worker thread,
over a plan made once per configuration (each file once, with the credentials it belongs
to), compared with the signatures each one's last read recorded (read in place: a commit
replaces a credential's signatures, it never edits them). Only the credentials whose files
changed are marked; the event loop sees one call, not one per file.

The full re-hash reads and fingerprints every file in the same worker thread, with the one
reader (:func:`~broker.engine.reader.read_file`) and the credential's fingerprint (HMAC of
each role's bytes, as the evaluation makes it): a credential whose files have the signatures
and the fingerprint its state was made from, and whose state has nothing to revise (no
problem, not polled), is left alone; every other one is re-read and evaluated as before.
A credential the thread cannot fingerprint as the evaluation does (a pattern, a fallback, a
``select``) is always re-read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

import anyio

from broker.aio.wakeup import Wakeup
from broker.core.fingerprint import Fingerprinter
from broker.core.globs import is_glob
from broker.core.state import Problem
from broker.engine.noise import NoiseMonitor
from broker.engine.reader import glob_paths, read_file, signature_of, stat_signature
from broker.engine.tracking import CredentialTable, Tracked
from broker.engine.tuning import EngineTuning
from broker.engine.watcher import Watcher
from broker.engine.writers import open_for_writing

__all__ = ["SafetyNet"]

#: Sets or clears a finding (name, source, problem) and re-reads without forcing past writers.
ReportFinding = Callable[[str, str, Problem | None], Awaitable[object]]

#: One watched file as the resync stats it: its path, and the records of the credentials it
#: belongs to (for the signatures each one's last read saw).
_File = tuple[str, tuple[Tracked, ...]]


class SafetyNet:
    """The resync and poll loops of one engine."""

    def __init__(
        self,
        *,
        table: CredentialTable,
        watcher: Watcher,
        fingerprinter: Fingerprinter,
        polling: Wakeup,
        mark: Callable[[Iterable[str]], None],
        report: ReportFinding,
        tuning: Callable[[], EngineTuning],
        resync_interval: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._table = table
        self._watcher = watcher
        self._fp = fingerprinter
        self._polling = polling  # poked when a path joins watcher.polled
        self._mark = mark  # queue names for a scan (writers checked) re-read
        self._report = report
        self._tuning = tuning
        self._resync_interval = resync_interval
        self._monotonic = monotonic
        first = tuning()
        self._noise = NoiseMonitor(rate=first.noisy_rate, minimum=first.noisy_min)
        self.last_resync_seconds = 0.0
        #: The plan: plain files, and patterns; made again when the table moves.
        self._files: tuple[_File, ...] = ()
        self._patterns: tuple[_File, ...] = ()
        self._plan_version = -1

    @property
    def poll_every(self) -> float:
        """How often unwatchable paths are polled."""
        return min(self._tuning().poll_interval, self._resync_interval())

    async def resync_loop(self) -> None:
        rounds = 0
        while True:
            started = self._monotonic()
            await anyio.sleep(self._resync_interval())
            rounds += 1
            await self._report_noise(self._monotonic() - started)
            await self.resync(full=rounds % self._tuning().full_rehash_every == 0)

    async def poll_loop(self) -> None:
        while True:
            if not self._watcher.polled:
                # Nothing to poll (the usual case): sleep until the watcher fails to watch
                # something, rather than waking every poll_every to find nothing.
                await self._polling.wait()
            await anyio.sleep(self.poll_every)
            polled = set(self._watcher.polled)
            if polled:
                files = [self._file(path) for path in polled]
                plain = tuple(f for f in files if not is_glob(f[0]))
                patterns = tuple(f for f in files if is_glob(f[0]))
                await self._mark_stat_changes(plain, patterns)

    async def resync(self, *, full: bool = False) -> None:
        """Re-stat every file, re-read what changed (``full``: re-hash every file, re-read
        what may differ from its state)."""
        started = time.perf_counter()
        await self._release_gone_writers()
        if full:
            await self._mark_rehash_changes()
        else:
            self.plan()
            await self._mark_stat_changes(self._files, self._patterns)
        self.last_resync_seconds = time.perf_counter() - started

    def plan(self) -> None:
        """Make the resync's plan for the credentials tracked now, if the table moved since
        the last. The engine calls it when it sets its credentials (start-up, reload), so
        that the cost (tens of milliseconds at 10,000 credentials) is theirs, not the first
        resync's."""
        table = self._table
        if self._plan_version == table.version:
            return
        files: list[_File] = []
        patterns: list[_File] = []
        for path in table.by_path:
            (patterns if is_glob(path) else files).append(self._file(path))
        self._files, self._patterns = tuple(files), tuple(patterns)
        self._plan_version = table.version

    def _file(self, path: str) -> _File:
        """``path`` with its credentials' records."""
        return (path, tuple(self._table[n] for n in self._table.by_path.get(path, ())))

    async def _report_noise(self, elapsed: float) -> None:
        """Annotate (once) each credential whose directory floods the broker with events for
        other files, and clear it when the directory calms down."""
        changes = self._noise.assess(
            self._watcher.take_noise(),
            elapsed,
            paths_in=self._watcher.paths_in,
            names_at=lambda path: self._table.by_path.get(path, ()),
            tracked=self._table,
        )
        for name, problem in changes.items():
            await self._report(name, "watch", problem)

    async def _release_gone_writers(self) -> None:
        # "A writer has it open" came from an event that may be long past (a lost close-write,
        # a writer killed): ask /proc again, or the file would be skipped forever.
        writing = set(self._watcher.writing)
        if not writing:
            return

        def gone() -> set[str]:
            files = {p: glob_paths(p) if is_glob(p) else [p] for p in writing}
            busy = open_for_writing(f for matches in files.values() for f in matches)
            return {p for p, matches in files.items() if not busy.intersection(matches)}

        self._watcher.release(await anyio.to_thread.run_sync(gone))

    async def _mark_stat_changes(
        self, files: Sequence[_File], patterns: Sequence[_File]
    ) -> None:
        writing = frozenset(self._watcher.writing)
        stale = await anyio.to_thread.run_sync(_stat_changes, files, patterns, writing)
        self._mark_tracked(stale)

    async def _mark_rehash_changes(self) -> None:
        todo = tuple(self._table.values())
        writing = frozenset(self._watcher.writing)
        polled_dirs = frozenset(self._watcher.polled_dirs)
        stale = await anyio.to_thread.run_sync(
            _rehash_changes, todo, writing, polled_dirs, self._fp
        )
        self._mark_tracked(stale)

    def _mark_tracked(self, names: list[str]) -> None:
        # A credential dropped by a reload while the thread ran has nothing to re-read.
        stale = [name for name in names if name in self._table]
        if stale:
            self._mark(stale)


def _stat_changes(
    files: Sequence[_File], patterns: Sequence[_File], writing: Collection[str]
) -> list[str]:
    """The credentials one of whose files' signature differs from what their last read saw
    (files a writer holds open are left to its close-write). Blocking: run in a thread."""
    stale: dict[str, None] = {}
    stat = os.stat
    for path, owners in files:
        if path in writing:
            continue
        try:
            signature = signature_of(stat(path))
        except (OSError, ValueError):
            signature = None
        for tracked in owners:
            if signature != tracked.signatures.get(path):
                stale[tracked.spec.name] = None
    for path, owners in patterns:
        if path not in writing:
            matches = stat_signature(path)
            for tracked in owners:
                if matches != tracked.signatures.get(path):
                    stale[tracked.spec.name] = None
    return list(stale)


def _rehash_changes(
    credentials: Sequence[Tracked],
    writing: Collection[str],
    polled_dirs: Collection[str],
    fingerprinter: Fingerprinter,
) -> list[str]:
    """The credentials whose files may no longer say what their state says, each file read
    and fingerprinted again; the ones not to be judged that way are all in it (see the
    module's docstring). Blocking: run in a thread."""
    stale = []
    for tracked in credentials:
        spec, state = tracked.spec, tracked.state
        if (
            spec.fallback is not None
            or spec.select is not None
            or state is None
            or state.fingerprint is None
            or state.problems  # a writer-active, a watch-polling...: the evaluation revises
            or tracked.settings_in_use is not spec  # a reload, the fallback in use
        ):
            stale.append(spec.name)
            continue
        known = tracked.signatures
        parts: list[tuple[str, bytes | None]] = []
        for role, file in spec.files.items():
            path = str(file)
            if is_glob(path) or path in writing or os.path.dirname(path) in polled_dirs:
                break
            read = read_file(role, path, spec.max_size)
            if read.content is None or read.signature != known.get(path):
                break
            parts.append((role, read.content))
        else:
            if fingerprinter.fingerprint(parts) == state.fingerprint:
                continue
        stale.append(spec.name)
    return stale

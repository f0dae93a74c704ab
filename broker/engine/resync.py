"""The safety nets under inotify: the periodic resync (re-stat every file, now and then
re-hash them all), polling of paths the kernel would not watch, writers that went without
a close-write, and noisy directories.

They only mark credentials for the engine to read again (or report a finding); they never
read content or change a state themselves.

The resync is the daemon's one periodic job that grows with the number of credentials, so
it is kept to what it must do: a stat of every file in one loop in a worker thread, over a
list of (credential, paths) made once per configuration, compared with the signatures the
last read recorded (read in place: a commit replaces a credential's signatures, it never
edits them). Only the credentials whose files changed are marked; the event loop sees one
call, not one per file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

import anyio

from broker.aio.wakeup import Wakeup
from broker.core.globs import is_glob
from broker.core.state import Problem
from broker.engine.noise import NoiseMonitor
from broker.engine.reader import glob_paths, signature_of, stat_signature
from broker.engine.tracking import CredentialTable, Tracked
from broker.engine.tuning import EngineTuning
from broker.engine.watcher import Watcher
from broker.engine.writers import open_for_writing

__all__ = ["SafetyNet"]

#: Sets or clears a finding (name, source, problem) and re-reads without forcing past writers.
ReportFinding = Callable[[str, str, Problem | None], Awaitable[object]]

#: One credential as the resync probes it: its name, its record (for the signatures its last
#: read saw), its plain paths (one stat each) and its patterns (a listing, a stat per match).
_Probe = tuple[str, Tracked, tuple[str, ...], tuple[str, ...]]


class SafetyNet:
    """The resync and poll loops of one engine."""

    def __init__(
        self,
        *,
        table: CredentialTable,
        watcher: Watcher,
        polling: Wakeup,
        mark: Callable[[Iterable[str]], None],
        report: ReportFinding,
        tuning: Callable[[], EngineTuning],
        resync_interval: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._table = table
        self._watcher = watcher
        self._polling = polling  # poked when a path joins watcher.polled
        self._mark = mark  # queue names for a scan (writers checked) re-read
        self._report = report
        self._tuning = tuning
        self._resync_interval = resync_interval
        self._monotonic = monotonic
        first = tuning()
        self._noise = NoiseMonitor(rate=first.noisy_rate, minimum=first.noisy_min)
        self.last_resync_seconds = 0.0
        self._probes: dict[str, _Probe] = {}
        self._probes_version = -1

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
                probes = self._current_probes()
                names = self._table.names_at(polled)
                await self._mark_stat_changes([probes[n] for n in names if n in probes])

    async def resync(self, *, full: bool = False) -> None:
        """Re-stat every file, re-read what changed (``full``: re-read all)."""
        started = time.perf_counter()
        await self._release_gone_writers()
        if full:
            self._mark(self._table)
        else:
            await self._mark_stat_changes(self._current_probes().values())
        self.last_resync_seconds = time.perf_counter() - started

    def plan(self) -> None:
        """Make the list of paths to stat for the credentials tracked now. The engine calls
        it when it sets its credentials (start-up, reload), so that the cost (tens of
        milliseconds at 10,000 credentials) is theirs, not the first resync's."""
        self._current_probes()

    def _current_probes(self) -> dict[str, _Probe]:
        """What to stat per credential, made again only when the configuration changed."""
        table = self._table
        if self._probes_version != table.version:
            probes: dict[str, _Probe] = {}
            for name, tracked in table.items():
                paths = tracked.paths
                files = tuple(p for p in paths if not is_glob(p))
                patterns = tuple(p for p in paths if is_glob(p))
                probes[name] = (name, tracked, files, patterns)
            self._probes, self._probes_version = probes, table.version
        return self._probes

    async def _report_noise(self, elapsed: float) -> None:
        """Annotate (once) each credential whose directory floods the broker with events for
        other files, and clear it when the directory calms down."""
        changes = self._noise.assess(
            self._watcher.take_noise(),
            elapsed,
            paths_in=self._watcher.paths_in,
            names_at=lambda path: self._table.by_path.get(path, set()),
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

    async def _mark_stat_changes(self, probes: Collection[_Probe]) -> None:
        if not probes:
            return
        # A tuple: the thread iterates it while the loop may rebuild the probes.
        todo, writing = tuple(probes), frozenset(self._watcher.writing)
        stale = await anyio.to_thread.run_sync(_stat_changes, todo, writing)
        # A credential dropped by a reload while the thread ran has nothing to re-read.
        stale = [name for name in stale if name in self._table]
        if stale:
            self._mark(stale)


def _stat_changes(probes: Sequence[_Probe], writing: Collection[str]) -> list[str]:
    """The credentials one of whose files' signature differs from what their last read saw
    (files a writer holds open are left to its close-write). Blocking: run in a thread."""
    stale = []
    stat = os.stat
    for name, tracked, files, patterns in probes:
        known = tracked.signatures
        for path in files:
            if path in writing:
                continue
            try:
                signature = signature_of(stat(path))
            except (OSError, ValueError):
                signature = None
            if signature != known.get(path):
                stale.append(name)
                break
        else:
            for path in patterns:
                if path not in writing and stat_signature(path) != known.get(path):
                    stale.append(name)
                    break
    return stale

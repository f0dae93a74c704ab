"""The safety nets under inotify: the periodic resync (re-stat every file, now and then
re-hash them all), polling of paths the kernel would not watch, writers that went without
a close-write, and noisy directories.

They only mark credentials for the engine to read again (or report a finding); they never
read content or change a state themselves.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

import anyio

from broker.core.globs import is_glob
from broker.core.state import Problem
from broker.engine.noise import NoiseMonitor
from broker.engine.reader import glob_paths, stat_signature
from broker.engine.tracking import CredentialTable
from broker.engine.tuning import EngineTuning
from broker.engine.watcher import Watcher
from broker.engine.writers import open_for_writing

__all__ = ["SafetyNet"]

#: Sets or clears a finding (name, source, problem) and re-reads without forcing past writers.
ReportFinding = Callable[[str, str, Problem | None], Awaitable[object]]


class SafetyNet:
    """The resync and poll loops of one engine."""

    def __init__(
        self,
        *,
        table: CredentialTable,
        watcher: Watcher,
        mark: Callable[[Iterable[str]], None],
        report: ReportFinding,
        tuning: Callable[[], EngineTuning],
        resync_interval: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._table = table
        self._watcher = watcher
        self._mark = mark  # queue names for a scan (writers checked) re-read
        self._report = report
        self._tuning = tuning
        self._resync_interval = resync_interval
        self._monotonic = monotonic
        first = tuning()
        self._noise = NoiseMonitor(rate=first.noisy_rate, minimum=first.noisy_min)
        self.last_resync_seconds = 0.0

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
            await anyio.sleep(self.poll_every)
            polled = set(self._watcher.polled)
            if polled:
                await self._mark_stat_changes(self._table.names_at(polled))

    async def resync(self, *, full: bool = False) -> None:
        """Re-stat every file, re-read what changed (``full``: re-read all)."""
        started = time.perf_counter()
        await self._release_gone_writers()
        if full:
            self._mark(self._table)
        else:
            await self._mark_stat_changes(set(self._table))
        self.last_resync_seconds = time.perf_counter() - started

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

    async def _mark_stat_changes(self, names: set[str]) -> None:
        known = {n: dict(self._table[n].signatures) for n in names if n in self._table}
        paths = {n: self._table[n].paths for n in known}
        writing = set(self._watcher.writing)

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
            self._mark(stale)

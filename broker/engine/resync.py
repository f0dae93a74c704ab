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

#: What the full re-hash reads of a credential it can fingerprint itself: ``max_size`` and
#: each (role, path) in role order.
_Rehash = tuple[int, tuple[tuple[str, str], ...]]
#: One credential as the resync probes it: its name, its record (for the signatures its last
#: read saw), its plain paths (one stat each), its patterns (a listing, a stat per match), and
#: what its full re-hash reads (``None``: it is re-read and evaluated whole).
_Probe = tuple[str, Tracked, tuple[str, ...], tuple[str, ...], _Rehash | None]


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
        """Re-stat every file, re-read what changed (``full``: re-hash every file, re-read
        what may differ from its state)."""
        started = time.perf_counter()
        await self._release_gone_writers()
        if full:
            await self._mark_rehash_changes(self._current_probes().values())
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
                spec = tracked.spec
                rehash: _Rehash | None = None
                if not patterns and spec.fallback is None and spec.select is None:
                    roles = tuple((role, str(path)) for role, path in spec.files.items())
                    rehash = (spec.max_size, roles)
                probes[name] = (name, tracked, files, patterns, rehash)
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
        self._mark_tracked(stale)

    async def _mark_rehash_changes(self, probes: Collection[_Probe]) -> None:
        todo, writing = tuple(probes), frozenset(self._watcher.writing)
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


def _stat_changes(probes: Sequence[_Probe], writing: Collection[str]) -> list[str]:
    """The credentials one of whose files' signature differs from what their last read saw
    (files a writer holds open are left to its close-write). Blocking: run in a thread."""
    stale = []
    stat = os.stat
    for name, tracked, files, patterns, _ in probes:
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


def _rehash_changes(
    probes: Sequence[_Probe],
    writing: Collection[str],
    polled_dirs: Collection[str],
    fingerprinter: Fingerprinter,
) -> list[str]:
    """The credentials whose files may no longer say what their state says, each file read
    and fingerprinted again; the ones not to be judged that way are all in it (see the
    module's docstring). Blocking: run in a thread."""
    stale = []
    for name, tracked, _, _, rehash in probes:
        state = tracked.state
        if (
            rehash is None
            or state is None
            or state.fingerprint is None
            or state.problems  # a writer-active, a watch-polling...: the evaluation revises
            or tracked.settings_in_use is not tracked.spec  # a reload, the fallback in use
        ):
            stale.append(name)
            continue
        max_size, roles = rehash
        known = tracked.signatures
        parts: list[tuple[str, bytes | None]] = []
        for role, path in roles:
            if path in writing or os.path.dirname(path) in polled_dirs:
                break
            read = read_file(role, path, max_size)
            if read.content is None or read.signature != known.get(path):
                break
            parts.append((role, read.content))
        else:
            if fingerprinter.fingerprint(parts) == state.fingerprint:
                continue
        stale.append(name)
    return stale

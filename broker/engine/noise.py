"""Noisy directories: a watched directory flooded with events for files no credential
watches costs the broker work and can overflow its inotify queue. Each credential living in
one is annotated (a problem, no event: the content did not change) until it calms down."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping

from broker.core.problems import ProblemCode
from broker.core.state import Problem

__all__ = ["NoiseMonitor"]

log = logging.getLogger("broker.engine")


class NoiseMonitor:
    """Which credentials are flagged for living in a noisy directory."""

    def __init__(self, *, rate: float, minimum: int) -> None:
        self.rate = rate
        self.minimum = minimum
        self._noisy: dict[str, frozenset[str]] = {}

    def assess(
        self,
        noise: Mapping[str, int],
        elapsed: float,
        *,
        paths_in: Callable[[str], Iterable[str]],
        names_at: Callable[[str], Collection[str]],
        tracked: Collection[str],
    ) -> dict[str, Problem | None]:
        """The findings to set (a problem) or clear (``None``), from ``noise`` (directory ->
        events for unrelated names) counted over ``elapsed`` seconds."""
        loud = {
            d: n for d, n in noise.items()
            if n >= self.minimum and n / max(elapsed, 1e-3) >= self.rate
        }
        flagged: dict[str, set[str]] = {}
        for directory in loud:
            for path in paths_in(directory):
                for name in names_at(path):
                    flagged.setdefault(name, set()).add(directory)
        changes: dict[str, Problem | None] = {}
        for name in set(flagged) | set(self._noisy):
            dirs = frozenset(flagged.get(name, ()))
            if dirs == self._noisy.get(name, frozenset()) or name not in tracked:
                continue
            if not dirs:
                del self._noisy[name]
                changes[name] = None
                continue
            self._noisy[name] = dirs
            where = ", ".join(sorted(dirs))
            total = sum(loud[d] for d in dirs)
            log.warning(
                "directory floods the broker with changes to unrelated files",
                extra={"credential": name, "directory": where, "events": total},
            )
            changes[name] = Problem(
                ProblemCode.NOISY_DIRECTORY,
                f"{where} had {total} changes to files no credential watches in "
                f"{elapsed:.0f}s; they cost the broker work and can overflow its "
                "inotify queue",
            )
        return changes

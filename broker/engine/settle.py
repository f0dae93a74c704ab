"""The settle window: a change that leaves a credential invalid or missing is withheld for
``settle`` seconds, so a writer's delete + recreate (or truncate + write) is one event.

While withheld, the state it would publish is kept here (never published meanwhile) and
``check`` answers it with a ``settling`` problem.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from broker.core.machine import Observation, Transition
from broker.core.problems import ProblemCode
from broker.core.state import Problem, State, Status
from broker.core.timefmt import format_time

__all__ = ["SettleWindow", "settling"]


@dataclass(frozen=True, slots=True)
class _Withheld:
    since: float  # when the first bad read was seen
    state: State  # what the latest bad read would publish


class SettleWindow:
    """Per credential: since when a bad change is withheld, and what it would publish."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._withheld: dict[str, _Withheld] = {}

    @property
    def open(self) -> bool:
        """Whether any credential is waiting out its window."""
        return bool(self._withheld)

    def consider(
        self,
        name: str,
        from_files: Observation,
        tr: Transition,
        now: float,
        *,
        exempt: bool,
        to_fallback: bool = False,
    ) -> float | None:
        """Withhold a change the files made invalid or missing, for ``settle``.

        Returns ``None`` while it is withheld (nothing to commit; read again at
        :meth:`due`), else the moment the transition is as of: ``now``, or when a change
        that outlived the window was first seen. The window runs from the first bad read
        and is not restarted by later ones, so a writer that keeps failing is reported
        ``settle`` late at most. ``exempt``: publish at once (start-up, nothing published
        yet). ``to_fallback``: leaving the files for the fallback (the expiry file vanished)
        waits out the window too.
        """
        bad = from_files.outcome is not Status.VALID or to_fallback
        if not bad or not tr.events or exempt or self.settle <= 0:
            self._withheld.pop(name, None)
            return now
        since = self._withheld[name].since if name in self._withheld else now
        if now >= since + self.settle:
            del self._withheld[name]
            return since if from_files.outcome is not Status.VALID else now
        self._withheld[name] = _Withheld(since, tr.state)
        return None

    def due(self, name: str) -> float | None:
        """When ``name``'s window closes (``None``: nothing withheld)."""
        found = self._withheld.get(name)
        return None if found is None else found.since + self.settle

    def answer(self, name: str) -> State | None:
        """The withheld state of ``name``, marked ``settling`` (``None``: nothing withheld)."""
        found = self._withheld.get(name)
        if found is None:
            return None
        return settling(found.state, found.since + self.settle)

    def forget(self, names: set[str]) -> None:
        """Drop the windows of credentials no longer tracked."""
        for name in names:
            self._withheld.pop(name, None)


def settling(state: State, until: float) -> State:
    """``state`` marked as withheld by the settle window until ``until`` (a timestamp)."""
    problem = Problem(
        ProblemCode.SETTLING,
        f"{state.status.value} since a change moments ago; published at "
        f"{format_time(until)} unless a further change resolves it",
    )
    return replace(state, problems=(*state.problems, problem))

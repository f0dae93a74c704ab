"""The one evaluation pipeline: read -> observe -> findings -> state machine -> state.

The engine runs it on every change it sees; ``credbroker check`` runs it once per
credential, with no previous state. Both get the same answer for the same files, because
both call :func:`evaluate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from broker.config import CredentialSettings
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import Observation, Transition, apply_findings, observe, transition
from broker.core.problems import ProblemCode
from broker.core.state import Problem, State
from broker.engine.reader import CredentialRead, read_credential

__all__ = ["Evaluation", "FindingsFor", "annotate_polling", "evaluate", "read_all"]

#: The findings from outside the files that apply to what an observation saw (a finding can
#: be about one version of the content only).
FindingsFor = Callable[[Observation], Iterable[Problem]]


def _no_findings(obs: Observation) -> Iterable[Problem]:
    return ()


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One credential evaluated: what the files say, with findings, and the transition."""

    read: CredentialRead
    #: What the files alone say (the settle window judges this, not the findings).
    from_files: Observation
    #: With the polling note and the findings from outside the files.
    observation: Observation
    transition: Transition
    prev: State | None
    startup: bool
    settings_changed: bool

    @property
    def state(self) -> State:
        return self.transition.state

    def as_of(self, when: float) -> Transition:
        """The transition had it been made at ``when`` (a change published after its settle
        window is dated when it was first seen)."""
        return transition(
            self.read.spec, self.prev, self.observation, when,
            startup=self.startup, settings_changed=self.settings_changed,
        )

    def with_findings(self, findings: Iterable[Problem], now: float) -> Evaluation:
        """This evaluation with more findings from outside the files (a validator's)."""
        observation = apply_findings(self.observation, findings)
        tr = transition(
            self.read.spec, self.prev, observation, now,
            startup=self.startup, settings_changed=self.settings_changed,
        )
        return replace(self, observation=observation, transition=tr)


def evaluate(
    read: CredentialRead,
    fingerprinter: Fingerprinter,
    now: float,
    *,
    prev: State | None = None,
    findings: FindingsFor = _no_findings,
    polled_dirs: Collection[str] = (),
    poll_every: float = 0.0,
    startup: bool = False,
    settings_changed: bool = False,
) -> Evaluation:
    """Evaluate one read of a credential against its previous state ``prev``.

    ``findings`` come from outside the files (validator, refresh runner, the watcher);
    ``polled_dirs`` are the directories inotify could not watch, polled every
    ``poll_every`` seconds instead (a ``watch-polling`` problem).
    """
    rules = read.spec  # the fallback's settings while it is in use
    from_files = observe(rules, read.reads, fingerprinter, note=read.note)
    obs = annotate_polling(from_files, polled_dirs, poll_every)
    obs = apply_findings(obs, findings(obs))
    tr = transition(
        rules, prev, obs, now, startup=startup, settings_changed=settings_changed
    )
    return Evaluation(read, from_files, obs, tr, prev, startup, settings_changed)


def annotate_polling(
    obs: Observation, polled_dirs: Collection[str], poll_every: float
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
        ProblemCode.WATCH_POLLING,
        f"inotify is not available for {', '.join(paths)}; polling every "
        f"{poll_every:g}s instead",
        "raise the limit: sysctl fs.inotify.max_user_watches=524288",
    )
    return replace(obs, problems=(*obs.problems, problem))


def read_all(specs: Mapping[str, CredentialSettings]) -> dict[str, CredentialRead]:
    """Read every credential of ``specs`` now (blocking: run in a thread)."""
    return {name: read_credential(spec) for name, spec in specs.items()}

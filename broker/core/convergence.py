"""Who still uses an old generation: the pure decisions of consumer tracking (no clock, no I/O).

Consumers report the generation (and its fingerprint) they use; :mod:`broker.engine.consumers`
keeps the reports and asks :func:`assess` what to announce. The rules (SPEC section 3):

- A consumer is *lagging* when it reports a generation older than the current one
  ``lag_after`` after that generation was refreshed, or holds the current generation while
  it is expired or invalid. ``credentials.lagging`` goes out once per consumer and
  generation (the ``lagged`` mark on its report).
- A credential has *converged* when every consumer that reported holds its current
  generation, while that generation is usable (valid or expiring). ``credentials.converged``
  goes out once per generation, and only if at least one consumer reported.

Consumer churn never changes ``generation`` and, apart from these two event types,
publishes nothing: a report is not a change of the credential.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from broker.core.errors import BrokerError

# Re-exported for the modules that still take them from here; spelled in broker.core.events.
from broker.core.events import CONVERGED as CONVERGED
from broker.core.events import LAGGING as LAGGING
from broker.core.state import Consumer, State, Status

#: A consumer id: also an MQTT topic level, so never ``/``, ``+``, ``#`` or control characters.
CONSUMER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
#: The fingerprints this broker prints (:mod:`broker.core.fingerprint`).
FINGERPRINT_RE = re.compile(r"hmac-sha256:[0-9a-f]{16}")
#: Statuses whose current generation is worth moving to.
USABLE = frozenset({Status.VALID, Status.EXPIRING})
#: Statuses that make the generation a consumer holds a problem in itself.
UNUSABLE_HELD = frozenset({Status.EXPIRED, Status.INVALID})
#: Statuses with no generation to move to: nobody lags behind a missing file.
NOTHING_BETTER = frozenset({Status.MISSING, Status.INVALID})


class ReportError(BrokerError, ValueError):
    """A consumer report the broker refuses: ``code`` and a message safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :func:`assess` decided for one credential."""

    #: The consumers table with the ``lagged`` marks of ``lagging`` set.
    consumers: Mapping[str, Consumer]
    #: Consumers to announce as lagging now, in id order.
    lagging: tuple[Consumer, ...]
    #: Announce ``credentials.converged`` for the current generation now.
    converged: bool
    #: When to assess again (a consumer reaching ``lag_after``), or None.
    deadline: float | None


def check_report(
    state: State,
    generation: object,
    fingerprint: object,
    *,
    known: Mapping[int, str] | None = None,
) -> tuple[int, str]:
    """Validate a report of ``generation``/``fingerprint`` against the credential's state.

    ``known`` maps recent generations to their fingerprints, so a report of an older
    generation can be checked too. Returns the pair; raises :class:`ReportError`.
    """
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise ReportError("invalid-report", '"generation" must be an integer')
    if not isinstance(fingerprint, str) or not FINGERPRINT_RE.fullmatch(fingerprint):
        raise ReportError(
            "invalid-report", '"fingerprint" must be a fingerprint ("hmac-sha256:" + 16 hex)'
        )
    if generation < 1:
        raise ReportError("invalid-report", '"generation" must be at least 1')
    if generation > state.generation:
        raise ReportError(
            "unknown-generation",
            f"generation {generation} is newer than the current generation {state.generation}",
        )
    expected = state.fingerprint if generation == state.generation else (known or {}).get(
        generation
    )
    if expected is not None and fingerprint != expected:
        raise ReportError(
            "fingerprint-mismatch",
            f"the fingerprint does not match generation {generation}",
        )
    return generation, fingerprint


def check_consumer_id(value: str) -> str:
    """``value`` if it is a valid consumer id; raises :class:`ReportError`."""
    if not CONSUMER_ID_RE.fullmatch(value):
        raise ReportError(
            "invalid-consumer-id",
            "a consumer id is 1-128 of A-Z a-z 0-9 _ . : @ - (starting with a letter or digit)",
        )
    return value


def record(
    consumers: Mapping[str, Consumer],
    consumer_id: str,
    generation: int,
    fingerprint: str,
    *,
    via: str,
    now: float,
) -> dict[str, Consumer]:
    """The table after ``consumer_id`` reported ``generation`` at ``now``.

    A repeated report of the same generation only refreshes ``seen``: ``since`` and the
    ``lagged`` mark stay, so a re-announcing consumer is announced once.
    """
    table = dict(consumers)
    old = table.get(consumer_id)
    if old is not None and old.generation == generation and old.fingerprint == fingerprint:
        table[consumer_id] = replace(old, seen=max(old.seen, now), via=via)
    else:
        table[consumer_id] = Consumer(consumer_id, generation, fingerprint, now, via, seen=now)
    return table


def forget_silent(
    consumers: Mapping[str, Consumer], ttl: float, now: float
) -> tuple[dict[str, Consumer], float | None]:
    """The consumers heard from within ``ttl``, and when the next one falls silent."""
    kept = {i: c for i, c in consumers.items() if now - c.seen < ttl}
    due = min((c.seen + ttl for c in kept.values()), default=None)
    return kept, due


def is_lagging(
    consumer: Consumer, state: State, refreshed_at: float | None, lag_after: float, now: float
) -> bool:
    """Whether ``consumer`` lags behind ``state`` at ``now`` (see the module docstring).

    ``refreshed_at`` is when the current generation was refreshed (None: unknown, so the
    lag is counted from the state's ``changed_at``).
    """
    if consumer.generation >= state.generation:
        return state.status in UNUSABLE_HELD
    if state.status in NOTHING_BETTER:
        return False
    return now >= lag_deadline(state, refreshed_at, lag_after)


def lag_deadline(state: State, refreshed_at: float | None, lag_after: float) -> float:
    """When a consumer on an older generation starts lagging behind ``state``."""
    start = refreshed_at if refreshed_at is not None else state.changed_at
    return (start if start is not None else -math.inf) + lag_after


def assess(
    state: State,
    consumers: Mapping[str, Consumer],
    *,
    refreshed_at: float | None,
    converged_generation: int,
    lag_after: float,
    now: float,
) -> Verdict:
    """Which consumers to announce as lagging and whether to announce convergence now."""
    table = dict(consumers)
    lagging: list[Consumer] = []
    deadline: float | None = None
    for consumer_id in sorted(table):
        consumer = table[consumer_id]
        if consumer.lagged:
            continue
        if is_lagging(consumer, state, refreshed_at, lag_after, now):
            marked = replace(consumer, lagged=True)
            table[consumer_id] = marked
            lagging.append(marked)
        elif consumer.generation < state.generation and state.status not in NOTHING_BETTER:
            due = lag_deadline(state, refreshed_at, lag_after)
            deadline = due if deadline is None else min(deadline, due)
    converged = (
        bool(table)
        and state.status in USABLE
        and converged_generation != state.generation
        and all(c.generation == state.generation for c in table.values())
    )
    return Verdict(table, tuple(lagging), converged, deadline)


def lagging_of(
    state: State,
    consumers: Iterable[Consumer],
    refreshed_at: float | None,
    lag_after: float,
    now: float,
) -> list[Consumer]:
    """The consumers lagging behind ``state`` now (metrics, tables, the fleet view)."""
    return [c for c in consumers if is_lagging(c, state, refreshed_at, lag_after, now)]


def lagging_reason(consumer: Consumer, state: State, lag_after: float) -> str:
    """The ``reason`` of a ``credentials.lagging`` event: names the consumer, never content."""
    if consumer.generation >= state.generation:
        return (
            f"consumer {consumer.id} still uses generation {consumer.generation}, "
            f"which is {state.status.value}"
        )
    return (
        f"consumer {consumer.id} still uses generation {consumer.generation} "
        f"{lag_after:g}s after generation {state.generation} was refreshed"
    )


def converged_reason(state: State, count: int) -> str:
    """The ``reason`` of a ``credentials.converged`` event."""
    who = "the reporting consumer uses" if count == 1 else f"all {count} reporting consumers use"
    return f"{who} generation {state.generation}"

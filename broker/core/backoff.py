"""The one retry policy: capped exponential backoff with jitter, pure (the random source is
passed in).

The n-th retry (``attempt`` from 0) waits a random delay below the ceiling
``min(cap, base * 2**n)``. How far below is the policy's ``floor``, a fraction of the ceiling:

- ``0`` is *full jitter*, ``[0, ceiling]``: what the SPEC asks of refresh, actions and
  webhooks (:func:`backoff_delay`);
- ``0.1`` (the default of :class:`Backoff`, used by the reconnecting loops of the MQTT
  publisher and the consumer client) keeps every delay above a tenth of the ceiling, so a
  server that refuses instantly can never make a client spin.

Kept free of any transport library so that the consumer client's HTTP path can use it without
importing MQTT.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FLOOR",
    "BACKOFF_INITIAL",
    "Backoff",
    "BackoffPolicy",
    "backoff_delay",
]

#: The reconnecting loops' defaults: 0.5 s doubling to 30 s, never below a tenth.
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0
BACKOFF_FLOOR = 0.1

#: A random number in ``[0, 1)`` (``random.random``; tests pass a fixed one).
Rand = Callable[[], float]


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Delays from ``base`` doubling up to ``cap``, jittered down to ``floor`` of the ceiling."""

    base: float
    cap: float
    floor: float = 0.0

    def __post_init__(self) -> None:
        # A base above the cap just starts at the cap (the retry workers allow it).
        if self.base < 0 or self.cap < 0:
            raise ValueError("need base >= 0 and cap >= 0")
        if not 0 <= self.floor <= 1:
            raise ValueError("need 0 <= floor <= 1")

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the delay before retry ``attempt`` (from 0)."""
        # Capping the exponent first: a month-long outage must not overflow the power.
        return min(self.cap, self.base * math.ldexp(1.0, min(max(attempt, 0), 1000)))

    def delay(self, attempt: int, r: float) -> float:
        """The delay before retry ``attempt`` for the random draw ``r`` in ``[0, 1]``."""
        ceiling = self.ceiling(attempt)
        low = ceiling * self.floor
        # Clamped: a draw outside [0, 1] from an odd random source stays within the bounds.
        return max(low, min(ceiling, low + (ceiling - low) * r))


class Backoff:
    """The policy with its attempt counter, for reconnecting loops: ``next()``, ``reset()``.

    Defaults to 0.5 s doubling to 30 s, never below a tenth of the ceiling (see the module).
    ``rand`` is the random source (``random.random``; tests pass their own).
    """

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        cap: float = BACKOFF_CAP,
        *,
        floor: float = BACKOFF_FLOOR,
        rand: Rand | None = None,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError("need 0 < initial <= cap")
        self.policy = BackoffPolicy(initial, cap, floor)
        self.attempt = 0
        self._rand = rand or random.random

    def __repr__(self) -> str:
        return f"Backoff({self.policy}, attempt={self.attempt})"

    @property
    def initial(self) -> float:
        """The first ceiling (seconds)."""
        return self.policy.base

    @property
    def cap(self) -> float:
        """The largest ceiling (seconds)."""
        return self.policy.cap

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return self.policy.ceiling(self.attempt)

    def next(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        delay = self.policy.delay(self.attempt, self._rand())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Back to the initial delay (after a connection that worked)."""
        self.attempt = 0


def backoff_delay(attempt: int, base: float, cap: float, rand: Rand = random.random) -> float:
    """Full jitter: a delay in ``[0, min(cap, base * 2**attempt)]`` (``attempt`` from 0).

    The retry workers (refresh, actions, webhooks) count their own attempts and call this.
    """
    return BackoffPolicy(base, cap).delay(attempt, rand())

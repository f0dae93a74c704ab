"""Capped exponential backoff with full jitter: ``Backoff`` for reconnecting loops, and
``backoff_delay`` for the retry workers (refresh, actions, webhooks).

Kept free of any transport library so that the consumer client's HTTP path can use it without
importing MQTT.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

__all__ = ["BACKOFF_CAP", "BACKOFF_INITIAL", "Backoff", "backoff_delay"]

BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0


class Backoff:
    """Capped exponential backoff with full jitter: 0.5 s doubling to 30 s.

    Each delay is drawn uniformly below the current ceiling, but never below a tenth of it:
    a server that refuses instantly can then never make a client spin.
    """

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        cap: float = BACKOFF_CAP,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError("need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # min() before the power would overflow for a long outage; 2**64 is plenty.
        return min(self.cap, self.initial * 2.0 ** min(self.attempt, 64))

    def next(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        ceiling = self.ceiling()
        self.attempt += 1
        return float(self._rng.uniform(ceiling / 10, ceiling))

    def reset(self) -> None:
        """Back to the initial delay (after a connection that worked)."""
        self.attempt = 0


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Full jitter: a delay in ``[0, min(cap, base * 2**attempt)]`` (``attempt`` from 0)."""
    ceiling = min(cap, base * math.ldexp(1.0, min(attempt, 1000)))
    return max(0.0, min(ceiling, ceiling * rand()))

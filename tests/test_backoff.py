"""The one retry policy (broker.core.backoff): its bounds, for any attempt and random draw."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.backoff import BACKOFF_CAP, Backoff, BackoffPolicy, backoff_delay

attempts = st.integers(min_value=0, max_value=10_000)
seconds = st.floats(min_value=0.001, max_value=1000, allow_nan=False)
draws = st.floats(min_value=0, max_value=1)
floors = st.floats(min_value=0, max_value=1)


@settings(max_examples=300, deadline=None)
@given(attempt=attempts, base=seconds, cap=seconds, floor=floors, r=draws)
def test_a_delay_stays_between_the_floor_and_the_ceiling(
    attempt: int, base: float, cap: float, floor: float, r: float
) -> None:
    policy = BackoffPolicy(base, cap, floor)
    ceiling = policy.ceiling(attempt)
    assert ceiling == min(cap, base * 2.0 ** min(attempt, 1000))
    delay = policy.delay(attempt, r)
    assert ceiling * floor <= delay <= ceiling
    assert delay == pytest.approx(ceiling * floor + ceiling * (1 - floor) * r)


@settings(max_examples=200, deadline=None)
@given(attempt=attempts, base=seconds, cap=seconds, floor=floors)
def test_the_ceiling_never_shrinks_and_stops_at_the_cap(
    attempt: int, base: float, cap: float, floor: float
) -> None:
    policy = BackoffPolicy(base, cap, floor)
    assert policy.ceiling(attempt) <= policy.ceiling(attempt + 1) <= cap
    assert policy.ceiling(attempt + 1) <= 2 * policy.ceiling(attempt)


@settings(max_examples=200, deadline=None)
@given(base=seconds, cap=seconds, r=draws, attempt=attempts)
def test_the_retry_workers_delay_is_the_policy_with_full_jitter(
    base: float, cap: float, r: float, attempt: int
) -> None:
    assert backoff_delay(attempt, base, cap, lambda: r) == BackoffPolicy(base, cap).delay(
        attempt, r
    )


@settings(max_examples=100, deadline=None)
@given(draws=st.lists(draws, min_size=1, max_size=40))
def test_backoff_counts_attempts_and_resets(draws: list[float]) -> None:
    source = iter(draws)
    backoff = Backoff(rand=lambda: next(source))
    for attempt, r in enumerate(draws):
        assert backoff.attempt == attempt
        assert backoff.next() == backoff.policy.delay(attempt, r)
    backoff.reset()
    assert backoff.attempt == 0 and backoff.ceiling() == 0.5


def test_backoff_defaults_never_drop_below_a_tenth() -> None:
    backoff = Backoff(rand=lambda: 0.0)
    delays = [backoff.next() for _ in range(10)]
    assert delays[:3] == [0.05, 0.1, 0.2]
    assert delays[-1] == BACKOFF_CAP / 10
    with pytest.raises(ValueError, match="initial"):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError, match="floor"):
        BackoffPolicy(1.0, 2.0, floor=1.5)

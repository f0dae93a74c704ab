"""Timestamps as the contract writes them."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.timefmt import MAX_TIMESTAMP, format_time, parse_time


def reference(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@settings(max_examples=500, deadline=None)
@given(st.floats(min_value=-10**9, max_value=MAX_TIMESTAMP - 1, allow_nan=False))
def test_format_time_matches_datetime(ts: float) -> None:
    assert format_time(ts) == reference(ts)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=int(MAX_TIMESTAMP * 1000) - 1))
def test_round_trip_at_millisecond_precision(millis: int) -> None:
    text = format_time(millis / 1000)
    assert text is not None
    assert text.endswith("Z")
    assert abs(parse_time(text) - millis / 1000) < 0.0011


def test_none_stays_none() -> None:
    assert format_time(None) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=MAX_TIMESTAMP - 1), min_size=1, max_size=50))
def test_a_timestamp_formatted_again_reads_the_same(stamps: list[float]) -> None:
    # Formatted values are remembered: again, and after many others, each is still its own.
    first = [format_time(ts) for ts in stamps]
    for ts in range(500):
        format_time(ts + 0.5)
    assert [format_time(ts) for ts in stamps] == first == [reference(ts) for ts in stamps]

"""RFC 3339 timestamps as the contract writes them: UTC, milliseconds, ``Z``."""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime

# Epoch seconds the datetime module can represent; outside it a timestamp is nonsense.
MIN_TIMESTAMP = datetime(1, 1, 1, tzinfo=UTC).timestamp()
MAX_TIMESTAMP = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def format_time(ts: float | None) -> str | None:
    """``1764093601.2`` -> ``"2025-11-25T18:00:01.200Z"``; ``None`` stays ``None``."""
    if ts is None:
        return None
    # A pass formats the same few instants again and again (its clock reading is the time
    # of each of its events and the changed_at of each state, twice when an event is encoded
    # again): this was the costliest line of a start-up's event path. Those few are what
    # is remembered (each entry ~170 B: 4,096 of them held 0.7 MB).
    return _format(ts)


@functools.lru_cache(maxsize=128)
def _format(ts: float) -> str:
    # Rounded to microseconds exactly as datetime.fromtimestamp does, then truncated to ms.
    frac, whole = math.modf(ts)
    seconds, micros = int(whole), round(frac * 1_000_000)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    elif micros < 0:
        seconds, micros = seconds - 1, micros + 1_000_000
    return f"{_second(seconds)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    # Every event formats several timestamps, mostly of the same few seconds: a burst of
    # 10,000 events spent a fifth of its time in strftime before this cache.
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def parse_time(text: str) -> float:
    """Parse an RFC 3339 / ISO 8601 timestamp to epoch seconds; naive times are taken as UTC."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()

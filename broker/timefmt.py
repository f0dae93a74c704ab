"""RFC 3339 timestamps as the contract writes them: UTC, milliseconds, ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime

# Epoch seconds the datetime module can represent; outside it a timestamp is nonsense.
MIN_TIMESTAMP = datetime(1, 1, 1, tzinfo=UTC).timestamp()
MAX_TIMESTAMP = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def format_time(ts: float | None) -> str | None:
    """``1764093601.2`` -> ``"2025-11-25T18:00:01.200Z"``; ``None`` stays ``None``."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_time(text: str) -> float:
    """Parse an RFC 3339 / ISO 8601 timestamp to epoch seconds; naive times are taken as UTC."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()

"""Durations (``"250ms"``, ``"15m"``, ``"7d"``, or seconds) and byte sizes (``"1MiB"``)."""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: str | int | float) -> float:
    """Return seconds for ``"250ms"``, ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"`` or a number.

    Raises ``ValueError`` with a message fit to show a user.
    """
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s", "15m", "12h" or a number of seconds')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}; expected a number with ms, s, m, h or d "
                '(e.g. "250ms", "30s", "15m", "12h", "7d") or a number of seconds'
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"duration must be a finite, non-negative number of seconds, got {value!r}"
        )
    return seconds


def parse_size(value: str | int) -> int:
    """Return bytes for ``"1MiB"``, ``"512KiB"``, ``"2MB"`` or a plain integer."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "1MiB" or a number of bytes')
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f'invalid size {value!r}; expected e.g. "1MiB", "512KiB", "64KB" or bytes'
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def format_duration(seconds: float) -> str:
    """Short human form for tables: ``"11h 59m"``, ``"42s"``, ``"-3m 10s"`` (negative = ago)."""
    sign = "-" if seconds < 0 else ""
    rest = int(abs(seconds))
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        text = f"{days}d {hours}h"
    elif hours:
        text = f"{hours}h {minutes}m"
    elif minutes:
        text = f"{minutes}m {secs}s"
    else:
        text = f"{secs}s"
    return sign + text

"""Where a credential's expiry comes from, reading it out of content, and the expiring moment.

Pure functions: content arrives as ``bytes`` and times as epoch seconds; nothing here touches
the file system or the clock.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from broker.core.durations import parse_duration
from broker.core.formats import (
    ContentError,
    decode_jwt_claims,
    load_certificates,
    load_ini,
    load_json_object,
)
from broker.core.problems import ProblemCode as Code
from broker.core.timefmt import MAX_TIMESTAMP, parse_time

SourceKind = Literal["jwt", "json", "ini", "pem", "ttl", "none"]

_BARE_KINDS: dict[str, SourceKind] = {"jwt": "jwt", "pem": "pem", "none": "none"}
_EXPECTED = "expected jwt, json:<path>, ini:<section>.<key>, pem, ttl:<duration>, none"
# Numbers written as strings ("1764093601", "1764093601.5"); deliberately not float()'s
# grammar, which would also take "nan", "inf" and "1_0".
_NUMERIC = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# Above this an epoch number must be milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
_MILLIS_THRESHOLD = 1e11


@dataclass(frozen=True, slots=True)
class ExpirySource:
    """A parsed ``expiry = "..."`` setting; ``str()`` gives back its canonical text."""

    kind: SourceKind
    path: tuple[str, ...] = ()  # json: dotted path parts; ini: (section, key)
    ttl: float = 0.0  # seconds, for kind "ttl"

    def __str__(self) -> str:
        if self.kind == "json":
            return "json:" + ".".join(self.path)
        if self.kind == "ini":
            return f"ini:{self.path[0]}.{self.path[1]}"
        if self.kind == "ttl":
            return f"ttl:{_format_seconds(self.ttl)}s"
        return self.kind


@dataclass(frozen=True, slots=True)
class Lifetime:
    """When a credential was issued and when it expires, in epoch seconds, where known."""

    issued_at: float | None
    expires_at: float | None


def parse_expiry_source(text: str) -> ExpirySource:
    """Parse ``jwt``, ``json:<dotted.path>``, ``ini:<section>.<key>``, ``pem``,
    ``ttl:<duration>`` or ``none``.

    Raises ``ValueError`` with a message fit to show next to the config key.
    """
    kind, colon, arg = text.partition(":")
    bare = _BARE_KINDS.get(kind)
    if bare is not None:
        if colon:
            raise ValueError(f'source "{kind}" takes no argument; {_EXPECTED}')
        return ExpirySource(bare)
    if kind == "json":
        if not arg:
            raise ValueError('source "json" needs a field path, e.g. "json:expiresAt", "json:a.b"')
        parts = tuple(arg.split("."))
        if not all(parts):
            raise ValueError(f"source {_quote(text)} has an empty path component")
        return ExpirySource("json", parts)
    if kind == "ini":
        # Split on the last dot: sections like "profile dev.eu" contain dots, AWS keys do not.
        section, dot, key = arg.rpartition(".")
        if not (dot and section and key):
            raise ValueError(
                'source "ini" needs <section>.<key>, e.g. "ini:default.x_security_token_expires"'
            )
        return ExpirySource("ini", (section, key))
    if kind == "ttl":
        if not arg:
            raise ValueError('source "ttl" needs a duration, e.g. "ttl:12h"')
        try:
            seconds = parse_duration(arg)
        except ValueError as exc:
            raise ValueError(f"source {_quote(text)}: {exc}") from None
        if seconds <= 0:
            raise ValueError(f"source {_quote(text)}: the duration must be greater than zero")
        return ExpirySource("ttl", ttl=seconds)
    raise ValueError(f"unknown source {_quote(text)}; {_EXPECTED}")


def read_lifetime(source: ExpirySource, data: bytes, mtime: float) -> Lifetime:
    """Read issue and expiry times from ``data`` as ``source`` says.

    ``mtime`` is the file's modification time, the issue time for ``ttl`` sources. Raises
    :class:`ContentError` only, whatever ``data`` holds.
    """
    if source.kind == "none":
        return Lifetime(None, None)
    if source.kind == "ttl":
        issued = _in_range(mtime, "file modification time")
        return Lifetime(issued, _in_range(mtime + source.ttl, "modification time + ttl"))
    if source.kind == "jwt":
        return _jwt_lifetime(data)
    if source.kind == "json":
        return Lifetime(None, _json_expiry(source.path, data))
    if source.kind == "ini":
        return Lifetime(None, _ini_expiry(source.path, data))
    if source.kind == "pem":
        return _pem_lifetime(data)
    raise ValueError(f"unknown expiry source kind {source.kind!r}")


def expiring_at(lifetime: Lifetime, before: float, fraction: float) -> float | None:
    """The moment a credential becomes *expiring* (SPEC section 2), or ``None`` if unknown.

    ``expires_at - before``, brought forward to ``issued_at + fraction * lifetime`` when the
    issue time is known and that is earlier.
    """
    expires_at = lifetime.expires_at
    if expires_at is None:
        return None
    moment = expires_at - before
    issued_at = lifetime.issued_at
    # An issue time at or after expiry gives no usable lifetime; fall back to the window alone.
    if issued_at is not None and issued_at < expires_at:
        moment = min(moment, issued_at + fraction * (expires_at - issued_at))
    return moment


def _jwt_lifetime(data: bytes) -> Lifetime:
    claims = decode_jwt_claims(data)
    if "exp" not in claims:
        raise ContentError(Code.NO_EXPIRY, "JWT has no exp claim")
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise ContentError(Code.BAD_EXPIRY, "JWT exp claim is not a number")
    expires_at = _in_range(exp, "JWT exp claim")
    iat = claims.get("iat")
    # iat is optional and informative only; a non-numeric one is ignored rather than fatal.
    issued_at = None
    if isinstance(iat, int | float) and not isinstance(iat, bool):
        issued_at = _in_range(iat, "JWT iat claim")
    return Lifetime(issued_at, expires_at)


def _json_expiry(path: tuple[str, ...], data: bytes) -> float:
    value: object = load_json_object(data)
    where = "JSON field " + ".".join(path)
    for depth, part in enumerate(path):
        if not isinstance(value, dict):
            parent = ".".join(path[:depth])
            raise ContentError(Code.NO_EXPIRY, f"{where} is missing ({parent} is not an object)")
        if part not in value:
            raise ContentError(Code.NO_EXPIRY, f"{where} is missing")
        value = value[part]
    if value is None:
        raise ContentError(Code.NO_EXPIRY, f"{where} is null")
    return _time_value(value, where)


def _ini_expiry(path: tuple[str, ...], data: bytes) -> float:
    section, key = path
    parser = load_ini(data)
    where = f"INI key {key} in section [{section}]"
    if section == parser.default_section:
        values = parser.defaults()
        if parser.optionxform(key) not in values:
            raise ContentError(Code.NO_EXPIRY, f"{where} is missing")
        return _time_value(values[parser.optionxform(key)], where)
    if not parser.has_section(section):
        raise ContentError(Code.NO_EXPIRY, f"INI section [{section}] is missing")
    value = parser.get(section, key, fallback=None)
    if value is None:
        raise ContentError(Code.NO_EXPIRY, f"{where} is missing")
    return _time_value(value, where)


def _pem_lifetime(data: bytes) -> Lifetime:
    leaf = load_certificates(data)[0]
    try:
        not_before = leaf.not_valid_before_utc.timestamp()
        not_after = leaf.not_valid_after_utc.timestamp()
    # Validity is decoded lazily by some cryptography versions; a broken one is a broken file.
    except Exception:
        raise ContentError(
            Code.MALFORMED_PEM, "certificate validity period cannot be read"
        ) from None
    return Lifetime(
        _in_range(not_before, "certificate notBefore"),
        _in_range(not_after, "certificate notAfter"),
    )


def _time_value(value: object, where: str) -> float:
    """An expiry written as RFC 3339 text, epoch seconds or epoch milliseconds."""
    if isinstance(value, bool):
        raise ContentError(Code.BAD_EXPIRY, f"{where} is a boolean, expected a time")
    if isinstance(value, int | float):
        return _epoch(value, where)
    if not isinstance(value, str):
        raise ContentError(Code.BAD_EXPIRY, f"{where} is not a time string or number")
    text = value.strip()
    if _NUMERIC.fullmatch(text):
        return _epoch(float(text), where)
    # Old AWS SSO caches write "2019-11-14T04:05:45UTC"; fromisoformat wants an offset.
    if text[-3:].upper() == "UTC":
        text = text[:-3].rstrip() + "+00:00"
    try:
        seconds = parse_time(text)
    except (ValueError, OverflowError):
        raise ContentError(Code.BAD_EXPIRY, f"{where} is not an RFC 3339 time") from None
    return _in_range(seconds, where)


def _epoch(value: int | float, where: str) -> float:
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        raise ContentError(Code.EXPIRY_OUT_OF_RANGE, f"{where} is out of range") from None
    if abs(seconds) > _MILLIS_THRESHOLD:
        seconds /= 1000.0
    return _in_range(seconds, where)


def _in_range(value: float, where: str) -> float:
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    # Before 1970 is nonsense for a credential, and past MAX_TIMESTAMP cannot be formatted.
    if not (math.isfinite(seconds) and 0.0 <= seconds <= MAX_TIMESTAMP):
        raise ContentError(Code.EXPIRY_OUT_OF_RANGE, f"{where} is out of range")
    return seconds


def _format_seconds(seconds: float) -> str:
    """Seconds in a form ``parse_duration`` reads back to the identical float.

    Plain digits, never an exponent (the duration grammar has none): ``43200``, ``0.25``.
    """
    if seconds.is_integer():
        return str(int(seconds))
    # repr() is the shortest text that round-trips; Decimal re-renders it without an exponent.
    return format(Decimal(repr(seconds)), "f")


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)

"""The config's single values: durations, sizes, counts, names, hosts, URLs, listen addresses.

Each parser takes what TOML gave (a string, a number, a boolean) and returns the value or
raises ``ValueError`` with the message the user sees. TOML's types are taken strictly: the
lax conversions pydantic would make (``true`` as 1, ``"10"`` as 10) are refused here.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from typing import Any

from broker.config.errors import show
from broker.core.durations import parse_duration, parse_size
from broker.core.urls import MQTT_SCHEMES, UrlParts, split_url

__all__ = [
    "HTTP_SCHEMES",
    "MAX_DURATION",
    "argv_not_a_string",
    "buffer",
    "check_api_url",
    "check_argv",
    "check_host",
    "check_ident",
    "default_host_id",
    "duration",
    "fraction",
    "is_loopback",
    "parameter",
    "positive_duration",
    "size",
    "split_config_url",
    "split_listen",
    "split_mqtt_url",
    "status_code",
    "strict_bool",
]

# Durations beyond this are typos, and near float limits they break time arithmetic
# (expires_at - expiring_before must still be a representable timestamp).
MAX_DURATION = 3650 * 86400.0
_MAX_SIZE = 1024**3
_MAX_BUFFER = 10_000_000
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_NAME_MAX = 64
_HOSTNAME_RE = re.compile(r"[a-z0-9_][a-z0-9_.-]*")
_PARAMETER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
_PARAMETER_MAX = 128

#: The schemes a validator or webhook URL may have, and their default ports.
HTTP_SCHEMES: Mapping[str, int] = {"https": 443, "http": 80}
_MQTT_EXAMPLE = "mqtt://host[:port] or mqtts://host[:port]"
_LISTEN_EXAMPLE = '"host:port", "[v6addr]:port" or "unix:/path"'


def duration(value: Any) -> float:
    """``"30s"``, ``"15m"``, ``"12h"``, ``"2d"`` or a number of seconds; at most 3650 days."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError('expected a duration such as "30s", "15m", "12h" or a number of seconds')
    try:
        seconds = parse_duration(value)
    except OverflowError:
        raise ValueError("the duration is out of range") from None
    if seconds > MAX_DURATION:
        raise ValueError("the duration is too long (at most 3650d)")
    return seconds


def positive_duration(value: Any) -> float:
    """A :func:`duration` greater than zero."""
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def size(value: Any) -> int:
    """``"1MiB"``, ``"512KiB"`` or a whole number of bytes; at most 1 GiB."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError('expected a size such as "1MiB", "512KiB" or a whole number of bytes')
    try:
        parsed = parse_size(value)
    except OverflowError:
        raise ValueError("the size is out of range") from None
    if parsed > _MAX_SIZE:
        raise ValueError("the size is too large (at most 1GiB)")
    return parsed


def fraction(value: Any) -> float:
    """A number greater than 0 and at most 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number greater than 0 and at most 1, e.g. 0.8")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not 0.0 < number <= 1.0:  # also rejects NaN
        raise ValueError("must be greater than 0 and at most 1, e.g. 0.8")
    return number


def _count(value: Any, maximum: int) -> int:
    # TOML integers only: pydantic's lax mode would take true, 1.0 and "10" as well.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected a whole number")
    if not 0 < value <= maximum:
        raise ValueError(f"must be between 1 and {maximum}")
    return value


def buffer(value: Any) -> int:
    """How many messages a queue holds: a whole number from 1 to 10,000,000."""
    return _count(value, _MAX_BUFFER)


def strict_bool(value: Any) -> bool:
    """``true`` or ``false`` only (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def status_code(value: Any) -> int:
    """An HTTP status code, 100 to 599."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an HTTP status code (a whole number)")
    if not 100 <= value <= 599:
        raise ValueError("must be an HTTP status code (100-599)")
    return value


def parameter(value: Any) -> str:
    """A preset parameter's value (``profile = "dev"``): it ends up in commands and sources."""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if len(value) > _PARAMETER_MAX or not _PARAMETER_RE.fullmatch(value):
        raise ValueError(
            f"invalid value {show(value)}: use letters, digits and _ . @ + -, starting with a "
            "letter or digit"
        )
    return value


def check_ident(value: str, what: str) -> str:
    """A name (credential, role, host_id, action, webhook): lower-case, digits, ``_``, ``-``."""
    if len(value) > _NAME_MAX:
        raise ValueError(f"{what} is longer than {_NAME_MAX} characters")
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f'invalid {what} {show(value)}: use lower-case letters, digits, "_" and "-", '
            "starting with a letter or digit"
        )
    return value


def default_host_id() -> str:
    """The short host name, lower-cased, with characters a host_id cannot hold made ``-``."""
    name = socket.gethostname().split(".", 1)[0].lower()
    name = re.sub(r"[^a-z0-9_-]", "-", name).lstrip("_-")[:_NAME_MAX]
    return name or "localhost"


# --------------------------------------------------------------------------------------------
# Hosts, URLs, listen addresses


def is_loopback(host: str) -> bool:
    """Only ``localhost`` and literal loopback addresses.

    Not ``*.localhost``: without nss-myhostname such a name is resolved through DNS, and a
    secret sent there in clear would leave the machine.
    """
    name = host.lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_host(host: str) -> str:
    """A hostname or IP address as it appears in a URL or listen address."""
    name = host.lower()
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return name
    except ValueError:
        pass
    if len(name) > 253 or not _HOSTNAME_RE.fullmatch(name):
        raise ValueError("the host is not a valid hostname or IP address")
    return name


def split_config_url(url: str, schemes: Mapping[str, int], example: str) -> UrlParts:
    """A URL of the config, its host checked. Messages never repeat the URL (secrets)."""
    parts = split_url(url, schemes, example)
    check_host(parts.host)
    return parts


def split_mqtt_url(url: str) -> UrlParts:
    """``mqtt.url``: ``mqtt://`` or ``mqtts://``, a host, maybe a port, nothing else."""
    parts = split_config_url(url, MQTT_SCHEMES, _MQTT_EXAMPLE)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"the url must have no path, query or fragment; expected {_MQTT_EXAMPLE}")
    return parts


def split_listen(listen: str) -> tuple[str | None, int | None, str | None]:
    """``(host, port, None)`` or ``(None, None, unix path)``."""
    if listen.startswith("unix:"):
        return None, None, listen[5:]
    if listen.startswith("["):
        host, sep, port_text = listen[1:].partition("]:")
        if not sep:
            raise ValueError(f"malformed listen address; expected {_LISTEN_EXAMPLE}")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError("the address in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = listen.rpartition(":")
        if not sep or not host:
            raise ValueError(f"malformed listen address; expected {_LISTEN_EXAMPLE}")
        if ":" in host:
            raise ValueError('an IPv6 listen address needs brackets: "[::1]:8790"')
        host = check_host(host)
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text), None


def check_api_url(url: str) -> str:
    """An HTTP(S) URL the broker sends a credential or an event to: https, or http to loopback."""
    example = "https://host/path (or http:// to a loopback host)"
    parts = split_config_url(url, HTTP_SCHEMES, example)
    if parts.scheme == "http" and not is_loopback(parts.host):
        raise ValueError(
            "plain http:// is only allowed to a loopback host (the credential would be "
            "sent unencrypted); use https://"
        )
    return url


# --------------------------------------------------------------------------------------------
# Commands (argv, run without a shell)


def argv_not_a_string(value: Any) -> Any:
    """Before validation: a command written as one string is refused (no shell runs it)."""
    if isinstance(value, str):
        raise ValueError(
            "expected an array of strings (argv, run without a shell), e.g. "
            '["nebius", "iam", "get-access-token"]'
        )
    return value


def check_argv(value: tuple[str, ...]) -> tuple[str, ...]:
    """A command's argv: a non-empty program, and no NUL anywhere."""
    if not value[0]:
        raise ValueError("the program (first element) must not be empty")
    if any("\0" in arg for arg in value):
        raise ValueError("arguments must not contain NUL")
    return value

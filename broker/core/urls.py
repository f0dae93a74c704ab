"""Splitting a URL the user wrote into scheme, host and port: the one place that does it.

The config checks ``mqtt.url``, ``validate.url`` and ``webhooks.url`` with it, and the
consumer client and the remote CLI can split theirs the same way. A URL may carry a secret
(userinfo, a token in the query), so no message here ever repeats it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from broker.core.errors import BrokerError

__all__ = ["HTTP_SCHEMES", "MQTT_SCHEMES", "UrlError", "UrlParts", "split_url"]

#: The MQTT schemes and their default ports.
MQTT_SCHEMES: Mapping[str, int] = {"mqtt": 1883, "mqtts": 8883}
#: The HTTP URL schemes and their default ports.
HTTP_SCHEMES: Mapping[str, int] = {"http": 80, "https": 443}


class UrlError(BrokerError, ValueError):
    """A URL cannot be used. A ``ValueError`` too, so validators can let it through as is."""


@dataclass(frozen=True, slots=True)
class UrlParts:
    """A URL cut up. ``host`` is lower-case, an IPv6 address without its brackets."""

    scheme: str  # lower-case, one of the schemes asked for
    host: str
    port: int  # the URL's port, else the scheme's default
    path: str
    query: str
    fragment: str

    @property
    def authority(self) -> str:
        """``host:port`` (``[v6]:port``): all of the URL that a message may show."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def split_url(
    url: str,
    schemes: Mapping[str, int],
    example: str,
    *,
    credentials_hint: str = "use the settings made for them",
) -> UrlParts:
    """Split ``url``, whose scheme must be a key of ``schemes`` (the value: its default port).

    ``example`` ends the messages (``expected mqtt://host[:port]``); ``credentials_hint``
    says what to use instead of a ``user:password@`` in the URL. Raises :class:`UrlError`.
    The host is not checked beyond being present: what a valid host is stays the caller's.
    """
    if "\0" in url or any(c.isspace() for c in url):
        raise UrlError(f"the url contains whitespace or control characters; expected {example}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlError(f"malformed url (bad port or brackets); expected {example}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise UrlError(f"unsupported url scheme; expected {example}")
    if "@" in parts.netloc:
        raise UrlError(f"credentials in the url are not accepted; {credentials_hint}")
    if not parts.hostname:
        raise UrlError(f"the url has no host; expected {example}")
    return UrlParts(
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else schemes[scheme],
        path=parts.path,
        query=parts.query,
        fragment=parts.fragment,
    )

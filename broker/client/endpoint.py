"""Where the daemon's HTTP API is, how to authenticate to it, and what its errors say.

Shared by the SSE transport and the HTTP consumer reports.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import aiohttp

from broker.aio.secretfile import SecretFileError, load_secret_file
from broker.core.errors import BrokerError
from broker.core.urls import HTTP_SCHEMES, split_url

__all__ = ["HttpEndpoint", "HttpError", "error_of"]

CONNECT_TIMEOUT = 10.0
#: The daemon sends a keep-alive comment every 15 s: four of them missing means it is gone.
READ_TIMEOUT = 60.0


class HttpError(BrokerError):
    """The daemon answered, but not with what was asked for (status and error code only)."""


class HttpEndpoint:
    """Where the daemon's HTTP API is and how to authenticate: ``http(s)://`` or ``unix:``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> None:
        if token is not None and token_file is not None:
            raise ValueError("pass token or token_file, not both")
        self._socket: str | None = None
        if url.startswith("unix:"):
            self._socket = url[len("unix:"):]
            if not self._socket:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/credbroker.sock")
            self.base = "http://localhost"
            self.description = url
        else:
            parts = split_url(url, HTTP_SCHEMES, "http(s)://host[:port] or unix:/path",
                              credentials_hint="pass token_file")
            self.base = f"{parts.scheme}://{parts.authority}"
            self.description = self.base
        self._tls = url.startswith("https:")
        self._token = token
        self._token_file = token_file
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file

    async def _headers(self) -> dict[str, str]:
        if self._token_file is not None:
            # Read at every connect: a rotated API token is picked up on reconnect.
            try:
                raw = (await load_secret_file(self._token_file)).data.decode("utf-8")
            except (SecretFileError, UnicodeDecodeError) as exc:
                # An OSError, so the reconnecting loop retries it like a connect failure.
                why = str(exc) if isinstance(exc, SecretFileError) else "is not UTF-8 text"
                raise OSError(f"token_file {why}") from None
            return {"Authorization": f"Bearer {raw.strip()}"}
        if self._token is not None:
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    def _connector(self) -> aiohttp.BaseConnector:
        if self._socket is not None:
            return aiohttp.UnixConnector(path=self._socket)
        context: ssl.SSLContext | bool = False
        if self._tls:
            context = ssl.create_default_context(
                cafile=None if self._ca_file is None else str(self._ca_file)
            )
            if self._cert_file is not None:
                context.load_cert_chain(
                    str(self._cert_file),
                    None if self._key_file is None else str(self._key_file),
                )
        return aiohttp.TCPConnector(ssl=context if self._tls else False)

    @asynccontextmanager
    async def session(self, read_bufsize: int = 2**16) -> AsyncIterator[aiohttp.ClientSession]:
        """An aiohttp session for this daemon (its bearer token read now)."""
        session = aiohttp.ClientSession(
            connector=self._connector(),
            headers=await self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT,
                                          sock_connect=CONNECT_TIMEOUT,
                                          sock_read=READ_TIMEOUT),
            read_bufsize=read_bufsize,
            raise_for_status=False,
        )
        async with session:
            yield session

    def path(self, *parts: str) -> str:
        return self.base + "/" + "/".join(quote(p, safe="") for p in parts)


async def error_of(response: aiohttp.ClientResponse) -> HttpError:
    """An :class:`HttpError` naming the status and the API's error code, never the body."""
    code = ""
    try:
        doc = await response.json(content_type=None)
        code = str(doc["error"]["code"])[:64]
    except Exception:  # not our JSON error: the status says enough
        code = ""
    what = f"HTTP {response.status}" + (f" ({code})" if code else "")
    return HttpError(f"{response.method} {response.url.path}: {what}")

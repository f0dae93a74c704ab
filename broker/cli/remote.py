"""``credbroker status`` and ``credbroker events``: clients of a running daemon's HTTP API.

Where the daemon is, first match wins: ``--url``; the ``[http]`` section of the config given
with ``-c``; ``$CREDBROKER_URL``; the config named by ``$CREDBROKER_CONFIG``; the default
``http://127.0.0.1:8790``. A URL is ``http://host:port`` or ``unix:/path/to/socket``. The
bearer token comes from ``--token-file``, else ``$CREDBROKER_TOKEN_FILE``, else the config's
``http.token_file``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import anyio

from broker.aio.secretfile import SecretFileError, read_secret_file
from broker.cli.parsers import DEFAULT_URL
from broker.config import HttpSettings, load_config
from broker.core.backoff import backoff_delay
from broker.core.errors import BrokerError
from broker.core.state import State
from broker.core.urls import HTTP_SCHEMES, UrlError, split_url

EXIT_OK = 0
EXIT_UNREACHABLE = 1
#: Reconnection delays of ``events``: capped exponential backoff with full jitter.
RETRY_MIN = 0.5
RETRY_MAX = 10.0
#: A stream silent for this long is taken as dead (the daemon sends a keep-alive every 15 s).
STREAM_IDLE_TIMEOUT = 45.0
#: An SSE line longer than this is refused rather than buffered without bound.
MAX_LINE = 16 * 1024 * 1024


class RemoteError(BrokerError):
    """The daemon could not be asked; ``str()`` is one line for the user."""


class Unreachable(RemoteError):
    """Nothing answers at the URL (refused, no such socket, timed out)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a daemon's HTTP API listens, and the token to present."""

    url: str  # as the user knows it: http://host:port or unix:/path
    token: str | None = field(default=None, repr=False)

    @property
    def unix_path(self) -> str | None:
        return self.url[5:] if self.url.startswith("unix:") else None

    @property
    def base(self) -> str:
        """The HTTP base URL requests are made against."""
        # Over a unix socket the host part is only what goes in the Host header.
        return "http://localhost" if self.unix_path is not None else self.url.rstrip("/")

    def session(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        """A client session for this endpoint, sending the token with every request."""
        connector: aiohttp.BaseConnector
        if self.unix_path is not None:
            connector = aiohttp.UnixConnector(path=self.unix_path)
        else:
            connector = aiohttp.TCPConnector(limit=4)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, raise_for_status=False
        )


def listen_url(settings: HttpSettings) -> str:
    """The URL a client uses to reach a daemon configured with ``settings``."""
    if settings.unix_path is not None:
        return f"unix:{settings.unix_path}"
    host, port = settings.host, settings.port
    assert host is not None and port is not None
    # A wildcard bind is reachable on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def resolve_endpoint(
    url: str | None = None,
    config: str | None = None,
    token_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Endpoint:
    """The endpoint named by flags, config and environment (precedence in the module doc).

    ``ConfigError`` when the config cannot be loaded; ``RemoteError`` for a bad URL or an
    unreadable token file.
    """
    env = os.environ if env is None else env
    settings: HttpSettings | None = None
    config = config or (None if url or env.get("CREDBROKER_URL") else env.get("CREDBROKER_CONFIG"))
    if config:
        loaded = load_config(config)
        if loaded.http is None:
            if not url:
                raise RemoteError(f"{config} has no [http] section: the daemon serves no "
                                  "HTTP API (add one, or pass --url)")
        else:
            settings = loaded.http
    if url is None:
        url = listen_url(settings) if settings is not None else env.get("CREDBROKER_URL")
    url = _check_url(url or DEFAULT_URL)
    token_path = token_file or env.get("CREDBROKER_TOKEN_FILE") or (
        settings.token_file if settings is not None else None
    )
    token = _read_token(Path(token_path)) if token_path else None
    return Endpoint(url, token)


def _check_url(url: str) -> str:
    if url.startswith("unix:"):
        if len(url) <= 5:
            raise RemoteError("a unix: URL needs a path, e.g. unix:/run/credbroker.sock")
        return url
    try:
        split_url(url, HTTP_SCHEMES, "http://host:port or unix:/path",
                  credentials_hint="use --token-file")
    except UrlError as exc:
        raise RemoteError(str(exc)) from None
    return url


def _read_token(path: Path) -> str:
    try:
        token = read_secret_file(path).data.decode("utf-8").strip()
    except (SecretFileError, UnicodeDecodeError) as exc:
        reason = str(exc) if isinstance(exc, SecretFileError) else f"{path} is not UTF-8 text"
        raise RemoteError(f"cannot read the token file: {reason}") from None
    if not token:
        raise RemoteError(f"the token file {path} is empty")
    return token


# -- requests ---------------------------------------------------------------------------------


async def fetch_states(endpoint: Endpoint, seconds: float = 10.0) -> list[State]:
    """Every credential's state, from ``GET /v1/credentials`` (giving up after ``seconds``)."""
    async with endpoint.session(aiohttp.ClientTimeout(total=seconds)) as session:
        try:
            async with session.get(f"{endpoint.base}/v1/credentials") as response:
                body = await response.read()
                _raise_for(endpoint, response.status, body)
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(_unreachable(endpoint, exc)) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unreachable(f"the daemon at {endpoint.url} did not answer: "
                              f"{_describe(exc)}") from None
    try:
        return [State.from_dict(doc) for doc in json.loads(body)["credentials"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"{endpoint.url} did not answer like a credbroker daemon "
                          f"({type(exc).__name__})") from None


async def fetch_deliveries(endpoint: Endpoint, seconds: float = 10.0) -> list[dict[str, Any]]:
    """Each action's and webhook's last outcome (``GET /v1/deliveries``); ``[]`` when the
    daemon has none or predates the route (best effort: the states are what status needs).
    """
    try:
        async with (
            endpoint.session(aiohttp.ClientTimeout(total=seconds)) as session,
            session.get(f"{endpoint.base}/v1/deliveries") as response,
        ):
            if response.status != 200:
                return []
            found = json.loads(await response.read())["deliveries"]
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError):
        return []
    return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One dispatched Server-Sent Event."""

    event: str
    data: str
    id: str | None


async def iter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[SseMessage]:
    """Parse a ``text/event-stream`` (WHATWG rules) from raw byte chunks.

    Lines of any length up to ``MAX_LINE`` (``ValueError`` beyond); comments are skipped;
    a message without data is not dispatched.
    """
    pending = b""
    event, last_id = "", None
    data: list[str] = []
    async for chunk in chunks:
        pending += chunk
        while True:
            cut = _line_end(pending)
            if cut is None:
                if len(pending) > MAX_LINE:
                    raise ValueError("event stream line too long")
                break
            if pending[cut:cut + 1] == b"\r" and cut + 1 == len(pending):
                break  # a CR ending the chunk may be the first half of a CRLF
            line = pending[:cut]
            pending = pending[cut + (2 if pending[cut:cut + 2] == b"\r\n" else 1):]
            text = line.decode("utf-8", "replace")
            if not text:
                if data:
                    yield SseMessage(event or "message", "\n".join(data), last_id)
                event, data = "", []
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                last_id = value


def _line_end(buffer: bytes) -> int | None:
    positions = [i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0]
    return min(positions) if positions else None


async def follow_events(
    endpoint: Endpoint,
    out: TextIO,
    *,
    credential: str | None = None,
    event_type: str | None = None,
    since: int | None = None,
    err: TextIO | None = None,
    retry_min: float = RETRY_MIN,
    retry_max: float = RETRY_MAX,
) -> None:
    """Print every event (CloudEvent JSON) as one line on ``out``, forever.

    Reconnects with ``Last-Event-ID`` when the stream breaks, so nothing is missed while
    the daemon keeps it; when it could not (an ``event: reset``), says so on ``err``.
    ``Unreachable`` (or ``RemoteError``) only if the very first connection fails.
    """
    err = err if err is not None else sys.stderr
    params = {k: v for k, v in (("credential", credential), ("type", event_type)) if v}
    last_id = None if since is None else str(since)
    connected_once = False
    failures = 0
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=STREAM_IDLE_TIMEOUT)
    async with endpoint.session(timeout) as session:
        while True:
            headers = {"Last-Event-ID": last_id} if last_id is not None else {}
            try:
                async with session.get(
                    f"{endpoint.base}/v1/events", params=params, headers=headers
                ) as response:
                    if response.status != 200:
                        _raise_for(endpoint, response.status, await response.read())
                    if connected_once:
                        print(f"credbroker: reconnected to {endpoint.url}", file=err, flush=True)
                    connected_once, failures = True, 0
                    async for message in iter_sse(response.content.iter_any()):
                        if message.id is not None:
                            last_id = message.id
                        if message.event == "reset":
                            print(
                                "credbroker: events were missed (the daemon no longer has them); "
                                "re-read the state with `credbroker status`",
                                file=err, flush=True,
                            )
                            continue
                        print(message.data, file=out, flush=True)
            except aiohttp.ClientConnectorError as exc:
                if not connected_once:
                    raise Unreachable(_unreachable(endpoint, exc)) from None
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                if not connected_once:
                    raise Unreachable(f"the daemon at {endpoint.url} did not answer: "
                                      f"{_describe(exc)}") from None
            if failures == 0:
                print(f"credbroker: lost the event stream from {endpoint.url}; reconnecting",
                      file=err, flush=True)
            failures += 1
            # Full jitter: many followers of one restarted daemon do not come back in step.
            await anyio.sleep(backoff_delay(failures, retry_min, retry_max))


def _raise_for(endpoint: Endpoint, status: int, body: bytes) -> None:
    if status == 200:
        return
    try:
        error = json.loads(body)["error"]
        detail = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        detail = f"HTTP {status}"
    if status == 401:
        detail += " (pass the daemon's token with -c CONFIG or --token-file FILE)"
    raise RemoteError(f"the daemon at {endpoint.url} answered {status}: {detail}")


def _unreachable(endpoint: Endpoint, exc: aiohttp.ClientConnectorError) -> str:
    return (f"cannot reach the daemon at {endpoint.url} ({_describe(exc.os_error)}); "
            "is `credbroker run` running with an [http] section?")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        # asyncio's own strerror ("Connect call failed (...)") says less than the errno.
        return os.strerror(exc.errno).lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# -- the commands -----------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """``credbroker status``: 0 with a table (or JSON), 1 when the daemon cannot be asked."""
    from broker.cli.table import print_report

    try:
        endpoint = resolve_endpoint(args.url, args.config, args.token_file)
        states = anyio.run(fetch_states, endpoint)
        deliveries = anyio.run(fetch_deliveries, endpoint)
    except RemoteError as exc:
        print(f"credbroker: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print_report(states, deliveries, as_json=args.json, out=sys.stdout)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """``credbroker events``: follows until interrupted; 1 when the daemon cannot be reached."""
    try:
        endpoint = resolve_endpoint(args.url, args.config, args.token_file)
        anyio.run(_follow_stdout, endpoint, args.credential, args.type, args.since)
    except RemoteError as exc:
        print(f"credbroker: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BrokenPipeError:
        # `credbroker events | head`: the reader left, a normal end. Point stdout at
        # /dev/null so the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK


async def _follow_stdout(
    endpoint: Endpoint, credential: str | None, event_type: str | None, since: int | None
) -> None:
    await follow_events(endpoint, sys.stdout, credential=credential, event_type=event_type,
                        since=since)


__all__ = [
    "DEFAULT_URL",
    "Endpoint",
    "RemoteError",
    "SseMessage",
    "Unreachable",
    "fetch_states",
    "follow_events",
    "iter_sse",
    "listen_url",
    "resolve_endpoint",
]

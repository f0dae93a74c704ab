"""The HTTP API of SPEC section 5 (aiohttp), run as a sink inside the broker's task group.

Routes (the OpenAPI document, ``broker/openapi.json``, is served at ``/v1/openapi.json``)::

    GET  /v1/credentials              {"credentials": [state, ...]}
    GET  /v1/credentials/{name}       state, or 404 unknown-credential
    POST /v1/credentials/{name}/check forced re-read; publishes any change; returns state
    PUT  /v1/credentials/{name}/consumers/{id}  a consumer reports its generation; state
    DELETE /v1/credentials/{name}/consumers/{id}  the consumer went away; state
    GET  /v1/events                   Server-Sent Events, replay from a bounded ring
    GET  /healthz                     {"status": "ok", "mqtt": "connected"|"disconnected"|"off"}
    GET  /metrics                     Prometheus exposition
    GET  /                            the status page (broker/statuspage.py)

Every error is JSON ``{"error": {"code", "message"}}``; no route ever returns file content.

Event stream: each client gets its own bounded bus subscription, so a client that stops
reading blocks only its own handler (aiohttp's ``write`` waits for the socket to drain)
while its mailbox coalesces; the publisher and the other clients never wait for it. The
API keeps one more subscription of its own that fills a ring of the last ``ring_size``
events (and counts them for the metrics); ``Last-Event-ID`` / ``?since=N`` replays from it,
or answers ``event: reset`` when the asked-for id is no longer there, so the client knows
to re-read the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import importlib.resources
import logging
import math
import os
import re
import resource
import socket
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from anyio.abc import TaskStatus

from broker.config import ConfigError, HttpSettings
from broker.core.convergence import ReportError
from broker.core.errors import BrokerError
from broker.core.events import Event, encode, stream_reset
from broker.core.timefmt import format_time
from broker.engine.bus import Subscription
from broker.sinks.metrics import DeliveryStats, Metrics, StreamStats
from broker.sinks.statuspage import StatusPage

if TYPE_CHECKING:
    from broker.app import Broker
    from broker.engine.consumers import ConsumerTracker

log = logging.getLogger("broker.http")

#: Events kept for replay (``Last-Event-ID``); older ones answer ``event: reset``.
RING_SIZE = 4096
#: Per SSE client: events queued before its mailbox starts coalescing (latest per credential).
SSE_BUFFER = 256
#: A comment line is sent on an idle stream this often, so proxies and clients see it alive.
KEEPALIVE = 15.0
#: How often an idle stream checks that its client is still connected (aiohttp does not
#: tell a handler that is not reading or writing).
LIVENESS_CHECK = 1.0
#: More concurrent SSE clients than this are refused with 503.
MAX_SSE_CLIENTS = 1024
#: On shutdown, how long open streams get to finish before their connections are aborted.
SHUTDOWN_GRACE = 0.5
#: Suggested client reconnection delay (the SSE ``retry:`` field), milliseconds.
RETRY_MS = 2000
#: No route takes a body; a larger one is refused with 413 (a smaller one is read, ignored).
MAX_BODY = 64 * 1024
#: Open connections at most (further ones first evict the oldest idle one, else are closed),
#: and never more than this fraction of the descriptor limit: the broker needs the rest for
#: credential files, the state directory and MQTT.
MAX_CONNECTIONS = 4096
CONNECTIONS_PER_FD = 0.25
#: A connection that has not sent a whole request's headers this long after it opened or
#: after its last answer (idle keep-alive) is closed.
IDLE_TIMEOUT = 10.0
#: At most one log line per this many seconds for failed accept() calls (EMFILE, ENFILE).
ACCEPT_ERROR_LOG_INTERVAL = 60.0
#: How long a browser may cache a CORS preflight answer.
CORS_MAX_AGE = 600

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ID_RE = re.compile(r"[0-9]{1,18}")
_TYPE_MAX = 128
_TYPE_RE = re.compile(rf"[\x20-\x7e]{{1,{_TYPE_MAX}}}")
_JSON = "application/json; charset=utf-8"
_ERROR_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "request-too-large",
    414: "uri-too-long",
    431: "headers-too-large",
    500: "internal-error",
    503: "unavailable",
}
_QUERY_PARAMETERS = {"/v1/events": frozenset({"since", "credential", "type"})}
_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")
_CORS_METHODS = "GET, POST, PUT, DELETE"
_CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(BrokerError):
    """An error answer: ``{"error": {"code": code, "message": message}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def load_openapi() -> bytes:
    """The OpenAPI 3.1 document of this API (package data ``broker/openapi.json``)."""
    return importlib.resources.files("broker").joinpath("openapi.json").read_bytes()


@dataclass(eq=False, slots=True)
class _Client:
    request: web.Request
    subscription: Subscription


class HttpApi:
    """The HTTP API sink. ``Broker`` creates it when ``[http]`` is configured.

    After ``run`` has started, ``url`` is where it listens (``http://host:port`` or
    ``unix:/path``) and ``port`` the bound TCP port, so ``listen = "127.0.0.1:0"`` works.
    """

    name = "http"

    def __init__(
        self,
        broker: Broker,
        *,
        settings: HttpSettings | None = None,
        ring_size: int | None = None,
        sse_buffer: int | None = None,
        keepalive: float | None = None,
        max_clients: int | None = None,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        settings = settings or broker.config.http
        if settings is None:
            raise ValueError("the HTTP API needs an [http] section (or settings=)")
        self._broker = broker
        self.settings = settings
        # Module constants are read here, not as default arguments, so a test can shrink them.
        self._ring: deque[Event] = deque(maxlen=ring_size or RING_SIZE)
        self._sse_buffer = sse_buffer or SSE_BUFFER
        self._keepalive = keepalive or KEEPALIVE
        self._max_clients = max_clients or MAX_SSE_CLIENTS
        self._max_connections = max_connections or connection_cap()
        self._idle_timeout = idle_timeout or IDLE_TIMEOUT
        self._hosts = accepted_hosts(settings)
        self._cors = frozenset(settings.cors_origins)
        # Subscribed here rather than in run(): a broker that creates its sinks before it
        # starts the engine gets the first-sight events into the ring and the counters too.
        self._ring_sub = broker.subscribe("*", buffer=self._ring.maxlen or RING_SIZE)
        # The ring holds every event with ring_floor < sequence <= ring_head.
        self._ring_floor = self._ring_head = broker.engine.sequence
        self._ring_lost = 0
        self._clients: set[_Client] = set()
        self._clients_gone = anyio.Event()
        self._coalesced_closed = 0
        self._delivered = 0  # SSE frames written to clients, for the delivery metrics
        self._closing = False
        self._token: bytes | None = None
        self._openapi = load_openapi()
        self._health_resource: web.AbstractResource | None = None
        self._page = StatusPage()
        self.metrics = Metrics(broker, self._stream_stats)
        self.url: str | None = None
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"HttpApi(url={self.url!r}, clients={len(self._clients)})"

    @property
    def sse_clients(self) -> int:
        """Connected event-stream clients."""
        return len(self._clients)

    # -- lifespan ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then end every stream and close the listener promptly."""
        ring_sub = self._ring_sub
        runner: _Runner | None = None
        unix_inode: tuple[int, int] | None = None
        accept_errors = AcceptErrorLog(ACCEPT_ERROR_LOG_INTERVAL)
        accept_errors.install()
        try:
            self._token = await anyio.to_thread.run_sync(self._read_token)
            self._page.set_token(self._token)
            runner = _Runner(self._make_app(), access_log=None, handle_signals=False,
                             shutdown_timeout=SHUTDOWN_GRACE,
                             keepalive_timeout=self._idle_timeout)
            runner.max_connections = self._max_connections
            await runner.setup()
            unix_inode = await self._listen(runner)
            log.info(
                "http listening",
                extra={"url": self.url, "auth": "bearer" if self._token else "none"},
            )
            task_status.started()
            async for event in ring_sub:
                self._append(event)
                self._sync_ring()
            await anyio.sleep_forever()  # the bus closed before us: keep serving state
        finally:
            ring_sub.close()
            accept_errors.uninstall()
            if runner is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(4 * SHUTDOWN_GRACE + 2):
                    await self._shutdown(runner, unix_inode)

    async def _shutdown(self, runner: web.AppRunner, unix_inode: tuple[int, int] | None) -> None:
        self._closing = True
        clients = list(self._clients)
        # A stream waiting for events ends at once when its subscription closes...
        for client in clients:
            client.subscription.close()
        if self._clients:
            with anyio.move_on_after(SHUTDOWN_GRACE):
                await self._clients_gone.wait()
        # ...one stuck writing to a client that stopped reading is cut off.
        for client in list(self._clients):
            transport = client.request.transport
            if transport is not None:
                transport.abort()
        await runner.cleanup()
        path = self.settings.unix_path
        if path is not None and unix_inode is not None:
            # Only remove the socket if it is still the one we created.
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == unix_inode:
                    os.unlink(path)
        log.info("http stopped", extra={"url": self.url, "streams_closed": len(clients)})

    async def _listen(self, runner: web.AppRunner) -> tuple[int, int] | None:
        settings = self.settings
        unix_path = settings.unix_path
        if unix_path is not None:
            sock = await anyio.to_thread.run_sync(_bind_unix, unix_path)
            st = os.stat(unix_path)
            site: web.BaseSite = web.SockSite(runner, sock)
            await site.start()
            self.url = f"unix:{unix_path}"
            return st.st_dev, st.st_ino
        host, port = settings.host, settings.port
        assert host is not None and port is not None
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError([("http.listen", f"cannot listen on {settings.listen}: "
                                f"{exc.strerror or exc}")]) from None
        bound = runner.addresses[0]
        self.port = int(bound[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        return None

    def _read_token(self) -> bytes | None:
        path = self.settings.token_file
        if path is None:
            return None
        try:
            raw = path.read_bytes()
            mode = os.stat(path).st_mode
        except OSError as exc:
            message = f"cannot read {path}: {exc.strerror}"
            raise ConfigError([("http.token_file", message)]) from None
        token = raw.strip()
        if not token:
            raise ConfigError([("http.token_file", f"{path} is empty")])
        if mode & 0o077:
            log.warning(
                "token file is readable by other users",
                extra={"path": str(path), "mode": f"{stat.S_IMODE(mode):04o}",
                       "remedy": f"chmod 600 {path}"},
            )
        return token

    # -- the application --------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._measure, self._errors, self._check_host, self._cors_headers,
                         self._authorize, self._limit_body, self._check_query],
            client_max_size=MAX_BODY,
        )
        router = app.router
        router.add_get("/v1/credentials", self._list, allow_head=False)
        router.add_get("/v1/credentials/{name}", self._get, allow_head=False)
        router.add_post("/v1/credentials/{name}/check", self._check)
        consumer = router.add_resource("/v1/credentials/{name}/consumers/{id}")
        consumer.add_route("PUT", self._report_consumer)
        consumer.add_route("DELETE", self._remove_consumer)
        router.add_get("/v1/events", self._events, allow_head=False)
        router.add_get("/v1/openapi.json", self._openapi_doc, allow_head=False)
        router.add_get("/metrics", self._metrics, allow_head=False)
        self._page.add_routes(router)  # GET /: the status page (broker/statuspage.py)
        router.add_get("/v1/deliveries", self._deliveries, allow_head=False)
        health = router.add_resource("/healthz")
        health.add_route("GET", self._health)
        self._health_resource = health
        return app

    # -- middlewares (outermost first) -----------------------------------------------------

    @web.middleware
    async def _measure(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        protocol = request.protocol
        if isinstance(protocol, _ParserErrors):
            protocol.busy = True
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            if isinstance(protocol, _ParserErrors):
                protocol.busy = False
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.observe_request(route, request.method, status, elapsed)
            log.debug(
                "http request",
                extra={"method": request.method, "route": route, "status": status,
                       "seconds": round(elapsed, 4)},
            )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Turn every failure into a JSON error; a bug is logged, never shown to the client."""
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {h: exc.headers[h] for h in _KEPT_HEADERS if h in exc.headers}
            return _error(exc.status, _ERROR_CODES.get(exc.status, f"http-{exc.status}"),
                          _http_message(exc), headers)
        except Exception:
            resource = request.match_info.route.resource
            log.exception(
                "http handler failed",
                extra={"method": request.method,
                       "route": resource.canonical if resource is not None else "unmatched"},
            )
            return _error(500, "internal-error", "internal error; the broker's log has details")

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # DNS rebinding: a hostile page whose name now resolves to 127.0.0.1 reaches this
        # port from the user's browser, but its requests still carry its own name as Host.
        # A unix socket cannot be reached from a browser, whatever Host it is sent.
        host = request.headers.get("Host")
        if (
            self.settings.unix_path is None
            and host is not None
            and host_name(host) not in self._hosts
        ):
            raise ApiError(
                421,
                "misdirected-request",
                "this Host is not served here; add it to http.allowed_hosts if it is "
                "a name of this broker",
            )
        return await handler(request)

    @web.middleware
    async def _cors_headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Opt-in only: without cors_origins no CORS header is ever sent, so browsers keep
        # other origins from reading answers. A preflight is answered before authorisation
        # (browsers send it without credentials).
        origin = request.headers.get("Origin")
        if origin is None or origin.lower() not in self._cors:
            return await handler(request)
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers.update({
                "Access-Control-Allow-Methods": _CORS_METHODS,
                "Access-Control-Allow-Headers": _CORS_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE),
            })
            return web.Response(status=204, headers=headers)
        try:
            response = await handler(request)
        except ApiError as exc:
            exc.headers = {**(exc.headers or {}), **headers}
            raise
        if not response.prepared:
            response.headers.update(headers)
        return response

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Checked before the route is looked at, so an unauthenticated client learns nothing,
        # not even which paths exist. Health stays open for load balancers and probes.
        token = self._token
        if (
            token is not None
            and request.match_info.route.resource is not self._health_resource
            and not self._page.is_public(request)
            and not _bearer_matches(request.headers.get("Authorization"), token)
            and not self._page.cookie_allows(request)  # the status page's session
        ):
            raise ApiError(
                401,
                "unauthorized",
                'missing or wrong token: send "Authorization: Bearer <token>" with the '
                "token from the broker's http.token_file",
                {"WWW-Authenticate": 'Bearer realm="credbroker"'},
            )
        return await handler(request)

    @web.middleware
    async def _limit_body(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # No route takes a body. A large one is refused before it is read (or, chunked, once
        # MAX_BODY of it has been); a small one is read and ignored.
        length = request.content_length
        try:
            if length is not None and length > MAX_BODY:
                raise web.HTTPRequestEntityTooLarge(MAX_BODY, length)
            if request.body_exists:
                await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "request-too-large",
                           f"no route takes a request body (at most {MAX_BODY} bytes are "
                           "accepted and ignored)") from None
        except HttpProcessingError:  # a malformed chunked body
            raise ApiError(400, "bad-request", "malformed request body") from None
        return await handler(request)

    @web.middleware
    async def _check_query(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Unknown or repeated parameters are refused rather than ignored: a typo such as
        # ?credentail=x must not silently stream every credential's events.
        resource = request.match_info.route.resource
        if resource is not None:
            allowed = _QUERY_PARAMETERS.get(resource.canonical, frozenset())
            for key in request.query:
                if key not in allowed:
                    known = ", ".join(sorted(allowed)) or "none"
                    raise ApiError(400, "invalid-parameter",
                                   f"unknown query parameter {_show(key)} (known: {known})")
                if len(request.query.getall(key)) > 1:
                    raise ApiError(400, "invalid-parameter", f"{key}: given more than once")
        return await handler(request)

    # -- handlers ---------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        return _json({"credentials": [s.to_dict() for s in self._broker.states()]})

    async def _get(self, request: web.Request) -> web.Response:
        name = self._known(request.match_info["name"])
        return _json(self._broker.state(name).to_dict())

    async def _check(self, request: web.Request) -> web.Response:
        name = self._known(request.match_info["name"])
        state = await self._broker.check(name)
        headers: dict[str, str] = {}
        validator = self._broker.sinks.get("validate")
        last = getattr(validator, "last_verdict", None)
        validated_at = format_time(last(name)) if callable(last) else None
        if validated_at is not None:
            # Forced checks reuse a recent verdict (validate.MIN_INTERVAL): say how old it is.
            headers["Validated-At"] = validated_at
        return _json(state.to_dict(), headers=headers or None)

    async def _report_consumer(self, request: web.Request) -> web.Response:
        from broker.engine.consumers import HTTP_FIELDS, parse_report

        name = self._known(request.match_info["name"])
        with _refusals():
            report = parse_report(await request.read(), HTTP_FIELDS)
            state = self._tracker().report(
                name, request.match_info["id"], report.generation, report.fingerprint, via="http"
            )
        return _json(state.to_dict())

    async def _remove_consumer(self, request: web.Request) -> web.Response:
        name = self._known(request.match_info["name"])
        with _refusals():
            state = self._tracker().remove(name, request.match_info["id"])
        return _json(state.to_dict())

    def _tracker(self) -> ConsumerTracker:
        from broker.engine.consumers import ConsumerTracker

        tracker = self._broker.sinks.get("consumers")
        if not isinstance(tracker, ConsumerTracker):
            raise ApiError(503, "unavailable", "consumer tracking is not running")
        return tracker

    async def _health(self, request: web.Request) -> web.Response:
        sink = self._broker.sinks.get("mqtt")
        if sink is None:
            mqtt = "off"
        else:
            mqtt = "connected" if getattr(sink, "state", None) == "connected" else "disconnected"
        return _json({"status": "ok", "mqtt": mqtt})

    async def _deliveries(self, request: web.Request) -> web.Response:
        from broker.sinks.deliveries import outcomes_of

        return _json({"deliveries": [o.to_dict() for o in outcomes_of(self._broker.sinks)]})

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _openapi_doc(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, headers={"Content-Type": _JSON})

    def _known(self, name: str) -> str:
        try:
            self._broker.state(name)
        except KeyError:
            known = ", ".join(self._broker.engine.names) or "none"
            raise ApiError(404, "unknown-credential",
                           f"unknown credential {_show(name)} (known: {known})") from None
        return name

    # -- the event stream -------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        since = _since(request)
        credential = request.query.get("credential")
        if credential is not None:
            if not _NAME_RE.fullmatch(credential):
                raise ApiError(400, "invalid-parameter",
                               "credential: expected a credential name ([a-z0-9][a-z0-9_-]*)")
            self._known(credential)
        pattern = request.query.get("type", "*")
        if not _TYPE_RE.fullmatch(pattern):
            raise ApiError(400, "invalid-parameter",
                           f"type: expected an event type or glob of 1 to {_TYPE_MAX} characters, "
                           "e.g. credentials.* or credentials.expiring")
        if self._closing:
            raise ApiError(503, "shutting-down", "the broker is stopping",
                           {"Retry-After": "2"})
        if len(self._clients) >= self._max_clients:
            raise ApiError(503, "too-many-clients",
                           f"already {len(self._clients)} event streams open; try again later",
                           {"Retry-After": "10"})
        sub = self._broker.subscribe(pattern, credential=credential, buffer=self._sse_buffer)
        client = _Client(request, sub)
        try:
            # Subscribed first, then the ring caught up, with no await in between: every
            # event is either in the ring (published before) or in `sub` (after), never lost.
            self._sync_ring()
            replay, last = self._replay(sub, since)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
                }
            )
            # Registered before the headers go out: a client that has them is counted.
            self._clients.add(client)
            log.debug("event stream opened",
                      extra={"credential": credential, "type": pattern, "since": since,
                             "clients": len(self._clients)})
            try:
                await response.prepare(request)
                await response.write(b"retry: %d\n: credbroker events\n\n" % RETRY_MS + replay)
                await self._pump(request, response, sub, last)
            except ConnectionError:
                pass  # the client went away mid-write
            return response
        finally:
            sub.close()
            self._coalesced_closed += sub.coalesced
            if client in self._clients:
                self._clients.discard(client)
                log.debug("event stream closed", extra={"clients": len(self._clients)})
                if not self._clients:
                    self._clients_gone.set()
                    self._clients_gone = anyio.Event()

    async def _pump(
        self, request: web.Request, response: web.StreamResponse, sub: Subscription, last: int
    ) -> None:
        """Forward ``sub`` to the client until it leaves or the broker stops."""
        quiet_since = time.monotonic()
        while True:
            event = sub.get_nowait()
            if event is None:
                if self._closing or _gone(request):
                    return
                idle = time.monotonic() - quiet_since
                if idle >= self._keepalive:
                    await response.write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
                    continue
                with anyio.move_on_after(min(LIVENESS_CHECK, self._keepalive - idle)):
                    try:
                        event = await sub.get()
                    except anyio.EndOfStream:
                        return
                if event is None:
                    continue
            # Whatever else is queued goes out in the same write.
            frames: list[bytes] = []
            while event is not None:
                if event.sequence > last:  # replayed already, or in flight at replay time
                    frames.append(_frame(event))
                    last = event.sequence
                event = sub.get_nowait()
            if frames:
                await response.write(b"".join(frames))
                self._delivered += len(frames)
                quiet_since = time.monotonic()

    def _replay(self, sub: Subscription, since: int | None) -> tuple[bytes, int]:
        """The frames to send first and the last sequence they account for."""
        # The engine numbers an event before it publishes it: a state read over HTTP can
        # carry a sequence the ring has not seen yet. That is not from the future.
        newest = max(self._ring_head, self._broker.engine.sequence)
        if since is None:
            return b"", self._ring_head
        if since < self._ring_floor or since > newest:
            if since > newest:
                reason = (f"event {since} is newer than the broker's latest ({newest}): "
                          "its state was reset; re-read the state")
            else:
                reason = (f"events after {since} are no longer kept (the broker keeps the "
                          f"last {self._ring.maxlen} since it started, from {self._ring_floor}); "
                          "re-read the state")
            data = stream_reset({"reason": reason, "requested": since,
                                 "oldest": self._ring_floor, "latest": newest},
                                source=self._broker.source, now=time.time())
            log.info("event stream reset", extra={"requested": since, "oldest": self._ring_floor,
                                                  "latest": newest})
            return b"id: %d\nevent: reset\ndata: %s\n\n" % (newest, data), newest
        frames = [_frame(e) for e in self._ring if e.sequence > since and sub.matches(e)]
        return b"".join(frames), max(since, self._ring_head)

    def _append(self, event: Event) -> None:
        ring = self._ring
        if len(ring) == ring.maxlen:
            self._ring_floor = ring[0].sequence
        ring.append(event)
        self._ring_head = max(self._ring_head, event.sequence)
        self.metrics.observe_event(event)

    def _sync_ring(self) -> None:
        """Move every event the ring's subscription holds into the ring."""
        sub = self._ring_sub
        while (event := sub.get_nowait()) is not None:
            self._append(event)
        if sub.coalesced != self._ring_lost:
            # A burst larger than the ring arrived between two reads and our own mailbox
            # coalesced some away: the ring has holes, so vouch only for what comes next.
            self._ring_lost = sub.coalesced
            self._ring.clear()
            self._ring_floor = self._ring_head
            log.warning("event burst overflowed the replay ring; older ids now get a reset")

    def delivery_stats(self) -> DeliveryStats:
        """Events written to SSE clients; pending: what their mailboxes hold now."""
        pending = sum(c.subscription.pending for c in self._clients)
        return DeliveryStats(delivered=self._delivered, failures=0, pending=pending)

    def _stream_stats(self) -> StreamStats:
        live = sum(c.subscription.coalesced for c in self._clients)
        return StreamStats(clients=len(self._clients), coalesced=self._coalesced_closed + live)


# -- requests refused before routing -----------------------------------------------------------

#: A too-long line whose start looks like a request target (or a whole request line): 414;
#: any other too-long line is a header: 431. (A header value that starts like a URL is taken
#: for one; the answer is a JSON 4xx either way.)
_TARGET_RE = re.compile(rb"(?:[A-Z]+ )?(?:/|\*|[A-Za-z][A-Za-z0-9+.-]*://)")


class _ParserErrors(RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses as JSON, like every
    other error, without quoting the request.

    A request line or header too long, too many headers or malformed HTTP never reach the
    application's middlewares: aiohttp answers them itself in text/plain, and both that
    answer and its log line (with a traceback) quote up to 100 bytes of the offending line,
    which can be an ``Authorization`` header.
    """

    __slots__ = ("busy",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Handling a request (set by the application's outermost middleware): never
        #: closed to make room for a new connection.
        self.busy = False

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer is under way: only closing is left
            raise ConnectionError("error after the response started")
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            log.error("http request failed outside the handlers", exc_info=exc)
            status, code = 500, "internal-error"
            text = "internal error; the broker's log has details"
        elif isinstance(exc, LineTooLong):
            line = exc.args[0] if exc.args else b""
            if isinstance(line, str):
                line = line.encode("utf-8", "replace")
            if _TARGET_RE.match(bytes(line)):
                status, code = 414, "uri-too-long"
                text = "the request target (URL) is too long"
            else:
                status, code = 431, "headers-too-large"
                text = "a request header is too long"
        elif "too many headers" in str(exc).lower():
            status, code, text = 431, "headers-too-large", "too many request headers"
        else:
            status, code, text = 400, "bad-request", "malformed HTTP request"
        if status < 500:
            log.info("http request refused by the parser",
                     extra={"status": status, "code": code, "error": type(exc).__name__})
        response = _error(status, code, text)
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's server, with :class:`_ParserErrors` connections, at most ``max_connections``.

    Over the cap, the oldest connection that is not handling a request is closed to make
    room (an idle keep-alive or a client that never sent one); when every connection is
    busy, the new one is closed. Either way the broker's descriptors stay bounded, whatever
    the number of clients that connect and say nothing.
    """

    max_connections: int

    def __call__(self) -> RequestHandler:
        return _ParserErrors(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        connections = self._connections
        if len(connections) <= self.max_connections:
            return
        # A closed connection stays listed until its handler task ends: count the open ones.
        open_ = [c for c in connections if c.transport is not None and not c.transport.is_closing()]
        if len(open_) <= self.max_connections:
            return
        victim = next((c for c in open_ if not _busy(c) and c is not handler), handler)
        log.debug("http connection cap reached; closing one",
                  extra={"connections": len(connections), "idle": victim is not handler})
        victim.force_close()
        if victim.transport is not None:
            victim.transport.abort()


def _busy(handler: RequestHandler) -> bool:
    return isinstance(handler, _ParserErrors) and handler.busy


class _Runner(web.AppRunner):
    """An ``AppRunner`` whose server is :class:`_Server`."""

    max_connections = MAX_CONNECTIONS

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server, with our connection factory and cap
        assert isinstance(server, _Server)
        server.max_connections = self.max_connections
        return server


def connection_cap(nofile: int | None = None) -> int:
    """How many HTTP connections to allow with a soft descriptor limit of ``nofile``."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, int(nofile * CONNECTIONS_PER_FD)))


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without port, brackets or trailing dot, lower-cased."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def accepted_hosts(settings: HttpSettings) -> frozenset[str]:
    """``Host`` names answered: loopback names and addresses, the listen address, the rest
    of ``allowed_hosts``."""
    names = {"localhost", "127.0.0.1", "::1", *settings.allowed_hosts}
    if settings.host is not None:
        names.add(settings.host.lower())
    return frozenset(host_name(f"[{n}]" if ":" in n else n) for n in names)


class AcceptErrorLog:
    """Rate-limits asyncio's log of failed ``accept()`` calls to one line per interval.

    Out of descriptors, asyncio reports every retry of the listener with a traceback; the
    loop's exception handler is wrapped for the server's lifetime and restored after.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.suppressed = 0
        self._last = -math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def install(self) -> None:
        """Wrap the running loop's exception handler."""
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        """Put the previous exception handler back."""
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)
            self._loop = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return
        exc = context.get("exception")
        log.error(
            "http cannot accept connections",
            extra={"error": getattr(exc, "strerror", None) or type(exc).__name__,
                   "suppressed": self.suppressed, "every_seconds": self.interval},
        )
        self._last = now
        self.suppressed = 0


# -- helpers ----------------------------------------------------------------------------------


def _frame(event: Event) -> bytes:
    payload = event.payload
    if b"\n" in payload or b"\r" in payload:  # never from our encoder; stay correct anyway
        payload = b"\ndata: ".join(payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                                   .split(b"\n"))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.sequence, event.type.encode(), payload)


def _since(request: web.Request) -> int | None:
    # Last-Event-ID wins: a browser's EventSource reconnects with the original URL (and its
    # ?since=) plus the header, and the header is the more recent position.
    # Both are checked, though: a malformed ?since= is the caller's error either way.
    header = request.headers.get("Last-Event-ID", "").strip()
    positions = [("since", request.query.get("since")), ("Last-Event-ID", header or None)]
    since: int | None = None
    for where, raw in positions:
        if raw is None:
            continue
        if not _ID_RE.fullmatch(raw):
            raise ApiError(400, "invalid-parameter",
                           f"{where}: expected an event id (a whole number >= 0, as sent in id:)")
        since = int(raw)
    return since


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _bearer_matches(header: str | None, token: bytes) -> bool:
    if header is None:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time, so the answer's timing says nothing about how much of a guess was right.
    return hmac.compare_digest(value.strip().encode("utf-8", "backslashreplace"), token)


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """A refused consumer report as a JSON error with its status (400, 404, 409, 413)."""
    from broker.engine.consumers import HTTP_STATUS

    try:
        yield
    except ReportError as exc:
        raise ApiError(HTTP_STATUS.get(exc.code, 400), exc.code, exc.message) from None


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=encode(doc), status=status,
                        headers={"Content-Type": _JSON, **(headers or {})})


def _error(status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


def _http_message(exc: web.HTTPException) -> str:
    if exc.status == 404:
        return "no such route; the API is described at /v1/openapi.json"
    if exc.status == 405:
        return f"method not allowed; allowed: {exc.headers.get('Allow', 'none')}"
    return exc.reason


def _show(value: str, limit: int = 64) -> str:
    shown = value if len(value) <= limit else value[:limit] + "…"
    return encode(shown).decode()


def _bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, created 0600 (never wider, not even briefly)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError([("http.listen", f"cannot use {path}: {exc.strerror}")]) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError([("http.listen", f"{path} exists and is not a socket; "
                                "refusing to replace it")])
        if _unix_in_use(path):
            raise ConfigError([("http.listen", f"another process is listening on {path}")])
        os.unlink(path)  # a stale socket left by a crash
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives the socket file the mode of the socket's inode at bind time, so this
        # closes the window in which a chmod after bind would leave it group/world-usable.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError([("http.listen", f"cannot listen on {path}: {exc.strerror}")]) from None
    return sock


def _unix_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True

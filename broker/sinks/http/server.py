"""``HttpApi``: the HTTP API sink's lifespan (token, listener, replay ring, shutdown).

Routes (the OpenAPI document, ``broker/openapi.json``, is served at ``/v1/openapi.json``)::

    GET  /v1/credentials              {"credentials": [state, ...]}
    GET  /v1/credentials/{name}       state, or 404 unknown-credential
    POST /v1/credentials/{name}/check forced re-read; publishes any change; returns state
    PUT  /v1/credentials/{name}/consumers/{id}  a consumer reports its generation; state
    DELETE /v1/credentials/{name}/consumers/{id}  the consumer went away; state
    GET  /v1/events                   Server-Sent Events, replay from a bounded ring
    GET  /v1/deliveries               what each action and webhook last did
    GET  /healthz                     {"status": "ok", "mqtt": "connected"|"disconnected"|"off"}
    GET  /metrics                     Prometheus exposition
    GET  /                            the status page (statuspage.py)

Every error is JSON ``{"error": {"code", "message"}}``; no route ever returns file content.
The modules beside this one hold the rest: ``middleware`` (what every request goes through),
``routes`` (the JSON handlers), ``sse`` (the event stream), ``replay`` (its ring),
``connections`` (parser errors, the connection cap), ``listen`` (TCP and unix sockets).
"""

from __future__ import annotations

import logging
import stat

import anyio
from aiohttp import web
from anyio.abc import TaskStatus

from broker.aio.secretfile import SecretFileError, load_secret_file
from broker.config import ConfigError, HttpSettings
from broker.port import SinkContext, SinkHealth
from broker.sinks.http.connections import AcceptErrorLog, ApiRunner, connection_cap
from broker.sinks.http.listen import Listening, listen, remove_unix
from broker.sinks.http.middleware import MAX_BODY, OPEN_RESOURCE, Guards
from broker.sinks.http.replay import RING_SIZE, ReplayRing
from broker.sinks.http.routes import Routes
from broker.sinks.http.sse import KEEPALIVE, MAX_SSE_CLIENTS, SSE_BUFFER, Client, EventStreams
from broker.sinks.http.statuspage import StatusPage
from broker.sinks.metrics import Metrics, StreamStats

log = logging.getLogger("broker.http")

#: A connection that has not sent a whole request's headers this long after it opened or
#: after its last answer (idle keep-alive) is closed.
IDLE_TIMEOUT = 10.0
#: On shutdown, how long open streams get to finish before their connections are aborted.
SHUTDOWN_GRACE = 0.5
#: At most one log line per this many seconds for failed accept() calls (EMFILE, ENFILE).
ACCEPT_ERROR_LOG_INTERVAL = 60.0


class HttpApi:
    """The HTTP API sink. ``Broker`` creates it when ``[http]`` is configured.

    ``settings`` replaces the config's ``[http]``; the other keywords are the tunables
    (tests shrink them). After ``run`` has started, ``url`` is where it listens
    (``http://host:port`` or ``unix:/path``) and ``port`` the bound TCP port, so
    ``listen = "127.0.0.1:0"`` works.
    """

    name = "http"

    def __init__(
        self,
        context: SinkContext,
        *,
        settings: HttpSettings | None = None,
        ring_size: int = RING_SIZE,
        sse_buffer: int = SSE_BUFFER,
        keepalive: float = KEEPALIVE,
        max_clients: int = MAX_SSE_CLIENTS,
        max_connections: int | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        shutdown_grace: float = SHUTDOWN_GRACE,
    ) -> None:
        settings = settings or context.config.http
        if settings is None:
            raise ConfigError([("http", "the HTTP API needs an [http] section (or settings=)")])
        port = context.port
        self.settings = settings
        self._max_connections = max_connections or connection_cap()
        self._idle_timeout = idle_timeout
        self._shutdown_grace = shutdown_grace
        self.metrics = Metrics(port, self._stream_stats)
        self._ring = ReplayRing(port, ring_size, observe=self.metrics.observe_event)
        self._routes = Routes(port, self.metrics)
        self._streams = EventStreams(port, self._ring, self._routes.known, buffer=sse_buffer,
                                     keepalive=keepalive, max_clients=max_clients)
        self._page = StatusPage()
        self._guards = Guards(settings, self._page, self.metrics)
        self.url: str | None = None
        self.port: int | None = None

    def __repr__(self) -> str:
        return f"HttpApi(url={self.url!r}, clients={len(self._streams.clients)})"

    @property
    def sse_clients(self) -> int:
        """Connected event-stream clients."""
        return len(self._streams.clients)

    @property
    def streams(self) -> frozenset[Client]:
        """The event streams open now (their requests and subscriptions)."""
        return self._streams.clients

    def health(self) -> SinkHealth:
        """SSE frames written, events the open streams' mailboxes hold, stream counts."""
        streams = self._streams
        return SinkHealth(
            name=self.name,
            delivered=streams.delivered,
            pending=streams.pending,
            counters={"sse_clients": len(streams.clients), "sse_coalesced": streams.coalesced},
        )

    def close(self) -> None:
        """Let go of the replay ring's subscription (for an API made but never run)."""
        self._ring.close()

    def make_app(self) -> web.Application:
        """The aiohttp application: middlewares, the JSON routes, the stream, the page."""
        app = web.Application(middlewares=self._guards.middlewares(), client_max_size=MAX_BODY)
        router = app.router
        app[OPEN_RESOURCE] = self._routes.add_to(router, self._streams)
        self._page.add_routes(router)  # GET /: the status page
        return app

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then end every stream and close the listener promptly."""
        runner: ApiRunner | None = None
        listening: Listening | None = None
        accept_errors = AcceptErrorLog(ACCEPT_ERROR_LOG_INTERVAL)
        accept_errors.install()
        try:
            token = await self._read_token()
            self._guards.set_token(token)
            runner = ApiRunner(self.make_app(), max_connections=self._max_connections,
                               keepalive_timeout=self._idle_timeout,
                               shutdown_timeout=self._shutdown_grace)
            await runner.setup()
            listening = await listen(runner, self.settings)
            self.url, self.port = listening.url, listening.port
            log.info("http listening",
                     extra={"url": self.url, "auth": "bearer" if token else "none"})
            task_status.started()
            await self._ring.follow()
            await anyio.sleep_forever()  # the bus closed before us: keep serving state
        finally:
            self._ring.close()
            accept_errors.uninstall()
            if runner is not None:
                grace = self._shutdown_grace
                with anyio.CancelScope(shield=True), anyio.move_on_after(4 * grace + 2):
                    await self._shutdown(runner, listening)

    async def _shutdown(self, runner: web.AppRunner, listening: Listening | None) -> None:
        closed = await self._streams.close(self._shutdown_grace)
        await runner.cleanup()
        path = self.settings.unix_path
        if path is not None and listening is not None and listening.unix_inode is not None:
            remove_unix(path, listening.unix_inode)
        log.info("http stopped", extra={"url": self.url, "streams_closed": closed})

    async def _read_token(self) -> bytes | None:
        path = self.settings.token_file
        if path is None:
            return None
        try:
            read = await load_secret_file(path)
        except SecretFileError as exc:
            raise ConfigError([("http.token_file", f"cannot use {exc}")]) from None
        token = read.data.strip()
        if not token:
            raise ConfigError([("http.token_file", f"{path} is empty")])
        if read.shared:
            log.warning(
                "token file is readable by other users",
                extra={"path": str(path), "mode": f"{stat.S_IMODE(read.mode):04o}",
                       "remedy": f"chmod 600 {path}"},
            )
        return token

    def _stream_stats(self) -> StreamStats:
        return StreamStats(clients=len(self._streams.clients), coalesced=self._streams.coalesced)

"""The API's connections: JSON answers for what aiohttp's parser refuses, and a bounded count.

aiohttp answers a request its parser refuses (a line too long, too many headers, malformed
HTTP) itself, before any middleware, in text/plain, and both that answer and its log line
quote up to 100 bytes of the offending line, which can be an ``Authorization`` header.
:class:`JsonErrorsHandler` answers those as JSON instead, quoting nothing.

:class:`ApiRunner` serves the application with a :class:`CappedServer`, a ``web.Server``
subclass made from the handler and request factory that aiohttp's own ``AppRunner`` makes,
whose connections are :class:`JsonErrorsHandler` and which holds at most ``max_connections``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from broker.sinks.http.errors import error_response

log = logging.getLogger("broker.http")

#: Open connections at most (further ones first evict the oldest idle one, else are closed),
#: and never more than this fraction of the descriptor limit: the broker needs the rest for
#: credential files, the state directory and MQTT.
MAX_CONNECTIONS = 4096
CONNECTIONS_PER_FD = 0.25

#: A too-long line whose start looks like a request target (or a whole request line): 414;
#: any other too-long line is a header: 431. (A header value that starts like a URL is taken
#: for one; the answer is a JSON 4xx either way.)
_TARGET_RE = re.compile(rb"(?:[A-Z]+ )?(?:/|\*|[A-Za-z][A-Za-z0-9+.-]*://)")


class JsonErrorsHandler(RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses as JSON, like every
    other error, without quoting the request."""

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
        response = error_response(status, code, text)
        response.force_close()
        return response


def mark_busy(request: web.BaseRequest, busy: bool) -> None:
    """Say whether ``request``'s connection is handling a request (busy ones are kept)."""
    protocol = request.protocol
    if isinstance(protocol, JsonErrorsHandler):
        protocol.busy = busy


class CappedServer(web.Server):
    """aiohttp's server, with :class:`JsonErrorsHandler` connections, at most ``max_connections``.

    Over the cap, the oldest connection that is not handling a request is closed to make
    room (an idle keep-alive or a client that never sent one); when every connection is
    busy, the new one is closed. Either way the broker's descriptors stay bounded, whatever
    the number of clients that connect and say nothing.
    """

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        handler_cancellation: bool,
        max_connections: int,
        loop: asyncio.AbstractEventLoop,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory,
                         handler_cancellation=handler_cancellation, loop=loop, **handler_kwargs)
        self.max_connections = max_connections
        #: What each connection's handler is made with (``keepalive_timeout``, ...).
        self._handler_loop = loop
        self._handler_kwargs = handler_kwargs

    def __call__(self) -> RequestHandler:
        # The protocol factory asyncio calls for every accepted connection.
        return JsonErrorsHandler(self, loop=self._handler_loop, **self._handler_kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        connections = self.connections
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
    return isinstance(handler, JsonErrorsHandler) and handler.busy


class ApiRunner(web.AppRunner):
    """An ``AppRunner`` that serves its application with a :class:`CappedServer`.

    ``keepalive_timeout`` closes a connection that has not sent a whole request's headers
    that long after it opened or after its last answer.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        keepalive_timeout: float,
        shutdown_timeout: float,
    ) -> None:
        super().__init__(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
        self._max_connections = max_connections
        self._keepalive_timeout = keepalive_timeout

    async def _make_server(self) -> web.Server:
        # AppRunner starts and freezes the application and makes aiohttp's server for it:
        # ours takes that server's request handler, request factory and cancellation mode.
        plain = await super()._make_server()
        loop = asyncio.get_running_loop()
        return CappedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            max_connections=self._max_connections,
            loop=loop,
            keepalive_timeout=self._keepalive_timeout,
            access_log=None,
            debug=loop.get_debug(),  # what aiohttp's own server gets by default
        )


def connection_cap(nofile: int | None = None) -> int:
    """How many HTTP connections to allow with a soft descriptor limit of ``nofile``."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, int(nofile * CONNECTIONS_PER_FD)))


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

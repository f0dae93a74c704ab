"""What every request goes through before its handler, outermost first.

Measure (metrics, the connection's busy flag), map every failure to the JSON error shape,
check ``Host`` (DNS rebinding), answer CORS, authorise (bearer token or the status page's
session cookie), bound the body, refuse unknown query parameters.
"""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from broker.config import HttpSettings
from broker.sinks.http.connections import mark_busy
from broker.sinks.http.errors import ApiError, error_response, http_error_response, show
from broker.sinks.http.statuspage import StatusPage
from broker.sinks.metrics import Metrics

log = logging.getLogger("broker.http")

#: No route takes a body; a larger one is refused with 413 (a smaller one is read, ignored).
MAX_BODY = 64 * 1024
#: How long a browser may cache a CORS preflight answer.
CORS_MAX_AGE = 600
#: The query parameters each route takes (any other is refused).
QUERY_PARAMETERS = {"/v1/events": frozenset({"since", "credential", "type"})}
_CORS_METHODS = "GET, POST, PUT, DELETE"
_CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"


#: The application's route that stays open without a token (``/healthz``, for probes).
OPEN_RESOURCE = web.AppKey("open_resource", web.AbstractResource)


class Guards:
    """The API's middlewares, for one ``[http]`` section.

    ``set_token`` gives the token once it is read (``None``: no auth).
    """

    def __init__(self, settings: HttpSettings, page: StatusPage, metrics: Metrics) -> None:
        self._settings = settings
        self._page = page
        self._metrics = metrics
        self._hosts = accepted_hosts(settings)
        self._cors = frozenset(settings.cors_origins)
        self._token: bytes | None = None

    def set_token(self, token: bytes | None) -> None:
        """The bearer token requests must carry (and the status page's session is keyed by)."""
        self._token = token
        self._page.set_token(token)

    def middlewares(self) -> list[Middleware]:
        """Outermost first."""
        return [self._measure, self._errors, self._check_host, self._cors_headers,
                self._authorize, self._limit_body, self._check_query]

    @web.middleware
    async def _measure(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        mark_busy(request, True)
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            mark_busy(request, False)
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            elapsed = time.perf_counter() - started
            self._metrics.observe_request(route, request.method, status, elapsed)
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
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return http_error_response(exc)
        except Exception:
            resource = request.match_info.route.resource
            log.exception(
                "http handler failed",
                extra={"method": request.method,
                       "route": resource.canonical if resource is not None else "unmatched"},
            )
            return error_response(500, "internal-error",
                                  "internal error; the broker's log has details")

    @web.middleware
    async def _check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # DNS rebinding: a hostile page whose name now resolves to 127.0.0.1 reaches this
        # port from the user's browser, but its requests still carry its own name as Host.
        # A unix socket cannot be reached from a browser, whatever Host it is sent.
        host = request.headers.get("Host")
        if (
            self._settings.unix_path is None
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
            and request.match_info.route.resource is not request.config_dict.get(OPEN_RESOURCE)
            and not self._page.is_public(request)
            and not bearer_matches(request.headers.get("Authorization"), token)
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
            allowed = QUERY_PARAMETERS.get(resource.canonical, frozenset())
            for key in request.query:
                if key not in allowed:
                    known = ", ".join(sorted(allowed)) or "none"
                    raise ApiError(400, "invalid-parameter",
                                   f"unknown query parameter {show(key)} (known: {known})")
                if len(request.query.getall(key)) > 1:
                    raise ApiError(400, "invalid-parameter", f"{key}: given more than once")
        return await handler(request)


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


def bearer_matches(header: str | None, token: bytes) -> bool:
    """``header`` is ``Bearer <token>`` (compared in constant time)."""
    if header is None:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time, so the answer's timing says nothing about how much of a guess was right.
    return hmac.compare_digest(value.strip().encode("utf-8", "backslashreplace"), token)

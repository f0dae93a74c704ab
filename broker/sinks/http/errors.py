"""The API's JSON answers: :class:`ApiError` and the ``{"error": {"code", "message"}}`` shape.

Every error the API gives, whether a handler refused the request, aiohttp did (404, 405) or
its parser did (414, 431), has this one shape; no answer ever quotes file content.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.core.errors import BrokerError
from broker.core.events import encode

JSON = "application/json; charset=utf-8"
#: The ``code`` of an error aiohttp raised, by status.
ERROR_CODES = {
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
#: Headers of an aiohttp error that the JSON answer keeps (the rest describe its text body).
KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


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


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """``doc`` as a JSON answer."""
    return web.Response(body=encode(doc), status=status,
                        headers={"Content-Type": JSON, **(headers or {})})


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The JSON error answer."""
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own error (no route, wrong method, too large) as the JSON error answer."""
    headers = {h: exc.headers[h] for h in KEPT_HEADERS if h in exc.headers}
    return error_response(exc.status, ERROR_CODES.get(exc.status, f"http-{exc.status}"),
                          _http_message(exc), headers)


def show(value: str, limit: int = 64) -> str:
    """A client-given value, quoted and cut short, for an error message."""
    shown = value if len(value) <= limit else value[:limit] + "…"
    return encode(shown).decode()


def _http_message(exc: web.HTTPException) -> str:
    if exc.status == 404:
        return "no such route; the API is described at /v1/openapi.json"
    if exc.status == 405:
        return f"method not allowed; allowed: {exc.headers.get('Allow', 'none')}"
    return exc.reason

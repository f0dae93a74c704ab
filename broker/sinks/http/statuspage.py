"""The status page at ``/`` (SPEC section 5) and its login, served by the HTTP API.

The page is static (``broker/static``, package data, no external asset): its script reads
``/v1/credentials`` and follows ``/v1/events`` with ``EventSource``. ``EventSource`` cannot
send an ``Authorization`` header, so when ``http.token_file`` is set a same-origin form posts
the token to ``/login``, which answers with a session cookie (HttpOnly, SameSite=Strict).
The cookie holds a keyed digest of the token, never the token: the page, its script and the
browser's storage never see the token again, and changing the token file ends every session.

CSRF: SameSite=Strict keeps the cookie off cross-site requests, and a cookie-authenticated
request that changes something (any method but GET/HEAD) must come with a same-origin
``Origin`` header. The login form itself checks ``Origin`` too, so another site cannot log a
browser in.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from aiohttp import web

COOKIE = "credbroker_session"
#: Anything the page loads comes from this server; no inline script, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: Login attempts whose token is longer than this are refused unread (no token is this long).
MAX_TOKEN = 4096
#: Paths the page needs before anyone has signed in (they hold no credential data).
PUBLIC_PATHS = frozenset({"/", "/login", "/logout", *(f"/static/{name}" for name in _ASSETS)})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _asset(name: str) -> bytes:
    return importlib.resources.files("broker").joinpath("static", name).read_bytes()


def _headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        # Not no-referrer: with it browsers send "Origin: null" on form posts, and the
        # login's same-origin check needs the real Origin.
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-cache",
    }


def session_value(token: bytes) -> str:
    """The cookie value for ``token``: a digest keyed by it (the cookie is not the token)."""
    return hmac.new(token, b"credbroker status page session", hashlib.sha256).hexdigest()


def same_origin(request: web.BaseRequest) -> bool:
    """``Origin`` names this server (scheme, host and port as the request reached it)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return False
    parts = urlsplit(origin)
    return parts.scheme == request.scheme and parts.netloc.lower() == request.host.lower()


class StatusPage:
    """The page's routes, and the cookie half of the API's authorization check."""

    def __init__(self) -> None:
        # Read once: the assets are part of the installed package and never change under us.
        self._index = _asset("index.html")
        self._assets = {name: _asset(name) for name in _ASSETS}
        self._session: str | None = None

    def set_token(self, token: bytes | None) -> None:
        """The API's token (``None``: no auth, every session cookie is ignored)."""
        self._session = session_value(token) if token is not None else None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self._page, allow_head=False)
        for name in _ASSETS:
            router.add_get(f"/static/{name}", self._static, allow_head=False)
        router.add_post("/login", self._login)
        router.add_post("/logout", self._logout)

    def is_public(self, request: web.BaseRequest) -> bool:
        """The page, its assets and the login: no credential data, open to all."""
        return request.path in PUBLIC_PATHS

    def cookie_allows(self, request: web.BaseRequest) -> bool:
        """The request carries a valid session cookie (and, unless it only reads, comes
        from this server's own page)."""
        expected = self._session
        value = request.cookies.get(COOKIE)
        if expected is None or not value:
            return False
        if not hmac.compare_digest(value.encode("ascii", "replace"), expected.encode()):
            return False
        return request.method in _SAFE_METHODS or same_origin(request)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._index, headers=_headers("text/html; charset=utf-8"))

    async def _static(self, request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        return web.Response(body=self._assets[name], headers=_headers(_ASSETS[name]))

    async def _login(self, request: web.Request) -> web.Response:
        if not same_origin(request):
            raise web.HTTPForbidden(reason="sign in from this server's own page")
        expected = self._session
        if expected is None:
            return _see_other("/")  # no token configured: nothing to sign in to
        given = b""
        if request.content_type == "application/x-www-form-urlencoded" and (
            request.content_length or 0
        ) <= MAX_TOKEN + 16:
            form = await request.post()
            field = form.get("token")
            given = field.strip().encode("utf-8", "replace") if isinstance(field, str) else b""
        # Compared as digests: constant time, whatever the lengths.
        candidate = session_value(given) if given else ""
        if not candidate or not hmac.compare_digest(candidate.encode(), expected.encode()):
            return _see_other("/#login-failed")
        response = _see_other("/")
        _set_cookie(response, expected, secure=request.secure)
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        if not same_origin(request):
            raise web.HTTPForbidden(reason="sign out from this server's own page")
        response = _see_other("/")
        _set_cookie(response, "", secure=request.secure, max_age=0)
        return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _set_cookie(
    response: web.Response, value: str, *, secure: bool, max_age: int | None = None
) -> None:
    cookie: SimpleCookie = SimpleCookie()
    cookie[COOKIE] = value
    morsel = cookie[COOKIE]
    morsel["path"] = "/"
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    if secure:
        morsel["secure"] = True
    if max_age is not None:
        morsel["max-age"] = max_age
    response.headers.add("Set-Cookie", morsel.OutputString())

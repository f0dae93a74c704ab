"""The event stream, ``GET /v1/events``: Server-Sent Events, resumed from the replay ring.

Each client gets its own bounded bus subscription, so a client that stops reading blocks
only its own handler (aiohttp's ``write`` waits for the socket to drain) while its mailbox
coalesces; the publisher and the other clients never wait for it. ``Last-Event-ID`` /
``?since=N`` resume from the :class:`~broker.sinks.http.replay.ReplayRing`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from aiohttp import web

from broker.aio.wakeup import Wakeup
from broker.sinks.http.errors import ApiError
from broker.sinks.http.replay import ReplayRing, frame

if TYPE_CHECKING:
    from collections.abc import Callable

    from broker.engine.bus import Subscription
    from broker.port import BrokerPort

log = logging.getLogger("broker.http")

#: Per SSE client: events queued before its mailbox starts coalescing (latest per credential).
SSE_BUFFER = 256
#: A comment line is sent on an idle stream this often, so proxies and clients see it alive.
KEEPALIVE = 15.0
#: How often an idle stream checks that its client is still connected (aiohttp does not
#: tell a handler that is not reading or writing).
LIVENESS_CHECK = 1.0
#: More concurrent SSE clients than this are refused with 503.
MAX_SSE_CLIENTS = 1024
#: Suggested client reconnection delay (the SSE ``retry:`` field), milliseconds.
RETRY_MS = 2000

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ID_RE = re.compile(r"[0-9]{1,18}")
_TYPE_MAX = 128
_TYPE_RE = re.compile(rf"[\x20-\x7e]{{1,{_TYPE_MAX}}}")


@dataclass(eq=False, slots=True)
class Client:
    """One open event stream: its request and its own bus subscription."""

    request: web.Request
    subscription: Subscription


class EventStreams:
    """The open event streams, and the handler that opens one.

    ``known`` raises the API's 404 for a credential it does not know.
    """

    def __init__(
        self,
        port: BrokerPort,
        ring: ReplayRing,
        known: Callable[[str], str],
        *,
        buffer: int = SSE_BUFFER,
        keepalive: float = KEEPALIVE,
        max_clients: int = MAX_SSE_CLIENTS,
    ) -> None:
        self._port = port
        self._ring = ring
        self._known = known
        self._buffer = buffer
        self._keepalive = keepalive
        self._max_clients = max_clients
        self._clients: set[Client] = set()
        self._gone = Wakeup()  # poked when the last stream ends
        self._closing = False
        self._coalesced_closed = 0
        #: SSE frames written to clients, for the delivery metrics.
        self.delivered = 0

    @property
    def clients(self) -> frozenset[Client]:
        """The streams open now."""
        return frozenset(self._clients)

    @property
    def pending(self) -> int:
        """Events the open streams' mailboxes hold now."""
        return sum(c.subscription.pending for c in self._clients)

    @property
    def coalesced(self) -> int:
        """Events slow clients never received because newer ones replaced them."""
        return self._coalesced_closed + sum(c.subscription.coalesced for c in self._clients)

    async def close(self, grace: float) -> int:
        """End every stream: at once when waiting for events, after ``grace`` seconds when
        stuck writing to a client that stopped reading. Returns how many were open."""
        self._closing = True
        clients = list(self._clients)
        # A stream waiting for events ends at once when its subscription closes...
        for client in clients:
            client.subscription.close()
        with anyio.move_on_after(grace):
            while self._clients:
                await self._gone.wait()
        # ...one stuck writing to a client that stopped reading is cut off.
        for client in list(self._clients):
            transport = client.request.transport
            if transport is not None:
                transport.abort()
        return len(clients)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/events``."""
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
        sub = self._port.subscribe(pattern, credential=credential, buffer=self._buffer)
        client = Client(request, sub)
        try:
            # Subscribed first, then the ring caught up, with no await in between: every
            # event is either in the ring (published before) or in `sub` (after), never lost.
            self._ring.sync()
            replay, last = self._ring.replay(sub, since)
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
                    self._gone.poke()

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
                    frames.append(frame(event))
                    last = event.sequence
                event = sub.get_nowait()
            if frames:
                await response.write(b"".join(frames))
                self.delivered += len(frames)
                quiet_since = time.monotonic()


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

"""The HTTP transport: ``GET /v1/credentials`` for the current state, then ``/v1/events`` (SSE).

The stream is always requested unfiltered (the client filters by credential itself), so the
broker-wide sequence in ``id:`` has no holes and any hole is a gap. It resumes with
``Last-Event-ID``; ``event: reset`` (the broker no longer has the events asked for) and any
gap make it re-read the current state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from broker.core.events import Event
from broker.core.state import State

from .endpoint import HttpEndpoint, HttpError, error_of
from .origin import SOURCE_PREFIX, state_event
from .reports import HttpReporter

if TYPE_CHECKING:
    from .owner import TransportOwner

__all__ = ["HttpEndpoint", "HttpError", "SseTransport"]

log = logging.getLogger("broker.client")



class SseTransport:
    """Follow the daemon's HTTP API (see the module doc)."""

    def __init__(
        self,
        url: str,
        *,
        host_id: str,
        credential: str | None,
        token: str | None,
        token_file: str | Path | None,
        ca_file: str | Path | None,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        max_payload: int,
    ) -> None:
        self.endpoint = HttpEndpoint(url, token=token, token_file=token_file, ca_file=ca_file,
                                     cert_file=cert_file, key_file=key_file)
        self.description = self.endpoint.description
        # One daemon: its host_id is that of its events. Until one is seen the states read
        # back carry host "" (unless the caller named the host), and are re-keyed then.
        self._source = None if host_id == "+" else SOURCE_PREFIX + host_id
        self._credential = credential
        self._max_payload = max_payload
        self._last_id: int | None = None
        #: State re-reads (initial, after a reset, after a gap).
        self.rereads = 0

    def reporter(self, credential: str, consumer_id: str, host: str) -> HttpReporter:
        return HttpReporter(self.endpoint, credential, consumer_id)

    async def session(self, client: TransportOwner) -> None:
        async with self.endpoint.session(read_bufsize=self._max_payload + 4096) as http:
            newest = await self._read_states(http, client)
            since = self._last_id if self._last_id is not None else newest
            headers = {"Accept": "text/event-stream"}
            if since is not None:
                headers["Last-Event-ID"] = str(since)
            async with http.get(self.endpoint.path("v1", "events"), headers=headers) as stream:
                if stream.status != 200:
                    raise await error_of(stream)
                client.connected_now()
                await self._follow(http, stream, client)
            raise HttpError("the event stream ended")

    async def _read_states(self, http: aiohttp.ClientSession, client: TransportOwner) -> int | None:
        """Read every credential's state; return the newest sequence among them."""
        async with http.get(self.endpoint.path("v1", "credentials")) as response:
            if response.status != 200:
                raise await error_of(response)
            try:
                doc = json.loads(await response.read())
                states = [State.from_dict(s) for s in doc["credentials"]]
            except Exception:  # never quote the body: it is the daemon's, but still
                raise HttpError("GET /v1/credentials: not a credentials document") from None
        self.rereads += 1
        source = self._source or SOURCE_PREFIX
        for state in states:
            client.accept(state_event(state, source), live=False)
        return max((s.sequence for s in states), default=None)

    async def _follow(
        self, http: aiohttp.ClientSession, stream: aiohttp.ClientResponse, client: TransportOwner
    ) -> None:
        frame: dict[str, list[str]] = {}
        size = 0
        async for raw in stream.content:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line:
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                size += len(value)
                if size <= self._max_payload:
                    frame.setdefault(name, []).append(value.removeprefix(" "))
                continue
            if frame and size <= self._max_payload:
                await self._dispatch(http, frame, client)
            elif frame:
                client.ignore("sse", f"frame larger than {self._max_payload} bytes")
            frame, size = {}, 0
            if client.take_resync():
                await self._read_states(http, client)

    async def _dispatch(
        self, http: aiohttp.ClientSession, frame: dict[str, list[str]], client: TransportOwner
    ) -> None:
        kind = frame.get("event", ["message"])[-1]
        ident = _int(frame.get("id", [""])[-1])
        data = "\n".join(frame.get("data", []))
        if kind == "reset":
            log.info("broker client stream reset; re-reading the current state",
                     extra={"server": self.description, "id": ident})
            await self._read_states(http, client)
            if ident is not None:
                self._last_id = ident
            return
        if not data:
            return
        try:
            event = Event.from_json(data)
        except Exception:  # hostile input: nothing may escape, nothing quoted
            client.ignore("sse", "not a credbroker event")
            return
        if ident is not None and ident != event.sequence:
            client.ignore("sse", "the frame id is not the event's sequence")
            return
        if self._source is None and event.source.startswith(SOURCE_PREFIX):
            self._source = event.source
            client.rehost(event.source)
        elif event.source != self._source:
            client.ignore("sse", "an event of another broker")
            return
        client.accept(event, live=True, contiguous=True)
        self._last_id = event.sequence


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


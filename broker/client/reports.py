"""Consumer adoption reports (SPEC section 3): which generation a consumer now uses.

Never the content: only the generation and fingerprint of the event the consumer acted on.
Over HTTP, ``PUT /v1/credentials/{name}/consumers/{id}`` and ``DELETE`` when it goes away;
over MQTT, see :class:`broker.client.mqtt_transport.MqttReporter`.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import aiohttp
import anyio

from broker.core.timefmt import format_time

from .endpoint import error_of

if TYPE_CHECKING:
    from .endpoint import HttpEndpoint

__all__ = ["CONSUMER_TTL", "REPORT_INTERVAL", "HttpReporter", "Reporter", "report_document"]

log = logging.getLogger("broker.client")

#: The broker forgets a consumer not heard from for this long (its default ``consumer_ttl``).
CONSUMER_TTL = 600.0
#: Re-announced this often: four reports per TTL, so a lost report or two never expire it.
REPORT_INTERVAL = CONSUMER_TTL / 4
#: Saying goodbye must not hold up a stopping service.
GOODBYE_TIMEOUT = 2.0


class Reporter(Protocol):
    """One consumer's report channel; leaving ``async with`` withdraws the report."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(self, generation: int, fingerprint: str | None, now: float) -> None:
        """Report the generation held; raises when it could not be delivered."""


def report_document(
    consumer_id: str, credential: str, generation: int, fingerprint: str | None, now: float
) -> dict[str, Any]:
    """The MQTT report payload of SPEC section 3."""
    return {"consumer": consumer_id, "credential": credential, "generation": generation,
            "fingerprint": fingerprint, "time": format_time(now)}


class HttpReporter:
    """Reports with ``PUT`` and withdraws with ``DELETE`` on the daemon's HTTP API."""

    def __init__(self, endpoint: HttpEndpoint, credential: str, consumer_id: str) -> None:
        self._endpoint = endpoint
        self._url = endpoint.path("v1", "credentials", credential, "consumers", consumer_id)
        self._session: aiohttp.ClientSession | None = None
        self._cm: Any = None
        self._sent = False
        self._refused_logged = False

    def __repr__(self) -> str:
        return f"HttpReporter({self._url})"

    async def __aenter__(self) -> Self:
        self._cm = self._endpoint.session()
        self._session = await self._cm.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        try:
            if session is not None and self._sent:
                with anyio.move_on_after(GOODBYE_TIMEOUT, shield=True):
                    try:
                        async with session.delete(self._url) as response:
                            await response.read()
                    except (aiohttp.ClientError, OSError) as err:
                        log.info("consumer report not withdrawn",
                                 extra={"url": self._url, "error": type(err).__name__})
        finally:
            with anyio.CancelScope(shield=True):
                await self._cm.__aexit__(exc_type, exc, tb)

    async def send(self, generation: int, fingerprint: str | None, now: float) -> None:

        assert self._session is not None, "use async with"
        body = {"generation": generation, "fingerprint": fingerprint}
        # Before the request, not after its answer: a PUT may reach the daemon and the
        # consumer close before the answer is read, and its report must still be withdrawn.
        self._sent = True
        async with self._session.put(self._url, json=body) as response:
            if response.status in (404, 405) and not self._refused_logged:
                # A daemon that predates consumer tracking: say so once, keep serving.
                self._refused_logged = True
                log.info("the broker does not track consumers over HTTP",
                         extra={"url": self._url, "status": response.status})
            if response.status >= 300:
                raise await error_of(response)
            await response.read()

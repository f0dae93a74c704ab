"""The API's JSON routes: credentials, forced checks, consumer reports, deliveries, health.

Every answer comes from the port (``broker.port.BrokerPort``): the states, the consumer
tracker, the validator's last verdict and the sinks' health; none reads another sink.
"""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from broker.core.convergence import ReportError
from broker.core.outcome import Outcome
from broker.core.timefmt import format_time
from broker.sinks.http.errors import JSON, ApiError, json_response, show

if TYPE_CHECKING:
    from broker.engine.consumers import ConsumerTracker
    from broker.port import BrokerPort, SinkHealth
    from broker.sinks.http.sse import EventStreams
    from broker.sinks.metrics import Metrics

#: The sinks whose outcomes ``/v1/deliveries`` lists, in this order.
OUTCOME_SINKS = ("actions", "webhooks")


def load_openapi() -> bytes:
    """The OpenAPI 3.1 document of this API (package data ``broker/openapi.json``)."""
    return importlib.resources.files("broker").joinpath("openapi.json").read_bytes()


class Routes:
    """The handlers of every route but the status page's."""

    def __init__(self, port: BrokerPort, metrics: Metrics) -> None:
        self._port = port
        self._metrics = metrics
        self._openapi = load_openapi()

    def add_to(self, router: web.UrlDispatcher, streams: EventStreams) -> web.AbstractResource:
        """Add the routes (``/v1/events`` served by ``streams``); returns ``/healthz``'s
        resource, the one open without a token."""
        router.add_get("/v1/credentials", self._list, allow_head=False)
        router.add_get("/v1/credentials/{name}", self._get, allow_head=False)
        router.add_post("/v1/credentials/{name}/check", self._check)
        consumer = router.add_resource("/v1/credentials/{name}/consumers/{id}")
        consumer.add_route("PUT", self._report_consumer)
        consumer.add_route("DELETE", self._remove_consumer)
        router.add_get("/v1/events", streams.handle, allow_head=False)
        router.add_get("/v1/openapi.json", self._openapi_doc, allow_head=False)
        router.add_get("/metrics", self._serve_metrics, allow_head=False)
        router.add_get("/v1/deliveries", self._deliveries, allow_head=False)
        health = router.add_resource("/healthz")
        health.add_route("GET", self._health)
        return health

    def known(self, name: str) -> str:
        """``name`` if it is a configured credential, else the API's 404."""
        try:
            self._port.state(name)
        except KeyError:
            known = ", ".join(self._port.names()) or "none"
            raise ApiError(404, "unknown-credential",
                           f"unknown credential {show(name)} (known: {known})") from None
        return name

    async def _list(self, request: web.Request) -> web.Response:
        return json_response({"credentials": [s.to_dict() for s in self._port.states()]})

    async def _get(self, request: web.Request) -> web.Response:
        name = self.known(request.match_info["name"])
        return json_response(self._port.state(name).to_dict())

    async def _check(self, request: web.Request) -> web.Response:
        name = self.known(request.match_info["name"])
        state = await self._port.check(name)
        headers: dict[str, str] = {}
        validated_at = format_time(self._port.verdict_at(name))
        if validated_at is not None:
            # Forced checks reuse a recent verdict (validate's min_interval): say how old it is.
            headers["Validated-At"] = validated_at
        return json_response(state.to_dict(), headers=headers or None)

    async def _report_consumer(self, request: web.Request) -> web.Response:
        from broker.engine.consumers import HTTP_FIELDS, parse_report

        name = self.known(request.match_info["name"])
        with _refusals():
            report = parse_report(await request.read(), HTTP_FIELDS)
            state = self._tracker().report(
                name, request.match_info["id"], report.generation, report.fingerprint, via="http"
            )
        return json_response(state.to_dict())

    async def _remove_consumer(self, request: web.Request) -> web.Response:
        name = self.known(request.match_info["name"])
        with _refusals():
            state = self._tracker().remove(name, request.match_info["id"])
        return json_response(state.to_dict())

    def _tracker(self) -> ConsumerTracker:
        tracker = self._port.consumers
        if tracker is None:
            raise ApiError(503, "unavailable", "consumer tracking is not running")
        return tracker

    async def _health(self, request: web.Request) -> web.Response:
        mqtt = next((h for h in self._port.health() if h.name == "mqtt"), None)
        shown = "off" if mqtt is None else "connected" if mqtt.connected else "disconnected"
        return json_response({"status": "ok", "mqtt": shown})

    async def _deliveries(self, request: web.Request) -> web.Response:
        outcomes = outcomes_in(self._port.health())
        return json_response({"deliveries": [o.to_dict() for o in outcomes]})

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _openapi_doc(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, headers={"Content-Type": JSON})


def outcomes_in(health: Sequence[SinkHealth]) -> list[Outcome]:
    """Every action's and webhook's last outcome (actions first), from the sinks' health."""
    by_name = {h.name: h for h in health}
    return [o for name in OUTCOME_SINKS if name in by_name for o in by_name[name].outcomes]


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """A refused consumer report as a JSON error with its status (400, 404, 409, 413)."""
    from broker.engine.consumers import HTTP_STATUS

    try:
        yield
    except ReportError as exc:
        raise ApiError(HTTP_STATUS.get(exc.code, 400), exc.code, exc.message) from None

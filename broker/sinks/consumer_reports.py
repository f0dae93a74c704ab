"""Consumer reports over MQTT: a sink with a connection of its own that subscribes to
``<prefix>/<host_id>/consumers/+/+`` and hands each retained report to the
:class:`~broker.engine.consumers.ConsumerTracker` (an empty message: the consumer went away,
typically its Last Will).

A connection of its own, so that a flood of reports never queues behind the publisher's
events, and the publisher never subscribes to anything. Hostile reports are ignored and
logged once per kind of refusal, then at most every ``LOG_EVERY`` seconds with a count.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import anyio
from aiomqtt import Client, Message, ProtocolVersion
from anyio.abc import TaskStatus

from broker.aio.mqtt_link import CONNECT_ERRORS, ProtocolFallback, close_client, open_client
from broker.aio.mqtt_material import (
    connect_material,
    describe_connect_error,
)
from broker.config import MqttSettings
from broker.core.backoff import Backoff
from broker.core.convergence import ReportError
from broker.core.topics import join_topic
from broker.engine.consumers import ConsumerTracker, parse_report
from broker.port import SinkContext, SinkHealth

log = logging.getLogger("broker.consumers")

#: An ignored report of the same kind is logged at most this often.
LOG_EVERY = 60.0


class RateLimitedLog:
    """Logs the first refusal of each code, then at most every ``every`` seconds."""

    def __init__(
        self, every: float = LOG_EVERY, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._every = every
        self._monotonic = monotonic
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        #: Refusals counted, by code (for tests and metrics).
        self.counts: dict[str, int] = {}

    def ignored(self, code: str, message: str, **extra: object) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        now = self._monotonic()
        last = self._last.get(code)
        if last is not None and now - last < self._every:
            self._suppressed[code] = self._suppressed.get(code, 0) + 1
            return
        self._last[code] = now
        suppressed = self._suppressed.pop(code, 0)
        log.warning(
            "mqtt consumer report ignored",
            extra={"code": code, "error": message, "suppressed": suppressed, **extra},
        )


class MqttConsumerReports:
    """The sink that reads consumer reports from MQTT (made when ``[mqtt]`` is set)."""

    name = "consumer-reports"

    def __init__(
        self,
        context: SinkContext,
        *,
        settings: MqttSettings | None = None,
        log_every: float = LOG_EVERY,
    ) -> None:
        settings = settings if settings is not None else context.config.mqtt
        if settings is None:
            raise ValueError("MQTT is not configured ([mqtt] is missing)")
        self._port = context.port
        self._settings = settings
        host_id = context.port.host_id
        self.filter = join_topic(settings.topic_prefix, host_id, "consumers", "+", "+",
                                 wildcards=True)
        self._prefix = self.filter[: -len("+/+")]
        self.client_id = f"{settings.client_id or f'credbroker-{host_id}'}-consumers"
        self._backoff = Backoff()
        self.log = RateLimitedLog(log_every)
        self.connected = False
        self.reports = 0

    def __repr__(self) -> str:
        return f"MqttConsumerReports(filter={self.filter!r}, connected={self.connected})"

    def health(self) -> SinkHealth:
        """Connected or not; ``counters`` holds the ignored reports by why."""
        return SinkHealth(
            self.name, delivers=False, connected=self.connected, delivered=self.reports,
            counters=dict(self.log.counts),
        )

    def close(self) -> None:
        """Nothing to let go of: the subscription is made by ``run``."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, reconnecting with backoff, until cancelled."""
        tracker = self._port.consumers
        if tracker is None:
            raise RuntimeError("consumer reports need the broker's consumer tracker")
        task_status.started()
        fallback = ProtocolFallback()
        while True:
            client = await fallback.connect_retrying(
                self._open, self._backoff,
                on_failure=lambda exc, delay: self._failed(exc, delay, fallback.name),
            )
            try:
                await client.subscribe(self.filter, qos=1)
                self.connected = True
                self._backoff.reset()
                log.info("mqtt consumer reports subscribed", extra={"filter": self.filter})
                async for message in client.messages:
                    self.handle(tracker, message)
            except CONNECT_ERRORS as exc:
                delay = self._backoff.next()
                self._failed(exc, delay, fallback.name)
                await anyio.sleep(delay)
            finally:
                self.connected = False
                await close_client(client)

    def _failed(self, exc: BaseException, delay: float, protocol: str) -> None:
        log.warning(
            "mqtt consumer reports: connection failed",
            extra={"error": describe_connect_error(exc), "retry_in": round(delay, 3),
                   "protocol": protocol},
        )

    async def _open(self, protocol: ProtocolVersion) -> Client:
        s = self._settings
        password, context = await connect_material(
            s.password_file, s.tls, s.ca_file, s.cert_file, s.key_file
        )
        return await open_client(
            s.host, s.port, protocol=protocol, username=s.username, password=password,
            tls_context=context, client_id=self.client_id,
            keepalive=max(1, math.ceil(s.keepalive)),
            logger=logging.getLogger("broker.mqtt.paho"),
        )

    def handle(self, tracker: ConsumerTracker, message: Message) -> None:
        """Apply one report message; anything hostile is ignored (and logged, rate-limited)."""
        topic = message.topic.value
        if not topic.startswith(self._prefix):
            return
        credential, _, consumer_id = topic[len(self._prefix):].partition("/")
        payload = message.payload
        body = payload if isinstance(payload, bytes) else str(payload or "").encode()
        try:
            if not body:
                tracker.remove(credential, consumer_id)
                return
            report = parse_report(body)
            if report.consumer not in (None, consumer_id) or report.credential not in (
                None, credential,
            ):
                raise ReportError("invalid-report", "the report names another topic")
            tracker.report(
                credential, consumer_id, report.generation, report.fingerprint,
                via="mqtt", at=report.time,
            )
            self.reports += 1
        except ReportError as exc:
            self.log.ignored(exc.code, exc.message, credential=_show(credential),
                             consumer=_show(consumer_id))


def _show(value: str, limit: int = 64) -> str:
    return ascii(value if len(value) <= limit else value[:limit] + "...")

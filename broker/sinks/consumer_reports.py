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
from aiomqtt import Client, Message, MqttError, ProtocolVersion
from anyio.abc import TaskStatus

from broker.aio.mqtt_link import close_client
from broker.aio.mqtt_material import (
    CONNECT_TIMEOUT,
    PROTOCOLS,
    connect_material,
    describe_connect_error,
    is_protocol_refusal,
    protocol_name,
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
        protocols = list(PROTOCOLS)
        while True:
            try:
                await self._session(tracker, protocols[0])
            except (MqttError, OSError, ValueError, TimeoutError) as exc:
                if is_protocol_refusal(exc) and len(protocols) > 1:
                    protocols.pop(0)
                    continue
                delay = self._backoff.next()
                log.warning(
                    "mqtt consumer reports: connection failed",
                    extra={"error": describe_connect_error(exc), "retry_in": round(delay, 3),
                           "protocol": protocol_name(protocols[0])},
                )
                await anyio.sleep(delay)
            finally:
                self.connected = False

    async def _session(self, tracker: ConsumerTracker, protocol: ProtocolVersion) -> None:
        s = self._settings
        password, context = await connect_material(
            s.password_file, s.tls, s.ca_file, s.cert_file, s.key_file
        )
        client = Client(
            s.host, s.port, username=s.username, password=password,
            identifier=self.client_id, protocol=protocol, tls_context=context,
            keepalive=max(1, math.ceil(s.keepalive)), timeout=CONNECT_TIMEOUT + 5,
            logger=logging.getLogger("broker.mqtt.paho"),
        )
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                await client.__aenter__()
        except BaseException:
            await close_client(client, wait=0.2)
            raise
        try:
            await client.subscribe(self.filter, qos=1)
            self.connected = True
            self._backoff.reset()
            log.info("mqtt consumer reports subscribed", extra={"filter": self.filter})
            async for message in client.messages:
                self.handle(tracker, message)
        finally:
            await close_client(client)

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

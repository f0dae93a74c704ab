"""Prometheus metrics of one broker, served by the HTTP API at ``/metrics``.

Every ``Metrics`` owns its own ``CollectorRegistry``: nothing is registered in
prometheus-client's global default registry, so several brokers (tests, embedding) in one
process never share or collide on a metric. Counters of things that happen (events, HTTP
requests) are incremented by the HTTP API; everything that *is* (credential status, time
left, watcher, MQTT, SSE clients) is read live from the broker at scrape time by a custom
collector, so the engine and the MQTT publisher need no metrics code of their own.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from broker.core.events import Event
from broker.core.state import State, Status

if TYPE_CHECKING:
    from broker.port import BrokerPort, SinkHealth

#: HTTP methods kept as a label value; anything else a client sends is counted as "other"
#: (a label must never take arbitrary client input: that is unbounded cardinality).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class StreamStats:
    """What the HTTP API knows about its Server-Sent Events clients, read at scrape time."""

    clients: int
    coalesced: int


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """A sink's deliveries, as the HTTP API's ``delivery_stats`` gave them before
    :class:`~broker.port.SinkHealth` (which the metrics read now); kept until it goes."""

    delivered: int  #: events (or messages) the other side accepted
    failures: int  #: attempts that failed and will be retried (or were given up)
    pending: int  #: events accepted from the bus but not delivered yet


class Metrics:
    """The metrics of one broker and its HTTP API, in a registry of their own.

    ``stream_stats`` is called at every scrape for the SSE gauges.
    """

    def __init__(self, port: BrokerPort, stream_stats: Callable[[], StreamStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._events = Counter(
            "credbroker_events",
            "Events published, by type and credential.",
            ["type", "credential"],
            registry=self.registry,
        )
        self._requests = Counter(
            "credbroker_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "credbroker_http_request_duration_seconds",
            "Time to answer an HTTP request (for /v1/events: the life of the stream).",
            ["route"],
            buckets=(0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 600.0),
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(port, stream_stats))
        # process_* (CPU, memory, fds against their limit, start time) and python_info: the
        # ones every exporter has, in this registry rather than the process-global one.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def observe_event(self, event: Event) -> None:
        """Count one published event."""
        self._events.labels(event.type, event.subject).inc()

    def observe_request(self, route: str, method: str, code: int, seconds: float) -> None:
        """Count one answered request; ``route`` is the route template, never the raw path."""
        method = method if method in KNOWN_METHODS else "other"
        self._requests.labels(route, method, str(code)).inc()
        self._latency.labels(route).observe(seconds)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when ``accept`` asks for it)."""
        encoder, content_type = choose_encoder(accept)
        body: bytes = encoder(self.registry)
        return body, str(content_type)


class _LiveCollector:
    """Reads the broker's current values at scrape time (a prometheus-client collector).

    Everything comes through the port: the states, the engine's figures and each sink's
    :class:`~broker.port.SinkHealth` (``credbroker_mqtt_*`` from the one named ``mqtt``).
    """

    def __init__(self, port: BrokerPort, stream_stats: Callable[[], StreamStats]) -> None:
        self._port = port
        self._stream_stats = stream_stats

    def collect(self) -> Iterator[Any]:
        health = list(self._port.health())
        yield _build_info()
        yield from self._credentials()
        yield from self._engine()
        yield from self._mqtt(health)
        yield from self._deliveries(health)
        yield from self._consumers(health)
        from broker.sinks.deliveries import delivery_metrics

        yield from delivery_metrics(health)
        stats = self._stream_stats()
        yield _gauge("credbroker_sse_clients", "Connected Server-Sent Events clients.",
                     stats.clients)
        yield _counter(
            "credbroker_sse_coalesced_events",
            "Events a slow SSE client never received because newer ones replaced them.",
            stats.coalesced,
        )

    def _credentials(self) -> Iterator[Any]:
        now = self._port.clock()
        status = GaugeMetricFamily(
            "credbroker_credential_status",
            "1 for the credential's current status, 0 for the others.",
            labels=["credential", "status"],
        )
        left = GaugeMetricFamily(
            "credbroker_credential_expiry_seconds",
            "Seconds until the credential expires (negative once expired); absent when unknown.",
            labels=["credential"],
        )
        generation = GaugeMetricFamily(
            "credbroker_credential_generation",
            "Content generation of the credential (+1 on every change).",
            labels=["credential"],
        )
        expires = GaugeMetricFamily(
            "credbroker_credential_expiry_timestamp_seconds",
            "When the credential expires, in seconds since the epoch; absent when unknown.",
            labels=["credential"],
        )
        problems = GaugeMetricFamily(
            "credbroker_credential_problems",
            "Problems the broker reports for the credential.",
            labels=["credential"],
        )
        problem = GaugeMetricFamily(
            "credbroker_credential_problem",
            "1 for each problem (by code) the credential has now, e.g. refresh-failed.",
            labels=["credential", "code"],
        )
        behind = GaugeMetricFamily(
            "credbroker_credential_consumers_behind",
            "Consumers that report an older generation than the current one.",
            labels=["credential"],
        )
        for state in self._port.states():
            name = state.credential
            for value in Status:
                status.add_metric([name, value.value], 1.0 if state.status is value else 0.0)
            if state.expires_at is not None:
                left.add_metric([name], state.expires_at - now)
                expires.add_metric([name], state.expires_at)
            generation.add_metric([name], state.generation)
            problems.add_metric([name], len(state.problems))
            for code in sorted({p.code for p in state.problems}):
                problem.add_metric([name, code], 1.0)
            behind.add_metric([name], _consumers_behind(state))
        yield from (status, left, expires, generation, problems, problem, behind)

    def _engine(self) -> Iterator[Any]:
        engine = self._port.engine_health()
        files = GaugeMetricFamily(
            "credbroker_watched_files",
            "Credential files, by how changes to them are noticed.",
            labels=["method"],
        )
        files.add_metric(["inotify"], engine.inotify_files)
        files.add_metric(["polling"], engine.polled_files)
        yield files
        yield _gauge("credbroker_inotify_watches", "Directories watched with inotify.",
                     engine.inotify_watches)
        yield _counter("credbroker_watcher_errors", "Errors seen by the file watcher.",
                       engine.watcher_errors)
        yield _counter(
            "credbroker_read_faults",
            "Credential reads that failed for the broker's own reasons (out of file "
            "descriptors or memory); the last state is kept and the read retried.",
            engine.read_faults,
        )
        yield _counter("credbroker_inotify_overflows", "inotify queue overflows (each one "
                       "re-reads every watched file).", engine.inotify_overflows)
        yield _counter("credbroker_unrelated_events", "inotify events for names no credential "
                       "watches, dropped by the name filter.", engine.unrelated_events)
        yield _gauge(
            "credbroker_resync_duration_seconds",
            "How long the last resync (re-stat of every file) took.",
            engine.last_resync_seconds,
        )
        yield _gauge("credbroker_event_sequence", "The broker-wide event sequence number.",
                     engine.sequence)
        yield _gauge(
            "credbroker_state_store_healthy",
            "1 while state is persisted to state_dir, 0 when running from memory.",
            1.0 if engine.store_error is None else 0.0,
        )

    def _mqtt(self, health: Sequence[SinkHealth]) -> Iterator[Any]:
        mqtt = next((h for h in health if h.name == "mqtt"), None)
        yield _gauge("credbroker_mqtt_enabled", "1 when an [mqtt] section is configured.",
                     0.0 if mqtt is None else 1.0)
        if mqtt is None:
            return
        yield _gauge("credbroker_mqtt_connected", "1 while connected to the MQTT server.",
                     1.0 if mqtt.connected else 0.0)
        yield _gauge("credbroker_mqtt_buffered", "Events waiting for the MQTT server.",
                     mqtt.pending)
        yield _counter("credbroker_mqtt_connects", "Successful connections to the MQTT server.",
                       mqtt.counters.get("connects", 0))
        yield _counter("credbroker_mqtt_published", "Messages published to the MQTT server.",
                       mqtt.delivered)
        yield _counter("credbroker_mqtt_publish_failures", "Publishes that failed.",
                       mqtt.failures)

    def _consumers(self, health: Sequence[SinkHealth]) -> Iterator[Any]:
        tracker = self._port.consumers
        if tracker is None:
            return
        count = GaugeMetricFamily(
            "credbroker_consumers", "Consumers that reported which generation they use.",
            labels=["credential"],
        )
        lagging = GaugeMetricFamily(
            "credbroker_consumers_lagging",
            "Consumers lagging: an older generation lag_after after a refresh, or an "
            "expired/invalid one.",
            labels=["credential"],
        )
        oldest = GaugeMetricFamily(
            "credbroker_consumer_lag_seconds",
            "Seconds since the oldest lagging consumer reported the generation it holds; "
            "absent when none lags.",
            labels=["credential"],
        )
        for entry in tracker.stats():
            count.add_metric([entry.credential], entry.consumers)
            lagging.add_metric([entry.credential], entry.lagging)
            if entry.oldest_lag_seconds is not None:
                oldest.add_metric([entry.credential], entry.oldest_lag_seconds)
        yield from (count, lagging, oldest)
        reports = next((h for h in health if h.name == "consumer-reports"), None)
        if reports is not None:
            ignored = reports.counters
            family = CounterMetricFamily(
                "credbroker_consumer_reports_ignored",
                "MQTT consumer reports ignored, by why (unknown-credential, invalid-report, ...).",
                labels=["code"],
            )
            for code, value in sorted(ignored.items()):
                family.add_metric([code], value)
            yield family

    def _deliveries(self, health: Sequence[SinkHealth]) -> Iterator[Any]:
        delivered = CounterMetricFamily(
            "credbroker_sink_delivered_events",
            "Events each sink delivered (the other side accepted them).",
            labels=["sink"],
        )
        failures = CounterMetricFamily(
            "credbroker_sink_delivery_failures",
            "Delivery attempts that failed, by sink (retried with backoff).",
            labels=["sink"],
        )
        pending = GaugeMetricFamily(
            "credbroker_sink_pending_events",
            "Events a sink has taken from the bus and not delivered yet.",
            labels=["sink"],
        )
        for each in health:
            if each.delivers:
                delivered.add_metric([each.name], each.delivered)
                failures.add_metric([each.name], each.failures)
                pending.add_metric([each.name], each.pending)
        yield from (delivered, failures, pending)


def _consumers_behind(state: State) -> int:
    return sum(1 for c in state.consumers if c.generation < state.generation)


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("credbroker")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _build_info() -> Any:
    info = GaugeMetricFamily(
        "credbroker_build_info",
        "Always 1; the labels say which credbroker and Python serve these metrics.",
        labels=["version", "python"],
    )
    info.add_metric([_version(), platform.python_version()], 1.0)
    return info


def _gauge(name: str, help_text: str, value: float) -> Any:
    return GaugeMetricFamily(name, help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> Any:
    return CounterMetricFamily(name, help_text, value=value)

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
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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
from broker.core.state import Status

if TYPE_CHECKING:
    from broker.app import Broker

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
    """What a sink tells the metrics about its deliveries (read at scrape time)."""

    delivered: int  #: events (or messages) the other side accepted
    failures: int  #: attempts that failed and will be retried (or were given up)
    pending: int  #: events accepted from the bus but not delivered yet


@runtime_checkable
class Delivering(Protocol):
    """A sink that reports its deliveries: ``credbroker_sink_*{sink="<its name>"}``."""

    def delivery_stats(self) -> DeliveryStats: ...


class Metrics:
    """The metrics of one broker and its HTTP API, in a registry of their own.

    ``stream_stats`` is called at every scrape for the SSE gauges.
    """

    def __init__(self, broker: Broker, stream_stats: Callable[[], StreamStats]) -> None:
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
        self.registry.register(_LiveCollector(broker, stream_stats))
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
    """Reads the broker's current values at scrape time (a prometheus-client collector)."""

    def __init__(self, broker: Broker, stream_stats: Callable[[], StreamStats]) -> None:
        self._broker = broker
        self._stream_stats = stream_stats

    def collect(self) -> Iterator[Any]:
        yield _build_info()
        yield from self._credentials()
        yield from self._engine()
        yield from self._mqtt()
        yield from self._deliveries()
        yield from self._consumers()
        from broker.sinks.deliveries import delivery_metrics

        yield from delivery_metrics(self._broker.sinks)
        stats = self._stream_stats()
        yield _gauge("credbroker_sse_clients", "Connected Server-Sent Events clients.",
                     stats.clients)
        yield _counter(
            "credbroker_sse_coalesced_events",
            "Events a slow SSE client never received because newer ones replaced them.",
            stats.coalesced,
        )

    def _credentials(self) -> Iterator[Any]:
        now = time.time()
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
        for state in self._broker.states():
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
        engine = self._broker.engine
        watcher = engine.watcher
        paths = {str(p) for name in engine.names for p in engine.spec(name).files.values()}
        polled = len(paths & watcher.polled)
        files = GaugeMetricFamily(
            "credbroker_watched_files",
            "Credential files, by how changes to them are noticed.",
            labels=["method"],
        )
        files.add_metric(["inotify"], len(paths) - polled)
        files.add_metric(["polling"], polled)
        yield files
        yield _gauge("credbroker_inotify_watches", "Directories watched with inotify.",
                     watcher.watch_count)
        errors = getattr(watcher, "errors", None)
        if isinstance(errors, int):  # only once the watcher counts them
            yield _counter("credbroker_watcher_errors", "Errors seen by the file watcher.", errors)
        yield _counter(
            "credbroker_read_faults",
            "Credential reads that failed for the broker's own reasons (out of file "
            "descriptors or memory); the last state is kept and the read retried.",
            engine.read_faults,
        )
        yield _counter("credbroker_inotify_overflows", "inotify queue overflows (each one "
                       "re-reads every watched file).", watcher.overflows)
        yield _counter("credbroker_unrelated_events", "inotify events for names no credential "
                       "watches, dropped by the name filter.", watcher.unrelated_total)
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
            1.0 if self._broker.store.error is None else 0.0,
        )

    def _mqtt(self) -> Iterator[Any]:
        sink = self._broker.sinks.get("mqtt")
        yield _gauge("credbroker_mqtt_enabled", "1 when an [mqtt] section is configured.",
                     0.0 if sink is None else 1.0)
        if sink is None:
            return
        # The publisher is another component: read what it offers, never assume its shape.
        yield _gauge("credbroker_mqtt_connected", "1 while connected to the MQTT server.",
                     1.0 if getattr(sink, "state", None) == "connected" else 0.0)
        yield _gauge("credbroker_mqtt_buffered", "Events waiting for the MQTT server.",
                     _number(getattr(sink, "buffered", 0)))
        for attr, help_text in (
            ("connects", "Successful connections to the MQTT server."),
            ("published", "Messages published to the MQTT server."),
            ("publish_failures", "Publishes that failed."),
        ):
            yield _counter(f"credbroker_mqtt_{attr}", help_text, _number(getattr(sink, attr, 0)))


    def _consumers(self) -> Iterator[Any]:
        tracker = self._broker.sinks.get("consumers")
        stats = getattr(tracker, "stats", None)
        if stats is None:
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
        for entry in stats():
            count.add_metric([entry.credential], entry.consumers)
            lagging.add_metric([entry.credential], entry.lagging)
            if entry.oldest_lag_seconds is not None:
                oldest.add_metric([entry.credential], entry.oldest_lag_seconds)
        yield from (count, lagging, oldest)
        reports = self._broker.sinks.get("consumer-reports")
        ignored = getattr(getattr(reports, "log", None), "counts", None)
        if isinstance(ignored, dict):
            family = CounterMetricFamily(
                "credbroker_consumer_reports_ignored",
                "MQTT consumer reports ignored, by why (unknown-credential, invalid-report, ...).",
                labels=["code"],
            )
            for code, value in sorted(ignored.items()):
                family.add_metric([code], value)
            yield family

    def _deliveries(self) -> Iterator[Any]:
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
        for name, sink in self._broker.sinks.items():
            stats = _delivery_stats(sink)
            if stats is None:
                continue
            delivered.add_metric([name], stats.delivered)
            failures.add_metric([name], stats.failures)
            pending.add_metric([name], stats.pending)
        yield from (delivered, failures, pending)


def _delivery_stats(sink: object) -> DeliveryStats | None:
    if isinstance(sink, Delivering):
        return sink.delivery_stats()
    if getattr(sink, "name", None) == "mqtt":
        # The publisher's own counters (see MqttPublisher), until it reports DeliveryStats.
        return DeliveryStats(
            delivered=int(_number(getattr(sink, "published", 0))),
            failures=int(_number(getattr(sink, "publish_failures", 0))),
            pending=int(_number(getattr(sink, "buffered", 0))),
        )
    return None


def _consumers_behind(state: object) -> int:
    # ``consumers`` is new in the state document: dicts or objects with a generation.
    current = getattr(state, "generation", 0)
    count = 0
    for consumer in getattr(state, "consumers", None) or ():
        generation = (consumer.get("generation") if isinstance(consumer, Mapping)
                      else getattr(consumer, "generation", None))
        if isinstance(generation, int) and generation < current:
            count += 1
    return count


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


def _number(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(len(value))  # type: ignore[arg-type]  # a buffer given as a collection
    except TypeError:
        return 0.0


def _gauge(name: str, help_text: str, value: float) -> Any:
    return GaugeMetricFamily(name, help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> Any:
    return CounterMetricFamily(name, help_text, value=value)

"""``credbroker fleet``: every host's credentials, read from the retained MQTT messages.

It subscribes to ``<prefix>/+/status``, ``<prefix>/+/state/+`` and
``<prefix>/+/consumers/+/+``: the server answers with every retained message at once.
To know when that answer is complete without waiting on a timer, it then publishes a
*sentinel* (a non-retained message on a topic of its own, ``<prefix>/_fleet/<random>``,
which no host id can take: host ids never start with ``_``) and has subscribed to it
too; a server delivers a connection's messages in order, so once the sentinel is back,
every retained message sent before it is in. A quiet period (no message for ``QUIET``
seconds) and an overall bound stop the wait on servers that do not deliver the sentinel.

The view is a pure fold of messages (:class:`FleetView`); a consumer counts as lagging
when it reports an older generation ``--lag-after`` after the credential last changed, or
holds a generation that is expired or invalid (the rules of :mod:`broker.core.convergence`).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio
from aiomqtt import Client, MqttError, ProtocolVersion

from broker.aio.mqtt_material import connect_material, describe_connect_error
from broker.core.convergence import is_lagging
from broker.core.durations import format_duration
from broker.core.events import Event
from broker.core.state import Consumer, State, Status
from broker.core.timefmt import parse_time
from broker.core.topics import join_topic

HEALTHY = frozenset({Status.VALID, Status.EXPIRING})
#: No message for this long ends the collection (servers that lose the sentinel).
QUIET = 2.0
#: ``--watch`` redraws at most this often.
REDRAW_EVERY = 0.5
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


@dataclass(slots=True)
class HostView:
    """What the retained messages say about one host."""

    status: str | None = None
    states: dict[str, State] = field(default_factory=dict)
    #: Consumer reports on MQTT, per credential.
    reports: dict[str, dict[str, Consumer]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Row:
    """One credential of one host, as shown."""

    host: str
    host_status: str | None
    state: State
    consumers: tuple[Consumer, ...]
    lagging: tuple[Consumer, ...]

    def to_dict(self, now: float) -> dict[str, Any]:
        s = self.state
        return {
            "host": self.host,
            "host_status": self.host_status,
            "credential": s.credential,
            "status": s.status.value,
            "generation": s.generation,
            "sequence": s.sequence,
            "fingerprint": s.fingerprint,
            "expires_at": s.to_dict()["expires_at"],
            "expires_in": None if s.expires_at is None else round(s.expires_at - now, 3),
            "consumers": [c.to_dict() for c in self.consumers],
            "lagging": [c.id for c in self.lagging],
        }


class FleetView:
    """A fold of retained (and later live) messages under one topic prefix. No I/O."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.hosts: dict[str, HostView] = {}
        self.messages = 0
        self.ignored = 0

    def take(self, topic: str, payload: bytes, now: float) -> bool:
        """Apply one message; True if it changed what is shown."""
        self.messages += 1
        if not topic.startswith(self.prefix + "/"):
            return False
        parts = topic[len(self.prefix) + 1:].split("/")
        host = parts[0]
        try:
            if parts[1:] == ["status"]:
                return self._set_status(host, payload)
            if len(parts) == 3 and parts[1] == "state":
                return self._set_state(host, parts[2], payload)
            if len(parts) == 4 and parts[1] == "consumers":
                return self._set_report(host, parts[2], parts[3], payload, now)
        except (ValueError, KeyError, TypeError):
            self.ignored += 1
        return False

    def _set_status(self, host: str, payload: bytes) -> bool:
        if not payload:
            return False
        view = self.hosts.setdefault(host, HostView())
        status = payload.decode("utf-8", "replace")[:32]
        changed = view.status != status
        view.status = status
        return changed

    def _set_state(self, host: str, name: str, payload: bytes) -> bool:
        view = self.hosts.setdefault(host, HostView())
        if not payload:  # the credential was removed from that host's config
            return view.states.pop(name, None) is not None
        event = Event.from_json(payload)
        if event.subject != name:
            raise ValueError("state topic and subject differ")
        old = view.states.get(name)
        if old is not None and old.sequence > event.data.sequence:
            return False  # an older retained copy arriving late (a bridge)
        view.states[name] = event.data
        return True

    def _set_report(
        self, host: str, name: str, consumer_id: str, payload: bytes, now: float
    ) -> bool:
        reports = self.hosts.setdefault(host, HostView()).reports.setdefault(name, {})
        if not payload:
            return reports.pop(consumer_id, None) is not None
        doc = json.loads(payload)
        generation = doc["generation"]
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise ValueError("generation is not an integer")
        when = doc.get("time")
        since = parse_time(when) if isinstance(when, str) else now
        reports[consumer_id] = Consumer(
            consumer_id, generation, str(doc.get("fingerprint")), since, "mqtt", seen=since
        )
        return True

    def rows(self, *, lag_after: float, now: float) -> list[Row]:
        """Every host's credentials, by host then credential."""
        out = []
        for host in sorted(self.hosts):
            view = self.hosts[host]
            for name in sorted(view.states):
                state = view.states[name]
                merged = {c.id: c for c in state.consumers}
                merged.update(view.reports.get(name, {}))
                consumers = tuple(merged[i] for i in sorted(merged))
                lagging = tuple(
                    c for c in consumers if is_lagging(c, state, None, lag_after, now)
                )
                out.append(Row(host, view.status, state, consumers, lagging))
        return out


def healthy(rows: Iterable[Row]) -> bool:
    """The exit-code rule: at least one credential, and every one valid or expiring."""
    rows = list(rows)
    return bool(rows) and all(r.state.status in HEALTHY for r in rows)


def print_fleet(rows: list[Row], out: TextIO, now: float) -> None:
    """The human table: one line per host and credential."""
    table = [("HOST", "CREDENTIAL", "STATUS", "EXPIRES IN", "GEN", "CONSUMERS", "LAGGING")]
    for r in rows:
        s = r.state
        host = r.host if r.host_status in (None, "online") else f"{r.host} ({r.host_status})"
        table.append((
            host,
            s.credential,
            s.status.value,
            "-" if s.expires_at is None else format_duration(s.expires_at - now),
            str(s.generation),
            str(len(r.consumers)),
            ",".join(c.id for c in r.lagging) or "-",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    hosts = len({r.host for r in rows})
    bad = sum(1 for r in rows if r.state.status not in HEALTHY)
    lagging = sum(len(r.lagging) for r in rows)
    print(f"{hosts} hosts, {len(rows)} credentials, {bad} not valid/expiring, "
          f"{lagging} lagging consumers", file=out)


def fleet_document(rows: list[Row], now: float) -> dict[str, Any]:
    """The ``--json`` document."""
    return {"hosts": len({r.host for r in rows}), "credentials": [r.to_dict(now) for r in rows]}


# -- I/O ---------------------------------------------------------------------------------------


def cmd_fleet(args: argparse.Namespace) -> int:
    """``credbroker fleet``: exit 0 when every credential is valid/expiring, 1 otherwise."""
    from pydantic import ValidationError

    from broker.config import MqttSettings
    from broker.core.durations import parse_duration

    try:
        settings = MqttSettings(
            url=args.mqtt, topic_prefix=args.prefix, username=args.username,
            password_file=args.password_file, ca_file=args.ca_file,
        )
        lag_after = parse_duration(args.lag_after)
        timeout = parse_duration(args.timeout)
    except (ValidationError, ValueError) as exc:
        message = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        print(f"credbroker fleet: {message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return anyio.run(_fleet, settings, args, lag_after, timeout)
    except (MqttError, OSError, TimeoutError) as exc:
        print(f"credbroker fleet: {settings.host}:{settings.port} unreachable: "
              f"{describe_connect_error(exc)}", file=sys.stderr)
        return EXIT_PROBLEM


async def _fleet(
    settings: Any, args: argparse.Namespace, lag_after: float, collect_for: float
) -> int:
    password, context = await connect_material(
        settings.password_file, settings.tls, settings.ca_file, None, None
    )
    prefix = settings.topic_prefix
    sentinel = join_topic(prefix, "_fleet", secrets.token_hex(8))
    view = FleetView(prefix)
    started = time.monotonic()
    async with Client(
        settings.host, settings.port, username=settings.username, password=password,
        tls_context=context, protocol=ProtocolVersion.V311, timeout=10,
    ) as client:
        for topic in (
            sentinel,
            join_topic(prefix, "+", "status", wildcards=True),
            join_topic(prefix, "+", "state", "+", wildcards=True),
            join_topic(prefix, "+", "consumers", "+", "+", wildcards=True),
        ):
            await client.subscribe(topic, qos=1)
        await client.publish(sentinel, b"", qos=1)
        messages = client.messages
        with anyio.move_on_after(collect_for):
            while True:
                with anyio.move_on_after(QUIET) as quiet:
                    message = await anext(messages)
                if quiet.cancelled_caught:
                    break
                if message.topic.value == sentinel:
                    break
                view.take(message.topic.value, _bytes(message.payload), time.time())
        collected = time.monotonic() - started
        now = time.time()
        rows = view.rows(lag_after=lag_after, now=now)
        _show(rows, args, now)
        if not args.json:
            print(f"({view.messages} retained messages in {collected:.2f}s)", file=sys.stderr)
        if not args.watch:
            return EXIT_OK if healthy(rows) else EXIT_PROBLEM
        last = time.monotonic()
        pending = False
        while True:
            with anyio.move_on_after(REDRAW_EVERY if pending else 3600):
                message = await anext(messages)
                if message.topic.value != sentinel:
                    pending |= view.take(message.topic.value, _bytes(message.payload), time.time())
            if pending and time.monotonic() - last >= REDRAW_EVERY:
                now = time.time()
                if not args.json and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                _show(view.rows(lag_after=lag_after, now=now), args, now)
                last, pending = time.monotonic(), False


def _show(rows: list[Row], args: argparse.Namespace, now: float) -> None:
    if args.json:
        print(json.dumps(fleet_document(rows, now), separators=(",", ":")), flush=True)
    else:
        print_fleet(rows, sys.stdout, now)
        sys.stdout.flush()


def _bytes(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    return b"" if payload is None else str(payload).encode()

"""What every action and webhook last did: for ``credbroker check``, ``/v1/deliveries``, metrics.

The running sinks keep an :class:`Outcome` each and write them, at most once a second, to
``deliveries-<sink>.json`` in ``state_dir`` (so that ``credbroker check``, which runs
without the daemon, can show them). Outcomes hold reasons, never secret bytes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from broker.aio.atomicfile import atomic_write
from broker.aio.wakeup import Wakeup
from broker.core.events import encode
from broker.core.outcome import Outcome

if TYPE_CHECKING:
    from broker.config import Config
    from broker.port import SinkHealth

__all__ = [
    "Outcome",
    "OutcomeFile",
    "configured_outcomes",
    "delivery_metrics",
    "outcomes_of",
    "print_outcomes",
    "read_outcomes",
]

#: The sinks that keep outcomes, by their names in ``Broker.sinks``.
SINKS = ("actions", "webhooks")
#: Outcome files are rewritten at most this often.
WRITE_INTERVAL = 1.0


class OutcomeFile:
    """Writes a sink's outcomes to ``state_dir`` whenever they changed, at most once a second."""

    def __init__(self, state_dir: Path, sink: str, outcomes: Callable[[], list[Outcome]]) -> None:
        self.path = state_dir / f"deliveries-{sink}.json"
        self._outcomes = outcomes
        self._dirty = Wakeup()

    def changed(self) -> None:
        self._dirty.poke()

    async def run(self) -> None:
        """Write on change until cancelled; a last write on the way out."""
        try:
            while True:
                await self._dirty.wait()
                await anyio.to_thread.run_sync(self._write)
                await anyio.sleep(WRITE_INTERVAL)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._write)

    def _write(self) -> None:
        doc = {"deliveries": [o.to_dict() for o in self._outcomes()]}
        # Best effort: the state dir's trouble is reported by the store.
        with contextlib.suppress(OSError):
            atomic_write(self.path, encode(doc))


def read_outcomes(state_dir: Path) -> list[dict[str, Any]]:
    """What the daemon last wrote (read-only, tolerant: unreadable files are skipped)."""
    found: list[dict[str, Any]] = []
    for sink in SINKS:
        try:
            doc = json.loads((state_dir / f"deliveries-{sink}.json").read_bytes())
            found.extend(d for d in doc["deliveries"] if isinstance(d, dict))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def configured_outcomes(config: Config) -> list[dict[str, Any]]:
    """One entry per configured action and webhook: what the daemon last wrote, or never ran."""
    last = {(d.get("kind"), d.get("name")): d for d in read_outcomes(config.broker.state_dir)}
    wanted = [("action", a.name) for a in config.actions]
    wanted += [("webhook", w.name) for w in config.webhooks]
    return [last.get(key) or Outcome(*key).to_dict() for key in wanted]


def print_outcomes(outcomes: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    """The human lines of ``check``: one per action and webhook, with its last outcome."""
    if not outcomes:
        return
    out.write("\n")
    width = max(len(f"{o['kind']} {o['name']}") for o in outcomes)
    for o in outcomes:
        label = f"{o['kind']} {o['name']}".ljust(width)
        if o.get("last_ok") is None:
            said = "no run yet"
        else:
            said = ("ok" if o["last_ok"] else "FAILED") + f" at {o.get('last_at')}"
            if o.get("last_reason"):
                said += f": {o['last_reason']}"
        if o.get("kind") == "webhook":
            said += f" (pending {o.get('pending', 0)}, retrying {o.get('retrying', 0)})"
        out.write(f"{label}  {said}\n")


def outcomes_of(health: Iterable[SinkHealth]) -> list[Outcome]:
    """Every action's and webhook's last outcome, from the running sinks' health
    (``port.health()``), actions first."""
    by_name = {h.name: h for h in health}
    return [o for key in SINKS if key in by_name for o in by_name[key].outcomes]


def delivery_metrics(health: Iterable[SinkHealth]) -> Iterator[Any]:
    """Prometheus families per action and webhook (read at scrape time)."""
    outcomes = outcomes_of(health)
    if not outcomes:
        return
    runs = CounterMetricFamily(
        "credbroker_delivery_attempts", "Action runs and webhook requests.", labels=["kind", "name"]
    )
    failed = CounterMetricFamily(
        "credbroker_delivery_failures",
        "Failed action runs and webhook requests.",
        labels=["kind", "name"],
    )
    delivered = CounterMetricFamily(
        "credbroker_webhook_delivered", "Events a webhook accepted (2xx).", labels=["name"]
    )
    retrying = GaugeMetricFamily(
        "credbroker_webhook_retrying",
        "Credentials whose next event waits for a retry.",
        labels=["name"],
    )
    pending = GaugeMetricFamily(
        "credbroker_webhook_pending", "Events in the webhook's outbox.", labels=["name"]
    )
    oldest = GaugeMetricFamily(
        "credbroker_webhook_oldest_undelivered_seconds",
        "Age of the oldest event not yet delivered (0 when none).",
        labels=["name"],
    )
    for o in outcomes:
        runs.add_metric([o.kind, o.name], o.runs)
        failed.add_metric([o.kind, o.name], o.failures)
        if o.kind == "webhook":
            delivered.add_metric([o.name], o.extra.get("delivered", 0))
            retrying.add_metric([o.name], o.extra.get("retrying", 0))
            pending.add_metric([o.name], o.extra.get("pending", 0))
            oldest.add_metric([o.name], o.extra.get("oldest_undelivered_seconds", 0.0))
    yield from (runs, failed, delivered, retrying, pending, oldest)

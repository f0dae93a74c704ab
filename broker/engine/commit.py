"""Committing transitions: number their events, persist the states, then publish.

The order is the guarantee: an event is on disk before any consumer hears of it, so a
restart never publishes a number twice or forgets a state a consumer already acted on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from broker.core.events import Event, IdFactory, make_event
from broker.core.machine import Transition
from broker.core.state import State
from broker.engine.bus import Bus
from broker.engine.reader import CredentialRead
from broker.engine.store import Store
from broker.engine.tracking import CredentialTable

__all__ = ["Committer", "Result"]

event_log = logging.getLogger("broker.events")


@dataclass(frozen=True, slots=True)
class Result:
    """One credential's transition to commit, and the read it came from (``None``: a tick)."""

    read: CredentialRead | None
    transition: Transition


class Committer:
    """Owns the broker-wide sequence counter; publishes to the bus, persists to the store."""

    def __init__(
        self,
        *,
        bus: Bus,
        store: Store,
        source: str,
        sequence: int,
        clock: Callable[[], float],
        new_id: IdFactory,
        shown: Callable[[State], State],
    ) -> None:
        self._bus = bus
        self._store = store
        self._source = source
        self._clock = clock
        self._new_id = new_id
        # A state as published: with who reported using it.
        self._shown = shown
        self.sequence = sequence

    async def commit(
        self, table: CredentialTable, results: Mapping[str, Result], *,
        yield_every: int | None = None,
    ) -> None:
        """Set each credential's new state, number its events, persist, then publish.

        ``yield_every`` (start-up's passes): the event loop is given back every so many
        events published, so that the MQTT sink sends meanwhile. Not otherwise: each turn
        wakes every subscriber for a few events, and 1,000 bus subscribers took 3.5 s
        instead of 1.4 s to get a mass rotation's events that way.
        The caller holds the engine's lock."""
        events: list[tuple[str, State]] = []
        changed: list[State] = []
        now = self._clock()
        for name, result in results.items():
            tracked = table[name]
            tr = result.transition
            if result.read is not None:
                tracked.signatures = dict(result.read.signatures)
                tracked.settings_in_use = result.read.spec
            before, state = tracked.state, tr.state
            for event_type, event_state in tr.events:
                self.sequence += 1
                numbered = event_state.with_sequence(self.sequence)
                events.append((event_type, numbered))
                state = (
                    numbered if event_state is tr.state else state.with_sequence(self.sequence)
                )
            tracked.state = state
            # Problems can change without an event (a refresh that now works, a validator
            # reachable again): persist those too, so `credbroker check` never reads stale ones.
            if tr.events or (before is not None and before.problems != state.problems):
                changed.append(state)
        if changed:
            # A state document is made once for the journal and the event's payload alike
            # (when the event's state is the credential's new state, as it mostly is).
            documents: list[dict[str, Any] | None] = []
            journalled: dict[str, dict[str, Any]] = {}
            for _, numbered in events:
                document = None
                if table[numbered.credential].state is numbered:
                    document = journalled[numbered.credential] = numbered.to_dict()
                documents.append(document)
            # The numbers are taken: a caller cancelled now (an HTTP client gone) must not
            # leave them recorded but unpublished.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    self._store.record, changed, self.sequence, table.states, journalled
                )
                published = zip(events, documents, strict=True)
                for index, ((event_type, numbered), document) in enumerate(published, 1):
                    if yield_every and index % yield_every == 0:
                        await anyio.lowlevel.checkpoint()
                    shown = self._shown(numbered)
                    event = make_event(
                        event_type, shown, source=self._source, now=now, id=self._new_id(),
                        document=document if shown is numbered else None,
                    )
                    _log_event(event)
                    self._bus.publish(event)

    def flush(self, table: CredentialTable) -> None:
        """Write a full snapshot of the store (clean shutdown; blocking)."""
        self._store.flush(table.states(), self.sequence)


def _log_event(event: Event) -> None:
    if not event_log.isEnabledFor(logging.INFO):
        return
    state = event.data
    event_log.info(
        event.type,
        extra={
            "credential": event.subject,
            "status": state.status.value,
            "generation": state.generation,
            "sequence": state.sequence,
            "fingerprint": state.fingerprint,
            "reason": state.reason,
            "event_id": event.id,  # the CloudEvent id: find this line from a consumer's event
        },
    )

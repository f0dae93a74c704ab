"""What the publisher's retained state topics hold (``<prefix>/<host_id>/state/<credential>``),
and what the current connection still owes them.

Each credential's topic holds its latest event. A credential with no event yet (a restarted
broker whose credentials did not change publishes none, and the MQTT server may have lost its
retained messages) gets one made up from its state, so that every connect republishes them
all. A credential removed from the config gets its topic cleared (SPEC section 4: an empty
retained message) until the server acknowledged the clearing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from broker.core.events import EVENT_FOR_STATUS, Event, make_event, payload_of, without_payload
from broker.core.state import State

__all__ = ["RetainedStates"]

class RetainedStates:
    """The latest event of each credential, and per connection which topics are up to date.

    ``state(name)`` is the broker's current state of a credential (``KeyError`` if unknown),
    ``source`` the events' CloudEvents source and ``clock`` the wall clock, for the events
    made up from a state.
    """

    def __init__(
        self, state: Callable[[str], State], *, source: str, clock: Callable[[], float]
    ) -> None:
        self._state = state
        self._source = source
        self._clock = clock
        #: The latest event of each credential: what goes retained on its state topic. Once
        #: sent, kept without its encoded payload (10,000 of them held 6 MB); :meth:`payload`
        #: encodes it again for the next connection.
        self.latest: dict[str, Event] = {}
        #: Per connection: the event id last sent on each state topic.
        self.sent: dict[str, str] = {}
        #: Removed credentials whose retained state topic is still to be cleared on this
        #: connection; refilled from the broker's removed credentials at every connect.
        self.to_clear: set[str] = set()
        #: Clearings in flight on this connection (sent, not yet acknowledged).
        self.clearing: set[str] = set()
        #: Added credentials whose retained state is to be published once they have one.
        self.resync: set[str] = set()

    def __repr__(self) -> str:
        return f"RetainedStates(latest={len(self.latest)}, to_clear={len(self.to_clear)})"

    def take(self, event: Event) -> None:
        """``event`` is its credential's latest."""
        self.latest[event.subject] = event

    def connected(self) -> None:
        """A new connection: what the server retains is unknown, every state is owed again."""
        self.sent.clear()

    def to_clear_now(self, removed: Iterable[str]) -> None:
        """The topics this connection is to clear: those of the ``removed`` credentials."""
        self.to_clear = set(removed)
        self.clearing.clear()  # in flight on a connection that is gone

    def owed(self, event: Event) -> bool:
        """True if ``event`` is its credential's latest and not yet sent on this connection."""
        latest = self.latest.get(event.subject)
        # By id: the latest may be the same event kept without its payload.
        return (
            latest is not None
            and latest.id == event.id
            and self.sent.get(event.subject) != event.id
        )

    def unsent(self) -> list[Event]:
        """The latest events not sent on this connection (a state publish cut short)."""
        return [e for e in self.latest.values() if self.sent.get(e.subject) != e.id]

    def sending(self, event: Event) -> None:
        """``event`` goes out on its state topic on this connection."""
        # Marked when sent, not when acknowledged: it is in flight on this connection, and a
        # connection that drops forgets every mark (the next one republishes every state).
        self.sent[event.subject] = event.id
        latest = self.latest.get(event.subject)
        if latest is not None and latest.id == event.id and latest.payload:
            # The publish has its bytes: what stays is kept without them.
            self.latest[event.subject] = without_payload(latest)

    @staticmethod
    def payload(event: Event) -> bytes:
        """What goes retained for ``event``: its payload, encoded again if not kept."""
        return payload_of(event)

    def clearing_started(self, name: str) -> None:
        """The empty retained message clearing ``name``'s topic goes out."""
        self.clearing.add(name)
        self.sent.pop(name, None)

    def cleared(self, name: str) -> None:
        """The server acknowledged the clearing of ``name``'s topic."""
        self.to_clear.discard(name)
        self.clearing.discard(name)

    def reconfigured(self, removed: Iterable[str], added: Iterable[str]) -> None:
        """A reload: removed credentials' topics are to be cleared, added ones' published."""
        for name in removed:
            self.latest.pop(name, None)
            self.to_clear.add(name)
        for name in added:
            self.to_clear.discard(name)
            self.resync.add(name)

    def latest_of(self, name: str) -> Event | None:
        """The latest event of ``name``, made up from its state if it has none yet."""
        event = self.latest.get(name)
        if event is None:
            try:
                state = self._state(name)
            except KeyError:
                return None
            event = self._made_up(state)
        return event

    def all_latest(self, states: Iterable[State]) -> list[Event]:
        """The latest event of every credential in ``states`` (the configured ones), made up
        from its state if it has none; forgets credentials no longer configured."""
        states = list(states)
        names = {s.credential for s in states}
        for gone in [n for n in self.latest if n not in names]:
            del self.latest[gone]  # removed by a reload
        events: list[Event] = []
        for state in states:
            event = self.latest.get(state.credential)
            events.append(event if event is not None else self._made_up(state))
        return events

    def _made_up(self, state: State) -> Event:
        # Without its payload: a connect makes one for every credential at once (10,000
        # payloads held until the last was sent); each is encoded as it is sent.
        event = make_event(
            EVENT_FOR_STATUS[state.status], state, source=self._source, now=self._clock(),
            encoded=False,
        )
        self.latest[state.credential] = event
        return event

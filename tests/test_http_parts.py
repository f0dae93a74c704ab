"""The HTTP API's parts without a server: the replay ring, SSE frames, the deliveries list."""

from __future__ import annotations

import json
from dataclasses import replace

from broker.core.events import Event, make_event
from broker.core.outcome import Outcome
from broker.core.state import State, Status
from broker.engine.bus import Bus, Subscription
from broker.port import SinkHealth
from broker.sinks.http.replay import ReplayRing, frame
from broker.sinks.http.routes import outcomes_in

SOURCE = "urn:credbroker:test"


class FakePort:
    """The part of the port the ring uses: a bus, a sequence, a source and a clock."""

    def __init__(self) -> None:
        self.bus = Bus()
        self.sequence = 0
        self.source = SOURCE

    def clock(self) -> float:
        return 1_764_093_601.0

    def subscribe(
        self, pattern: str = "*", *, credential: str | None = None, buffer: int = 256
    ) -> Subscription:
        return self.bus.subscribe(pattern, credential=credential, buffer=buffer)

    def publish(self, credential: str = "svc") -> Event:
        self.sequence += 1
        state = State(credential=credential, status=Status.VALID, sequence=self.sequence)
        event = make_event("credentials.changed", state, source=SOURCE, now=self.clock())
        self.bus.publish(event)
        return event


def test_the_ring_replays_what_it_holds_and_resets_what_it_lost() -> None:
    port = FakePort()
    seen: list[Event] = []
    ring = ReplayRing(port, 4, observe=seen.append)  # type: ignore[arg-type]
    events = []
    for _ in range(6):  # one at a time, as the ring's follower takes them
        events.append(port.publish())
        ring.sync()
    assert [e.sequence for e in seen] == [e.sequence for e in events]
    sub = port.subscribe()
    # The last four are kept: after 2, the ring vouches for 3 to 6.
    replay, last = ring.replay(sub, 2)
    assert last == 6
    assert replay == b"".join(frame(e) for e in events[2:])
    # After 1, event 2 is gone: a reset, numbered with the latest id.
    replay, last = ring.replay(sub, 1)
    assert last == 6 and replay.startswith(b"id: 6\nevent: reset\ndata: ")
    reset = json.loads(replay.split(b"data: ", 1)[1])
    assert reset["data"]["oldest"] == 2 and reset["data"]["requested"] == 1
    assert reset["source"] == SOURCE
    # Newer than anything published: the broker's state was reset.
    replay, last = ring.replay(sub, 99)
    assert b"event: reset" in replay and b"newer than the broker" in replay
    # No position: nothing to replay, and the stream starts after the newest.
    assert ring.replay(sub, None) == (b"", 6)
    ring.close()
    sub.close()


def test_a_burst_the_ring_could_not_take_leaves_only_what_comes_next() -> None:
    port = FakePort()
    ring = ReplayRing(port, 4, observe=lambda _: None)  # type: ignore[arg-type]
    for _ in range(6):  # more than the ring's own mailbox holds, between two reads
        port.publish()
    ring.sync()
    sub = port.subscribe()
    replay, last = ring.replay(sub, 5)  # the ring has holes up to the burst's end
    assert b"event: reset" in replay and last == 6
    newer = port.publish()
    ring.sync()
    assert ring.replay(sub, 6) == (frame(newer), 7)
    ring.close()
    sub.close()


def test_a_frame_keeps_a_payload_with_line_breaks_in_data_lines() -> None:
    port = FakePort()
    event = port.publish()
    odd = replace(event, payload=b'{"a":\r\n1,\r"b":\n2}')
    assert frame(odd) == (b"id: 1\nevent: credentials.changed\n"
                          b'data: {"a":\ndata: 1,\ndata: "b":\ndata: 2}\n\n')


def test_deliveries_list_actions_then_webhooks_from_the_sinks_health() -> None:
    hook, act = Outcome("webhook", "ops"), Outcome("action", "reload")
    health = [
        SinkHealth(name="webhooks", outcomes=(hook,)),
        SinkHealth(name="mqtt", connected=True),
        SinkHealth(name="actions", outcomes=(act,)),
    ]
    assert outcomes_in(health) == [act, hook]
    assert outcomes_in([]) == []

"""The in-process bus: filtering, ordering, coalescing, shutdown."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.app import Broker
from broker.core.events import Event, make_event, payload_of
from broker.core.state import State, Status
from broker.engine.bus import Bus
from tests.conftest import make_config, write_atomic


def event(credential: str, sequence: int, kind: str = "credentials.refreshed") -> Event:
    state = State(credential, Status.VALID, generation=sequence, sequence=sequence)
    return make_event(kind, state, source="urn:credbroker:t", now=0)


def test_pattern_and_credential_filters() -> None:
    bus = Bus()
    everything = bus.subscribe("*")
    refreshed = bus.subscribe("credentials.refreshed")
    only_a = bus.subscribe("credentials.*", credential="a")
    bus.publish(event("a", 1))
    bus.publish(event("b", 2, "credentials.expired"))
    assert [e.sequence for e in iter(everything.get_nowait, None)] == [1, 2]
    assert [e.sequence for e in iter(refreshed.get_nowait, None)] == [1]
    assert [e.sequence for e in iter(only_a.get_nowait, None)] == [1]


def test_a_subscriber_without_payloads_gets_the_same_events_and_holds_no_payload() -> None:
    bus = Bus()
    full = bus.subscribe("*")
    light = bus.subscribe("*", payloads=False)
    published = [event(f"c{i}", i + 1) for i in range(50)]
    for e in published:
        bus.publish(e)
    got_full = list(iter(full.get_nowait, None))
    got_light = list(iter(light.get_nowait, None))
    assert got_full == published == got_light  # the same events, field by field
    assert all(e.payload for e in got_full)
    assert not any(e.payload for e in got_light)  # nothing encoded held while queued
    # Encoded again when needed: the same bytes, the same id.
    assert [payload_of(e) for e in got_light] == [e.payload for e in published]


@pytest.mark.anyio
async def test_the_consumer_tracker_queues_events_without_payloads(tmp_path: Path) -> None:
    # The tracker follows the bus only once start-up is done: every first-sight event waits
    # in its queue meanwhile (one per credential), so it must not hold their encoded JSON.
    config = make_config(tmp_path, [
        {"name": f"c{i}", "files": {"token": str(tmp_path / f"t{i}")}} for i in range(3)
    ], http={"listen": "127.0.0.1:0"})
    for i in range(3):
        write_atomic(tmp_path / f"t{i}", f"secret-value-{i}")
    async with Broker(config) as broker:
        tracker = broker.consumers
        assert tracker is not None
        published = event("c0", 99)
        assert published.payload
        broker.bus.publish(published)
        # Offered synchronously: it is in the tracker's queue now, as the tracker holds it.
        queued = tracker._subscription._queue[-1]
        assert queued == published and queued.id == published.id
        assert not queued.payload


def test_closed_subscription_is_removed() -> None:
    bus = Bus()
    sub = bus.subscribe()
    assert bus.subscriber_count == 1
    sub.close()
    assert bus.subscriber_count == 0
    bus.publish(event("a", 1))
    assert sub.get_nowait() is None


@pytest.mark.anyio
async def test_iteration_ends_when_the_bus_closes() -> None:
    bus = Bus()
    received: list[int] = []

    async def consume() -> None:
        async with bus.subscribe() as events:
            async for e in events:
                received.append(e.sequence)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            bus.publish(event("a", 1))
            bus.publish(event("a", 2))
            await anyio.wait_all_tasks_blocked()
            bus.close()
    assert received == [1, 2]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8), st.lists(st.sampled_from("abcdefghij"), max_size=200))
def test_full_buffer_coalesces_but_keeps_the_latest_of_every_credential(
    buffer: int, credentials: list[str]
) -> None:
    bus = Bus()
    slow = bus.subscribe(buffer=buffer)
    published = [event(c, i + 1) for i, c in enumerate(credentials)]
    for e in published:
        bus.publish(e)
    got = list(iter(slow.get_nowait, None))
    # Bounded: never more than the buffer or (if more credentials than that) two per credential.
    assert len(got) <= max(buffer, 2 * len(set(credentials))) + 1
    # Per credential, in sequence order, nothing invented.
    for c in set(credentials):
        seqs = [e.sequence for e in got if e.subject == c]
        assert seqs == sorted(seqs)
    # The latest event of every credential is there.
    latest = {e.subject: e.sequence for e in published}
    assert {e.subject: e.sequence for e in got} == latest
    assert slow.coalesced == len(published) - len(got)

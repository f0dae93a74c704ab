"""Removed credentials: their retained MQTT state is cleared (on reload and at the next
start), and their generation and fingerprint are kept as bounded tombstones, so re-adding
unchanged content is silent and generations never go backwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.core.topics import Topics
from broker.engine.store import MAX_TOMBSTONES, Loaded, Store
from tests.conftest import SecretRegistry, make_config, write_atomic
from tests.mosquitto import (
    Mosquitto,
    Subscriber,
    mosquitto_server_fixture,  # noqa: F401 - fixture "mosquitto_server"
)
from tests.test_mqtt import HOST, has_states, new_prefix, token_cred, token_path

pytestmark = pytest.mark.anyio


async def _generation(h: Any, name: str, generation: int) -> None:
    while (await h.next(name)).data.generation != generation:
        pass


def _fence(tmp_path: Path) -> dict[str, Any]:
    return {"name": "fence", "files": {"token": str(tmp_path / "fence" / "token")}}


async def test_reload_clears_the_retained_state_and_re_adding_is_silent(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc, gone = token_cred(tmp_path, "svc", secrets), token_cred(tmp_path, "gone", secrets)
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    async with harness_factory([svc, gone], mqtt=mqtt) as h, \
            Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as live:
        write_atomic(token_path(gone), secrets.token("gone"))
        await _generation(h, "gone", 2)
        await live.wait_for(has_states(topics, ["svc", "gone", "fence"]))

        await h.broker.reload(make_config(tmp_path, [svc, _fence(tmp_path)], mqtt=mqtt))
        await live.wait_for(lambda ms: any(m.topic == topics.state("gone") and not m.payload
                                           for m in ms))
        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as late:
            await late.wait_for(has_states(topics, ["svc", "fence"]))
            assert late.on(topics.state("gone")) == []  # nothing retained any more

        # Re-added with the content it had: no event, and generation 2, not 1.
        h.seen.clear()
        await h.broker.reload(make_config(tmp_path, [svc, gone, _fence(tmp_path)], mqtt=mqtt))
        await h.fence()
        assert h.types("gone") == []
        assert h.broker.state("gone").generation == 2
        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as again:
            await again.wait_for(has_states(topics, ["svc", "gone", "fence"]))
        # Re-added with new content: the generation moves on from 2.
        write_atomic(token_path(gone), secrets.token("gone"))
        event = await h.next("gone")
        assert (event.type, event.data.generation) == ("credentials.refreshed", 3)
        # (the line above also proves no transient event came between: the next one is it)


async def test_a_restart_without_it_clears_it_and_a_restart_with_it_resumes(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = new_prefix()
    topics = Topics(prefix, HOST)
    svc, gone = token_cred(tmp_path, "svc", secrets), token_cred(tmp_path, "gone", secrets)
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    async with harness_factory([svc, gone], mqtt=mqtt) as h:
        write_atomic(token_path(gone), secrets.token("gone"))
        await _generation(h, "gone", 2)
        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub:
            await sub.wait_for(lambda ms: any(
                m.topic == topics.state("gone") and b'"generation":2' in m.payload for m in ms))
    async with harness_factory([svc], mqtt=mqtt) as h:
        await h.fence()
        async with Subscriber(mosquitto_server.port, [f"{prefix}/#"], secrets) as sub:
            await sub.wait_for(has_states(topics, ["svc", "fence"]))
            await anyio.sleep(0.2)  # retained messages arrive together; give stragglers a moment
            assert sub.on(topics.state("gone")) == []
    async with harness_factory([svc, gone], mqtt=mqtt) as h:
        await h.fence()
        assert h.types("gone") == []  # unchanged content: silent
        assert h.broker.state("gone").generation == 2


def test_tombstones_are_bounded_and_survive_a_restart(tmp_path: Path) -> None:
    from broker.core.state import State, Status

    store = Store(tmp_path / "state")
    store.prepare()
    store.bury(State(f"c{i}", Status.VALID, generation=i + 1, fingerprint=f"fp{i}")
               for i in range(MAX_TOMBSTONES + 10))
    again = Store(tmp_path / "state")
    loaded = Loaded()
    again.reconcile(loaded, ["c5000", f"c{MAX_TOMBSTONES + 9}"])
    assert len(again.tombstones) == MAX_TOMBSTONES - 1
    assert "c0" not in again.tombstones  # the oldest went first
    assert loaded.states[f"c{MAX_TOMBSTONES + 9}"].generation == MAX_TOMBSTONES + 10

"""`broker.client` pieces: the cache's race check, invalidates, gap healing, consumer reports."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.client import BrokerClient, CredentialCache, GenerationGate, invalidates
from broker.core.backoff import Backoff
from broker.core.events import Event, make_event
from broker.core.state import FileInfo, State, Status
from tests.client_daemon import Daemon
from tests.conftest import SecretRegistry, write_atomic
from tests.mosquitto import (
    Mosquitto,
    Subscriber,
    mosquitto_fixture,  # noqa: F401 - fixture "mosquitto"
    mosquitto_server_fixture,  # noqa: F401 - fixture "mosquitto_server"
)

pytestmark = pytest.mark.anyio
WAIT = 15.0
SOURCE = "urn:credbroker:unit"
FAST_RETRIES = (0.001,) * 10


def announce(path: Path, generation: int, sequence: int | None = None,
             name: str = "svc") -> Event:
    """The event a broker publishes for ``path``'s current content."""
    st = path.stat()
    state = State(credential=name, status=Status.VALID, generation=generation,
                  sequence=generation if sequence is None else sequence,
                  fingerprint=f"hmac-sha256:{generation:016x}",
                  files=(FileInfo("token", str(path), True, st.st_size, st.st_mtime,
                                  st.st_mode),))
    return make_event("credentials.refreshed", state, source=SOURCE, now=time.time())


async def test_a_load_that_races_the_next_writer_is_retried_never_cached(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    token = secrets.token()
    write_atomic(path, token)
    event = announce(path, 1)
    mtime_ns = path.stat().st_mtime_ns
    reads: list[str] = []

    def restore() -> None:
        # The file is as announced again (same bytes, same mtime) a moment later.
        path.write_text(token)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    def load() -> str:
        if not reads:
            # A `cmd > file` truncates just as we read: we read nothing.
            path.write_text("")
            threading.Timer(0.05, restore).start()
        reads.append(path.read_text())
        return reads[-1]

    cache: CredentialCache[str] = CredentialCache(load, credential="svc")
    assert cache.observe(event)
    assert await cache.aget() == token
    assert reads[0] == "" and cache.races >= 2 and cache.loads == 2
    assert cache.generation == 1 and not cache.stale


def test_a_file_that_never_matches_keeps_the_last_good_value(
    tmp_path: Path, secrets: SecretRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    first = secrets.token()
    write_atomic(path, first)
    cache: CredentialCache[str] = CredentialCache(path.read_text, credential="svc",
                                                  retry_delays=FAST_RETRIES)
    cache.observe(announce(path, 1))
    assert cache.get() == first  # sync get, no client: loads in the caller's thread
    write_atomic(path, secrets.token())
    stale = announce(path, 2)
    path.write_text("")  # a writer truncated it again before we could read gen 2
    cache.observe(stale)
    assert cache.get() == first and cache.generation == 1
    assert cache.races >= 10
    assert "credential load not accepted" in caplog.text


async def test_a_failing_loader_keeps_the_last_good_value(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    first = secrets.token()
    write_atomic(path, first)
    fail = False

    async def load() -> str:
        if fail:
            raise RuntimeError(f"parse error near {path.read_text()}")  # quotes content
        return path.read_text()

    cache: CredentialCache[str] = CredentialCache(load, credential="svc",
                                                  retry_delays=FAST_RETRIES)
    cache.observe(announce(path, 1))
    assert await cache.aget() == first
    fail = True
    write_atomic(path, secrets.token())
    cache.observe(announce(path, 2))
    assert await cache.aget() == first and cache.failures >= 1
    # The leak guard checks the log: the exception's message (with the token) is not there.


async def test_invalidates_clears_once_per_generation_and_after_the_cache(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    client = BrokerClient("http://127.0.0.1:9")  # not started: events fed by hand
    order: list[str] = []

    @invalidates("svc", client=client)
    @functools.lru_cache(maxsize=1)
    def session() -> str:
        return "session"

    seen: list[int] = []
    invalidates("svc", lambda e: seen.append(e.data.generation), client=client)
    # Created after the invalidates, yet it observes first.
    cache: CredentialCache[str] = CredentialCache(path.read_text, credential="svc",
                                                  client=client)
    client.on_event(lambda e: order.append("plain callback"))
    original_observe = cache.observe
    assert original_observe

    first = announce(path, 1)
    session()
    client.accept(first, live=False)
    assert session.cache_info().currsize == 0 and seen == [1]
    session()
    # The same generation again (its state-topic copy, a re-read): nothing cleared.
    again = Event.from_dict({**first.to_dict(), "id": str(uuid.uuid4())})
    client.accept(again, live=True)
    assert session.cache_info().currsize == 1 and seen == [1]
    write_atomic(path, secrets.token())
    client.accept(announce(path, 2), live=True)
    assert session.cache_info().currsize == 0 and seen == [1, 2]
    assert cache.stale  # its reload was due before the session was cleared
    # Other credentials and unusable states change nothing.
    other = announce(path, 3, name="other")
    client.accept(other, live=True)
    assert seen == [1, 2]


def generation_of(client: BrokerClient, name: str) -> int:
    # Until the daemon's first event names its host_id, states read over HTTP have host "".
    (event,) = [e for (_, n), e in client.states.items() if n == name]
    return event.data.generation


# -- a forced gap -----------------------------------------------------------------------------


@asynccontextmanager
async def dropping_proxy(upstream: str, drop: Any) -> AsyncIterator[str]:
    """An HTTP proxy in front of the daemon that drops the SSE frames ``drop(doc)`` picks."""
    dropped: list[dict[str, Any]] = []

    async def forward(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as session, session.get(
            upstream + request.path_qs, headers={
                k: v for k, v in request.headers.items() if k.lower() == "last-event-id"}
        ) as reply:
            if not reply.content_type.startswith("text/event-stream"):
                return web.Response(body=await reply.read(), status=reply.status,
                                    content_type=reply.content_type)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            frame = b""
            async for line in reply.content:
                frame += line
                if line.strip():
                    continue
                data = [x[5:] for x in frame.split(b"\n") if x.startswith(b"data:")]
                doc = json.loads(data[0]) if data else None
                if doc is not None and "data" in doc and drop(doc):
                    dropped.append(doc)
                else:
                    try:
                        await response.write(frame)
                    except ConnectionError:
                        break  # the client left
                frame = b""
            return response

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", forward)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        assert dropped, "the proxy dropped nothing: the test did not test a gap"


async def test_a_dropped_sse_frame_is_a_gap_healed_by_a_state_reread(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    paths = {name: tmp_path / name / "token" for name in ("a", "b")}
    for path in paths.values():
        path.parent.mkdir()
        write_atomic(path, secrets.token())

    def drop(doc: dict[str, Any]) -> bool:
        return bool(doc["subject"] == "a" and doc["data"]["generation"] == 2)

    with Daemon(tmp_path / "daemon", paths) as daemon:
        async with dropping_proxy(daemon.url, drop) as url, BrokerClient(url) as client:
            cache: CredentialCache[str] = CredentialCache(paths["a"].read_text,
                                                          credential="a", client=client)
            with anyio.fail_after(WAIT):
                await client.wait_connected()
            new_a = secrets.token()
            write_atomic(paths["a"], new_a)  # its refreshed never reaches the client...
            with anyio.fail_after(WAIT):
                while daemon.states()["a"]["generation"] < 2:
                    await anyio.sleep(0.01)
            assert generation_of(client, "a") == 1
            write_atomic(paths["b"], secrets.token())  # ...the next event shows the hole
            with anyio.fail_after(WAIT):
                while generation_of(client, "a") < 2:
                    await anyio.sleep(0.01)
                while cache.generation != 2:
                    await anyio.sleep(0.01)
            assert client.gaps == 1
            assert await cache.aget() == new_a


# -- consumer reports -------------------------------------------------------------------------


async def test_http_reports_put_the_generation_and_delete_on_close(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    """Against a recording stand-in for the daemon's API (the real route is the broker's)."""
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    event = announce(path, 4, sequence=9)
    requests: list[tuple[str, str, Any]] = []

    async def credentials(request: web.Request) -> web.Response:
        return web.json_response({"credentials": [event.data.to_dict()]})

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await response.write(b": keep-alive\n\n")
            await anyio.sleep(0.2)

    async def consumer(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        requests.append((request.method, request.path, body))
        return web.json_response(event.data.to_dict())

    app = web.Application()
    app.router.add_get("/v1/credentials", credentials)
    app.router.add_get("/v1/events", events)
    app.router.add_route("*", "/v1/credentials/{name}/consumers/{id}", consumer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = BrokerClient(f"http://127.0.0.1:{port}", host_id="unit")
        async with client:
            cache: CredentialCache[str] = CredentialCache(
                path.read_text, credential="svc", client=client, consumer_id="api-1")
            with anyio.fail_after(WAIT):
                while not requests:
                    await anyio.sleep(0.01)
            assert cache.generation == 4
        assert requests == [
            ("PUT", "/v1/credentials/svc/consumers/api-1",
             {"generation": 4, "fingerprint": event.data.fingerprint}),
            ("DELETE", "/v1/credentials/svc/consumers/api-1", None),
        ]
    finally:
        await runner.cleanup()



async def test_an_http_report_is_not_withdrawn_when_the_daemons_host_id_becomes_known(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    """Regression: the states read back before the first SSE event carry host "", and the
    first new generation from the stream (host "unit") made the cache DELETE its report
    before it PUT the new one, so the daemon briefly forgot the consumer (and could announce
    converged without it)."""
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    first = announce(path, 4, sequence=9)
    requests: list[tuple[str, Any]] = []
    rotate = anyio.Event()
    second: list[Event] = []

    async def credentials(request: web.Request) -> web.Response:
        return web.json_response({"credentials": [first.data.to_dict()]})

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await rotate.wait()
        [event] = second
        frame = (f"id: {event.sequence}\nevent: {event.type}\n"
                 f"data: {json.dumps(event.to_dict())}\n\n")
        await response.write(frame.encode())
        while True:
            await response.write(b": keep-alive\n\n")
            await anyio.sleep(0.2)

    async def consumer(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        requests.append((request.method, body and body["generation"]))
        return web.json_response(first.data.to_dict())

    app = web.Application()
    app.router.add_get("/v1/credentials", credentials)
    app.router.add_get("/v1/events", events)
    app.router.add_route("*", "/v1/credentials/{name}/consumers/{id}", consumer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with BrokerClient(f"http://127.0.0.1:{port}") as client:  # host_id "+"
            cache: CredentialCache[str] = CredentialCache(
                path.read_text, credential="svc", client=client, consumer_id="api-1")
            with anyio.fail_after(WAIT):
                while not requests:
                    await anyio.sleep(0.01)
            write_atomic(path, secrets.token())
            second.append(announce(path, 5, sequence=10))
            rotate.set()
            with anyio.fail_after(WAIT):
                while cache.reports < 2:
                    await anyio.sleep(0.01)
            assert cache.generation == 5
            assert requests == [("PUT", 4), ("PUT", 5)]
        assert requests == [("PUT", 4), ("PUT", 5), ("DELETE", None)]
    finally:
        await runner.cleanup()

async def test_mqtt_reports_are_retained_and_withdrawn(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    path = tmp_path / "creds" / "token"
    path.parent.mkdir()
    write_atomic(path, secrets.token())
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    topic = f"{prefix}/test-host/consumers/svc/api-1"
    async with (
        harness_factory([{"name": "svc", "files": {"token": str(path)}}], mqtt=mqtt) as h,
        Subscriber(mosquitto_server.port, [f"{prefix}/+/consumers/#"], secrets) as sub,
    ):
        async with BrokerClient(mosquitto_server.url, prefix=prefix) as client:
            cache: CredentialCache[str] = CredentialCache(
                path.read_text, credential="svc", client=client, consumer_id="api-1")
            await sub.wait_for(lambda m: any(x.topic == topic and x.payload for x in m))
            doc = json.loads(sub.on(topic)[-1].payload)
            state = h.broker.state("svc")
            assert doc["consumer"] == "api-1" and doc["credential"] == "svc"
            assert (doc["generation"], doc["fingerprint"]) == (state.generation,
                                                               state.fingerprint)
            assert cache.generation == state.generation
            write_atomic(path, secrets.token())
            await sub.wait_for(lambda m: any(
                x.topic == topic and x.payload
                and json.loads(x.payload)["generation"] == state.generation + 1 for x in m))
        # Leaving: an empty retained message clears the report.
        await sub.wait_for(lambda m: m[-1].topic == topic and m[-1].payload == b"")


def test_importing_the_client_for_http_loads_no_engine_config_pydantic_or_mqtt() -> None:
    code = (
        "import sys, broker.client\n"
        "broker.client.BrokerClient('http://127.0.0.1:9')\n"
        "bad = [m for m in ('broker.engine.engine', 'broker.config', 'broker.app', 'pydantic',"
        " 'aiomqtt', 'paho') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


@pytest.mark.timeout(400)
def test_client_latency_benchmark_smoke_runs() -> None:
    """Its figures are not asserted (machine speed varies); that it runs and reports is."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.client_latency", "--smoke", "--json"],
        capture_output=True, text=True, check=False, timeout=380,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    for transport in ("HTTP", "MQTT"):
        row = rows[f"{transport}: BrokerClient callback in a worker"]
        assert row["n"] == 10 and row["p50_ms"] > 0 and row["ratio_p50"] > 0
        assert rows[f"{transport}: floor, bare reader in the same worker"]["n"] == 10


def test_follow_in_thread_restarts_after_a_failure_and_stops() -> None:
    client = BrokerClient("http://127.0.0.1:9")  # nothing listens: it keeps retrying
    failures: list[int] = []

    async def fails_once() -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("a worker bug")
        await anyio.sleep_forever()

    client.attach(fails_once)
    follower = client.follow_in_thread()
    deadline = time.monotonic() + WAIT
    while follower.restarts < 1:
        assert time.monotonic() < deadline, "the follower did not restart the client"
        time.sleep(0.01)
    assert follower.alive
    follower.stop(timeout=WAIT)
    assert not follower.alive
    follower.stop()  # idempotent


async def test_unix_socket_with_a_bearer_token(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "creds" / "token"
    path.parent.mkdir()
    write_atomic(path, secrets.token())
    api_token = tmp_path / "api-token"
    write_atomic(api_token, secrets.token("api") + "\n")
    socket = tmp_path / "api.sock"
    http = {"listen": f"unix:{socket}", "token_file": str(api_token)}
    async with harness_factory([{"name": "svc", "files": {"token": str(path)}}],
                               http=http) as h:
        refused = BrokerClient(f"unix:{socket}", backoff=Backoff(0.05, 0.1))
        async with refused:
            await anyio.sleep(0.3)
            assert not refused.connected and not refused.states  # 401 without the token
        async with BrokerClient(f"unix:{socket}", token_file=api_token) as client:
            with anyio.fail_after(WAIT):
                await client.wait_connected()
            await h.fence()  # past the first-sight events
            assert generation_of(client, "svc") == h.broker.state("svc").generation
            write_atomic(path, secrets.token())
            change = await h.next("svc")
            with anyio.fail_after(WAIT):
                while client.states.get(("test-host", "svc")) is None or (
                    client.states[("test-host", "svc")].id != change.id
                ):
                    await anyio.sleep(0.01)


async def test_a_dropped_mqtt_message_is_a_gap_healed_by_resubscribing(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    paths = {name: tmp_path / name / "token" for name in ("a", "b")}
    for path in paths.values():
        path.parent.mkdir()
        write_atomic(path, secrets.token())
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    creds = [{"name": n, "files": {"token": str(p)}} for n, p in paths.items()]
    async with harness_factory(creds, mqtt=mqtt) as h:
        client = BrokerClient(mosquitto_server.url, prefix=prefix)
        transport: Any = client._transport
        deliver = transport._on_message
        dropped: list[str] = []

        def lossy(client: BrokerClient, message: Any) -> None:
            # What an MQTT server does to a subscriber whose queue is full: live messages
            # vanish; the retained copy stays on the server.
            payload = message.payload
            if (not message.retain and payload and b'"subject":"a"' in payload
                    and b'"generation":2,' in payload):
                dropped.append(message.topic.value)
                return
            deliver(client, message)

        transport._on_message = lossy
        async with client:
            with anyio.fail_after(WAIT):
                await client.wait_connected()
            await h.fence()
            with anyio.fail_after(WAIT):
                while set(client.states) != {("test-host", n) for n in ("a", "b", "fence")}:
                    await anyio.sleep(0.01)
            write_atomic(paths["a"], secrets.token())
            await h.next("a")
            with anyio.fail_after(WAIT):
                while len(dropped) < 2:  # its state and its event message
                    await anyio.sleep(0.01)
            assert client.states[("test-host", "a")].data.generation == 1
            write_atomic(paths["b"], secrets.token())  # the next event shows the hole
            with anyio.fail_after(WAIT):
                while client.states[("test-host", "a")].data.generation < 2:
                    await anyio.sleep(0.01)
            assert client.gaps == 1 and transport.rereads == 1


def _event(name: str, generation: int, sequence: int) -> Event:
    state = State(credential=name, status=Status.VALID, generation=generation,
                  sequence=sequence, fingerprint=f"hmac-sha256:{generation:016x}")
    return make_event("credentials.refreshed", state, source=SOURCE, now=1e9 + sequence)


@given(order=st.permutations(range(12)), repeats=st.lists(st.integers(0, 11), max_size=8),
       live=st.booleans())
@settings(max_examples=200, deadline=None)
def test_delivery_is_once_in_order_and_generations_act_once(
    order: list[int], repeats: list[int], live: bool
) -> None:
    """Events of two credentials, shuffled and duplicated: each callback sees each credential's
    events in increasing sequence, at most once, ending at the latest; a gate acts once per
    generation it sees."""
    events = [_event("ab"[i % 2], i // 2 + 1, i + 1) for i in range(12)]
    client = BrokerClient("http://127.0.0.1:9")
    gate_a = GenerationGate("a")
    seen: list[Event] = []
    acted: list[int] = []
    client.on_event(seen.append)
    client.on_event(lambda e: acted.append(e.data.generation) if gate_a.new(e) else None)
    for i in [*order, *repeats]:
        client.accept(events[i], live=live, contiguous=True)
    for name in "ab":
        sequences = [e.sequence for e in seen if e.subject == name]
        assert sequences == sorted(set(sequences))
        assert client.states[("unit", name)].sequence == max(
            e.sequence for e in events if e.subject == name)
    assert acted == sorted(set(acted)) and acted[-1] == 6
    # In-order delivery, or a state read back, is never a gap.
    if not live or order == sorted(order):
        assert client.gaps == 0


async def test_http_reports_reach_a_real_daemon_and_are_withdrawn(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "creds" / "token"
    path.parent.mkdir()
    write_atomic(path, secrets.token())

    def consumers(daemon: Daemon) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = daemon.states()["svc"].get("consumers", [])
        return found

    with Daemon(tmp_path / "daemon", {"svc": path}) as daemon:
        async with BrokerClient(daemon.url) as client:
            cache: CredentialCache[str] = CredentialCache(
                path.read_text, credential="svc", client=client, consumer_id="api-1")
            with anyio.fail_after(WAIT):
                while not (now := await anyio.to_thread.run_sync(consumers, daemon)):
                    await anyio.sleep(0.02)
            state = daemon.states()["svc"]
            [report] = now
            assert (report["id"], report["generation"], report["fingerprint"]) == (
                "api-1", state["generation"], state["fingerprint"])
            assert cache.generation == state["generation"]
        assert consumers(daemon) == []  # DELETE when the client stopped

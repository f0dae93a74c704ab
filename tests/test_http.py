"""The HTTP API over a real socket: routes, errors, auth, the event stream, metrics.

Every response body goes through ``ApiClient``, which registers it with the secret-leak
guard and validates JSON bodies against the OpenAPI document's schema for that route and
status, so the document is checked against what the server really sends.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import jsonschema
import pytest
from multidict import CIMultiDictProxy

from broker import Broker
from broker.cli.remote import SseMessage, iter_sse
from broker.config import ConfigError, parse_config
from broker.core.events import make_event
from broker.core.state import State, Status
from broker.sinks.http import HttpApi, load_openapi
from tests.conftest import Harness, SecretRegistry, make_config, write_atomic

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
OPENAPI: dict[str, Any] = json.loads(load_openapi())
TIMEOUT = 5.0


# -- helpers (also used by test_http_fuzz.py and test_remote.py) ------------------------------


def schema_validator(schema: Mapping[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for a schema taken from the OpenAPI document (its $refs resolve)."""
    root = {**schema, "components": OPENAPI["components"]}
    return jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def component(name: str) -> jsonschema.Draft202012Validator:
    return schema_validator({"$ref": f"#/components/schemas/{name}"})


def response_schema(template: str, method: str, status: int, media: str) -> dict[str, Any]:
    """The documented schema of one answer; fails the test when it is not documented."""
    operation = OPENAPI["paths"][template][method.lower()]
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {template} answered {status}, not documented"
    response = responses[str(status)]
    if "$ref" in response:
        response = OPENAPI["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    content = response["content"]
    assert media in content, f"{method} {template} {status}: {media} is not documented"
    schema: dict[str, Any] = content[media]["schema"]
    return schema


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ApiClient:
    """Requests against a running HttpApi; every body is observed and schema-checked."""

    def __init__(self, session: aiohttp.ClientSession, base: str, secrets: SecretRegistry) -> None:
        self.session = session
        self.base = base
        self.secrets = secrets

    async def call(
        self,
        method: str,
        template: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
        check_schema: bool = True,
        **path: str,
    ) -> Reply:
        url = self.base + template.format(**path)
        with anyio.fail_after(TIMEOUT):
            async with self.session.request(method, url, headers=headers, params=params) as r:
                reply = Reply(r.status, r.headers, await r.read())
        self.secrets.observe(f"HTTP {method} {url}", reply.body)
        self.secrets.observe(f"HTTP headers {method} {url}", repr(dict(reply.headers)))
        media = reply.headers.get("Content-Type", "").split(";")[0]
        if reply.status >= 400:
            assert media == "application/json", f"{reply.status} with {media}: {reply.body[:200]!r}"
            component("Error").validate(reply.json())
        documented = method.lower() in OPENAPI["paths"].get(template, {})
        if check_schema and media == "application/json" and documented:
            schema = response_schema(template, method, reply.status, media)
            schema_validator(schema).validate(reply.json())
        return reply

    async def get(self, template: str, **kwargs: Any) -> Reply:
        return await self.call("GET", template, **kwargs)

    @asynccontextmanager
    async def stream(
        self, *, headers: Mapping[str, str] | None = None, **params: str
    ) -> AsyncIterator[EventStream]:
        """An open ``/v1/events`` stream (headers received, so the server has subscribed)."""
        url = self.base + "/v1/events"
        with anyio.fail_after(TIMEOUT):
            response = await self.session.get(url, params=params, headers=headers)
        try:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            yield EventStream(response, self.secrets)
        finally:
            response.close()


class EventStream:
    """Reads SSE messages; each one's data is observed and validated as a CloudEvent."""

    def __init__(self, response: aiohttp.ClientResponse, secrets: SecretRegistry) -> None:
        self.response = response
        self._messages = iter_sse(response.content.iter_any())
        self._secrets = secrets

    async def next(self, timeout: float = TIMEOUT) -> SseMessage:
        with anyio.fail_after(timeout):
            message = await self._messages.__anext__()
        self._secrets.observe(f"SSE {message.event}", message.data)
        if message.event == "reset":
            component("StreamResetEvent").validate(json.loads(message.data))
        else:
            doc = json.loads(message.data)
            component("CloudEvent").validate(doc)
            assert message.id == str(doc["data"]["sequence"])
            assert message.event == doc["type"]
        return message

    async def next_of(self, credential: str, timeout: float = TIMEOUT) -> SseMessage:
        """The next message about ``credential`` (skipping the others)."""
        with anyio.fail_after(timeout):
            while True:
                message = await self.next()
                if message.event == "reset" or json.loads(message.data)["subject"] == credential:
                    return message


@asynccontextmanager
async def serving(
    harness_factory: Any,
    credentials: list[dict[str, Any]],
    secrets: SecretRegistry,
    *,
    token: str | None = None,
    connections: int = 100,
    broker: dict[str, Any] | None = None,
    api: Any = None,
    **http: Any,
) -> AsyncIterator[tuple[Harness, HttpApi, ApiClient]]:
    """A running broker with its HTTP API (``[http]`` = ``http``), and a client for it.

    ``api`` makes the API instead of the built-in one (``partial(HttpApi, ring_size=4)``).
    """
    http.setdefault("listen", "127.0.0.1:0")
    sinks = [api] if api is not None else None
    async with harness_factory(credentials, http=http, broker=broker or {}, sinks=sinks) as h:
        api = h.broker.sinks["http"]
        assert isinstance(api, HttpApi) and api.url is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            yield h, api, ApiClient(session, api.url, secrets)


def cred(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "files": {"token": str(path)}, **extra}


def event_of(message: SseMessage) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(message.data)
    return doc


# -- routes -----------------------------------------------------------------------------------


async def test_every_route_answers_per_the_document(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    async with serving(harness_factory, [cred("svc", path)], secrets) as (h, _api, client):
        listing = (await client.get("/v1/credentials")).json()
        assert [s["credential"] for s in listing["credentials"]] == ["svc", "fence"]
        one = await client.get("/v1/credentials/{name}", name="svc")
        assert one.status == 200
        assert one.json() == h.broker.state("svc").to_dict()
        assert one.json()["status"] == "valid"
        checked = await client.call("POST", "/v1/credentials/{name}/check", name="svc")
        assert checked.status == 200 and checked.json()["generation"] == one.json()["generation"]
        health = await client.get("/healthz")
        assert health.json() == {"status": "ok", "mqtt": "off"}
        metrics = await client.get("/metrics")
        assert metrics.status == 200
        assert metrics.headers["Content-Type"].startswith("text/plain")
        assert b'credbroker_credential_status{credential="svc",status="valid"} 1.0' in metrics.body
        doc = await client.get("/v1/openapi.json")
        assert doc.json() == OPENAPI
        # The file content appears nowhere, not even as part of a bigger answer.
        for reply in (listing, one.json(), checked.json()):
            secrets.assert_absent(json.dumps(reply), "a state document")


async def test_error_answers_are_json(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    async with serving(harness_factory, [cred("svc", path)], secrets) as (_, _api, client):
        for method, template in (("GET", "/v1/credentials/{name}"),
                                 ("POST", "/v1/credentials/{name}/check")):
            reply = await client.call(method, template, name="nope")
            assert reply.status == 404
            assert reply.json()["error"]["code"] == "unknown-credential"
            assert "nope" in reply.json()["error"]["message"]
        missing = await client.get("/v2/whatever")
        assert (missing.status, missing.json()["error"]["code"]) == (404, "not-found")
        wrong = await client.call("PUT", "/v1/credentials")
        assert wrong.status == 405 and wrong.headers["Allow"] == "GET"
        assert wrong.json()["error"]["code"] == "method-not-allowed"
        get_check = await client.call("GET", "/v1/credentials/{name}/check", name="svc")
        assert get_check.status == 405 and get_check.headers["Allow"] == "POST"
        for params, headers in (
            ({"since": "-1"}, {}),
            ({"since": "abc"}, {}),
            ({}, {"Last-Event-ID": "x1"}),
            # The header's position wins, but a malformed ?since= beside it is still an error.
            ({"since": "true"}, {"Last-Event-ID": "1"}),
            ({"credential": "NOT A NAME"}, {}),
            ({"type": ""}, {}),
            ({"type": "x" * 200}, {}),
        ):
            bad = await client.get("/v1/events", params=params, headers=headers)
            assert bad.status == 400, (params, headers)
            assert bad.json()["error"]["code"] == "invalid-parameter"
        # Unknown or repeated query parameters are refused, not silently ignored.
        for template, params in (
            ("/v1/credentials", {"x": "1"}),
            ("/v1/events", {"credentail": "svc"}),
            ("/v1/events", [("since", "1"), ("since", "2")]),
        ):
            refused = await client.get(template, params=params)
            assert refused.status == 400, (template, params)
            assert refused.json()["error"]["code"] == "invalid-parameter"
        unknown = await client.get("/v1/events", params={"credential": "nope"})
        assert (unknown.status, unknown.json()["error"]["code"]) == (404, "unknown-credential")


async def test_a_bug_is_a_json_500_and_a_log_line_not_a_trace(
    harness_factory: Any,
    tmp_path: Path,
    secrets: SecretRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    async with serving(harness_factory, [cred("svc", path)], secrets) as (h, _api, client):

        async def broken(name: str) -> State:
            raise RuntimeError("boom in check")

        # Broken where every check ends up, whatever the port puts in between.
        monkeypatch.setattr(h.broker.engine, "check", broken)
        reply = await client.call("POST", "/v1/credentials/{name}/check", name="svc",
                                  check_schema=False)
        assert reply.status == 500
        assert reply.json()["error"]["code"] == "internal-error"
        assert b"boom" not in reply.body and b"Traceback" not in reply.body
        assert any(r.name == "broker.http" and r.exc_info for r in caplog.records)


async def test_bearer_token_guards_every_route_but_health(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    token = secrets.token("bearer")
    token_file = tmp_path / "http-token"
    write_atomic(token_file, token + "\n")
    async with serving(harness_factory, [cred("svc", path)], secrets, token=token,
                       token_file=str(token_file)) as (_, api, client):
        routes = [("GET", "/v1/credentials"), ("GET", "/v1/credentials/svc"),
                  ("POST", "/v1/credentials/svc/check"), ("GET", "/v1/events"),
                  ("GET", "/metrics"), ("GET", "/v1/openapi.json"),
                  ("GET", "/no/such/route"), ("DELETE", "/v1/credentials")]
        wrong_headers: list[dict[str, str]] = [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": f"Basic {token}"},
            {"Authorization": token},
        ]
        async with aiohttp.ClientSession() as anonymous:
            bare = ApiClient(anonymous, api.url or "", secrets)
            for method, route in routes:
                for headers in wrong_headers:
                    reply = await bare.call(method, route, headers=headers)
                    assert reply.status == 401, (method, route, headers)
                    assert reply.json()["error"]["code"] == "unauthorized"
                    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
            health = await bare.get("/healthz")
            assert health.status == 200
        # With the token (the client's default header), everything answers.
        assert (await client.get("/v1/credentials")).status == 200
        assert (await client.get("/metrics")).status == 200
        assert (await client.call("POST", "/v1/credentials/{name}/check", name="svc")).status == 200
        lower = await client.get("/v1/credentials",
                                 headers={"Authorization": f"bearer {token}"})
        assert lower.status == 200
        async with client.stream() as stream:
            assert stream.response.status == 200


async def test_unreadable_token_file_stops_the_start_with_a_config_error(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    for content in (None, "  \n"):
        token_file = tmp_path / "token"
        if content is not None:
            write_atomic(token_file, content)
        config = make_config(tmp_path, [cred("svc", path)],
                             http={"listen": "127.0.0.1:0", "token_file": str(token_file)})
        with pytest.raises(ConfigError) as info:
            async with Broker(config):
                pass
        assert info.value.errors[0][0] == "http.token_file"


def test_non_loopback_listen_needs_a_token_file(tmp_path: Path) -> None:
    creds = [cred("svc", tmp_path / "svc")]
    for listen in ("0.0.0.0:8790", "[::]:8790", "192.0.2.10:8790", "example.com:80"):
        with pytest.raises(ConfigError) as info:
            make_config(tmp_path, creds, http={"listen": listen})
        assert info.value.errors[0][0] == "http.listen"
        assert "token_file" in str(info.value)
        make_config(tmp_path, creds, http={"listen": listen, "token_file": str(tmp_path / "t")})
    for listen in ("127.0.0.1:0", "[::1]:8790", "localhost:8790", f"unix:{tmp_path}/s"):
        make_config(tmp_path, creds, http={"listen": listen})
    assert parse_config({"credentials": creds, "http": {}}).http is not None


async def test_unix_socket_is_0600_and_serves(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    sock_path = tmp_path / "api.sock"
    # A stale socket from a crashed daemon is replaced...
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    async with harness_factory([cred("svc", path)], http={"listen": f"unix:{sock_path}"}) as h:
        api = h.broker.sinks["http"]
        assert isinstance(api, HttpApi) and api.url == f"unix:{sock_path}"
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        connector = aiohttp.UnixConnector(path=str(sock_path))
        async with aiohttp.ClientSession(connector=connector) as session:
            client = ApiClient(session, "http://localhost", secrets)
            listing = await client.get("/v1/credentials")
            assert listing.status == 200
    assert not sock_path.exists(), "the socket is removed on shutdown"
    # ...but a file that is not a socket is never replaced.
    sock_path.write_text("not a socket")
    config = make_config(tmp_path, [cred("svc", path)], http={"listen": f"unix:{sock_path}"})
    with pytest.raises(ConfigError, match="not a socket"):
        async with Broker(config):
            pass
    assert sock_path.read_text() == "not a socket"


async def test_a_port_in_use_is_a_config_error(tmp_path: Path, secrets: SecretRegistry) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tmp_path, [cred("svc", path)], http={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(ConfigError, match="cannot listen on") as info:
            async with Broker(config):
                pass
        assert info.value.errors[0][0] == "http.listen"


async def test_forced_check_finds_a_change_inotify_cannot_see(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    hidden_dir = tmp_path / "hidden"
    hidden_dir.mkdir()
    hidden = hidden_dir / "token"
    write_atomic(hidden, secrets.token())
    # Only the check can find it: no resync for an hour, and no inotify watch (below).
    async with serving(harness_factory, [cred("svc", hidden)], secrets,
                       broker={"resync_interval": "1h"}) as (h, _api, client):
        engine = h.broker.engine
        engine.watcher.watch([str(h.fence_path)])
        assert str(hidden) not in engine.watcher.polled
        before = h.broker.state("svc")
        async with client.stream(credential="svc") as stream:
            write_atomic(hidden, secrets.token())
            await h.fence()  # every change inotify could report has been processed...
            assert h.broker.state("svc").generation == before.generation  # ...not this one
            reply = await client.call("POST", "/v1/credentials/{name}/check", name="svc")
            state = reply.json()
            assert state["generation"] == before.generation + 1
            assert state["fingerprint"] != before.fingerprint
            message = await stream.next()
            assert message.event == "credentials.refreshed"
            assert event_of(message)["data"] == state
        assert (await h.next("svc")).data.generation == before.generation + 1


# -- the event stream -------------------------------------------------------------------------


async def test_a_change_arrives_on_the_stream_fast(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    latencies: list[float] = []
    async with (
        serving(harness_factory, [cred("svc", path)], secrets) as (h, _api, client),
        client.stream() as stream,
    ):
        generation = h.broker.state("svc").generation
        for _ in range(20):
            started = time.perf_counter()
            write_atomic(path, secrets.token())
            message = await stream.next_of("svc")
            latencies.append(time.perf_counter() - started)
            generation += 1
            assert message.event == "credentials.refreshed"
            assert event_of(message)["data"]["generation"] == generation
    median, worst = statistics.median(latencies), max(latencies)
    print(f"SSE latency over {len(latencies)} changes: median {median * 1000:.1f} ms, "
          f"max {worst * 1000:.1f} ms")
    assert worst < 0.5, latencies


async def test_reconnect_with_last_event_id_gets_exactly_the_missed_events(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_atomic(a, secrets.token())
    write_atomic(b, secrets.token())
    async with serving(harness_factory, [cred("a", a), cred("b", b)], secrets) as (h, _, client):
        async with client.stream() as stream:
            write_atomic(a, secrets.token())
            first = await stream.next_of("a")
        last_seen = int(first.id or 0)
        # While disconnected: three changes, all processed before reconnecting.
        for path in (b, a, b):
            write_atomic(path, secrets.token())
            await h.fence()  # each its own event, not merged with the next write
        missed = [e for e in h.seen if e.sequence > last_seen]
        assert [e.subject for e in missed] == ["b", "fence", "a", "fence", "b", "fence"]
        async with client.stream(headers={"Last-Event-ID": str(last_seen)}) as stream:
            replayed = [await stream.next() for _ in missed]
            assert [int(m.id or 0) for m in replayed] == [e.sequence for e in missed]
            assert [event_of(m)["id"] for m in replayed] == [e.id for e in missed]
            # ...then live events continue, with nothing repeated.
            write_atomic(a, secrets.token())
            live = await stream.next()
            assert int(live.id or 0) == missed[-1].sequence + 1
        # ?since= does the same, and a filter applies to the replay too.
        async with client.stream(since=str(last_seen), credential="b") as stream:
            only_b = [await stream.next() for _ in range(2)]
            assert [int(m.id or 0) for m in only_b] == [
                e.sequence for e in missed if e.subject == "b"
            ]
        # The header wins over ?since= (a browser reconnects with both).
        async with client.stream(since="0", headers={"Last-Event-ID": str(missed[-1].sequence)},
                                 credential="a") as stream:
            message = await stream.next()
            assert message.event != "reset" and int(message.id or 0) > missed[-1].sequence


async def test_an_id_older_than_the_ring_gets_a_reset(
    harness_factory: Any,
    tmp_path: Path,
    secrets: SecretRegistry,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    small = partial(HttpApi, ring_size=4)
    async with serving(harness_factory, [cred("svc", path)], secrets, api=small) as (
        h, _api, client
    ):
        start = h.broker.engine.sequence
        for _ in range(6):
            write_atomic(path, secrets.token())
            await h.fence()  # one svc event and one fence event each time
        latest = h.broker.engine.sequence
        assert latest - start >= 12
        async with client.stream(headers={"Last-Event-ID": str(start)}) as stream:
            reset = await stream.next()
            assert reset.event == "reset"
            assert reset.id == str(latest)
            envelope = json.loads(reset.data)  # a CloudEvent, like every other frame's data
            assert envelope["type"] == "credbroker.stream.reset"
            assert envelope["specversion"] == "1.0" and envelope["source"] == h.broker.source
            uuid.UUID(envelope["id"])
            data = envelope["data"]
            assert data["requested"] == start and data["latest"] == latest
            assert data["oldest"] == latest - 4
            write_atomic(path, secrets.token())
            live = await stream.next_of("svc")
            assert int(live.id or 0) > latest
        # Still in the ring: an ordinary replay.
        async with client.stream(since=str(latest - 2)) as stream:
            assert (await stream.next()).id == str(latest - 1)
        # From the future (the broker's state was reset): a reset too.
        async with client.stream(since=str(latest + 1000)) as stream:
            future = await stream.next()
            assert future.event == "reset"
            assert json.loads(future.data)["data"]["requested"] == latest + 1000


async def test_credential_and_type_filters(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_atomic(a, json.dumps({"token": secrets.token()}))
    write_atomic(b, secrets.token())
    creds = [cred("a", a, format="json"), cred("b", b)]
    async with (
        serving(harness_factory, creds, secrets) as (h, _api, client),
        client.stream(credential="a") as only_a,
        client.stream(type="credentials.inv*") as only_invalid,
        client.stream(type="credentials.refreshed", credential="b") as b_refreshed,
    ):
        for path, content in ((b, secrets.token()), (a, "this is not JSON"),
                              (a, json.dumps({"token": secrets.token()})),
                              (b, secrets.token())):
            write_atomic(path, content)
            await h.fence()  # each its own event, not merged with the next write
        assert [m.event for m in [await only_a.next(), await only_a.next()]] == [
            "credentials.invalid", "credentials.refreshed"]
        invalid = await only_invalid.next()
        assert (invalid.event, event_of(invalid)["subject"]) == ("credentials.invalid", "a")
        got = [await b_refreshed.next(), await b_refreshed.next()]
        assert {event_of(m)["subject"] for m in got} == {"b"}
        # Nothing else is queued for the filtered streams: a further event of another
        # credential is not delivered, the next matching one is.
        write_atomic(a, "broken again")
        write_atomic(b, secrets.token())
        assert event_of(await b_refreshed.next())["subject"] == "b"
        assert (await only_invalid.next()).event == "credentials.invalid"


async def test_keep_alive_comments_on_an_idle_stream(
    harness_factory: Any,
    tmp_path: Path,
    secrets: SecretRegistry,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    async with (
        serving(harness_factory, [cred("svc", path)], secrets,
                api=partial(HttpApi, keepalive=0.2)) as (_, _api, client),
        client.stream() as stream,
    ):
        seen = b""
        with anyio.fail_after(TIMEOUT):
            while seen.count(b": keep-alive\n\n") < 2:
                seen += await stream.response.content.readany()
        assert seen.startswith(b"retry: 2000\n")


async def test_two_hundred_clients_all_get_the_event(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    clients = 200
    async with serving(harness_factory, [cred("svc", path)], secrets,
                       connections=clients + 10) as (h, api, client):
        received: list[float] = []
        ready = anyio.Event()
        opened = 0

        async def listen() -> None:
            nonlocal opened
            async with client.stream(credential="svc") as stream:
                opened += 1
                if opened == clients:
                    ready.set()
                message = await stream.next(timeout=15)
                assert message.event == "credentials.refreshed"
                received.append(time.perf_counter())

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(clients):
                    tg.start_soon(listen)
                await ready.wait()
                assert api.sse_clients == clients
                started = time.perf_counter()
                write_atomic(path, secrets.token())
        assert len(received) == clients
        print(f"{clients} SSE clients: all received the event within "
              f"{(max(received) - started) * 1000:.0f} ms")
        await h.fence()


async def test_a_client_that_stops_reading_stalls_no_one(
    harness_factory: Any,
    tmp_path: Path,
    secrets: SecretRegistry,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A tiny receive window, and then never a read: the server's writes soon block.
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(TIMEOUT)
    try:
        small = partial(HttpApi, sse_buffer=4, ring_size=16)  # a ring of 16: the events are big
        async with serving(harness_factory, [cred("svc", path)], secrets, api=small) as (
            h, api, client
        ):
            request = b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n"
            await anyio.to_thread.run_sync(stuck.connect, ("127.0.0.1", api.port))
            await anyio.to_thread.run_sync(stuck.sendall, request)
            head = b""
            while b"\r\n\r\n" not in head:  # headers sent: the server has subscribed it
                head += await anyio.to_thread.run_sync(stuck.recv, 1)
            assert head.startswith(b"HTTP/1.1 200")
            async with client.stream(credential="svc") as healthy:
                assert api.sse_clients == 2
                # Large events (of no configured credential) until the stuck client's socket
                # is full, its handler blocks in write and its mailbox coalesces.
                big = "x" * 65536
                sequence = 10**9
                coalesced = "credbroker_sse_coalesced_events_total"
                with anyio.fail_after(15):
                    # Beyond what the kernel buffers (4 MiB send buffer at most), so that
                    # the handler is left blocked for good, not just for a moment.
                    while (api.metrics.registry.get_sample_value(coalesced) or 0) < 32 or (
                        sequence < 10**9 + 128
                    ):
                        for _ in range(8):
                            sequence += 1
                            state = State("bulk", Status.VALID, sequence=sequence, reason=big)
                            h.broker.bus.publish(
                                make_event("credentials.refreshed", state,
                                           source=h.broker.source, now=time.time())
                            )
                        await anyio.sleep(0.005)  # let the handlers write
                assert api.sse_clients == 2
                # Everyone else carries on.
                started = time.perf_counter()
                write_atomic(path, secrets.token())
                message = await healthy.next(timeout=2)
                assert message.event == "credentials.refreshed"
                assert time.perf_counter() - started < 0.5
            # Stopping the broker is prompt with the stuck client still connected.
            stop_started = time.perf_counter()
        stopped_in = time.perf_counter() - stop_started
        print(f"stopped in {stopped_in * 1000:.0f} ms with a stuck client connected")
        assert stopped_in < 3.0
    finally:
        stuck.close()


async def test_shutdown_ends_open_streams_promptly(tmp_path: Path, secrets: SecretRegistry) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    config = make_config(tmp_path, [cred("svc", path)], http={"listen": "127.0.0.1:0"})
    async with aiohttp.ClientSession() as session:
        responses: list[aiohttp.ClientResponse] = []
        try:
            async with Broker(config) as broker:
                api = broker.sinks["http"]
                assert isinstance(api, HttpApi)
                for _ in range(3):
                    with anyio.fail_after(TIMEOUT):
                        responses.append(await session.get(f"{api.url}/v1/events"))
                assert api.sse_clients == 3
                started = time.perf_counter()
            assert time.perf_counter() - started < 2.0
            for response in responses:
                with anyio.fail_after(TIMEOUT):
                    body = await response.content.read()  # ends: EOF, not a hang
                secrets.observe("SSE at shutdown", body)
                assert body.startswith(b"retry:")
        finally:
            for response in responses:
                response.close()


async def test_too_many_streams_are_refused(
    harness_factory: Any,
    tmp_path: Path,
    secrets: SecretRegistry,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    small = partial(HttpApi, max_clients=2)
    async with serving(harness_factory, [cred("svc", path)], secrets, api=small) as (
        _, api, client
    ):
        async with client.stream(), client.stream():
            refused = await client.get("/v1/events")
            assert refused.status == 503
            assert refused.json()["error"]["code"] == "too-many-clients"
            assert "Retry-After" in refused.headers
        # The server notices a closed stream at its next liveness check.
        with anyio.fail_after(TIMEOUT):
            while api.sse_clients >= 2:
                await anyio.sleep(0.05)
        async with client.stream() as again:
            assert again.response.status == 200


# -- metrics and the document -----------------------------------------------------------------


async def test_metrics_report_live_values_from_a_registry_of_their_own(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    from prometheus_client import REGISTRY

    path = tmp_path / "svc"
    exp = int(time.time()) + 3600
    write_atomic(path, secrets.jwt(exp=exp))
    creds = [cred("svc", path, format="jwt", expiry="jwt")]
    async with (
        serving(harness_factory, creds, secrets) as (h, api, client),
        client.stream(),
    ):
        write_atomic(path, secrets.jwt(exp=exp))
        await h.fence()
        await client.get("/v1/credentials/{name}", name="nope")
        sample = api.metrics.registry.get_sample_value
        # First sight at start-up, then the rewrite: the API subscribes before the first read.
        assert sample("credbroker_events_total",
                      {"type": "credentials.refreshed", "credential": "svc"}) == 2.0
        assert sample("credbroker_credential_status",
                      {"credential": "svc", "status": "valid"}) == 1.0
        assert sample("credbroker_credential_status",
                      {"credential": "svc", "status": "expired"}) == 0.0
        left = sample("credbroker_credential_expiry_seconds", {"credential": "svc"})
        assert left is not None and 3500 < left <= 3600
        assert sample("credbroker_watched_files", {"method": "inotify"}) == 2.0
        assert sample("credbroker_watched_files", {"method": "polling"}) == 0.0
        assert sample("credbroker_sse_clients") == 1.0
        assert sample("credbroker_mqtt_enabled") == 0.0
        assert sample("credbroker_state_store_healthy") == 1.0
        assert sample("credbroker_http_requests_total",
                      {"route": "/v1/credentials/{name}", "method": "GET", "code": "404"}) == 1
        scraped = await client.get("/metrics")
        for name in ("credbroker_resync_duration_seconds", "credbroker_inotify_watches",
                     "credbroker_event_sequence", "credbroker_http_request_duration_seconds",
                     "credbroker_inotify_overflows_total", "credbroker_unrelated_events_total"):
            assert name.encode() in scraped.body
        openmetrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
        assert openmetrics.body.rstrip().endswith(b"# EOF")
    # Nothing went to prometheus-client's global registry.
    assert not [m for m in REGISTRY.collect() if m.name.startswith("credbroker")]


def test_docs_copy_of_the_openapi_document_is_identical() -> None:
    assert (ROOT / "docs" / "openapi.json").read_bytes() == load_openapi()
    assert OPENAPI["openapi"].startswith("3.1")
    for name, schema in OPENAPI["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert name[0].isupper()



def test_the_document_names_every_event_type_the_stream_carries() -> None:
    """lagging, converged and action_failed go out on /v1/events like the machine's types
    (regression: the CloudEvent and StreamMessage enums listed only the machine's six)."""
    from broker.core.convergence import CONVERGED, LAGGING
    from broker.core.machine import EVENT_TYPES
    from broker.sinks.actions import ACTION_FAILED

    published = {*EVENT_TYPES, ACTION_FAILED, LAGGING, CONVERGED}
    schemas = OPENAPI["components"]["schemas"]
    assert set(schemas["CloudEvent"]["properties"]["type"]["enum"]) == published
    [event_message] = [m for m in schemas["StreamMessage"]["oneOf"]
                       if "enum" in m["properties"]["event"]]
    assert set(event_message["properties"]["event"]["enum"]) == published

async def test_the_document_lists_exactly_the_served_routes(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    async with serving(harness_factory, [cred("svc", path)], secrets) as (_, api, _client):
        app = api.make_app()
        served = {
            (route.method.lower(), route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None
        }
    documented = {
        (method, template)
        for template, item in OPENAPI["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert served == documented

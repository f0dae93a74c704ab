"""Bad input at every boundary, and no secret in any object's ``repr``.

- names that try MQTT topic injection are config errors naming the key, and topic building
  refuses them even when a settings model is built directly (bypassing validation);
- oversized or malformed HTTP requests (headers, URL, body) get a JSON 4xx, promptly;
- garbage ``Last-Event-ID`` values get a JSON 400 (or, when valid, a stream);
- ``repr()``/``str()`` of every broker object reachable from a running broker (and of every
  live MQTT client) holds none of the secrets it was given.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import re
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import pytest
from aiohttp import web

from broker import Broker
from broker.client import BrokerClient, CredentialCache
from broker.config import ConfigError, CredentialSettings, MqttSettings, parse_config
from broker.core.fingerprint import Fingerprinter
from broker.core.topics import Topics, join_topic
from broker.engine.reader import FileRead, read_credential, read_file
from broker.sinks.mqtt import MqttPublisher
from tests.conftest import SecretRegistry, make_config, record_figures, write_atomic
from tests.mosquitto import Mosquitto, mosquitto_server_fixture  # noqa: F401 - fixture
from tests.test_http import OPENAPI, cred, serving

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
REPLY_TIMEOUT = 10.0

# --------------------------------------------------------------------------------------------
# MQTT topic injection

#: Each tries to widen a subscription, split a level, end a C string early, or to be
#: refused by the MQTT server (which drops the connection: nothing would ever be delivered).
INJECTIONS = ["a/b", "+", "#", "a+", "b#", "a/#", "x\0y", "a\tb", "a\x7fb", "a\x85b",
              "a\ufffeb", "a\ufdd0b", "a\U0010ffffb", "x" * 70000]


def _config(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "broker": {"state_dir": "/tmp/unused", "host_id": "h"},
        "credentials": [{"name": "a", "files": {"token": "/tmp/unused/a"}}],
    }
    doc.update(sections)
    return doc


@pytest.mark.parametrize("value", INJECTIONS, ids=lambda v: repr(v)[:16])
def test_topic_injection_in_any_name_is_a_config_error_naming_the_key(value: str) -> None:
    mqtt = {"url": "mqtt://127.0.0.1:1883"}
    cases = {
        "credentials[0].name": _config(credentials=[{"name": value, "files": {"token": "/x"}}]),
        "broker.host_id": _config(broker={"state_dir": "/tmp/unused", "host_id": value}),
        "mqtt.client_id": _config(mqtt={**mqtt, "client_id": value}),
        "mqtt.username": _config(mqtt={**mqtt, "username": value}),
    }
    if value not in ("a/b",):  # a prefix may have levels
        cases["mqtt.topic_prefix"] = _config(mqtt={**mqtt, "topic_prefix": value})
    for key, doc in cases.items():
        if key in ("mqtt.client_id", "mqtt.username") and value in ("a/b", "+", "#", "a+", "b#",
                                                                     "a/#"):
            continue  # fine in a client id or user name: they are not topics
        with pytest.raises(ConfigError) as caught:
            parse_config(doc)
        assert str(caught.value).startswith(key + ":"), (key, str(caught.value)[:200])


@pytest.mark.parametrize("prefix", ["a//b", "a/\tb", "p" * 1025])
def test_prefixes_that_used_to_pass_config_then_fail_are_config_errors(prefix: str) -> None:
    # Regression: "a//b" passed the config and crashed the daemon at start with a bare
    # ValueError (an empty topic level); control characters passed both and mosquitto then
    # dropped every connection; a prefix near 64 KiB overflowed MQTT's topic limit.
    with pytest.raises(ConfigError, match=r"^mqtt\.topic_prefix: "):
        parse_config(_config(mqtt={"url": "mqtt://127.0.0.1:1883", "topic_prefix": prefix}))


def test_the_daemon_refuses_a_bad_prefix_with_exit_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "h"\n'
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\ntopic_prefix = "a//b"\n'
        f'[[credentials]]\nname = "a"\nfiles = {{ token = "{tmp_path / "a"}" }}\n'
    )
    run = subprocess.run([sys.executable, "-m", "broker", "run", "-c", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 2, run.stderr
    assert "mqtt.topic_prefix" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("value", INJECTIONS, ids=lambda v: repr(v)[:16])
def test_topic_building_refuses_injection_even_from_unvalidated_models(
    tmp_path: Path, value: str
) -> None:
    # model_construct skips every validator: what a buggy caller or a future code path
    # could hand the MQTT sink. The topic builder is the last line, and it holds.
    spec = CredentialSettings.model_construct(name=value, files={"token": Path("/x")})
    topics = Topics("credbroker", "h")
    with pytest.raises(ValueError, match="MQTT topic"):
        topics.state(spec.name)
    with pytest.raises(ValueError, match="MQTT topic"):
        topics.event(spec.name, "credentials.refreshed")
    with pytest.raises(ValueError, match="MQTT topic"):
        Topics("credbroker", value)
    if "/" not in value:
        with pytest.raises(ValueError, match="MQTT topic"):
            Topics(value, "h")
    # A publisher is refused at construction, before it could connect with a bad topic.
    config = make_config(tmp_path, [{"name": "a", "files": {"token": str(tmp_path / "a")}}])
    broker = Broker(config)
    settings = MqttSettings.model_construct(
        url="mqtt://127.0.0.1:1", topic_prefix=value if "/" not in value else "a//b",
        buffer=10, client_id=None, keepalive=30.0,
    )
    with pytest.raises(ValueError, match="MQTT topic"):
        MqttPublisher(broker.sink_context(), settings=settings)


def test_valid_topics_still_build() -> None:
    topics = Topics("org/credbroker é", "web-1")
    assert topics.state("svc") == "org/credbroker é/web-1/state/svc"
    assert join_topic("p", "+", "state", "+", wildcards=True) == "p/+/state/+"


# --------------------------------------------------------------------------------------------
# HTTP: oversized and malformed requests


def _exchange(port: int, request: bytes, timeout: float = REPLY_TIMEOUT) -> tuple[bytes, float]:
    """Send ``request`` on a fresh connection; return the first whole response and the time."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # refused early, the answer may still be there to read
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    return head + sep + body[:length], time.monotonic() - started
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return data, time.monotonic() - started
            data += chunk


def _status_and_json(reply: bytes) -> tuple[int, str, dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    content_type = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-type:")), "")
    return status, content_type, json.loads(body) if body else {}


async def test_oversized_and_malformed_requests_get_a_json_4xx_promptly(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    token = secrets.token("bearer")
    token_file = tmp_path / "http-token"
    write_atomic(token_file, token)
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n"
    ten_mib = 10 * 1024 * 1024
    chunk = 0x100000
    cases: list[tuple[str, bytes, int, str]] = [
        ("100 KiB header", b"GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\n" + auth
         + b"X-Big: " + b"a" * 100 * 1024 + b"\r\n\r\n", 431, "headers-too-large"),
        ("the token in a 100 KiB Authorization header",
         b"GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
         + token.encode()
         + b"x" * 100 * 1024 + b"\r\n\r\n", 431, "headers-too-large"),
        ("1,000 headers", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
         + b"".join(b"X-%d: a\r\n" % i for i in range(1000)) + b"\r\n", 431, "headers-too-large"),
        ("64 KiB URL", b"GET /v1/credentials/" + b"a" * 65536 + b" HTTP/1.1\r\nHost: localhost\r\n"
         + auth + b"\r\n", 414, "uri-too-long"),
        ("64 KiB query",
         b"GET /v1/events?since=" + b"1" * 65536 + b" HTTP/1.1\r\nHost: localhost\r\n"
         + auth + b"\r\n", 414, "uri-too-long"),
        ("10 MiB body to /check",
         b"POST /v1/credentials/svc/check HTTP/1.1\r\nHost: localhost\r\n" + auth
         + b"Content-Length: %d\r\n\r\n" % ten_mib + b"z" * ten_mib, 413, "request-too-large"),
        ("10 MiB chunked body to /check",
         b"POST /v1/credentials/svc/check HTTP/1.1\r\nHost: localhost\r\n" + auth
         + b"Transfer-Encoding: chunked\r\n\r\n"
         + (b"%x\r\n" % chunk + b"z" * chunk + b"\r\n") * 10 + b"0\r\n\r\n",
         413, "request-too-large"),
        ("10 MiB body, no token", b"POST /v1/credentials/svc/check HTTP/1.1\r\nHost: localhost\r\n"
         b"Content-Length: %d\r\n\r\n" % ten_mib + b"z" * ten_mib, 401, "unauthorized"),
        ("1 MiB body to a GET", b"GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\n" + auth
         + b"Content-Length: %d\r\n\r\n" % (1 << 20) + b"z" * (1 << 20), 413,
         "request-too-large"),
        ("malformed chunked body", b"POST /v1/credentials/svc/check HTTP/1.1\r\nHost: localhost\r\n"
         + auth + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400,
         "bad-request"),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
         400, "bad-request"),
        ("NUL in a header", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n", 400,
         "bad-request"),
        ("bad request line", b"GET\r\n\r\n", 400, "bad-request"),
    ]
    times: dict[str, float] = {}
    async with serving(harness_factory, [cred("svc", path)], secrets, token=token,
                       token_file=str(token_file)) as (h, api, client):
        assert api.port is not None
        for name, request, status, code in cases:
            reply, took = await anyio.to_thread.run_sync(_exchange, api.port, request)
            secrets.observe(f"HTTP reply to {name}", reply)
            got_status, content_type, body = _status_and_json(reply)
            assert (got_status, body.get("error", {}).get("code")) == (status, code), (name, reply)
            assert content_type.startswith("application/json"), (name, reply[:300])
            # Nothing of the request is quoted back (aiohttp's own answer quoted 100 bytes).
            assert b"aaaa" not in reply and b"zzzz" not in reply and b"xxxx" not in reply, name
            # Regression: aiohttp's own answer (and log line) quoted the start of an over-long
            # header: with an Authorization header, the bearer token.
            assert token.encode() not in reply, name
            assert took < REPLY_TIMEOUT / 2, (name, took)
            times[name] = round(took, 3)
        # Still serving, and nothing was logged as a crash.
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/v1/credentials")).status == 200
        await h.fence()
    assert not [r for r in caplog.records if r.exc_info], "a refused request logged a traceback"
    record_figures("http_oversized", cases=len(cases), seconds=times)


async def test_a_failure_outside_the_handlers_is_a_json_500_not_a_text_trace(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    async with serving(harness_factory, [cred("svc", path)], secrets) as (h, api, client):
        assert api.port is not None

        def broken(*args: Any) -> None:
            raise RuntimeError("boom in the outermost middleware")

        # The metrics middleware wraps everything else, even the JSON error middleware.
        monkeypatch.setattr(api.metrics, "observe_request", broken)
        reply, _ = await anyio.to_thread.run_sync(
            _exchange, api.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, content_type, body = _status_and_json(reply)
        assert (status, body["error"]["code"]) == (500, "internal-error")
        assert content_type.startswith("application/json") and b"boom" not in reply
        monkeypatch.undo()
        assert (await client.get("/healthz")).status == 200
        await h.fence()
    assert [r for r in caplog.records
            if r.getMessage() == "http request failed outside the handlers" and r.exc_info]


async def test_garbage_last_event_id_is_a_json_400_or_a_stream(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    rng = random.Random(7)
    fixed = [b"-1", b"+1", b"1e3", b"0x10", b"1.0", b"NaN", b"1;2", b"1 2", b"9" * 19, b"9" * 8000,
             b"\xff\xfe", b"\xd9\xa1\xd9\xa2", b"%31", b"1\x0b", b"\"1\"", b"1,2", b" 12 ", b"12",
             b"0", b"0" * 18, b"000000000000000001"]
    alphabet = b"0123456789 +-.,;:xX\"'\t\x80\xff"
    fuzz = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(300)]
    answers: dict[int, int] = {}
    [parameter] = [p for p in OPENAPI["paths"]["/v1/events"]["get"]["parameters"]
                   if p["name"] == "Last-Event-ID"]
    documented = parameter["schema"]["pattern"]
    async with serving(harness_factory, [cred("svc", path)], secrets) as (h, api, client):
        assert api.port is not None
        for value in fixed + fuzz:
            request = (b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\nLast-Event-ID: " + value
                       + b"\r\n\r\n")
            reply = await anyio.to_thread.run_sync(_head, api.port, request)
            status = int(reply.split(b" ", 2)[1])
            answers[status] = answers.get(status, 0) + 1
            stripped = value.strip(b" \t")
            valid = stripped.isdigit() and stripped.isascii() and len(stripped) <= 18
            if not stripped:
                valid = True  # an empty header is no header: a live stream
            # The OpenAPI document says the same (schemathesis once found them disagreeing).
            assert bool(re.fullmatch(documented, stripped.decode("latin-1"))) == valid, value
            if valid:
                assert status == 200, (value, reply)
            else:
                assert status == 400, (value, reply)
                assert b"application/json" in reply, reply
                # The route's own check, or (control bytes) the HTTP parser's refusal.
                assert b'"invalid-parameter"' in reply or b'"bad-request"' in reply, reply
        assert (await client.get("/healthz")).status == 200
        await h.fence()
    record_figures("last_event_id_garbage", values=len(fixed) + len(fuzz), answers=answers)


def _head(port: int, request: bytes) -> bytes:
    """The status line and headers (and, for an error, the body) of the first response."""
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " in head.split(b"\r\n", 1)[0]:
            return data  # a live stream: the head is the answer
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (chunk := sock.recv(4096)):
            body += chunk
        return head + b"\r\n\r\n" + body


# --------------------------------------------------------------------------------------------
# repr() of everything


_PRIMITIVES = (str, bytes, bytearray, memoryview, int, float, complex, bool, type(None), Path)
_CONTAINERS = (dict, list, tuple, set, frozenset, deque, MappingProxyType)


def _attributes(obj: Any) -> Iterator[Any]:
    seen: set[str] = set()
    for klass in type(obj).__mro__:
        for name in getattr(klass, "__slots__", ()):
            if name not in seen and hasattr(obj, name):
                seen.add(name)
                yield getattr(obj, name)
    yield from getattr(obj, "__dict__", {}).values()
    if is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield getattr(obj, f.name, None)


def walk(roots: list[Any], limit: int = 50000) -> Iterator[Any]:
    """Every object reachable from ``roots`` through broker objects and plain containers.

    Objects of other libraries are yielded (their ``repr`` counts too) but not entered:
    an event loop or a socket is not the broker's to describe.
    """
    queue: deque[Any] = deque(roots)
    seen: set[int] = set()
    while queue and len(seen) < limit:
        obj = queue.popleft()
        if id(obj) in seen or isinstance(obj, (*_PRIMITIVES, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict | MappingProxyType):
            queue.extend(obj.keys())
            queue.extend(obj.values())
            continue
        if isinstance(obj, _CONTAINERS):
            queue.extend(obj)
            continue
        yield obj
        if _package(obj) == "broker":
            queue.extend(_attributes(obj))


def _package(obj: Any) -> str:
    module = getattr(type(obj), "__module__", None)
    return module.split(".")[0] if isinstance(module, str) and not isinstance(obj, type) else ""


def assert_no_secret(obj: Any, secrets: list[str]) -> None:
    for text in (repr(obj), str(obj)):
        for secret in secrets:
            assert secret not in text, f"{type(obj).__qualname__} shows a secret: {text[:200]}"


async def test_no_object_shows_a_secret_in_its_repr(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    # The secrets: credential content, the HTTP bearer token, the MQTT password, the
    # fingerprint key, and what a refresh command writes.
    token_path = tmp_path / "svc"
    write_atomic(token_path, secrets.token("content"))
    jwt_path = tmp_path / "jwt"
    write_atomic(jwt_path, secrets.jwt(exp=int(time.time()) + 300, iat=int(time.time()) - 60))
    refreshed = secrets.jwt(exp=int(time.time()) + 200, iat=int(time.time()))
    source = tmp_path / "refresh-source"
    write_atomic(source, refreshed)
    http_token = secrets.token("bearer")
    write_atomic(tmp_path / "http-token", http_token)
    password = secrets.token("mqtt-password")
    write_atomic(tmp_path / "mqtt-password", password + "\n")

    validated: list[str] = []

    async def whoami(request: web.Request) -> web.Response:
        validated.append(request.headers.get("Authorization", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = make_config(
        tmp_path,
        [
            {"name": "svc", "files": {"token": str(token_path)},
             "validate": {"url": f"http://127.0.0.1:{port}/whoami",
                          "header": "Authorization: Bearer {token}", "interval": "1h"}},
            {"name": "jwt", "files": {"token": str(jwt_path)}, "format": "jwt", "expiry": "jwt",
             "refresh": {"command": [sys.executable, "-c",
                                     f"import sys; sys.stdout.write(open({str(source)!r}).read())"],
                         "output": "token"}},
        ],
        http={"listen": "127.0.0.1:0", "token_file": str(tmp_path / "http-token")},
        mqtt={"url": mosquitto_server.url, "topic_prefix": f"repr{time.monotonic_ns()}",
              "username": "credbroker", "password_file": str(tmp_path / "mqtt-password")},
    )
    loaded: list[str] = []

    def load_token() -> str:
        loaded.append(token_path.read_text())
        return loaded[-1]

    try:
        async with Broker(config) as broker, broker.subscribe("*") as events:
            key = (tmp_path / "state" / "fingerprint.key").read_text().strip()
            secrets.add(key)
            # Wait until the refresh command has run, the validator has asked, MQTT is up.
            with anyio.fail_after(20):
                mqtt = broker.sinks["mqtt"]
                assert isinstance(mqtt, MqttPublisher)
                while broker.state("jwt").generation < 2 or not validated or (
                    mqtt.state != "connected"
                ):
                    await anyio.sleep(0.05)
            assert refreshed in jwt_path.read_text()
            assert validated[0].endswith(json.loads(json.dumps(token_path.read_text())))
            cache: CredentialCache[str] = CredentialCache(load_token, credential="svc")
            assert await cache.aget() == token_path.read_text()
            assert config.mqtt is not None
            client = BrokerClient(mosquitto_server.url, host_id="test-host",
                                  prefix=config.mqtt.topic_prefix, username="credbroker",
                                  password_file=tmp_path / "mqtt-password")
            async with client:
                client.on_event(cache.observe)
                with anyio.fail_after(10):
                    await client.wait_connected()
                    while len(client.states) < 2:
                        await anyio.sleep(0.05)
                queued = []
                while (event := events.get_nowait()) is not None:
                    queued.append(event)
                assert queued
                spec = broker.engine.spec("svc")
                named = [
                    broker, broker.engine, broker.config, broker.store, broker.bus,
                    *broker.sinks.values(), *broker.states(), *queued, spec,
                    read_file("token", str(token_path), spec.max_size), read_credential(spec),
                    Fingerprinter(key.encode()), broker.config.mqtt, broker.config.http,
                    client, cache, *client.states.values(), events,
                ]
                objects = list(walk(named))
                # Plus every broker, MQTT and HTTP-client object alive in the process (the
                # connected aiomqtt/paho clients hold the password).
                gc.collect()
                alive = [o for o in gc.get_objects()
                         if _package(o) in ("broker", "aiomqtt", "paho")]
                # The walk reaches the objects that do hold content (a read before it is
                # fingerprinted): they just never show it.
                assert any(isinstance(o, FileRead) and o.content for o in objects)
                kinds = {type(o).__qualname__ for o in objects + alive}
                assert {"Broker", "Engine", "Tracked", "State", "Event", "Config",
                        "CredentialSettings", "MqttSettings", "HttpSettings", "HttpApi",
                        "MqttPublisher", "Refresher", "Validator", "Subscription", "FileRead",
                        "Fingerprinter", "Outbox", "Store", "BrokerClient", "CredentialCache",
                        "Client"} <= kinds, kinds
                for obj in objects + alive:
                    assert_no_secret(obj, secrets.values)
                record_figures("repr_walk", reachable=len(objects), alive_in_process=len(alive),
                               types=len(kinds), secrets=len(secrets.values))
    finally:
        await runner.cleanup()

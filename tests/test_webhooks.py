"""Webhooks: a real aiohttp receiver that verifies every request with the official libraries."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import standardwebhooks
from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import ConfigError
from broker.core.events import make_event
from broker.core.state import State, Status
from broker.sinks.outbox import Outbox
from broker.sinks.webhooks import SecretError, Webhooks, read_secret
from tests.conftest import Harness, SecretRegistry, make_config, write_atomic

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_secret(path: Path, secrets: SecretRegistry) -> str:
    raw = os.urandom(24)
    value = "whsec_" + base64.b64encode(raw).decode()
    secrets.add(value)
    secrets.add(base64.b64encode(raw).decode())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    event: Any  # the cloudevents SDK's event
    verified: bool


@dataclass
class Receiver:
    """An aiohttp endpoint that records, verifies and parses every request."""

    secret: str | None
    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)  # answered in turn, then 204
    got: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        verified = False
        if self.secret is not None:
            standardwebhooks.Webhook(self.secret).verify(body, headers, json_parse=False)
            verified = True
        event = from_http_event(
            HTTPMessage(headers={k.lower(): v for k, v in headers.items()}, body=body)
        )
        status = self.statuses.pop(0) if self.statuses else 204
        self.got.append(Received(headers, body, event, verified))
        return web.Response(status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.got]


@asynccontextmanager
async def receiving(secret: str | None) -> AsyncIterator[Receiver]:
    receiver = Receiver(secret)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


def cred(name: str, path: Path) -> dict[str, Any]:
    return {"name": name, "files": {"token": str(path)}}


@pytest.fixture
def webhook_harness(harness_factory: Any) -> Any:
    @asynccontextmanager
    async def start(
        credentials: list[dict[str, Any]], webhooks: list[dict[str, Any]], **kw: Any
    ) -> AsyncIterator[Harness]:
        kw.setdefault("rand", lambda: 1.0)
        sinks = [partial(Webhooks, **kw)]
        async with harness_factory(credentials, sinks=sinks, webhooks=webhooks) as h:
            yield h

    return start


def observe(secrets: SecretRegistry, receiver: Receiver) -> None:
    for r in receiver.got:
        secrets.observe("webhook request", json.dumps(r.headers) + r.body.decode())


# -- the official libraries accept what we send ------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_every_request_verifies_and_parses_with_the_official_libraries(
    webhook_harness: Any, tmp_path: Path, secrets: SecretRegistry, mode: str
) -> None:
    secret_file = tmp_path / "hook.whsec"
    secret = write_secret(secret_file, secrets)
    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    async with receiving(secret) as receiver:
        hook = {
            "name": "ops",
            "url": receiver.url,
            "credentials": ["a"],
            "secret_file": str(secret_file),
            "mode": mode,
        }
        async with webhook_harness([cred("a", a)], [hook]) as h:
            await wait_for(lambda: len(receiver.got) == 1)
            write_atomic(a, secrets.token())
            await wait_for(lambda: len(receiver.got) == 2)
            await h.fence()
            published = h.of("a")
    observe(secrets, receiver)
    assert [e.id for e in published] == receiver.ids()
    for event, got in zip(published, receiver.got, strict=True):
        assert got.verified
        ce = got.event
        assert ce.get_id() == event.id == got.headers["webhook-id"]
        assert ce.get_type() == event.type
        assert ce.get_subject() == "a"
        assert ce.get_source() == event.source
        data = ce.get_data()
        data = json.loads(data) if isinstance(data, bytes | str) else data
        assert data == event.data.to_dict()
        if mode == "binary":
            assert got.headers["ce-id"] == event.id
            assert got.headers["Content-Type"] == "application/json"
        else:
            assert got.headers["Content-Type"].startswith("application/cloudevents+json")
            assert not any(k.lower().startswith("ce-") for k in got.headers)
        # The check can fail: another secret does not verify.
        other = standardwebhooks.Webhook("whsec_" + base64.b64encode(os.urandom(24)).decode())
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            other.verify(got.body, got.headers)
        # ... nor does a tampered body.
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(secret).verify(got.body + b" ", got.headers)
    assert {e.data.generation for e in published} == {1, 2}


@pytest.mark.anyio
async def test_unsafe_secret_file_delivers_nothing_until_fixed(
    webhook_harness: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    secret_file = tmp_path / "hook.whsec"
    secret = write_secret(secret_file, secrets)
    secret_file.chmod(0o644)
    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    async with receiving(secret) as receiver:
        hook = {
            "name": "ops",
            "url": receiver.url,
            "credentials": ["a"],
            "secret_file": str(secret_file),
        }
        async with webhook_harness([cred("a", a)], [hook], base=0.1, cap=0.2) as h:
            sink = h.broker.sinks["webhooks"]
            await wait_for(lambda: sink.outcomes()[0].failures >= 2)
            outcome = sink.outcomes()[0]
            assert "readable by others" in outcome.last_reason
            assert f"chmod 600 {secret_file}" in outcome.last_reason
            assert receiver.got == []
            assert outcome.extra["pending"] == 1
            secret_file.chmod(0o600)
            await wait_for(lambda: len(receiver.got) == 1)
            assert receiver.got[0].verified
    observe(secrets, receiver)


@pytest.mark.anyio
async def test_a_redirect_is_not_followed_but_retried(
    webhook_harness: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    followed: list[str] = []
    async with receiving(None) as receiver:
        assert receiver.runner is not None
        receiver.statuses = [307]
        original = receiver.handle

        async def handle(request: web.Request) -> web.Response:
            response = await original(request)
            if response.status == 307:
                response.headers["Location"] = "/elsewhere"
            return response

        receiver.handle = handle  # type: ignore[method-assign]
        await receiver.stop()
        app = web.Application()
        app.router.add_post("/hook", handle)

        async def elsewhere(request: web.Request) -> web.Response:
            followed.append(request.path)
            return web.Response(status=204)

        app.router.add_post("/elsewhere", elsewhere)
        receiver.runner = web.AppRunner(app)
        await receiver.runner.setup()
        await web.TCPSite(receiver.runner, "127.0.0.1", receiver.port).start()
        hook = {"name": "ops", "url": receiver.url, "credentials": ["a"]}
        async with webhook_harness([cred("a", a)], [hook], base=0.05, cap=0.05) as h:
            await wait_for(lambda: len(receiver.got) == 2)
            outcome = h.broker.sinks["webhooks"].outcomes()[0]
            assert outcome.failures == 1
    assert followed == []
    assert receiver.got[0].headers["webhook-id"] == receiver.got[1].headers["webhook-id"]


# -- at least once, in order, across faults ---------------------------------------------------


@pytest.mark.anyio
async def test_500_then_down_then_back_delivers_everything_per_credential_in_order(
    webhook_harness: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    paths = {n: tmp_path / n for n in ("a", "b")}
    for p in paths.values():
        write_atomic(p, secrets.token())
    receiver = Receiver(None, statuses=[500, 500, 503])
    await receiver.start()
    try:
        hook = {"name": "ops", "url": receiver.url, "credentials": ["a", "b"], "timeout": "2s"}
        async with webhook_harness(
            [cred(n, p) for n, p in paths.items()], [hook], base=0.05, cap=0.3
        ) as h:
            sink = h.broker.sinks["webhooks"]
            await wait_for(lambda: len(receiver.got) >= 3)  # the three errors answered
            await receiver.stop()
            for _ in range(3):
                for p in paths.values():
                    write_atomic(p, secrets.token())
                await anyio.sleep(0.05)
            await h.fence()
            await wait_for(lambda: sink.outcomes()[0].extra["retrying"] >= 1)
            pending = sink.outcomes()[0].extra["pending"]
            assert pending >= 2
            assert sink.outcomes()[0].extra["oldest_undelivered_seconds"] > 0
            await receiver.start()
            published = [e for e in h.seen if e.subject in paths]
            want = {e.id for e in published}
            await wait_for(lambda: want <= set(receiver.ids()))
            await wait_for(lambda: sink.outcomes()[0].extra["pending"] == 0)
            outcome = sink.outcomes()[0]
            assert outcome.extra["delivered"] == len(want)
            assert outcome.failures >= 3
    finally:
        await receiver.stop()
    check_order(receiver, published)


def check_order(receiver: Receiver, published: list[Any]) -> None:
    """Every event arrived; per credential in sequence order; a duplicate is the same event."""
    by_id = {e.id: e for e in published}
    assert set(by_id) <= set(receiver.ids())
    bodies: dict[str, bytes] = {}
    last: dict[str, int] = {}
    for got in receiver.got:
        event_id = got.headers["webhook-id"]
        data = json.loads(got.body)["data"]
        seq = data["sequence"]
        name = data["credential"]
        if event_id in bodies:
            assert bodies[event_id] == got.body  # a redelivery is the same event
            continue
        bodies[event_id] = got.body
        assert seq > last.get(name, 0), "events of one credential out of sequence order"
        last[name] = seq


def _start_daemon(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def _outbox_ids(path: Path) -> set[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    ids: set[str] = set()
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "add" in record:
            ids.add(record["add"]["id"])
        elif "done" in record:
            ids.discard(record["done"])
    return ids


def _queued_generations(path: Path) -> set[int]:
    """The newest generation queued per credential, as a set (one value once all agree)."""
    newest: dict[str, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return set()
    for line in lines:
        try:
            data = json.loads(line)["add"]["data"]
        except (ValueError, KeyError):
            continue
        newest[data["credential"]] = max(newest.get(data["credential"], 0), data["generation"])
    return set(newest.values()) if len(newest) == 3 else set()


@pytest.mark.anyio
async def test_sigkill_with_undelivered_events_loses_none(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    paths = [tmp_path / f"t{i}" for i in range(3)]
    for p in paths:
        write_atomic(p, secrets.token())
    receiver = Receiver(None, statuses=[500])
    config = tmp_path / "broker.toml"
    state = tmp_path / "state"
    body = f'[broker]\nstate_dir = "{state}"\nhost_id = "hooks"\n'
    for i, p in enumerate(paths):
        body += f'\n[[credentials]]\nname = "c{i}"\nfiles = {{ token = "{p}" }}\n'
    body += f'\n[[webhooks]]\nname = "ops"\nurl = "{receiver.url}"\ntimeout = "1s"\n'
    config.write_text(body)
    outbox = state / "outbox-ops.jsonl"
    await receiver.start()
    proc = _start_daemon(config)
    try:
        await wait_for(lambda: len(receiver.got) >= 1)  # answered 500
        await receiver.stop()  # now down
        # Each round waits until the outbox holds it: under load two quick writes of one
        # file could otherwise be one change, and the generations below would differ.
        for generation in range(2, 6):
            for p in paths:
                write_atomic(p, secrets.token())
            await wait_for(lambda g=generation: _queued_generations(outbox) == {g})
        # The 12 changes wait (with whatever first-sight event got the 500).
        assert 12 <= len(_outbox_ids(outbox)) <= 15
        queued = _outbox_ids(outbox)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await receiver.start()
        proc = _start_daemon(config)
        await wait_for(lambda: queued <= set(receiver.ids()))
        await wait_for(lambda: _outbox_ids(outbox) == set())
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[1]
        await receiver.stop()
    secrets.assert_absent(out, "daemon log")
    observe(secrets, receiver)
    last = {}
    for got in receiver.got[1:]:
        data = json.loads(got.body)["data"]
        last[data["credential"]] = data["generation"]
    assert last == {"c0": 5, "c1": 5, "c2": 5}  # every credential's latest arrived
    check_order(receiver, [])


@pytest.mark.anyio
async def test_an_event_published_but_never_queued_before_a_crash_is_re_announced(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    from broker import Broker

    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    receiver = Receiver(None)
    config = make_config(
        tmp_path,
        [cred("a", a)],
        webhooks=[{"name": "ops", "url": receiver.url, "timeout": "1s"}],
    )
    outbox = tmp_path / "state" / "outbox-ops.jsonl"
    await receiver.start()
    try:
        async with Broker(config, sinks=[partial(Webhooks, base=0.05, cap=0.1)]):
            await wait_for(lambda: len(receiver.got) == 1)
            await wait_for(lambda: _outbox_ids(outbox) == set())
            before = outbox.read_bytes()  # the outbox once generation 1 was delivered
            await receiver.stop()
            write_atomic(a, secrets.token())
            await wait_for(lambda: b'"generation":2' in outbox.read_bytes())
        # As if SIGKILLed after the engine recorded generation 2 but before the outbox did.
        outbox.write_bytes(before)
        await receiver.start()
        for _ in range(2):  # the second restart must not announce it again
            async with Broker(config, sinks=[partial(Webhooks, base=0.05, cap=0.1)]) as b:
                await wait_for(lambda: len(receiver.got) >= 2)
                await wait_for(lambda: _outbox_ids(outbox) == set())
                assert b.state("a").generation == 2
    finally:
        await receiver.stop()
    observe(secrets, receiver)
    assert len(receiver.got) == 2
    again = json.loads(receiver.got[1].body)
    assert (again["type"], again["data"]["generation"]) == ("credentials.refreshed", 2)


# -- the outbox ---------------------------------------------------------------------------------


def _event(name: str, sequence: int) -> Any:
    state = State(credential=name, status=Status.VALID, generation=sequence, sequence=sequence)
    return make_event("credentials.refreshed", state, source="urn:x", now=time.time())


def test_outbox_survives_reload_and_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    events = [_event("a", 1), _event("b", 2), _event("a", 3)]
    box.add(events)
    box.done([events[0].id])
    with open(path, "ab") as fh:
        fh.write(b'{"add": {"specversion": "1.0", "id": "x')  # SIGKILL mid-write
    again = Outbox(path)
    again.load()
    assert [e.id for e in again.events()] == [events[1].id, events[2].id]
    assert again.head("a") == events[2]
    assert again.problems and "unreadable" in again.problems[0]
    assert (path.stat().st_mode & 0o777) == 0o600
    reloaded = Outbox(path)
    reloaded.load()
    assert not reloaded.problems  # the load rewrote it clean


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=40), st.integers(1, 8))
def test_outbox_bound_keeps_every_credentials_latest_and_order(
    tmp_path_factory: pytest.TempPathFactory, names: list[str], limit: int
) -> None:
    path = tmp_path_factory.mktemp("box") / "outbox.jsonl"
    box = Outbox(path, limit=limit)
    events = [_event(n, i + 1) for i, n in enumerate(names)]
    for e in events:
        box.add([e])
    kept = list(box.events())
    latest = {e.subject: e for e in events}
    assert set(latest.values()) <= set(kept)
    assert len(kept) <= max(limit, 2 * len(latest))
    for name in latest:
        seqs = [e.sequence for e in kept if e.subject == name]
        assert seqs == sorted(seqs)
    again = Outbox(path, limit=limit)
    again.load()
    assert [e.id for e in again.events()] == [e.id for e in kept]


# -- config and secret file -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "where", "message"),
    [
        ({"url": "http://example.com/x"}, "webhooks[0].url", "only allowed to a loopback"),
        ({"url": "ftp://127.0.0.1/"}, "webhooks[0].url", "unsupported url scheme"),
        ({"url": "https://u:p@example.com/"}, "webhooks[0].url", "credentials in the url"),
        ({"url": "https://e.com", "mode": "batch"}, "webhooks[0].mode", "structured"),
        ({"url": "https://e.com", "secret": "x"}, "webhooks[0].secret", "unknown key"),
        ({"url": "https://e.com", "on": "credentials.*"}, "webhooks[0].on", "expected an array"),
    ],
)
def test_webhook_config_errors_name_the_key(
    tmp_path: Path, hook: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(
            tmp_path, [{"name": "a", "files": {"t": "/x"}}], webhooks=[{"name": "w", **hook}]
        )
    text = str(info.value)
    assert where in text and message in text
    assert "u:p" not in text


def test_action_config_errors_name_the_key(tmp_path: Path) -> None:
    creds = [{"name": "a", "files": {"t": "/x"}}]
    cases = [
        ({"name": "n"}, "actions[0]", "set either signal"),
        ({"name": "n", "command": ["x"], "signal": {"pidfile": "/p"}}, "actions[0]", "not both"),
        ({"name": "n", "command": "systemctl reload"}, "actions[0].command", "argv"),
        (
            {"name": "n", "signal": {"pidfile": "/p", "name": "NOPE"}},
            "actions[0].signal.name",
            "unknown signal",
        ),
        ({"name": "N!", "command": ["x"]}, "actions[0].name", "invalid action name"),
        ({"name": "n", "command": ["x"], "coalesce": "soon"}, "actions[0].coalesce", "duration"),
        ({"name": "n", "command": ["x"], "shell": True}, "actions[0].shell", "unknown key"),
    ]
    for action, where, message in cases:
        with pytest.raises(ConfigError) as info:
            make_config(tmp_path, creds, actions=[action])
        assert f"{where}: " in str(info.value) and message in str(info.value), action
    dup = [{"name": "n", "command": ["x"]}, {"name": "n", "command": ["y"]}]
    with pytest.raises(ConfigError, match=r"actions\[1\]\.name: duplicate action name"):
        make_config(tmp_path, creds, actions=dup)
    ok = make_config(tmp_path, creds, actions=[{"name": "n", "signal": {"pidfile": "/p"}}])
    assert ok.actions[0].on == ("credentials.refreshed",)
    assert ok.actions[0].signal is not None and ok.actions[0].signal.name == "HUP"
    assert ok.actions[0].coalesce == 0.5


def test_secret_file_rules(tmp_path: Path, secrets: SecretRegistry) -> None:
    path = tmp_path / "s"
    with pytest.raises(SecretError, match="not found"):
        read_secret(path)
    value = write_secret(path, secrets)
    assert read_secret(path) == base64.b64decode(value[6:])
    path.chmod(0o640)
    with pytest.raises(SecretError, match="chmod 600"):
        read_secret(path)
    path.chmod(0o600)
    path.write_text("hunter2-not-whsec")
    with pytest.raises(SecretError) as info:
        read_secret(path)
    assert "hunter2" not in str(info.value)
    path.write_text("whsec_" + "!" * 30)
    with pytest.raises(SecretError, match="not base64"):
        read_secret(path)


# -- last outcomes: /v1/deliveries, metrics, `credbroker check` --------------------------------


@pytest.mark.anyio
async def test_last_outcomes_over_http_in_metrics_and_in_check(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, capsys: Any
) -> None:
    import aiohttp

    from broker.cli.main import main
    from tests.test_http import ApiClient

    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    async with receiving(None) as receiver:
        receiver.statuses = [500]
        hook = {"name": "ops", "url": receiver.url, "credentials": ["a"]}
        async with harness_factory(
            [cred("a", a)],
            sinks=[partial(Webhooks, base=0.05, cap=0.05)],
            webhooks=[hook],
            http={"listen": "127.0.0.1:0"},
        ) as h:
            api = h.broker.sinks["http"]
            sink = h.broker.sinks["webhooks"]
            # The receiver holds a request before the broker has read its answer: wait for
            # the broker's own count, not the receiver's.
            await wait_for(lambda: sink.outcomes()[0].extra["delivered"] == 1)
            assert len(receiver.got) == 2
            async with aiohttp.ClientSession() as session:
                client = ApiClient(session, api.url, secrets)
                doc = (await client.get("/v1/deliveries")).json()
                (entry,) = doc["deliveries"]
                assert entry["kind"] == "webhook" and entry["name"] == "ops"
                assert entry["last_ok"] is True and entry["failures"] == 1
                assert entry["delivered"] == 1 and entry["pending"] == 0
                metrics = (await client.get("/metrics")).body
            assert b'credbroker_webhook_delivered_total{name="ops"} 1.0' in metrics
            assert b'credbroker_sink_delivered_events_total{sink="webhooks"} 1.0' in metrics
            capsys.readouterr()
            code = await anyio.to_thread.run_sync(main, ["status", "--url", api.url])
            assert code == 0
            assert "webhook ops  ok at " in capsys.readouterr().out
            assert b'credbroker_delivery_failures_total{kind="webhook",name="ops"} 1.0' in metrics
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "test-host"\n'
        f'[[credentials]]\nname = "a"\nfiles = {{ token = "{a}" }}\n'
        f'[[webhooks]]\nname = "ops"\nurl = "{receiver.url}"\n'
        '[[webhooks]]\nname = "new"\nurl = "https://hooks.example.com/x"\n'
    )
    capsys.readouterr()
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "webhook ops  ok at " in out and ": HTTP 204 (pending 0, retrying 0)" in out
    assert "webhook new  no run yet" in out
    assert main(["check", "-c", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in doc["deliveries"]] == ["ops", "new"]

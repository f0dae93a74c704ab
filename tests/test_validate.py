"""Validation against a real local HTTP server, in the daemon and in `credbroker check`."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from broker import Broker
from broker.core.state import Status
from broker.workers.refresh import Refresher
from broker.workers.validate import (
    REJECTED,
    UNEXPECTED,
    UNREACHABLE,
    Validator,
    build_header,
    url_host,
    worth_validating,
)
from tests.conftest import SecretRegistry, make_config, write_atomic

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0

pytestmark = pytest.mark.anyio


@dataclass
class Api:
    """A stand-in for the real API: answers ``status``, or never (``hang``)."""

    status: int = 200
    hang: bool = False
    port: int = 0
    release: anyio.Event = field(default_factory=anyio.Event)
    send: MemoryObjectSendStream[str | None] | None = None
    received: MemoryObjectReceiveStream[str | None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/whoami"

    async def handle(self, request: web.Request) -> web.Response:
        assert self.send is not None
        self.send.send_nowait(request.headers.get("Authorization"))
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.status, text="body with private details")

    async def next_header(self) -> str | None:
        assert self.received is not None
        with anyio.fail_after(TIMEOUT):
            return await self.received.receive()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    server = Api()
    server.send, server.received = anyio.create_memory_object_stream[str | None](100)
    app = web.Application()
    app.router.add_get("/whoami", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()
        server.send.close()
        server.received.close()


#: The validator without a minimum interval between forced checks.
UNBOUNDED = [partial(Validator, min_interval=0.0)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def validated(token: Path, url: str, **settings: Any) -> dict[str, Any]:
    return {
        "name": "svc",
        "files": {"token": str(token)},
        "validate": {
            "url": url,
            "header": "Authorization: Bearer {token}",
            "interval": "1h",
            "timeout": "500ms",
            **settings,
        },
    }


# -- the daemon ---------------------------------------------------------------------------------


async def test_valid_rejected_unreachable(
    harness_factory: Any, api: Api, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    token = secrets.token()
    write_atomic(path, token + "\n")
    # Each forced check here must reach the API: no minimum interval.
    async with harness_factory([validated(path, api.url)], sinks=UNBOUNDED) as h:
        await h.fence()
        h.seen.clear()
        validator = h.broker.sinks["validate"]
        assert isinstance(validator, Validator)
        # At start: one request, with the file's content (stripped) in the header.
        assert await api.next_header() == f"Bearer {token}"
        state = await validator.validate_now("svc")
        assert await api.next_header() == f"Bearer {token}"
        assert state.status is Status.VALID
        assert state.problems == ()

        api.status = 401
        state = await validator.validate_now("svc")
        assert state.status is Status.INVALID
        assert state.problems[0].code == REJECTED
        assert state.problems[0].message == f"127.0.0.1:{api.port} answered 401"
        assert state.problems[0].remedy == f"renew the credential and write it to {path}"
        event = await h.next("svc")
        assert event.type == "credentials.invalid"
        assert event.data.generation == 1

        # Accepted again: the same content is restored.
        api.status = 200
        state = await validator.validate_now("svc")
        assert state.status is Status.VALID
        event = await h.next("svc")
        assert event.type == "credentials.refreshed"
        assert event.data.reason == "restored after invalid"

        # No answer within the timeout: advice, not a verdict.
        api.hang = True
        state = await validator.validate_now("svc")
        assert state.status is Status.VALID
        problem = next(p for p in state.problems if p.code == UNREACHABLE)
        assert problem.message == f"127.0.0.1:{api.port} did not answer within 500ms"
        assert problem.remedy == (
            f"check network access to 127.0.0.1:{api.port}; the broker retries every 1h"
        )
        api.hang = False
        api.release.set()

        # An answer that is neither accepted nor a rejection.
        api.status = 500
        state = await validator.validate_now("svc")
        assert state.status is Status.VALID
        assert [p.code for p in state.problems] == [UNEXPECTED]
        assert state.problems[0].message == f"127.0.0.1:{api.port} answered 500, expected 200"
        await h.fence()
        assert h.types("svc") == ["credentials.invalid", "credentials.refreshed"]


async def test_connection_refused_is_unreachable(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    port = closed_port()
    url = f"http://127.0.0.1:{port}/whoami"
    async with harness_factory([validated(path, url, interval="10m")], sinks=UNBOUNDED) as h:
        validator = h.broker.sinks["validate"]
        assert isinstance(validator, Validator)
        state = await validator.validate_now("svc")
        assert state.status is Status.VALID
        problem = next(p for p in state.problems if p.code == UNREACHABLE)
        assert problem.message.startswith(f"cannot connect to 127.0.0.1:{port}: ")
        assert problem.remedy == (
            f"check network access to 127.0.0.1:{port}; the broker retries every 10m"
        )
        await h.fence()
        assert h.types("svc") == ["credentials.refreshed"]


async def test_new_content_is_validated_and_a_rejection_dropped(
    harness_factory: Any, api: Api, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    first = secrets.token()
    write_atomic(path, first)
    api.status = 401
    async with harness_factory([validated(path, api.url)]) as h:
        # The start-up validation rejects it by itself.
        assert await api.next_header() == f"Bearer {first}"
        events = [await h.next("svc"), await h.next("svc")]
        assert [e.type for e in events] == ["credentials.refreshed", "credentials.invalid"]
        assert events[1].data.problems[0].code == REJECTED

        # New content: the rejection was about the old one; the new one is sent at once.
        api.status = 200
        second = secrets.token()
        write_atomic(path, second)
        event = await h.next("svc")
        assert (event.type, event.data.status) == ("credentials.refreshed", Status.VALID)
        assert event.data.generation == 2
        assert await api.next_header() == f"Bearer {second}"
        await h.fence()
        assert h.broker.state("svc").status is Status.VALID


async def test_missing_content_is_not_sent(
    harness_factory: Any, api: Api, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    async with harness_factory([validated(path, api.url)]) as h:
        validator = h.broker.sinks["validate"]
        assert isinstance(validator, Validator)
        state = await validator.validate_now("svc")
        assert state.status is Status.MISSING
    assert api.received is not None
    assert api.received.statistics().current_buffer_used == 0


# -- `credbroker check` -------------------------------------------------------------------------


async def credbroker(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, "-m", "broker", *args],
            check=False,
            cwd=ROOT,
            env=env or os.environ.copy(),
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def toml_credential(name: str, token: Path, url: str, extra: str = "") -> str:
    return (
        f'[[credentials]]\nname = "{name}"\nfiles = {{ token = "{token}" }}\n'
        f'validate = {{ url = "{url}", header = "Authorization: Bearer {{token}}", '
        f'timeout = "2s" }}\n{extra}\n'
    )


async def test_check_explains_rejected_and_unreachable(
    api: Api, tmp_path: Path, secrets: SecretRegistry
) -> None:
    api.status = 401
    rejected, unreachable = tmp_path / "rejected", tmp_path / "unreachable"
    token = secrets.token()
    write_atomic(rejected, token)
    write_atomic(unreachable, secrets.token())
    port = closed_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "cli"\n\n'
        + toml_credential("rej", rejected, api.url)
        + toml_credential("down", unreachable, f"http://127.0.0.1:{port}/whoami")
    )
    code, out, err = await credbroker("check", "-c", str(config))
    secrets.observe("check stdout", out)
    secrets.observe("check stderr", err)
    assert code == 1, err
    assert await api.next_header() == f"Bearer {token}"
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["rej", "invalid"]
    assert lines[4].split()[:2] == ["down", "valid"]
    assert f"    ! rejected-by-validator: 127.0.0.1:{api.port} answered 401" in lines
    assert f"      fix: renew the credential and write it to {rejected}" in lines
    assert any(
        line.startswith(f"    ! validator-unreachable: cannot connect to 127.0.0.1:{port}: ")
        for line in lines
    )
    assert (
        f"      fix: check network access to 127.0.0.1:{port}; the broker retries every 10m"
        in lines
    )

    # Accepted: exit 0, and the JSON says so.
    api.status = 200
    code, out, err = await credbroker("check", "rej", "-c", str(config), "--json")
    secrets.observe("check stdout", out)
    assert code == 0, err
    assert '"status": "valid"' in out


async def test_check_shows_a_failing_refresh_reported_by_the_daemon(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    then = time.time() - 55 * 60  # expiring (ttl 1h, window 15m) before the broker starts
    os.utime(token, (then, then))
    script = tmp_path / "renew"
    script.write_text("#!/bin/sh\necho 'renew: the server said no' >&2\nexit 3\n")
    script.chmod(0o755)
    cred = {
        "name": "svc",
        "files": {"token": str(token)},
        "expiry": "ttl:1h",
        "refresh": {"command": [str(script), "--now"], "output": "token"},
    }
    broker = Broker(make_config(tmp_path, [cred]))
    async with broker.subscribe("credentials.refresh_failed") as events, broker:
        assert isinstance(broker.sinks["refresh"], Refresher)
        with anyio.fail_after(TIMEOUT):
            event = await events.get()
        secrets.observe("event", event.payload)
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "test-host"\n\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\nexpiry = "ttl:1h"\n'
        f'refresh = {{ command = ["{script}", "--now"], output = "token" }}\n'
    )
    code, out, err = await credbroker("check", "-c", str(config))
    secrets.observe("check stdout", out)
    assert code == 0, err  # expiring is still healthy
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["svc", "expiring"]
    assert "    ! refresh-failed: exit code 3; stderr: renew: the server said no" in lines
    assert f"      fix: run it by hand to see: {script} --now" in lines


# -- pure helpers -------------------------------------------------------------------------------


def test_header_is_built_from_stripped_content(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        [validated(tmp_path / "t", "https://api.example.com/v1/whoami?key=secret")],
    )
    settings = config.credentials[0].validate_
    assert settings is not None
    assert build_header(settings, {"token": b"  abc\n"}) == ("Authorization", "Bearer abc")
    for bad in (b"a\nb", b"", b"\xff", b"x\x00"):
        with pytest.raises(Exception, match="token file") as info:
            build_header(settings, {"token": bad})
        assert "a\nb" not in str(info.value)
    assert url_host(settings.url) == "api.example.com"
    assert url_host("https://[::1]:8443/x") == "[::1]:8443"


def test_only_usable_content_is_worth_sending(tmp_path: Path) -> None:
    from broker.core.state import Problem, State

    assert worth_validating(State("x", Status.VALID))
    assert worth_validating(State("x", Status.EXPIRING))
    assert not worth_validating(State("x", Status.EXPIRED))
    assert not worth_validating(State("x", Status.MISSING))
    assert not worth_validating(State("x", Status.INVALID, problems=(Problem("empty", "e"),)))
    assert worth_validating(State("x", Status.INVALID, problems=(Problem(REJECTED, "401"),)))


async def test_forced_checks_are_bounded_and_say_when_the_verdict_was_made(
    harness_factory: Any, tmp_path: Path, api: Api, secrets: SecretRegistry
) -> None:
    # 200 POST checks in a burst: the API sees the credential once, not 200 times.
    import aiohttp

    from broker.core.timefmt import parse_time
    from broker.sinks.http import HttpApi

    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    sinks = [HttpApi, partial(Validator, min_interval=1.5)]
    async with harness_factory([validated(token, api.url)], sinks=sinks,
                               http={"listen": "127.0.0.1:0"}) as h:
        assert await api.next_header() is not None  # the validation at start
        http = h.broker.sinks["http"]
        assert isinstance(http, HttpApi)
        url = f"http://127.0.0.1:{http.port}/v1/credentials/svc/check"
        async with aiohttp.ClientSession() as session:

            async def check() -> tuple[str | None, Any]:
                async with session.post(url) as reply:
                    assert reply.status == 200
                    body = await reply.json()
                    secrets.observe("check", repr(body))
                    return reply.headers.get("Validated-At"), body

            first_at, body = await check()  # within the interval of the start's request
            assert first_at is not None and body["status"] == "valid"
            assert parse_time(first_at) <= time.time()
            seen_at: list[str | None] = []
            started = time.monotonic()
            with anyio.fail_after(TIMEOUT):
                for _ in range(200):
                    at, body = await check()
                    seen_at.append(at)
                    assert body["status"] == "valid"
            # One verdict per interval at most: the start's, and one more for each interval
            # the burst outlasted (none on an idle machine; a loaded one is slower).
            intervals = int((time.monotonic() - started) / 1.5)
            assert seen_at[0] == first_at and len(set(seen_at)) <= 1 + intervals
            assert seen_at == sorted(seen_at, key=lambda a: parse_time(a or first_at))
            assert api.received is not None
            extra = 0
            while True:
                try:
                    api.received.receive_nowait()
                    extra += 1
                except anyio.WouldBlock:
                    break
            assert extra <= 1 + intervals
            await anyio.sleep(1.6)  # the interval is a span of time: nothing to await instead
            later_at, _ = await check()
            assert await api.next_header() is not None
            assert later_at is not None and parse_time(later_at) > parse_time(first_at)

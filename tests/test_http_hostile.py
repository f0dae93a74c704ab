"""The HTTP API against hostile clients: rebound names (Host), other origins (CORS), and
more idle connections than the broker has file descriptors."""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from broker.config import ConfigError, parse_config
from broker.sinks.http import HttpApi, connection_cap, host_name
from tests.conftest import SecretRegistry, write_atomic
from tests.daemon import run_daemon

TIMEOUT = 5.0


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _get(port: int, host: str, *, extra: bytes = b"", method: bytes = b"GET",
         path: bytes = b"/v1/credentials") -> tuple[int, bytes]:
    reply = _raw(port, method + b" " + path + b" HTTP/1.1\r\nHost: " + host.encode()
                 + b"\r\nConnection: close\r\n" + extra + b"\r\n")
    head = reply.split(b"\r\n\r\n", 1)[0]
    return int(head.split()[1]), head


@pytest.mark.anyio
async def test_unknown_host_gets_421(harness_factory: Any, tmp_path: Path,
                                     secrets: SecretRegistry) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    http = {"listen": "127.0.0.1:0", "allowed_hosts": ["creds.internal"]}
    async with harness_factory([{"name": "svc", "files": {"token": str(token)}}],
                               sinks=[HttpApi], http=http) as h:
        api = h.broker.sinks["http"]
        assert isinstance(api, HttpApi) and api.port is not None
        port = api.port
        for host in ("attacker.example", f"attacker.example:{port}", "evil.localhost",
                     "127.0.0.1.nip.io", "localhost.attacker.example", "[::2]"):
            status, head = await anyio.to_thread.run_sync(_get, port, host)
            assert status == 421, host
            assert b"application/json" in head
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]",
                     f"[::1]:{port}", "creds.internal", "CREDS.internal.", "LocalHost"):
            status, _ = await anyio.to_thread.run_sync(_get, port, host)
            assert status == 200, host


def test_host_names_are_compared_without_port_case_or_dot() -> None:
    assert host_name("LocalHost:8790") == "localhost"
    assert host_name("[::1]:8790") == "::1"
    assert host_name("example.com.") == "example.com"
    assert host_name("::1") == "::1"


@pytest.mark.anyio
async def test_cors_is_off_by_default_and_opt_in(harness_factory: Any, tmp_path: Path,
                                                 secrets: SecretRegistry) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    cred = [{"name": "svc", "files": {"token": str(token)}}]
    origin = b"Origin: https://dash.example.com\r\n"
    preflight = origin + b"Access-Control-Request-Method: GET\r\n"
    async with harness_factory(cred, sinks=[HttpApi], http={"listen": "127.0.0.1:0"}) as h:
        api = h.broker.sinks["http"]
        assert isinstance(api, HttpApi) and api.port is not None
        status, head = await anyio.to_thread.run_sync(
            lambda: _get(api.port or 0, "localhost", extra=origin))
        assert status == 200 and b"access-control" not in head.lower()
        status, head = await anyio.to_thread.run_sync(
            lambda: _get(api.port or 0, "localhost", extra=preflight, method=b"OPTIONS"))
        assert b"access-control" not in head.lower()
    http = {"listen": "127.0.0.1:0", "cors_origins": ["https://dash.example.com"]}
    async with harness_factory(cred, sinks=[HttpApi], http=http) as h:
        api = h.broker.sinks["http"]
        assert isinstance(api, HttpApi) and api.port is not None
        status, head = await anyio.to_thread.run_sync(
            lambda: _get(api.port or 0, "localhost", extra=preflight, method=b"OPTIONS"))
        assert status == 204
        assert b"Access-Control-Allow-Origin: https://dash.example.com" in head
        assert b"Access-Control-Allow-Headers: Authorization" in head
        status, head = await anyio.to_thread.run_sync(
            lambda: _get(api.port or 0, "localhost", extra=origin))
        assert status == 200 and b"Access-Control-Allow-Origin: https://dash.example.com" in head
        other = b"Origin: https://attacker.example\r\n"
        status, head = await anyio.to_thread.run_sync(
            lambda: _get(api.port or 0, "localhost", extra=other))
        assert b"access-control" not in head.lower()


def test_cors_origins_and_allowed_hosts_are_checked() -> None:
    base = {"broker": {"state_dir": "/tmp/x"}, "credentials": []}
    for origins in (["*"], ["https://a.example/path"], ["dash.example.com"]):
        with pytest.raises(ConfigError, match="cors_origins"):
            parse_config({**base, "http": {"cors_origins": origins}})
    with pytest.raises(ConfigError, match="allowed_hosts"):
        parse_config({**base, "http": {"allowed_hosts": ["not a host"]}})


def test_connection_cap_stays_well_below_the_descriptor_limit() -> None:
    assert connection_cap(1024) == 256
    assert connection_cap(64) == 16
    assert connection_cap(10**7) == 4096


def _daemon_config(tmp_path: Path, token: Path, bearer: Path) -> Path:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "fd"\n'
        f'[http]\nlisten = "127.0.0.1:0"\ntoken_file = "{bearer}"\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
    )
    return config


@pytest.mark.parametrize("rounds", [
    pytest.param(1, id="1"),
    pytest.param(20, id="20", marks=[pytest.mark.soak, pytest.mark.timeout(600)]),
])
def test_idle_connections_cannot_exhaust_the_daemons_descriptors(
    tmp_path: Path, secrets: SecretRegistry, rounds: int
) -> None:
    # 1,100 connections that never send a byte against a daemon limited to 1,024
    # descriptors (soft = hard, as systemd sets it): a rotation is still published as
    # refreshed, and an authorised request is answered at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip("the test itself needs 1,300 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    for round_ in range(rounds):
        _flood_then_rotate(tmp_path / f"r{round_}", secrets)


def _flood_then_rotate(tmp_path: Path, secrets: SecretRegistry) -> None:
    tmp_path.mkdir()
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    bearer = tmp_path / "bearer"
    write_atomic(bearer, secrets.token("bearer"))
    auth = "Bearer " + bearer.read_text()
    idle: list[socket.socket] = []
    with run_daemon(_daemon_config(tmp_path, token, bearer), nofile=1024) as daemon:
        try:
            url = daemon.wait_for("http listening")["url"]
            port = int(url.rsplit(":", 1)[1])
            daemon.wait_for("broker started")
            for _ in range(1100):
                sock = socket.socket()
                sock.settimeout(TIMEOUT)
                with contextlib.suppress(OSError):
                    sock.connect(("127.0.0.1", port))
                idle.append(sock)
            time.sleep(0.5)  # let the daemon accept what it will (nothing to await from outside)
            write_atomic(token, secrets.token())
            record = daemon.wait_for("credentials.refreshed", generation=2)
            assert record["credential"] == "svc"
            started = time.monotonic()
            status, _ = _get(port, "localhost", path=b"/v1/credentials/svc",
                             extra=b"Authorization: " + auth.encode() + b"\r\n")
            reply = _raw(port, b"GET /v1/credentials/svc HTTP/1.1\r\nHost: localhost\r\n"
                         b"Connection: close\r\nAuthorization: " + auth.encode() + b"\r\n\r\n")
            assert time.monotonic() - started < 2.0
            assert status == 200 and reply.startswith(b"HTTP/1.1 200")
            body = reply.split(b"\r\n\r\n", 1)[1]
            secrets.observe("GET svc", body)
            assert b'"status":"valid"' in body.replace(b" ", b"")
            assert b'"generation":2' in body.replace(b" ", b"")
        finally:
            for sock in idle:
                sock.close()
        code, rest = daemon.stop()
        log = daemon.log_text() + rest
        secrets.observe("daemon log", log)
        assert code == 0
        assert "credentials.missing" not in log
        assert log.count("http cannot accept connections") <= 1


@pytest.mark.anyio
async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    cred = [{"name": "svc", "files": {"token": str(token)}}]
    sinks = [partial(HttpApi, idle_timeout=0.5)]
    async with harness_factory(cred, sinks=sinks, http={"listen": "127.0.0.1:0"}) as h:
        api = h.broker.sinks["http"]
        assert isinstance(api, HttpApi) and api.port is not None
        port = api.port

        def silent_then_partial(data: bytes) -> float:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                started = time.monotonic()
                sock.sendall(data)
                assert sock.recv(1) == b""  # closed by the broker
                return time.monotonic() - started

        # Nothing sent at all, and headers that never end (slowloris).
        for data in (b"", b"GET /v1/credentials HTTP/1.1\r\nHost: localhost\r\n"):
            elapsed = await anyio.to_thread.run_sync(silent_then_partial, data)
            assert 0.3 < elapsed < 3.0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as reply,
        ):
            assert reply.status == 200

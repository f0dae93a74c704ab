"""`credbroker status` and `credbroker events` against a real daemon, and their building blocks."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from subprocess import PIPE
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from broker import Broker
from broker.cli.remote import (
    DEFAULT_URL,
    Endpoint,
    RemoteError,
    follow_events,
    iter_sse,
    listen_url,
    resolve_endpoint,
)
from broker.config import ConfigError
from broker.sinks.http import HttpApi
from tests.conftest import SecretRegistry, make_config, write_atomic

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


# -- the SSE parser and endpoint resolution ---------------------------------------------------


async def test_sse_parser_follows_the_wire_format() -> None:
    wire = (
        b"retry: 2000\n: a comment\n\n"
        b"id: 7\nevent: credentials.refreshed\ndata: {\"a\":1}\n\n"
        b"data: line one\r\ndata:line two\r\n\r\n"  # CRLF, no space after the colon
        b"id: 9\revent: reset\rdata: {}\r\r"  # bare CR line ends
        b"event: ignored-without-data\n\n"
        b"data: tail-without-blank-line"
    )
    for size in (1, 2, 3, 7, len(wire)):  # every way of splitting it into chunks

        async def chunks(size: int = size) -> AsyncIterator[bytes]:
            for i in range(0, len(wire), size):
                yield wire[i:i + size]

        messages = [m async for m in iter_sse(chunks())]
        assert [(m.event, m.data, m.id) for m in messages] == [
            ("credentials.refreshed", '{"a":1}', "7"),
            ("message", "line one\nline two", "7"),
            ("reset", "{}", "9"),
        ], size


def test_endpoint_resolution(tmp_path: Path, secrets: SecretRegistry) -> None:
    token = secrets.token("bearer")
    token_file = tmp_path / "token"
    write_atomic(token_file, token + "\n")
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[http]\nlisten = "unix:{tmp_path / "api.sock"}"\ntoken_file = "{token_file}"\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{tmp_path / "svc"}" }}\n'
    )
    assert resolve_endpoint(env={}) == Endpoint(DEFAULT_URL)
    assert resolve_endpoint(env={"CREDBROKER_URL": "http://127.0.0.1:1"}).url == "http://127.0.0.1:1"
    from_config = resolve_endpoint(config=str(config), env={"CREDBROKER_URL": "http://x:1"})
    assert from_config == Endpoint(f"unix:{tmp_path / 'api.sock'}", token)
    assert from_config.base == "http://localhost" and token not in repr(from_config)
    # --url wins over everything; the config's token still applies.
    flag = resolve_endpoint("http://[::1]:9", str(config), env={})
    assert flag == Endpoint("http://[::1]:9", token)
    # $CREDBROKER_CONFIG is the fallback after $CREDBROKER_URL.
    assert resolve_endpoint(env={"CREDBROKER_CONFIG": str(config)}).token == token
    assert resolve_endpoint(env={"CREDBROKER_CONFIG": str(config),
                                 "CREDBROKER_URL": "http://h:2"}) == Endpoint("http://h:2")
    assert resolve_endpoint("http://h:2", token_file=str(token_file), env={}).token == token
    for bad in ("ftp://h", "h:80", "unix:", "http://user:pw@h:1"):
        with pytest.raises(RemoteError):
            resolve_endpoint(bad, env={})
    with pytest.raises(RemoteError, match="cannot read the token file"):
        resolve_endpoint("http://h:2", token_file=str(tmp_path / "nope"), env={})
    with pytest.raises(ConfigError):
        resolve_endpoint(config=str(tmp_path / "missing.toml"), env={})
    no_http = tmp_path / "no-http.toml"
    no_http.write_text(config.read_text().split("[http]")[0] + config.read_text().split(
        'token_file = "' + str(token_file) + '"\n')[1])
    with pytest.raises(RemoteError, match=r"no \[http\] section"):
        resolve_endpoint(config=str(no_http), env={})


def test_listen_addresses_map_to_urls(tmp_path: Path) -> None:
    creds = [{"name": "svc", "files": {"token": str(tmp_path / "svc")}}]
    token = {"token_file": str(tmp_path / "t")}
    cases = {
        "127.0.0.1:8790": "http://127.0.0.1:8790",
        "[::1]:8790": "http://[::1]:8790",
        "localhost:1": "http://localhost:1",
        "0.0.0.0:8790": "http://127.0.0.1:8790",
        "[::]:8790": "http://[::1]:8790",
        f"unix:{tmp_path}/s": f"unix:{tmp_path}/s",
    }
    for listen, url in cases.items():
        settings = make_config(tmp_path, creds, http={"listen": listen, **token}).http
        assert settings is not None and listen_url(settings) == url


# -- against a daemon in a subprocess ---------------------------------------------------------


def write_config(tmp_path: Path, http: str, credentials: dict[str, Path]) -> Path:
    path = tmp_path / "broker.toml"
    creds = "".join(
        f'[[credentials]]\nname = "{name}"\nfiles = {{ token = "{file}" }}\n\n'
        for name, file in credentials.items()
    )
    path.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "cli"\n\n[http]\n{http}\n\n'
        + creds
    )
    return path


class Daemon:
    """``credbroker run`` in a subprocess; its log is collected as it is written."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.log = ""
        self.url = ""
        self.listening = anyio.Event()

    async def drain(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        async for chunk in self.process.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace")
                self.log += text + "\n"
                try:
                    record = json.loads(text)
                except ValueError:
                    continue
                if record.get("message") == "http listening":
                    self.url = record["url"]
                    self.listening.set()


@asynccontextmanager
async def daemon(config: Path, secrets: SecretRegistry) -> AsyncIterator[Daemon]:
    """A running daemon; ready once it logged where it listens (its real port, for port 0)."""
    process = await anyio.open_process(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        stdin=None, stdout=PIPE, stderr=PIPE, cwd=ROOT,
    )
    running = Daemon(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(running.drain)
            with anyio.fail_after(TIMEOUT):
                await running.listening.wait()
            yield running
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(TIMEOUT):
                assert await process.wait() == 0, running.log
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()
        secrets.observe("daemon log", running.log)


async def credbroker(*args: str, secrets: SecretRegistry,
                     env: dict[str, str] | None = None) -> tuple[int, str, str]:
    with anyio.fail_after(30):
        result = await anyio.run_process(
            [sys.executable, "-m", "broker", *args], check=False, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    secrets.observe(f"credbroker {' '.join(args)} stdout", out)
    secrets.observe(f"credbroker {' '.join(args)} stderr", err)
    return result.returncode, out, err


async def test_status_and_events_against_a_running_daemon(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    svc, db = tmp_path / "svc", tmp_path / "db"
    write_atomic(svc, secrets.token())
    config = write_config(tmp_path, 'listen = "127.0.0.1:0"', {"svc": svc, "db": db})
    async with daemon(config, secrets) as running:
        code, out, err = await credbroker("status", "--url", running.url, secrets=secrets)
        assert code == 0, err
        rows = [line.split() for line in out.splitlines()]
        assert rows[0][:2] == ["CREDENTIAL", "STATUS"]
        assert [r[:2] for r in rows[1:] if not r[0].startswith(("!", "fix:"))] == [
            ["svc", "valid"], ["db", "missing"]]
        assert any("missing" in line for line in out.splitlines() if "!" in line)
        code, out, _ = await credbroker("status", "--json", secrets=secrets,
                                        env={"CREDBROKER_URL": running.url})
        assert code == 0
        assert [s["credential"] for s in json.loads(out)["credentials"]] == ["svc", "db"]

        follower = await anyio.open_process(
            [sys.executable, "-m", "broker", "events", "--url", running.url,
             "--credential", "svc"],
            stdin=None, stdout=PIPE, stderr=PIPE, cwd=ROOT,
        )
        try:
            assert follower.stdout is not None
            # The follower prints nothing until an event comes: it is connected once the
            # daemon counts its stream.
            with anyio.fail_after(TIMEOUT):
                while "credbroker_sse_clients 1.0" not in await _metrics(running.url):
                    await anyio.sleep(0.05)
            write_atomic(db, secrets.token())  # filtered out
            write_atomic(svc, secrets.token())
            buffered = b""
            with anyio.fail_after(TIMEOUT):
                while b"\n" not in buffered:
                    buffered += await follower.stdout.receive()
            line = buffered.split(b"\n")[0]
            secrets.observe("credbroker events", buffered)
            event = json.loads(line)
            assert (event["type"], event["subject"]) == ("credentials.refreshed", "svc")
            assert event["data"]["generation"] == 2
        finally:
            follower.send_signal(signal.SIGINT)
            with anyio.fail_after(TIMEOUT):
                code = await follower.wait()
                assert follower.stderr is not None
                rest = b"".join([chunk async for chunk in follower.stderr])
            secrets.observe("credbroker events stderr", rest)
            await follower.aclose()
        assert code == 130, rest


async def _metrics(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        return await r.text()


async def test_status_over_a_unix_socket_with_the_config_token(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    svc = tmp_path / "svc"
    write_atomic(svc, secrets.token())
    token_file = tmp_path / "http-token"
    write_atomic(token_file, secrets.token("bearer"))
    sock = tmp_path / "api.sock"
    config = write_config(tmp_path, f'listen = "unix:{sock}"\ntoken_file = "{token_file}"',
                          {"svc": svc})
    async with daemon(config, secrets) as running:
        assert running.url == f"unix:{sock}"
        code, out, err = await credbroker("status", "-c", str(config), secrets=secrets)
        assert code == 0, err
        assert out.splitlines()[1].split()[:2] == ["svc", "valid"]
        code, out, err = await credbroker("status", "--url", f"unix:{sock}", secrets=secrets)
        assert code == 1 and out == ""
        assert "401" in err and "unauthorized" in err and len(err.splitlines()) == 1
        code, _, err = await credbroker("status", "--url", f"unix:{sock}", "--token-file",
                                        str(token_file), secrets=secrets)
        assert code == 0, err


async def test_nothing_listening_is_exit_1_with_one_clear_line(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    for url in (f"http://127.0.0.1:{port}", f"unix:{tmp_path / 'none.sock'}"):
        for command in ("status", "events"):
            code, out, err = await credbroker(command, "--url", url, secrets=secrets)
            assert code == 1, (command, url, out, err)
            assert out == ""
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith(f"credbroker: cannot reach the daemon at {url}")
            assert "credbroker run" in err


# -- reconnection, in-process -----------------------------------------------------------------


class LineWriter(io.StringIO):
    """A text stream whose complete lines can be awaited."""

    def __init__(self, send: MemoryObjectSendStream[str]) -> None:
        super().__init__()
        self._send = send
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._send.send_nowait(line)
        return len(text)


async def next_line(receive: MemoryObjectReceiveStream[str], secrets: SecretRegistry) -> str:
    with anyio.fail_after(TIMEOUT):
        line = await receive.receive()
    secrets.observe("follower output", line)
    return line


async def test_follower_reconnects_with_last_event_id_and_replays_what_it_missed(
    tmp_path: Path, secrets: SecretRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    svc = tmp_path / "svc"
    write_atomic(svc, secrets.token())
    sock = tmp_path / "api.sock"
    config = make_config(tmp_path, [{"name": "svc", "files": {"token": str(svc)}}],
                         http={"listen": f"unix:{sock}"})
    out_send, out_receive = anyio.create_memory_object_stream[str](100)
    err_send, err_receive = anyio.create_memory_object_stream[str](100)
    out, err = LineWriter(out_send), LineWriter(err_send)
    endpoint = Endpoint(f"unix:{sock}")

    def opened_since() -> list[Any]:
        return [getattr(r, "since", "?") for r in caplog.records
                if r.getMessage() == "event stream opened"]

    async with out_send, out_receive, err_send, err_receive, anyio.create_task_group() as tg:
        async with Broker(config) as first:
            api = first.sinks["http"]
            assert isinstance(api, HttpApi)
            tg.start_soon(partial(follow_events, endpoint, out, err=err,
                                  retry_min=0.02, retry_max=0.1))
            with anyio.fail_after(TIMEOUT):
                while api.sse_clients == 0:  # nothing to await: the follower says nothing yet
                    await anyio.sleep(0.01)
            write_atomic(svc, secrets.token())
            one = json.loads(await next_line(out_receive, secrets))
        assert "lost the event stream" in await next_line(err_receive, secrets)

        # Restarted, nothing changed meanwhile: it resumes exactly where it was.
        async with Broker(config):
            assert "reconnected" in await next_line(err_receive, secrets)
            assert opened_since()[-1] == one["data"]["sequence"]
            write_atomic(svc, secrets.token())
            two = json.loads(await next_line(out_receive, secrets))
            assert two["data"]["sequence"] == one["data"]["sequence"] + 1
            assert two["data"]["generation"] == one["data"]["generation"] + 1
        assert "lost the event stream" in await next_line(err_receive, secrets)

        # Changed while stopped: the new daemon's ring starts with that event (the API
        # subscribes before the first read), so the follower replays it, then goes on.
        write_atomic(svc, secrets.token())
        async with Broker(config):
            assert "reconnected" in await next_line(err_receive, secrets)
            three = json.loads(await next_line(out_receive, secrets))
            assert three["data"]["generation"] == two["data"]["generation"] + 1
            assert three["data"]["reason"] == "content changed while the broker was stopped"
            write_atomic(svc, secrets.token())
            four = json.loads(await next_line(out_receive, secrets))
            assert four["data"]["generation"] == two["data"]["generation"] + 2
            tg.cancel_scope.cancel()

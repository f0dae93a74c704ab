"""Consumer tracking with real processes: MQTT reports (mosquitto_pub, a paho client with a
Last Will), HTTP reports (curl), lagging/converged, TTL, hostile reports, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiomqtt import Client

from broker.core.events import Event
from broker.core.state import State
from broker.core.timefmt import format_time, parse_time
from broker.sinks.consumer_reports import MqttConsumerReports
from tests.conftest import SecretRegistry, write_atomic
from tests.mosquitto import Mosquitto, mosquitto_server_fixture  # noqa: F401
from tests.test_http import serving

pytestmark = pytest.mark.anyio

HOST = "test-host"
WAIT = 10.0
LAG_AFTER = 1.5

_counter = iter(range(1_000_000))


def new_prefix() -> str:
    return f"cons{os.getpid()}x{next(_counter)}"


def report(state: State, consumer: str, **extra: Any) -> bytes:
    doc = {"consumer": consumer, "credential": state.credential, "generation": state.generation,
           "fingerprint": state.fingerprint, "time": format_time(time.time()), **extra}
    return json.dumps(doc).encode()


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, timeout=WAIT, capture_output=True)


def mosquitto_pub(port: int, topic: str, payload: bytes) -> None:
    """A consumer process that reports once (retained, QoS 1) and exits."""
    run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-r", "-t", topic,
         "-m", payload.decode()])


def curl_put(url: str, state: State, *, token: str | None = None) -> dict[str, Any]:
    """A consumer process reporting over HTTP."""
    body = json.dumps({"generation": state.generation, "fingerprint": state.fingerprint})
    argv = ["curl", "-sS", "--fail-with-body", "-X", "PUT", "-H",
            "Content-Type: application/json", "--data", body, url]
    if token:
        argv[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(argv, check=True, timeout=WAIT, capture_output=True).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


# A consumer with a Last Will that clears its retained report: reports what it reads on stdin.
WILL_CONSUMER = r"""
import sys
import paho.mqtt.client as mqtt
port, topic = int(sys.argv[1]), sys.argv[2]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=sys.argv[3])
c.will_set(topic, b"", qos=1, retain=True)
c.connect("127.0.0.1", port, keepalive=5)
c.loop_start()
for line in sys.stdin:
    c.publish(topic, line.strip().encode(), qos=1, retain=True).wait_for_publish(10)
    print("sent", flush=True)
"""


class WillConsumer:
    def __init__(self, port: int, topic: str, client_id: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WILL_CONSUMER, str(port), topic, client_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def send(self, payload: bytes) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(payload.decode() + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "sent"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT)


@contextmanager
def will_consumer(port: int, topic: str, client_id: str) -> Iterator[WillConsumer]:
    consumer = WillConsumer(port, topic, client_id)
    try:
        yield consumer
    finally:
        if consumer.proc.poll() is None:
            consumer.kill()


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Consumer churn publishes no event to wait on: poll the in-memory state, bounded."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


async def next_of_type(h: Any, credential: str, event_type: str) -> Event:
    with anyio.fail_after(WAIT):
        while True:
            event: Event = await h.next(credential)
            if event.type == event_type:
                return event


def ids(state: State) -> dict[str, int]:
    return {c.id: c.generation for c in state.consumers}


# --------------------------------------------------------------------------------------------


async def test_three_consumers_one_lags_then_catches_up_and_a_killed_one_leaves(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    prefix = new_prefix()
    port = mosquitto_server.port
    topic = f"{prefix}/{HOST}/consumers/svc"
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    creds = [{"name": "svc", "files": {"token": str(path)}, "lag_after": f"{LAG_AFTER}s"}]
    async with harness_factory(creds, mqtt=mqtt, http={"listen": "127.0.0.1:0"}) as h:
        api = h.broker.sinks["http"]
        url = f"{api.url}/v1/credentials/svc/consumers/api-http"
        await h.fence()
        g1 = h.broker.state("svc")
        with will_consumer(port, f"{topic}/api-will", "cons-will") as stale:
            await anyio.to_thread.run_sync(mosquitto_pub, port, f"{topic}/api-pub",
                                           report(g1, "api-pub"))
            await anyio.to_thread.run_sync(curl_put, url, g1)
            await anyio.to_thread.run_sync(stale.send, report(g1, "api-will"))
            await until(lambda: ids(h.broker.state("svc")) == {
                "api-pub": 1, "api-http": 1, "api-will": 1})
            assert {c.via for c in h.broker.state("svc").consumers} == {"mqtt", "http"}

            write_atomic(path, secrets.token())  # the rotation
            refreshed = await next_of_type(h, "svc", "credentials.refreshed")
            refreshed_at = time.monotonic()
            g2 = refreshed.data
            assert g2.generation == 2
            await anyio.to_thread.run_sync(mosquitto_pub, port, f"{topic}/api-pub",
                                           report(g2, "api-pub"))
            await anyio.to_thread.run_sync(curl_put, url, g2)
            lagging = await next_of_type(h, "svc", "credentials.lagging")
            waited = time.monotonic() - refreshed_at
            assert waited >= LAG_AFTER - 0.05, waited  # not before lag_after
            assert parse_time(lagging.time) - parse_time(refreshed.time) >= LAG_AFTER - 0.01
            assert "api-will" in lagging.data.reason and "generation 1" in lagging.data.reason
            assert ids(lagging.data) == {"api-pub": 2, "api-http": 2, "api-will": 1}
            assert lagging.data.generation == 2  # reports never change the generation

            await anyio.to_thread.run_sync(stale.send, report(g2, "api-will"))
            converged = await next_of_type(h, "svc", "credentials.converged")
            assert converged.data.generation == 2 and ids(converged.data) == {
                "api-pub": 2, "api-http": 2, "api-will": 2}

            # Re-announcing changes nothing: no second converged, no event at all.
            await anyio.to_thread.run_sync(stale.send, report(g2, "api-will"))
            await anyio.to_thread.run_sync(curl_put, url, g2)
            await h.fence()
            after = [e for e in h.of("svc") if e.data.generation == 2]
            assert [e.type for e in after] == [
                "credentials.refreshed", "credentials.lagging", "credentials.converged"]
            sequences = [e.sequence for e in h.of("svc")]
            assert sequences == sorted(sequences)

            stale.kill()  # SIGKILL: the server publishes its Will, an empty retained report
            await until(lambda: "api-will" not in ids(h.broker.state("svc")))
            assert ids(h.broker.state("svc")) == {"api-pub": 2, "api-http": 2}
        # The retained state on MQTT carries the consumers of the latest event.
        async with Client("127.0.0.1", port) as client:
            await client.subscribe(f"{prefix}/{HOST}/state/svc", qos=1)
            with anyio.fail_after(WAIT):
                message = await anext(client.messages)
            retained = Event.from_json(bytes(message.payload))
            assert retained.type == "credentials.converged"
            assert ids(retained.data)["api-will"] == 2
    with anyio.fail_after(WAIT):  # clear the retained reports of this prefix
        await anyio.to_thread.run_sync(mosquitto_pub, port, f"{topic}/api-pub", b"")


async def test_a_silent_http_consumer_is_forgotten_after_consumer_ttl(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    creds = [{"name": "svc", "files": {"token": str(path)}, "consumer_ttl": "1s"}]
    async with serving(harness_factory, creds, secrets) as (h, api, client):
        url = f"{api.url}/v1/credentials/svc/consumers/api-1"
        reported = time.monotonic()
        doc = await anyio.to_thread.run_sync(curl_put, url, h.broker.state("svc"))
        assert [c["id"] for c in doc["consumers"]] == ["api-1"]
        assert doc["consumers"][0]["via"] == "http"
        await until(lambda: not h.broker.state("svc").consumers, timeout=5)
        assert time.monotonic() - reported >= 1.0 - 0.05
        body = await client.get("/v1/credentials/svc")
        assert body.json()["consumers"] == []


async def test_consumers_and_announcements_survive_a_restart(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    creds = [{"name": "svc", "files": {"token": str(path)}}]
    async with serving(harness_factory, creds, secrets) as (h, api, _):
        state = h.broker.state("svc")
        await anyio.to_thread.run_sync(curl_put, f"{api.url}/v1/credentials/svc/consumers/a",
                                       state)
        await next_of_type(h, "svc", "credentials.converged")
        await anyio.to_thread.run_sync(curl_put, f"{api.url}/v1/credentials/svc/consumers/b",
                                       state)
        await until(lambda: len(h.broker.state("svc").consumers) == 2)
    assert (tmp_path / "state" / "consumers.json").stat().st_mode & 0o777 == 0o600
    async with serving(harness_factory, creds, secrets) as (h, api, client):
        assert ids(h.broker.state("svc")) == {"a": 1, "b": 1}
        await h.fence()
        assert h.types("svc") == []  # no second converged for the same generation
        doc = await client.get("/v1/credentials/svc")
        assert [c["id"] for c in doc.json()["consumers"]] == ["a", "b"]


async def test_hostile_http_reports_are_refused_with_json_errors(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    token = secrets.token("bearer")
    token_file = tmp_path / "http-token"
    write_atomic(token_file, token)
    creds = [{"name": "svc", "files": {"token": str(path)}}]
    async with serving(harness_factory, creds, secrets, token=token,
                       token_file=str(token_file)) as (h, api, _):
        state = h.broker.state("svc")
        base = f"{api.url}/v1/credentials"
        good = {"generation": state.generation, "fingerprint": state.fingerprint}
        auth = {"Authorization": f"Bearer {token}"}
        cases: list[tuple[str, str, Any, dict[str, str], int, str]] = [
            ("PUT", "/nope/consumers/a", good, auth, 404, "unknown-credential"),
            ("PUT", "/svc/consumers/a", b"garbage", auth, 400, "invalid-report"),
            ("PUT", "/svc/consumers/a", [1], auth, 400, "invalid-report"),
            ("PUT", "/svc/consumers/a", {**good, "generation": state.generation + 1}, auth,
             409, "unknown-generation"),
            ("PUT", "/svc/consumers/a", {**good, "fingerprint": "hmac-sha256:" + "0" * 16},
             auth, 409, "fingerprint-mismatch"),
            ("PUT", "/svc/consumers/a", {**good, "extra": "x"}, auth, 400, "invalid-report"),
            ("PUT", "/svc/consumers/-bad", good, auth, 400, "invalid-consumer-id"),
            ("PUT", "/svc/consumers/" + "x" * 200, good, auth, 400, "invalid-consumer-id"),
            ("PUT", "/svc/consumers/a", {**good, "pad": "x" * 5000}, auth, 413,
             "report-too-large"),
            # Without the token nobody may report, or remove another consumer.
            ("PUT", "/svc/consumers/a", good, {}, 401, "unauthorized"),
            ("DELETE", "/svc/consumers/a", None, {}, 401, "unauthorized"),
            ("DELETE", "/svc/consumers/a", None, {"Authorization": "Bearer wrong"}, 401,
             "unauthorized"),
        ]
        async with aiohttp.ClientSession() as session:
            for method, route, body, headers, status, code in cases:
                data = body if isinstance(body, bytes) or body is None else json.dumps(body)
                async with session.request(method, base + route, data=data,
                                           headers=headers) as response:
                    doc = await response.json()
                    assert (response.status, doc["error"]["code"]) == (status, code), (
                        route, body, doc)
                    assert set(doc) == {"error"}
            assert h.broker.state("svc").consumers == ()
            # The real thing works, and DELETE with the token removes it.
            async with session.put(base + "/svc/consumers/a", json=good,
                                   headers=auth) as response:
                assert response.status == 200
                assert [c["id"] for c in (await response.json())["consumers"]] == ["a"]
            async with session.delete(base + "/svc/consumers/a", headers=auth) as response:
                assert response.status == 200 and (await response.json())["consumers"] == []
        await h.fence()
        assert "credentials.lagging" not in h.types("svc")


async def test_hostile_mqtt_reports_are_ignored_and_logged_once_per_kind(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    prefix = new_prefix()
    base = f"{prefix}/{HOST}/consumers"
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    creds = [{"name": "svc", "files": {"token": str(path)}}]
    async with harness_factory(creds, mqtt=mqtt) as h:
        sink = h.broker.sinks["consumer-reports"]
        assert isinstance(sink, MqttConsumerReports)
        await until(lambda: sink.connected)
        s = h.broker.state("svc")
        hostile = {
            f"{base}/nope/a": report(s, "a", credential="nope"),
            f"{base}/svc/g1": b"garbage",
            f"{base}/svc/g2": b"\xff\x00",
            f"{base}/svc/future": report(s, "future", generation=s.generation + 1),
            f"{base}/svc/mismatch": report(s, "mismatch", fingerprint="hmac-sha256:" + "1" * 16),
            f"{base}/svc/bad id": report(s, "bad id"),
            f"{base}/svc/other": report(s, "someone-else"),
            f"{base}/svc/big": report(s, "big", pad="x" * 5000),
            f"{base}/svc/old": report(s, "old", time="2001-01-01T00:00:00.000Z"),
        }
        async with Client("127.0.0.1", mosquitto_server.port) as client:
            for topic, payload in hostile.items():
                await client.publish(topic, payload, qos=1, retain=True)
            for topic, payload in hostile.items():  # again: logged once per kind
                await client.publish(topic, payload, qos=1, retain=True)
            await client.publish(f"{base}/svc/fine", report(s, "fine"), qos=1, retain=True)
            await until(lambda: "fine" in ids(h.broker.state("svc")))
            assert ids(h.broker.state("svc")) == {"fine": s.generation}
            counts = dict(sink.log.counts)
            for topic in [*hostile, f"{base}/svc/fine"]:
                await client.publish(topic, b"", qos=1, retain=True)
        await until(lambda: not h.broker.state("svc").consumers)
        assert counts == {"unknown-credential": 2, "invalid-report": 6, "unknown-generation": 2,
                          "fingerprint-mismatch": 2, "invalid-consumer-id": 2,
                          "report-too-large": 2, "stale-report": 2}, counts
        warnings = [r for r in caplog.records if r.getMessage() == "mqtt consumer report ignored"]
        assert sorted(r.__dict__["code"] for r in warnings) == sorted(counts)
        await h.fence()
        assert h.types("svc") == ["credentials.refreshed", "credentials.converged"]


async def test_metrics_status_and_check_show_consumers_and_lag(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from broker.cli.main import check_now, main

    path = tmp_path / "svc"
    write_atomic(path, secrets.token())
    creds = [{"name": "svc", "files": {"token": str(path)}, "lag_after": "0.5s"}]
    async with serving(harness_factory, creds, secrets) as (h, api, client):
        await h.fence()
        old = h.broker.state("svc")
        for consumer in ("behind", "ahead"):
            await anyio.to_thread.run_sync(
                curl_put, f"{api.url}/v1/credentials/svc/consumers/{consumer}", old)
        write_atomic(path, secrets.token())
        new = (await next_of_type(h, "svc", "credentials.refreshed")).data
        await anyio.to_thread.run_sync(
            curl_put, f"{api.url}/v1/credentials/svc/consumers/ahead", new)
        lagging = await next_of_type(h, "svc", "credentials.lagging")
        assert "behind" in lagging.data.reason
        metrics = (await client.get("/metrics")).body.decode()
        assert 'credbroker_consumers{credential="svc"} 2.0' in metrics
        assert 'credbroker_consumers_lagging{credential="svc"} 1.0' in metrics
        assert 'credbroker_consumers{credential="fence"} 0.0' in metrics
        [lag] = [line for line in metrics.splitlines()
                 if line.startswith('credbroker_consumer_lag_seconds{credential="svc"}')]
        assert float(lag.split()[-1]) >= 0.5
        assert "credbroker_consumer_lag_seconds{credential=\"fence\"}" not in metrics

        capsys.readouterr()
        code = await anyio.to_thread.run_sync(main, ["status", "--url", api.url or ""])
        out = capsys.readouterr().out
        assert code == 0
        assert "consumer ahead: generation 2 (current) via http" in out
        assert "consumer behind: generation 1 (old content, for" in out
        config = h.broker.config
    # `check` reads the files, and the consumers the daemon persisted.
    [state] = await anyio.to_thread.run_sync(check_now, config, ["svc"])
    assert {c.id: c.fingerprint == state.fingerprint for c in state.consumers} == {
        "ahead": True, "behind": False}

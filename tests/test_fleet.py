"""A fleet on one machine: daemon processes (distinct host_ids) publishing to one mosquitto,
bridged to a second one where ``credbroker fleet`` and consumers connect.

The small version runs in the normal suite; 20 daemons x 100 credentials is ``soak``.
Figures: ``credbroker fleet`` start-up over the retained states (and its ratio to a bare
subscriber collecting the same retained messages), and event latency across the bridge
(file written -> event received on the other server), p50/p99, with the ratio to a bare
message published on one server and received on the other (the bridge's own floor).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiomqtt import Client

from broker.cli.fleet import FleetView
from broker.core.events import Event
from tests.conftest import SecretRegistry, record_figures, write_atomic
from tests.mosquitto import Mosquitto, free_port

pytestmark = pytest.mark.anyio

PREFIX = "fleet"
WAIT = 60.0


@dataclass
class Daemon:
    host_id: str
    directory: Path
    credentials: list[Path]
    http_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    rotations: dict[int, int] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.directory / "broker.toml"

    def start(self) -> None:
        log = open(self.directory / "daemon.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "-c", str(self.config)],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def make_daemon(root: Path, index: int, count: int, mqtt_url: str, secrets: SecretRegistry,
                *, http: bool = False) -> Daemon:
    host_id = f"host-{index:02d}"
    directory = root / host_id
    (directory / "creds").mkdir(parents=True)
    paths: list[Path] = []
    lines = [
        "[broker]", f'host_id = "{host_id}"', f'state_dir = "{directory / "state"}"', "",
        "[mqtt]", f'url = "{mqtt_url}"', f'topic_prefix = "{PREFIX}"', "",
    ]
    daemon = Daemon(host_id, directory, paths)
    if http:
        daemon.http_port = free_port()
        lines += ["[http]", f'listen = "127.0.0.1:{daemon.http_port}"', ""]
    for i in range(count):
        path = directory / "creds" / f"cred-{i:03d}"
        write_atomic(path, secrets.token())
        paths.append(path)
        lines += ["[[credentials]]", f'name = "cred-{i:03d}"', f'files = {{ token = "{path}" }}',
                  ""]
    daemon.config.write_text("\n".join(lines))
    return daemon


def bridged_servers(root: Path) -> tuple[Mosquitto, Mosquitto]:
    """``a`` (the daemons' server) and ``b``, which runs the bridge to ``a``."""
    queue = ["max_queued_messages 100000"]
    a = Mosquitto(root / "mqtt-a", extra=queue)
    b = Mosquitto(root / "mqtt-b", extra=[
        *queue,
        "connection to-a",
        f"address 127.0.0.1:{a.port}",
        f"topic {PREFIX}/# both 1",
        "cleansession true",
        "restart_timeout 1 2",
        "notifications false",
        "try_private true",
    ])
    return a, b


def fleet_cli(url: str, *extra: str) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "broker", "fleet", "--mqtt", url, "--prefix", PREFIX, *extra],
        capture_output=True, text=True, timeout=WAIT,
    )
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - started


def check_json(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """What the files hold now, by ``credbroker check`` (the daemon's fingerprint key)."""
    out = subprocess.run(
        [sys.executable, "-m", "broker", "check", "-c", str(daemon.config), "--json"],
        capture_output=True, text=True, timeout=WAIT,
    ).stdout
    return {d["credential"]: d for d in json.loads(out)["credentials"]}


class StateWatcher:
    """A subscriber on one server folding every state topic into a FleetView."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.view = FleetView(PREFIX)
        self.changed = anyio.Event()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        while True:
            try:
                async with Client("127.0.0.1", self.port, timeout=5) as client:
                    await client.subscribe(f"{PREFIX}/+/state/+", qos=1)
                    task_status.started()
                    task_status = anyio.TASK_STATUS_IGNORED
                    async for message in client.messages:
                        payload = message.payload
                        self.view.take(message.topic.value,
                                       payload if isinstance(payload, bytes) else b"",
                                       time.time())
                        self.changed.set()
                        self.changed = anyio.Event()
            except Exception:  # the server is being restarted: come back
                await anyio.sleep(0.2)

    def generations(self) -> dict[tuple[str, str], int]:
        return {(r.host, r.state.credential): r.state.generation
                for r in self.view.rows(lag_after=60, now=time.time())}

    async def wait_for(self, expected: dict[tuple[str, str], int], timeout: float = WAIT) -> None:
        with anyio.fail_after(timeout):
            while self.generations() != expected:
                await self.changed.wait()


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop() if isinstance(thing, Daemon) else thing.kill()


async def bare_bridge_latency(a: Mosquitto, b: Mosquitto, rounds: int) -> list[float]:
    """The floor: a message published on ``a``, received by a subscriber on ``b``."""
    out = []
    async with Client("127.0.0.1", b.port) as sub, Client("127.0.0.1", a.port) as pub:
        await sub.subscribe(f"{PREFIX}/_floor", qos=1)
        messages = sub.messages
        for i in range(rounds):
            sent = time.perf_counter()
            await pub.publish(f"{PREFIX}/_floor", str(i).encode(), qos=1)
            with anyio.fail_after(10):
                while (await anext(messages)).payload != str(i).encode():
                    pass
            out.append(time.perf_counter() - sent)
    return out


async def bare_collect(port: int, expected: int) -> float:
    """The floor of the fleet view: a raw subscriber collecting the retained states."""
    started = time.perf_counter()
    async with Client("127.0.0.1", port) as client:
        await client.subscribe(f"{PREFIX}/+/state/+", qos=1)
        seen = 0
        with anyio.fail_after(WAIT):
            async for _ in client.messages:
                seen += 1
                if seen == expected:
                    break
    return time.perf_counter() - started


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run_fleet(tmp_path: Path, secrets: SecretRegistry, cleanup: list[Any], *,
                    daemons: int, credentials: int, rotations: int, name: str) -> None:
    a, b = bridged_servers(tmp_path)
    cleanup += [a, b]
    a.start()
    b.start()
    fleet = [make_daemon(tmp_path, i, credentials, a.url, secrets, http=i == 0)
             for i in range(daemons)]
    cleanup.extend(fleet)
    for d in fleet:
        d.start()
    watcher = StateWatcher(b.port)
    expected = {(d.host_id, f"cred-{i:03d}"): 1 for d in fleet for i in range(credentials)}
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        await watcher.wait_for(expected, timeout=WAIT + daemons * 3)
        total = daemons * credentials

        # The fleet view on the other server sees every host's states.
        code, out, err, wall = await anyio.to_thread.run_sync(fleet_cli, b.url)
        assert code == 0, err
        assert f"{daemons} hosts, {total} credentials, 0 not valid/expiring" in out
        assert f"({total + daemons} retained messages in" in err  # states + statuses
        collected = float(err.rsplit(" in ", 1)[1].split("s)")[0])
        code, out, err, _ = await anyio.to_thread.run_sync(fleet_cli, b.url, "--json")
        doc = json.loads(out)
        assert code == 0 and doc["hosts"] == daemons and len(doc["credentials"]) == total
        floor_collect = await bare_collect(b.port, total)

        # A rotation on one host reaches a consumer on the other server; latency p50/p99.
        floor = await bare_bridge_latency(a, b, rotations)
        target = fleet[-1]
        latencies = []
        async with Client("127.0.0.1", b.port) as consumer:
            await consumer.subscribe(f"{PREFIX}/{target.host_id}/events/+/+", qos=1)
            messages = consumer.messages
            for r in range(rotations):
                index = r % credentials
                path = target.credentials[index]
                sent = time.perf_counter()
                write_atomic(path, secrets.token())
                target.rotations[index] = target.rotations.get(index, 0) + 1
                with anyio.fail_after(10):
                    while True:
                        message = await anext(messages)
                        event = Event.from_json(bytes(message.payload))
                        if (event.type == "credentials.refreshed"
                                and event.subject == f"cred-{index:03d}"
                                and event.data.generation == 1 + target.rotations[index]):
                            break
                latencies.append(time.perf_counter() - sent)
        for index, count in target.rotations.items():
            expected[(target.host_id, f"cred-{index:03d}")] = 1 + count
        await watcher.wait_for(expected)

        # A consumer on the other server reports; the daemon (via the bridge) tracks it.
        first = fleet[0]
        state = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{first.http_port}/v1/credentials/cred-000", timeout=10).read())
        async with Client("127.0.0.1", b.port) as consumer:
            await consumer.publish(
                f"{PREFIX}/{first.host_id}/consumers/cred-000/far-away",
                json.dumps({"generation": state["generation"],
                            "fingerprint": state["fingerprint"]}).encode(),
                qos=1, retain=True,
            )
        with anyio.fail_after(WAIT):
            while True:
                doc = json.loads(urllib.request.urlopen(
                    f"http://127.0.0.1:{first.http_port}/v1/credentials/cred-000",
                    timeout=10).read())
                if [c["id"] for c in doc["consumers"]] == ["far-away"]:
                    break
                await anyio.sleep(0.05)
        assert doc["consumers"][0]["via"] == "mqtt"

        # A bridge outage: the far server dies; a credential rotates meanwhile; it heals.
        b.kill()
        write_atomic(target.credentials[0], secrets.token())
        target.rotations[0] = target.rotations.get(0, 0) + 1
        expected[(target.host_id, "cred-000")] = 1 + target.rotations[0]
        b.start()  # no persistence: everything it holds must come back over the bridge
        healed = time.perf_counter()
        watcher.view = FleetView(PREFIX)
        await watcher.wait_for(expected)
        healed = time.perf_counter() - healed
        tg.cancel_scope.cancel()

    # The retained states equal what the files hold (fingerprints by each daemon's key).
    code, out, err, _ = await anyio.to_thread.run_sync(fleet_cli, b.url, "--json")
    assert code == 0, err
    retained = {(c["host"], c["credential"]): c for c in json.loads(out)["credentials"]}
    for d in fleet:
        files = await anyio.to_thread.run_sync(check_json, d)
        for cred, doc in files.items():
            got = retained[(d.host_id, cred)]
            assert got["status"] == doc["status"] == "valid"
            assert got["generation"] == expected[(d.host_id, cred)]
            assert got["fingerprint"] == doc["fingerprint"] is not None
    assert set(retained) == set(expected)
    for d in fleet:
        d.stop()
        secrets.assert_absent((d.directory / "daemon.log").read_text(), f"{d.host_id} log")

    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    f50 = percentile(floor, 50)
    figures = {
        "daemons": daemons, "credentials": total,
        "fleet_collect_s": round(collected, 3), "fleet_cli_wall_s": round(wall, 3),
        "bare_collect_s": round(floor_collect, 3),
        "collect_ratio": round(collected / floor_collect, 1),
        "latency_p50_ms": round(p50 * 1000, 1), "latency_p99_ms": round(p99 * 1000, 1),
        "bridge_floor_p50_ms": round(f50 * 1000, 2),
        "latency_ratio_p50": round(p50 / f50, 1),
        "bridge_heal_s": round(healed, 2),
    }
    print(f"fleet {name}: {figures}")
    record_figures(name, **figures)
    assert statistics.median(latencies) < 5.0


async def test_small_fleet_across_bridged_servers(
    tmp_path: Path, secrets: SecretRegistry, cleanup: list[Any]
) -> None:
    await run_fleet(tmp_path, secrets, cleanup, daemons=3, credentials=10, rotations=10,
                    name="fleet-3x10")


@pytest.mark.soak
async def test_fleet_of_20_daemons_by_100_credentials_across_bridged_servers(
    tmp_path: Path, secrets: SecretRegistry, cleanup: list[Any]
) -> None:
    await run_fleet(tmp_path, secrets, cleanup, daemons=20, credentials=100, rotations=100,
                    name="fleet-20x100")


def test_fleet_exits_1_when_the_server_is_unreachable_and_2_on_a_bad_url() -> None:
    code, out, err, _ = fleet_cli(f"mqtt://127.0.0.1:{free_port()}")
    assert code == 1 and "unreachable" in err and out == ""
    code, _, err, _ = fleet_cli("http://127.0.0.1:1")
    assert code == 2 and "credbroker fleet:" in err


async def test_fleet_watch_follows_changes_and_exit_1_for_a_bad_credential(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    server = Mosquitto(tmp_path / "mqtt")
    server.start()
    try:
        good, bad = tmp_path / "good", tmp_path / "bad"
        write_atomic(good, secrets.token())
        write_atomic(bad, "")  # empty: invalid
        mqtt = {"url": server.url, "topic_prefix": PREFIX}
        creds = [{"name": "good", "files": {"token": str(good)}},
                 {"name": "bad", "files": {"token": str(bad)}}]
        async with harness_factory(creds, mqtt=mqtt) as h:
            await h.fence()
            watcher = StateWatcher(server.port)
            async with anyio.create_task_group() as tg:
                await tg.start(watcher.run)
                await watcher.wait_for({(HOST_ID, n): h.broker.state(n).generation
                                        for n in ("good", "bad", "fence")})
                tg.cancel_scope.cancel()
            code, out, _, _ = await anyio.to_thread.run_sync(fleet_cli, server.url)
            assert code == 1 and "1 not valid/expiring" in out
            proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "fleet", "--mqtt", server.url, "--prefix",
                 PREFIX, "--watch", "--json"], stdout=subprocess.PIPE, text=True,
            )
            try:
                assert proc.stdout is not None
                stdout = proc.stdout

                async def line() -> Any:
                    return json.loads(await anyio.to_thread.run_sync(
                        stdout.readline, abandon_on_cancel=True))

                first = await line()
                rows = {r["credential"]: r for r in first["credentials"]}
                assert rows["good"]["generation"] == 1 and rows["bad"]["status"] == "invalid"
                write_atomic(good, secrets.token())
                with anyio.fail_after(WAIT):
                    while True:
                        doc = await line()
                        rows = {r["credential"]: r for r in doc["credentials"]}
                        if rows["good"]["generation"] == 2:
                            break
            finally:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        server.kill()


HOST_ID = "test-host"

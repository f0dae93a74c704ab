"""`broker.client` against a real daemon: worker processes, rotations, restarts, gaps, reports."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import anyio
import pytest

from tests.client_daemon import Daemon, Worker
from tests.conftest import SecretRegistry, write_atomic
from tests.mosquitto import (
    Mosquitto,
    Subscriber,
    mosquitto_fixture,  # noqa: F401 - fixture "mosquitto"
    mosquitto_server_fixture,  # noqa: F401 - fixture "mosquitto_server"
)

ROTATIONS = 50
NEXT_REQUEST_TIMEOUT = 15.0


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def slow_write(path: Path, token: str) -> None:
    """What `cmd > file` does with a slow command: truncate, pause, write in chunks."""
    with path.open("w") as fh:  # O_TRUNC: the file is empty from here on
        fh.flush()
        time.sleep(0.03)
        third = max(1, len(token) // 3)
        for start in range(0, len(token), third):
            fh.write(token[start:start + third])
            fh.flush()
            time.sleep(0.015)


def wait_for_token(worker: Worker, token: str, complete: dict[str, str]) -> int:
    """Ask ``worker`` until its session uses ``token``; every answer must be a whole token."""
    deadline = time.monotonic() + NEXT_REQUEST_TIMEOUT
    asked = 0
    while True:
        answer = worker.ask()
        asked += 1
        assert answer["digest"] in complete, f"worker {worker.pid} holds a partial token: {answer}"
        assert answer["length"] == len(complete[answer["digest"]])
        if answer["digest"] == digest(token):
            return asked
        assert time.monotonic() < deadline, f"worker {worker.pid} kept the old token: {answer}"
        time.sleep(0.01)


def wait_for_generation(daemon: Daemon, generation: int) -> None:
    deadline = time.monotonic() + NEXT_REQUEST_TIMEOUT
    while daemon.states()["svc"]["generation"] < generation:
        assert time.monotonic() < deadline, "the daemon did not announce the rotation"
        time.sleep(0.002)


def ask_all(workers: list[Worker], complete: dict[str, str]) -> None:
    for worker in workers:
        answer = worker.ask()
        assert answer["digest"] in complete, f"worker {worker.pid} holds a partial token"


@pytest.mark.parametrize("transport", ["http", "mqtt"])
def test_worker_processes_follow_slow_rotations_across_restarts(
    tmp_path: Path, secrets: SecretRegistry, mosquitto: Mosquitto, transport: str
) -> None:
    """Three processes of a sync server, their lru_cached session built from a token file.

    Each `cmd > file` rotation reaches each worker's next request, and no request ever sees
    an empty or partial token, across a daemon restart (and an MQTT server restart).
    """
    token_file = tmp_path / "creds" / "token"
    token_file.parent.mkdir()
    first = secrets.token()
    write_atomic(token_file, first)
    complete = {digest(first): first}
    prefix = f"t{uuid.uuid4().hex[:8]}"
    mqtt = None
    if transport == "mqtt":
        mosquitto.start()
        mqtt = {"url": mosquitto.url, "topic_prefix": prefix}
    daemon = Daemon(tmp_path / "daemon", {"svc": token_file}, mqtt=mqtt)
    workers: list[Worker] = []
    with daemon:
        url = daemon.url if transport == "http" else mosquitto.url
        args = ["--url", url, "--token-file", str(token_file), "--prefix", prefix]
        try:
            workers = [Worker(tmp_path, args).start() for _ in range(3)]
            pids = [w.pid for w in workers]
            for worker in workers:
                wait_for_token(worker, first, complete)
            asked = 0
            for rotation in range(ROTATIONS):
                if rotation == ROTATIONS // 3:
                    daemon.restart()
                if mqtt is not None and rotation == 2 * ROTATIONS // 3:
                    mosquitto.restart()
                token = secrets.token()
                complete[digest(token)] = token
                generation = daemon.states()["svc"]["generation"]
                slow_write(token_file, token)
                if rotation % 2 == 0 and rotation + 1 < ROTATIONS:
                    # The next `cmd > file` truncates right after the daemon announced this
                    # one: the workers' reload races it, and must not cache what it read.
                    wait_for_generation(daemon, generation + 1)
                    ask_all(workers, complete)
                    continue
                for worker in workers:
                    asked += wait_for_token(worker, token, complete)
            assert [w.pid for w in workers] == pids and all(w.alive() for w in workers)
            builds = [w.ask()["builds"] for w in workers]
            # One session per generation (plus the first): invalidates cleared it once each.
            assert all(b <= ROTATIONS + 3 for b in builds), builds
        finally:
            for worker in workers:
                worker.stop()
    for worker in workers:
        secrets.assert_absent(worker.log_text(), "a worker's log")
    secrets.assert_absent(daemon.log_text(), "the daemon's log")


async def _wait_report(sub: Subscriber, topic: str, present: bool) -> None:
    await sub.wait_for(lambda m: bool(m) and any(x.topic == topic for x in m)
                       and bool([x for x in m if x.topic == topic][-1].payload) == present)


@pytest.mark.anyio
async def test_a_killed_workers_mqtt_report_is_cleared_by_its_last_will(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    token_file = tmp_path / "token"
    write_atomic(token_file, secrets.token())
    prefix = f"t{uuid.uuid4().hex[:8]}"
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    topic = f"{prefix}/daemon/consumers/svc/worker-1"
    with Daemon(tmp_path / "daemon", {"svc": token_file}, mqtt=mqtt) as daemon:
        worker = Worker(tmp_path, ["--url", mosquitto_server.url, "--token-file",
                                   str(token_file), "--prefix", prefix,
                                   "--consumer-id", "worker-1"])
        async with Subscriber(mosquitto_server.port, [f"{prefix}/+/consumers/#"],
                              secrets) as sub:
            try:
                await anyio.to_thread.run_sync(worker.start)
                await _wait_report(sub, topic, present=True)
                report = json.loads(sub.on(topic)[-1].payload)
                state = daemon.states()["svc"]
                assert (report["consumer"], report["credential"]) == ("worker-1", "svc")
                assert (report["generation"], report["fingerprint"]) == (
                    state["generation"], state["fingerprint"])
                worker.kill()
                await _wait_report(sub, topic, present=False)  # the Will, retained
            finally:
                worker.stop()
    secrets.assert_absent(worker.log_text(), "a worker's log")

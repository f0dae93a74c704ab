"""Convergence end to end (issue 16): a real `credbroker run`, three consumer processes of
`broker.client` reporting over HTTP, one of them held on its old generation by its loader.

The held-back consumer is the real client doing what it does when a service's loader fails:
`CredentialCache` keeps the last good value, keeps reporting its generation, and retries the
load with its backoff; once the loader works again, the retry catches up with the generation
it missed. The daemon's event stream (`/v1/events`) says what the operator sees.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from broker.core.timefmt import parse_time
from tests.client_daemon import Daemon, Worker
from tests.conftest import SecretRegistry, write_atomic
from tests.test_http import ApiClient, EventStream

pytestmark = pytest.mark.anyio

LAG_AFTER = 2.0
#: The lagging event comes this soon after ``lag_after`` (the tracker's timer, not a poll).
SOON = 1.0
WAIT = 10.0
#: The held-back consumer retries its load this often, for far longer than the test holds it.
RETRY_DELAY = 0.1
RETRIES = 200
CONSUMERS = ("api-1", "api-2", "api-3")
STUCK = "api-3"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generations(state: dict[str, Any]) -> dict[str, int]:
    return {c["id"]: c["generation"] for c in state["consumers"]}


async def next_event(stream: EventStream, timeout: float = WAIT) -> dict[str, Any]:
    """The next CloudEvent of the stream (schema-checked and leak-checked by EventStream)."""
    message = await stream.next(timeout)
    assert message.event != "reset", message.data
    doc: dict[str, Any] = json.loads(message.data)
    return doc


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    """Consumer reports publish no event of their own (but the first converged): poll, bounded."""
    with anyio.fail_after(timeout):
        while not await condition():
            await anyio.sleep(0.02)


async def test_three_client_processes_one_held_on_its_old_generation_lags_then_converges(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    token_file = tmp_path / "creds" / "token"
    token_file.parent.mkdir()
    tokens = [secrets.token() for _ in range(3)]
    write_atomic(token_file, tokens[0])
    flag = tmp_path / f"{STUCK}.fail"
    daemon = Daemon(tmp_path / "daemon", {"svc": token_file},
                    credential_options={"lag_after": f"{LAG_AFTER:g}s"})
    base = ["--url", daemon.url, "--token-file", str(token_file)]
    workers = {
        cid: Worker(tmp_path, [*base, "--consumer-id", cid]) for cid in CONSUMERS if cid != STUCK
    }
    workers[STUCK] = Worker(tmp_path, [*base, "--consumer-id", STUCK, "--fail-flag", str(flag),
                                       "--retry-delay", str(RETRY_DELAY),
                                       "--retries", str(RETRIES)])
    seen: list[dict[str, Any]] = []

    async def held(cid: str) -> dict[str, Any]:
        doc = await anyio.to_thread.run_sync(workers[cid].held)
        secrets.observe(f"worker {cid} /held", json.dumps(doc))
        return doc

    try:
        await anyio.to_thread.run_sync(daemon.start)
        async with aiohttp.ClientSession() as session:
            api = ApiClient(session, daemon.url, secrets)

            async def state() -> dict[str, Any]:
                doc: dict[str, Any] = (await api.get("/v1/credentials/svc")).json()
                return doc

            async with api.stream(since="0", credential="svc") as stream:

                async def event() -> dict[str, Any]:
                    doc = await next_event(stream)
                    seen.append(doc)
                    return doc

                first = await event()
                assert (first["type"], first["data"]["generation"]) == (
                    "credentials.refreshed", 1)
                g1 = first["data"]
                async with anyio.create_task_group() as tg:
                    for worker in workers.values():
                        tg.start_soon(anyio.to_thread.run_sync, worker.start)
                # The first report converges generation 1; the others follow, silently.
                converged = await event()
                assert (converged["type"], converged["data"]["generation"]) == (
                    "credentials.converged", 1)

                async def all_report(generation: int) -> bool:
                    return generations(await state()) == dict.fromkeys(CONSUMERS, generation)

                await until(lambda: all_report(1))

                # The rotation, while api-3's loader fails: it keeps generation 1.
                flag.touch()
                write_atomic(token_file, tokens[1])
                refreshed = await event()
                received = time.monotonic()
                assert (refreshed["type"], refreshed["data"]["generation"]) == (
                    "credentials.refreshed", 2)
                g2 = refreshed["data"]

                # Next comes the lagging event: no converged while api-3 lags, and not before
                # lag_after.
                with anyio.fail_after(LAG_AFTER + SOON + WAIT):
                    lagging = await event()
                waited = time.monotonic() - received
                assert lagging["type"] == "credentials.lagging", lagging["type"]
                late = parse_time(lagging["time"]) - parse_time(refreshed["time"])
                assert LAG_AFTER - 0.01 <= late <= LAG_AFTER + SOON, late
                assert waited >= LAG_AFTER - 0.05, waited
                data = lagging["data"]
                assert data["generation"] == 2  # reports never change the generation
                assert data["reason"] == (f"consumer {STUCK} still uses generation 1 "
                                          f"{LAG_AFTER:g}s after generation 2 was refreshed")
                assert generations(data) == {"api-1": 2, "api-2": 2, STUCK: 1}
                [stuck] = [c for c in data["consumers"] if c["id"] == STUCK]
                assert (stuck["fingerprint"], stuck["via"]) == (g1["fingerprint"], "http")
                assert all(c["fingerprint"] == g2["fingerprint"]
                           for c in data["consumers"] if c["id"] != STUCK)

                # What the processes hold: api-3 is really on generation 1, its loads failing.
                for cid in CONSUMERS:
                    doc = await held(cid)
                    assert doc["generation"] == (1 if cid == STUCK else 2), (cid, doc)
                assert (await held(STUCK))["failures"] >= 1
                assert generations(await state()) == {"api-1": 2, "api-2": 2, STUCK: 1}
                metrics = (await api.get("/metrics")).body.decode()
                assert 'credbroker_consumers_lagging{credential="svc"} 1.0' in metrics

                # api-3's loader works again: its next retry catches up with generation 2.
                flag.unlink()
                released = time.time()
                converged = await event()
                assert (converged["type"], converged["data"]["generation"]) == (
                    "credentials.converged", 2), converged["type"]
                assert parse_time(converged["time"]) >= released - 0.01
                assert generations(converged["data"]) == dict.fromkeys(CONSUMERS, 2)
                assert converged["data"]["reason"] == (
                    "all 3 reporting consumers use generation 2")
                assert (await held(STUCK))["generation"] == 2
                answer = await anyio.to_thread.run_sync(workers[STUCK].ask)
                assert answer["digest"] == digest(tokens[1]), answer

                # The next rotation fences the stream: nothing came between the converged
                # of generation 2 and it (one converged, no second lagging), and now all
                # three follow at once.
                write_atomic(token_file, tokens[2])
                fence = await event()
                assert (fence["type"], fence["data"]["generation"]) == (
                    "credentials.refreshed", 3), fence["type"]
                last = await event()
                assert (last["type"], last["data"]["generation"]) == (
                    "credentials.converged", 3), last["type"]
                assert generations(last["data"]) == dict.fromkeys(CONSUMERS, 3)
    finally:
        for worker in workers.values():
            worker.stop()
        daemon.stop()

    assert [(e["type"], e["data"]["generation"]) for e in seen] == [
        ("credentials.refreshed", 1), ("credentials.converged", 1),
        ("credentials.refreshed", 2), ("credentials.lagging", 2), ("credentials.converged", 2),
        ("credentials.refreshed", 3), ("credentials.converged", 3),
    ]
    sequences = [e["data"]["sequence"] for e in seen]
    assert sequences == sorted(sequences)
    for cid, worker in workers.items():
        secrets.assert_absent(worker.log_text(), f"worker {cid}'s log")
    secrets.assert_absent(daemon.log_text(), "the daemon's log")

"""Actions and webhooks: change -> action started and change -> webhook receiver, beside the bus.

    python -m benchmarks.hooks [--changes 200] [--credentials 1000] [--smoke] [--json]

One broker, one credential, an action (``coalesce = 0``, a ``sh -c 'date'`` command that
stamps its own start) and a signed webhook to an aiohttp receiver in this process. Each
change (atomic rename) is timed from the moment the rename returned to: the bus subscriber
holding the event, the broker starting the action's run, the command running, the receiver
holding the verified POST. The bare inotify floor is measured in the same run, and every
row is printed with its ratio to it. Then ``--credentials`` credentials are rotated at once
with one webhook: the time until the receiver holds every event, beside the time the bus
took for the same rotation.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from benchmarks.common import summarize
from benchmarks.latency import inotify_floor, write_rename
from broker import Broker
from broker.config import parse_config
from broker.sinks.webhooks import read_secret, sign


class Receiver:
    """Records, per (credential, generation), when a verified POST arrived (wall clock)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.got: dict[tuple[str, int], float] = {}
        self.wakeup = anyio.Event()
        self.bad = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        h = request.headers
        expected = sign(self.key, h["webhook-id"], int(h["webhook-timestamp"]), body)
        if h.get("webhook-signature") != expected:
            self.bad += 1
            return web.Response(status=401)
        data = json.loads(body)["data"]
        self.got.setdefault((data["credential"], data["generation"]), now)
        self.wakeup.set()
        self.wakeup = anyio.Event()
        return web.Response(status=204)

    async def wait(self, key: tuple[str, int], limit: float = 10.0) -> float:
        with anyio.fail_after(limit):
            while key not in self.got:
                await self.wakeup.wait()
        return self.got[key]


async def _serve(receiver: Receiver) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/hook"


def _secret(path: Path) -> bytes:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("whsec_" + base64.b64encode(os.urandom(24)).decode())
    return read_secret(path)


async def _until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    # The command's stamps come from another process: there is no event to await.
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.001)


def _stamps(path: Path) -> list[float]:
    try:
        return [float(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


async def one_credential(workdir: Path, changes: int) -> dict[str, list[float]]:
    token = workdir / "creds" / "token"
    token.parent.mkdir(parents=True)
    write_rename(token, b"initial-token")
    stamps = workdir / "stamps"
    key = _secret(workdir / "hook.whsec")
    receiver = Receiver(key)
    runner, url = await _serve(receiver)
    config = parse_config(
        {
            "broker": {"state_dir": str(workdir / "state"), "host_id": "bench"},
            "credentials": [{"name": "svc", "files": {"token": str(token)}}],
            "actions": [
                {
                    "name": "stamp",
                    "command": ["sh", "-c", f"date +%s.%N >> {stamps}"],
                    "coalesce": 0,
                }
            ],
            "webhooks": [{"name": "bench", "url": url, "secret_file": str(workdir / "hook.whsec")}],
        }
    )
    rows: dict[str, list[float]] = {
        "bus": [],
        "action run started": [],
        "action command running": [],
        "webhook receiver": [],
    }
    try:
        async with Broker(config) as broker, broker.subscribe(credential="svc") as events:
            actions = broker.sinks["actions"]
            await receiver.wait(("svc", 1))
            await _until(lambda: len(_stamps(stamps)) >= 1)  # the first-sight run
            while events.get_nowait() is not None:
                pass
            for i in range(changes):
                runs_before = len(actions.started_at)  # type: ignore[attr-defined]
                stamped_before = len(_stamps(stamps))
                write_rename(token, f"token-{i:08d}-{os.urandom(8).hex()}".encode())
                t0, p0 = time.time(), time.perf_counter()
                with anyio.fail_after(10):
                    event = await events.get()
                rows["bus"].append((time.perf_counter() - p0) * 1000)
                generation = event.data.generation
                rows["webhook receiver"].append(
                    (await receiver.wait(("svc", generation)) - t0) * 1000
                )
                await _until(lambda n=runs_before: len(actions.started_at) > n)  # type: ignore[attr-defined]
                await _until(lambda n=stamped_before: len(_stamps(stamps)) > n)
                started = actions.started_at[runs_before]  # type: ignore[attr-defined]
                rows["action run started"].append((started - t0) * 1000)
                rows["action command running"].append((_stamps(stamps)[stamped_before] - t0) * 1000)
                # Wait for the run to end, so the next change is not coalesced into it.
                await _until(lambda: not actions.workers[0].running)  # type: ignore[attr-defined]
    finally:
        await runner.cleanup()
    assert receiver.bad == 0
    return rows


async def many_credentials(workdir: Path, count: int) -> dict[str, float]:
    from benchmarks.common import make_tree

    paths = make_tree(workdir / "creds", count, max(1, count // 100))
    key = _secret(workdir / "hook.whsec")
    receiver = Receiver(key)
    runner, url = await _serve(receiver)
    config = parse_config(
        {
            "broker": {"state_dir": str(workdir / "state"), "host_id": "bench"},
            "credentials": [
                {"name": f"c{i}", "files": {"token": str(p)}} for i, p in enumerate(paths)
            ],
            "webhooks": [{"name": "bench", "url": url, "secret_file": str(workdir / "hook.whsec")}],
        }
    )
    try:
        async with Broker(config) as broker, broker.subscribe() as events:
            with anyio.fail_after(120):
                while len(receiver.got) < count:  # first sight delivered
                    await receiver.wakeup.wait()
            while events.get_nowait() is not None:
                pass
            t0 = time.perf_counter()
            wall0 = time.time()
            for i, path in enumerate(paths):
                write_rename(path, f"rotated-{i}-{os.urandom(8).hex()}".encode())
            written = time.perf_counter() - t0
            seen: set[str] = set()
            with anyio.fail_after(120):
                while len(seen) < count:
                    event = await events.get()
                    if event.data.generation == 2:
                        seen.add(event.subject)
            bus = time.perf_counter() - t0
            with anyio.fail_after(300):
                while sum(1 for (_, g) in receiver.got if g == 2) < count:
                    await receiver.wakeup.wait()
            last = max(t for (_, g), t in receiver.got.items() if g == 2)
            hooks = last - wall0
            outcome = broker.sinks["webhooks"].outcomes()[0]  # type: ignore[attr-defined]
            delivered = sum(1 for (_, g) in receiver.got if g == 2)
    finally:
        await runner.cleanup()
    return {
        "credentials": count,
        "write_s": round(written, 3),
        "bus_all_s": round(bus, 3),
        "webhook_all_s": round(hooks, 3),
        "webhook_per_s": round(count / hooks, 1),
        "ratio_to_bus": round(hooks / bus, 2),
        "delivered": delivered,
        "failures": outcome.failures,
    }


async def run(changes: int, credentials: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="credbroker-bench-") as tmp:
        floor = summarize(await inotify_floor(Path(tmp), write_rename, changes))
        rows = {"inotify floor": floor}
        one = await one_credential(Path(tmp) / "one", changes)
        for name, samples in one.items():
            rows[name] = summarize(samples)
        many = await many_credentials(Path(tmp) / "many", credentials)
    for row in rows.values():
        row["ratio_p50"] = round(row["p50_ms"] / floor["p50_ms"], 1) if floor["p50_ms"] else 0.0
    return {"changes": changes, "rows": rows, "many": many}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| change -> | n | p50 ms | p99 ms | max ms | p50 / floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["rows"].items():
        lines.append(
            f"| {name} | {r['n']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} "
            f"| {r['ratio_p50']}x |"
        )
    m = results["many"]
    lines += [
        "",
        f"{m['credentials']} credentials rotated at once, one webhook: all {m['delivered']} "
        f"delivered in {m['webhook_all_s']} s ({m['webhook_per_s']}/s; the bus had them all "
        f"after {m['bus_all_s']} s: {m['ratio_to_bus']}x), {m['failures']} failed requests",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="a few changes, 50 credentials")
    parser.add_argument("--json", action="store_true", help="also print the JSON document")
    args = parser.parse_args(argv)
    changes, count = (5, 50) if args.smoke else (args.changes, args.credentials)
    results = anyio.run(run, changes, count)
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fan-out: 1,000 in-process subscribers and 200 SSE clients during a 1,000-credential rotation.

    python -m benchmarks.fanout [--credentials 1000] [--subscribers 1000] [--sse 200] [--smoke]

Measures the time from the first rotation to full delivery at every subscriber, twice:
once with everyone reading, once with one stalled bus subscriber and one stalled SSE
client added, to show that a stalled reader changes nobody else's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from benchmarks.common import make_tree, markdown, rotate
from broker import Broker
from broker.config import parse_config
from broker.sinks.http import HttpApi


async def run_once(
    root: Path, credentials: int, subscribers: int, sse: int, stalled: bool
) -> dict[str, Any]:
    paths = make_tree(root / "creds", credentials, min(100, credentials))
    config = parse_config(
        {
            "broker": {"state_dir": str(root / "state"), "host_id": "fanout"},
            "http": {"listen": "127.0.0.1:0"},
            "credentials": [
                {"name": f"c{i}", "files": {"token": str(p)}} for i, p in enumerate(paths)
            ],
        }
    )
    done_bus: list[float] = []
    done_sse: list[float] = []
    started = [0.0]
    ready = anyio.Event()
    all_done = anyio.Event()
    connected = [0]

    def finished(into: list[float]) -> None:
        into.append(time.perf_counter() - started[0])
        if len(done_bus) == subscribers and len(done_sse) == sse:
            all_done.set()

    async with Broker(config) as broker:
        api = broker.sinks["http"]
        assert isinstance(api, HttpApi)
        url = f"{api.url}/v1/events?type=credentials.refreshed"

        async def bus_reader(sub: Any) -> None:
            seen = 0
            async for _ in sub:
                seen += 1
                if seen == credentials:
                    finished(done_bus)
                    return

        async def sse_reader(session: aiohttp.ClientSession, read: bool) -> None:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=None)) as resp:
                connected[0] += 1
                if connected[0] == sse + stalled:
                    ready.set()
                if not read:
                    await anyio.sleep_forever()
                seen = 0
                async for line in resp.content:
                    if line.startswith(b"id:"):
                        seen += 1
                        if seen == credentials:
                            finished(done_sse)
                            return

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with anyio.create_task_group() as tg:
                subs = [broker.subscribe("credentials.refreshed") for _ in range(subscribers)]
                for sub in subs:
                    tg.start_soon(bus_reader, sub)
                stalled_sub = broker.subscribe("credentials.refreshed") if stalled else None
                for _ in range(sse):
                    tg.start_soon(sse_reader, session, True)
                if stalled:
                    tg.start_soon(sse_reader, session, False)
                with anyio.fail_after(60):
                    await ready.wait()
                started[0] = time.perf_counter()
                for i, path in enumerate(paths):
                    rotate(path, f"rotated-{i}".encode())
                with anyio.fail_after(300):
                    await all_done.wait()
                tg.cancel_scope.cancel()
            held = stalled_sub.pending if stalled_sub is not None else 0
    return {
        "stalled readers": "1 bus + 1 SSE" if stalled else "none",
        "bus_all_delivered_s": round(max(done_bus), 3),
        "sse_all_delivered_s": round(max(done_sse), 3),
        "stalled_bus_queue": held,
    }


async def run(credentials: int, subscribers: int, sse: int) -> list[dict[str, Any]]:
    rows = []
    for stalled in (False, True):
        with tempfile.TemporaryDirectory(prefix="credbroker-fanout-") as tmp:
            rows.append(await run_once(Path(tmp), credentials, subscribers, sse, stalled))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--sse", type=int, default=200)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = (50, 20, 5) if args.smoke else (args.credentials, args.subscribers, args.sse)
    rows = anyio.run(run, *sizes)
    if args.json:
        print(json.dumps(rows, indent=2))
    columns = ["stalled readers", "bus_all_delivered_s", "sse_all_delivered_s", "stalled_bus_queue"]
    print(markdown(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""File change -> in-process subscriber latency, next to the raw inotify floor.

    python -m benchmarks.latency [--changes 200] [--smoke] [--json]

Prints a markdown table (and a JSON document with --json). Each change is timed from the
moment the writer finished (rename returned, or close() returned for ``cmd > file``) to
the moment the subscriber holds the event. The atomic-rename row is also run with
``settle = 0``: the ratio of the two shows what the settle window costs a valid change
(it should cost nothing); each bus row's ratio to the inotify floor is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from asyncinotify import Inotify, Mask

from broker import Broker
from broker.config import parse_config

Writer = Callable[[Path, bytes], None]


def write_rename(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_truncate(path: Path, data: bytes) -> None:
    # What `cmd > file` does: truncate on open, write, close.
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        fh.write(data[len(data) // 2 :])


def summarize(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99_index = min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[p99_index], 3),
        "max_ms": round(ordered[-1], 3),
    }


async def bus_latency(
    workdir: Path, writer: Writer, changes: int, *, settle: float | None = None
) -> list[float]:
    token = workdir / "creds" / "token"
    token.parent.mkdir(parents=True, exist_ok=True)
    write_rename(token, b"initial-token")
    settings = {} if settle is None else {"settle": settle}
    config = parse_config(
        {
            "broker": {"state_dir": str(workdir / "state"), "host_id": "bench", **settings},
            "credentials": [{"name": "svc", "files": {"token": str(token)}}],
        }
    )
    samples: list[float] = []
    async with Broker(config) as broker, broker.subscribe(credential="svc") as events:
        for i in range(changes):
            writer(token, f"token-{i:08d}-{os.urandom(8).hex()}".encode())
            started = time.perf_counter()
            with anyio.fail_after(5):
                event = await events.get()
            samples.append((time.perf_counter() - started) * 1000)
            assert event.type == "credentials.refreshed"
    return samples


async def inotify_floor(workdir: Path, writer: Writer, changes: int) -> list[float]:
    """The physical limit: a bare inotify reader on the same directory, no broker."""
    directory = workdir / "floor"
    directory.mkdir(exist_ok=True)
    token = directory / "token"
    samples: list[float] = []
    with Inotify() as inotify:
        inotify.add_watch(directory, Mask.CLOSE_WRITE | Mask.MOVED_TO)
        for i in range(changes):
            writer(token, f"token-{i:08d}".encode())
            started = time.perf_counter()
            with anyio.fail_after(5):
                while True:
                    event = await inotify.get()
                    if event.name is not None and event.name.name == "token":
                        break
            samples.append((time.perf_counter() - started) * 1000)
    return samples


async def run(changes: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
        },
        "changes": changes,
        "rows": {},
        "ratios": {},
    }
    rows, ratios = results["rows"], results["ratios"]
    for label, writer in (("atomic rename", write_rename), ("cmd > file", write_truncate)):
        with tempfile.TemporaryDirectory(prefix="credbroker-bench-") as tmp:
            floor = await inotify_floor(Path(tmp), writer, changes)
            bus = await bus_latency(Path(tmp), writer, changes)
        rows[f"inotify floor, {label}"] = summarize(floor)
        rows[f"bus, {label}"] = summarize(bus)
        ratios[f"bus / inotify floor, {label} (p50)"] = _ratio(
            rows[f"bus, {label}"], rows[f"inotify floor, {label}"]
        )
    # Alternating blocks, so drift in the machine's load hits both sides alike.
    on: list[float] = []
    off: list[float] = []
    block = max(1, changes // 4)
    for _ in range(max(1, changes // block)):
        for settle, samples in ((1.0, on), (0.0, off)):
            with tempfile.TemporaryDirectory(prefix="credbroker-bench-") as tmp:
                samples += await bus_latency(Path(tmp), write_rename, block, settle=settle)
    rows["bus, atomic rename, settle 1s (interleaved)"] = summarize(on)
    rows["bus, atomic rename, settle 0 (interleaved)"] = summarize(off)
    ratios["bus, atomic rename: settle 1s / settle 0 (p50)"] = _ratio(
        rows["bus, atomic rename, settle 1s (interleaved)"],
        rows["bus, atomic rename, settle 0 (interleaved)"],
    )
    return results


def _ratio(row: dict[str, float], floor: dict[str, float]) -> float:
    return round(row["p50_ms"] / max(floor["p50_ms"], 1e-9), 2)


def table(results: dict[str, Any]) -> str:
    lines = ["| path | n | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, row in results["rows"].items():
        lines.append(
            f"| {name} | {row['n']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in results.get("ratios", {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument(
        "--smoke", action="store_true", help="a few changes, to keep the script from rotting"
    )
    parser.add_argument("--json", action="store_true", help="also print the JSON document")
    args = parser.parse_args(argv)
    results = anyio.run(run, 10 if args.smoke else args.changes)
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

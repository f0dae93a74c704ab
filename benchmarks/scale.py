"""10,000 credentials to a real MQTT subscriber, against a bare pipeline measured in the same run.

    python -m benchmarks.scale [--count 10000] [--idle 60] [--floor-client NAME]
                               [--gmqtt-path DIR] [--smoke]

The daemon runs as a subprocess (``credbroker run``) with ``[mqtt]`` pointing at a loopback
mosquitto on a free port; ``mosquitto_sub`` (C, another process) counts what reaches a
subscriber, with the server's receive timestamps. Per layout and mosquitto settings:

- start-up: daemon spawned -> every retained state, and every first-sight event, at the
  subscriber; when the daemon is actually idle after that (the first 1 s window under 1 %
  of a core), then its idle CPU over ``--idle`` seconds, inotify watches, peak RSS;
- mass rotation: another process renames a new version over every file at once -> the last
  ``refreshed`` at the subscriber; lost and duplicated; daemon CPU per rotated credential
  and per MQTT message (all of the daemon's CPU over the burst, divided).

The daemon's and the floor's modules are byte-compiled first (``compileall``), as an
installed package's are. The floor, in the same run, to the same server and subscriber:
the *bare pipeline*, the least code that reads and SHA-256-hashes the same files and
publishes the same number of QoS 1 messages of the same size (half retained) with the
fastest client measured (the bare link of ``broker/aio/mqtt_link.py``; ``--floor-client
gmqtt --gmqtt-path DIR`` or ``paho`` picks another; see ``benchmarks.mqtt_clients``). The
floor process imports nothing of the daemon but that link.
Every figure is printed with its ratio to that floor. Each layout runs with mosquitto's
defaults and with fleet settings (:data:`FLEET_SETTINGS`); lost messages are printed for
both. Resync and full re-hash are timed in-process (no MQTT), as is rotation to the bus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from benchmarks.common import (
    config_toml,
    cpu_seconds,
    idle_cpu_percent,
    inotify_watches,
    make_tree,
    markdown,
    rotate,
    rss_mb,
)
from benchmarks.mqtt_clients import PUBLISHERS

if TYPE_CHECKING:
    from tests.mosquitto import Mosquitto

#: What a fleet's mosquitto needs: no silent drop of a subscriber's queued QoS 1 messages
#: (``max_queued_messages``, default 1,000), and a Receive Maximum (``max_inflight_messages``,
#: default 20) that lets a publisher pipeline a burst.
FLEET_SETTINGS = ("max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 100")
PREFIX = "credbroker/bench"
#: "Idle" once a 1 s window of the daemon's CPU stays under this share of a core.
IDLE_THRESHOLD = 0.01


# --------------------------------------------------------------------------------------------
# The subscriber: mosquitto_sub, its lines read in a thread


@dataclass
class Received:
    at: float  # the subscriber's wall clock (CLOCK_REALTIME), as mosquitto_sub stamps it
    kind: str  # "state", "event" or "other"
    name: str
    id: str
    sequence: int


@dataclass
class Counter:
    """A ``mosquitto_sub`` on ``topic``; every message it prints becomes a :class:`Received`."""

    port: int
    topic: str
    received: list[Received] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self._proc = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), "-V", "5", "-q", "1",
             "-t", self.topic, "-F", "%U %t %p"],
            stdout=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            at, topic, payload = line.split(b" ", 2)
            kind, name = "other", ""
            parts = topic.decode().split("/")
            for i, part in enumerate(parts[:-1]):
                if part in ("state", "events"):
                    kind, name = part.rstrip("s"), parts[i + 1]
                    break
            record = Received(float(at), kind, name, _field(payload, b'"id":"', b'"'),
                              int(_field(payload, b'"sequence":', b",") or 0))
            with self.changed:
                self.received.append(record)
                self.changed.notify_all()

    def wait(self, ready: Any, timeout: float) -> bool:
        """Wait (bounded) until ``ready(received)``; False on timeout."""
        with self.changed:
            return self.changed.wait_for(lambda: ready(self.received), timeout)

    def wait_subscribed(self) -> None:
        """mosquitto_sub says nothing once subscribed: publish probes until one arrives."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port),
                            "-t", self.topic.replace("#", "probe"), "-m", "probe"], check=True)
            if self.wait(lambda r: any(x.kind == "other" for x in r), 0.2):
                return
        raise RuntimeError("mosquitto_sub did not subscribe")

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)
        self._reader.join(timeout=10)


def _field(payload: bytes, start: bytes, end: bytes) -> str:
    """A field of an event's JSON by plain search: parsing 40,000 documents would compete
    with the daemon for the cores."""
    i = payload.find(start)
    if i < 0:
        return ""
    i += len(start)
    return payload[i:payload.find(end, i)].decode()


# --------------------------------------------------------------------------------------------
# The daemon


def daemon_figures(
    root: Path, paths: list[Path], server: Mosquitto, idle: float
) -> dict[str, Any]:
    count = len(paths)
    config = root / "broker.toml"
    extra = f'[mqtt]\nurl = "{server.url}"\nbuffer = {4 * count}\n'
    config.write_text(config_toml(root / "state", paths, extra))
    sub = Counter(server.port, f"{PREFIX}/#")
    sub.wait_subscribed()
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        stderr=subprocess.DEVNULL,
    )
    figures: dict[str, Any] = {}
    try:
        def names_of(kind: str, records: list[Received]) -> set[str]:
            return {r.name for r in records if r.kind == kind}

        def complete(r: list[Received]) -> bool:
            return len(names_of("state", r)) >= count and len(names_of("event", r)) >= count

        # With mosquitto's defaults the server may drop some: then wait until nothing has
        # come for 5 s, and count what is missing.
        seen = -1
        while not sub.wait(complete, 5) and len(sub.received) != seen:
            seen = len(sub.received)
        records = list(sub.received)
        figures["startup_lost"] = (2 * count - len(names_of("state", records))
                                   - len(names_of("event", records)))
        figures["startup_states_s"] = round(_last_first(records, "state") - started, 3)
        figures["startup_events_s"] = round(_last_first(records, "event") - started, 3)
        figures["startup_cpu_s"] = round(cpu_seconds(proc.pid), 3)
        # When is it actually idle: the first 1 s window under the threshold.
        while True:
            before, at = cpu_seconds(proc.pid), time.time()
            time.sleep(1)
            if cpu_seconds(proc.pid) - before < IDLE_THRESHOLD or time.time() - started > 120:
                figures["idle_after_s"] = round(at - started, 3)
                break
        figures["inotify_watches"] = inotify_watches(proc.pid)
        if idle:
            figures["idle_cpu_percent"] = idle_cpu_percent(proc.pid, idle)
        figures.update(_rotation(root, proc.pid, sub, count))
        figures.update({f"{k.lower()}_mb": v for k, v in rss_mb(proc.pid).items()})
        figures["event_bytes"] = _event_size(paths[0])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sub.close()
    return figures


def _last_first(records: list[Received], kind: str) -> float:
    """When the last credential's first message of ``kind`` arrived."""
    first: dict[str, float] = {}
    for r in records:
        if r.kind == kind:
            first.setdefault(r.name, r.at)
    return max(first.values())


def _rotation(root: Path, pid: int, sub: Counter, count: int) -> dict[str, Any]:
    after = max(r.sequence for r in sub.received)
    writer = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale", "--rotate", str(root / "creds")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    cpu = cpu_seconds(pid)
    writer.stdin.write("go\n")
    writer.stdin.flush()
    go = float(writer.stdout.readline().split()[1])
    wrote = float(writer.stdout.readline().split()[1])
    writer.wait(timeout=30)

    def rotated(records: list[Received]) -> list[Received]:
        return [r for r in records if r.kind == "event" and r.sequence > after]

    sub.wait(lambda r: len({x.id for x in rotated(r)}) >= count, 120)
    cpu = cpu_seconds(pid) - cpu
    time.sleep(0.5)  # anything sent twice would arrive right behind
    events = rotated(list(sub.received))
    ids = {r.id for r in events}
    last = max((r.at for r in events), default=go)
    return {
        "rotation_write_s": round(wrote - go, 3),
        "rotation_to_mqtt_s": round(last - go, 3),
        "rotation_after_write_s": round(last - wrote, 3),
        "mqtt_lost": count - len(ids),
        "mqtt_duplicated": len(events) - len(ids),
        "cpu_us_per_credential": round(1e6 * cpu / count),
        "cpu_us_per_mqtt_message": round(1e6 * cpu / (2 * count)),
    }


def _event_size(path: Path) -> int:
    """The size of a typical event of this tree (the floor publishes as many bytes)."""
    from broker.core.events import make_event
    from broker.core.state import FileInfo, State, Status

    state = State("c0", Status.VALID, 1, 1, "f" * 43, files=(FileInfo("token", str(path), True,
                  32, time.time(), 0o600),))
    return len(make_event("credentials.refreshed", state, source="urn:credbroker:bench",
                          now=time.time()).payload)


# --------------------------------------------------------------------------------------------
# The bare pipeline (the floor)


def floor_figures(
    tree: Path, server: Mosquitto, size: int, gmqtt_path: Path | None,
    floor_client: str = "credbroker",
) -> dict[str, Any]:
    count = len(list(tree.glob("*/*")))
    sub = Counter(server.port, "floor/#")
    sub.wait_subscribed()
    env = dict(os.environ)
    # The fastest publisher measured (``python -m benchmarks.mqtt_clients``): the bare link of
    # broker/aio/mqtt_link.py, ahead of gmqtt and paho. ``--floor-client`` picks another.
    client = floor_client
    if client == "gmqtt":
        if gmqtt_path is None:
            raise SystemExit("--floor-client gmqtt needs --gmqtt-path")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gmqtt_path), env.get("PYTHONPATH")]))
    started = time.time()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.scale", "--floor", client, str(server.port),
             str(tree), str(size)],
            env=env, capture_output=True, text=True, timeout=300, check=True,
        )
        done = sub.wait(lambda r: sum(x.kind != "other" for x in r) >= 2 * count, 60)
        got = [r for r in sub.received if r.kind != "other"]
        last = max(r.at for r in got)
    finally:
        sub.close()
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "floor_client": client,
        "floor_s": round(last - started, 3),
        "floor_cpu_s": round(child["cpu_s"], 3),
        "floor_lost": 0 if done else 2 * count - len(got),
    }


def _floor_child(client: str, port: int, tree: Path, size: int) -> None:
    """Child: read and hash every file, publish an event and a retained state for each."""
    import resource

    messages = []
    for i, path in enumerate(sorted(tree.glob("*/*"))):
        digest = hashlib.sha256(path.read_bytes()).hexdigest().encode()
        body = b'{"id":"%d","sequence":%d,"fingerprint":"%s"}' % (i, i + 1, digest)
        body += b" " * max(0, size - len(body))
        messages.append((f"floor/events/c{i}/credentials.refreshed", body, False))
        messages.append((f"floor/state/c{i}", body, True))
    anyio.run(PUBLISHERS[client], port, messages, 100, backend="asyncio")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


# --------------------------------------------------------------------------------------------
# In-process: resync, full re-hash, rotation to the bus


async def in_process_figures(root: Path, paths: list[Path]) -> dict[str, Any]:
    count = len(paths)
    config_path = root / "broker-inproc.toml"
    config_path.write_text(config_toml(root / "state-inproc", paths))
    from broker import Broker
    from broker.config import load_config

    broker = Broker(load_config(config_path))
    events = broker.subscribe(buffer=4 * count)
    async with broker:
        await broker.engine.quiesce()
        while events.get_nowait() is not None:
            pass
        t = time.perf_counter()
        await broker.engine.resync()
        await broker.engine.quiesce()
        resync = time.perf_counter() - t
        t = time.perf_counter()
        await broker.engine.resync(full=True)
        await broker.engine.quiesce()
        full = time.perf_counter() - t
        started = time.perf_counter()
        for i, path in enumerate(paths):
            rotate(path, f"bus-{i}".encode())
        seen: dict[str, int] = {}
        with anyio.fail_after(120):
            while len(seen) < count:
                event = await events.get()
                seen[event.subject] = seen.get(event.subject, 0) + 1
        delivered = time.perf_counter() - started
        await broker.engine.quiesce()
        while (event := events.get_nowait()) is not None:
            seen[event.subject] = seen.get(event.subject, 0) + 1
    return {
        "resync_s": round(resync, 3),
        "full_rehash_s": round(full, 3),
        "rotation_to_bus_s": round(delivered, 3),
        "lost": count - len(seen),
        "duplicated": sum(n - 1 for n in seen.values()),
    }


def _rotate_all(tree: Path) -> None:
    """Child: on ``go``, rename a new version over every file; ``started``, then ``wrote``."""
    paths = sorted(tree.glob("*/*"))
    print("ready", flush=True)
    sys.stdin.readline()
    print(f"started {time.time():.6f}", flush=True)
    for i, path in enumerate(paths):
        rotate(path, f"rotated-{i}".encode())
    print(f"wrote {time.time():.6f}", flush=True)


# --------------------------------------------------------------------------------------------


def run(
    count: int, idle: float, gmqtt_path: Path | None = None, *, smoke: bool = False,
    floor_client: str = "credbroker",
) -> dict[str, Any]:
    """Every layout with fleet settings; the 100-directory one with mosquitto's defaults too.

    ``smoke`` skips the one-directory-per-file layout: the test suite runs it.
    """
    from tests.mosquitto import Mosquitto  # the parent only: gmqtt's ``tests`` stays out
    # Byte-compiled first, as an installed package is: from a checkout under
    # PYTHONDONTWRITEBYTECODE every start of the daemon (and of the floor) would compile its
    # modules from source, 0.2 s of the daemon's start-up here.
    here = Path(__file__).resolve().parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(here.parent / "broker"),
                    str(here)], check=True, stdout=subprocess.DEVNULL)
    results: dict[str, Any] = {"count": count, "fleet_settings": list(FLEET_SETTINGS),
                               "layouts": {}}
    runs = [("100 dirs", min(100, count), "fleet"), ("100 dirs", min(100, count), "defaults"),
            (f"{count} dirs", count, "fleet")][: 2 if smoke else 3]
    for label, directories, settings in runs:
        with tempfile.TemporaryDirectory(prefix="credbroker-scale-") as tmp:
            root = Path(tmp)
            paths = make_tree(root / "creds", count, directories)
            extra = list(FLEET_SETTINGS) if settings == "fleet" else []
            server = Mosquitto(root / "mqtt", extra=extra).start()
            try:
                daemon = daemon_figures(root, paths, server, idle if settings == "fleet" else 0)
                floor = floor_figures(
                    root / "creds", server, daemon["event_bytes"], gmqtt_path, floor_client
                )
            finally:
                server.kill()
            row = {**daemon, **floor}
            if settings == "fleet":
                row.update(anyio.run(in_process_figures, root, paths))
        f = row["floor_s"]
        row["startup_x_floor"] = round(row["startup_events_s"] / f, 2)
        row["rotation_x_floor"] = round(row["rotation_after_write_s"] / f, 2)
        results["layouts"][f"{label}, mosquitto {settings}"] = row
    return results


COLUMNS = [
    "layout",
    "floor_s",
    "startup_states_s",
    "startup_events_s",
    "startup_x_floor",
    "startup_lost",
    "idle_after_s",
    "idle_cpu_percent",
    "vmhwm_mb",
    "inotify_watches",
    "rotation_write_s",
    "rotation_to_mqtt_s",
    "rotation_after_write_s",
    "rotation_x_floor",
    "mqtt_lost",
    "mqtt_duplicated",
    "floor_lost",
    "cpu_us_per_credential",
    "cpu_us_per_mqtt_message",
    "resync_s",
    "full_rehash_s",
    "rotation_to_bus_s",
    "lost",
    "duplicated",
]


def table(results: dict[str, Any]) -> str:
    rows = [{"layout": k, **v} for k, v in results["layouts"].items()]
    return markdown(rows, COLUMNS) + (
        f"\n\nfleet settings: {', '.join(results['fleet_settings'])}; defaults: mosquitto "
        "2.x's (max_queued_messages 1000, max_inflight_messages 20)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    parser.add_argument("--gmqtt-path", type=Path, help="gmqtt, for --floor-client gmqtt")
    parser.add_argument("--floor-client", choices=sorted(PUBLISHERS), default="credbroker",
                        help="the floor's publisher (default: the fastest measured)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rotate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rotate:
        _rotate_all(args.rotate)
        return 0
    if args.floor:
        client, port, tree, size = args.floor
        _floor_child(client, int(port), Path(tree), int(size))
        return 0
    count, idle = (200, 1.0) if args.smoke else (args.count, args.idle)
    results = run(count, idle, args.gmqtt_path, smoke=args.smoke, floor_client=args.floor_client)
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

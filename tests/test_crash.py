"""The daemon SIGKILLed at random moments while credentials rotate: nothing is lost or reused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import SecretRegistry, record_figures, write_atomic

ROOT = Path(__file__).resolve().parent.parent
KILLS = 20


def start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_log(proc: subprocess.Popen[str], until: str | None, sink: list[dict[str, Any]]) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    for line in proc.stderr:
        try:
            sink.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by SIGKILL
        if until is not None and sink[-1]["message"] == until:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no {until!r} within 20 s")
    if until is not None:
        raise AssertionError(f"the daemon exited before {until!r}")


def test_sigkill_during_rotation_loses_and_reuses_nothing(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    rng = random.Random(20261125)
    paths = [tmp_path / f"t{i}" for i in range(3)]
    for path in paths:
        write_atomic(path, secrets.token())
    config = tmp_path / "broker.toml"
    body = f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "crash"\n'
    for i, path in enumerate(paths):
        body += f'\n[[credentials]]\nname = "c{i}"\nfiles = {{ token = "{path}" }}\n'
    config.write_text(body)

    events: list[dict[str, Any]] = []
    for _ in range(KILLS):
        proc = start(config)
        startup: list[dict[str, Any]] = []
        read_log(proc, "broker started", startup)
        events += startup
        stop = threading.Event()

        def rotate(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                write_atomic(rng.choice(paths), secrets.token())
                time.sleep(0.002)

        writer = threading.Thread(target=rotate)
        writer.start()
        tail: list[dict[str, Any]] = []
        reader = threading.Thread(target=read_log, args=(proc, None, tail))
        reader.start()
        time.sleep(rng.uniform(0.05, 0.4))  # the random moment of the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        writer.join()
        reader.join(timeout=10)
        events += tail

    # A last clean run: it starts from whatever the kills left, reports, stops cleanly.
    proc = start(config)
    final: list[dict[str, Any]] = []
    read_log(proc, "broker started", final)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    read_log(proc, None, final)
    events += final
    assert not any(r["message"] == "state store problem" for r in events), [
        r for r in events if r["message"] == "state store problem"
    ]

    published = [r for r in events if r["message"].startswith("credentials.")]
    assert len(published) > KILLS  # the rotations really happened
    by_generation: dict[tuple[str, int], set[str]] = {}
    for record in published:
        by_generation.setdefault((record["credential"], record["generation"]), set()).add(
            record["fingerprint"]
        )
    reused = {k: v for k, v in by_generation.items() if len(v) > 1}
    assert reused == {}, "a generation number was used for different content"
    sequences = [r["sequence"] for r in published]
    assert len(sequences) == len(set(sequences)), "a sequence number was reused"

    # The store agrees with the files as they are now.
    check = subprocess.run(
        [sys.executable, "-m", "broker", "check", "-c", str(config), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    on_disk = {s["credential"]: s["fingerprint"] for s in json.loads(check.stdout)["credentials"]}
    stored = json.loads((tmp_path / "state" / "state.json").read_text())["credentials"]
    assert {n: s["fingerprint"] for n, s in stored.items()} == on_disk
    assert os.stat(tmp_path / "state" / "state.json").st_mode & 0o777 == 0o600
    secrets.assert_absent(json.dumps(events) + check.stdout, "daemon output")
    record_figures("sigkill_during_rotation", kills=KILLS, events=len(published),
                   generations=len(by_generation), reused=0)

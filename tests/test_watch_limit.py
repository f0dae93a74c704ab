"""When the kernel refuses more inotify watches, those paths are polled and still deliver.

The limit is real: the daemon runs in a user namespace of its own (``unshare -U -r``), where
``/proc/sys/user/max_inotify_watches`` can be lowered without touching the host's.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SecretRegistry, record_figures, write_atomic

ROOT = Path(__file__).resolve().parent.parent


def _userns_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 7 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _userns_available(), reason="needs unprivileged user namespaces (unshare -U)"
)


def limited(argv: list[str], watches: int) -> list[str]:
    script = f'echo {watches} > /proc/sys/user/max_inotify_watches && exec "$@"'
    return ["unshare", "-U", "-r", "sh", "-c", script, "sh", *argv]


def test_paths_beyond_the_watch_limit_are_polled(tmp_path: Path, secrets: SecretRegistry) -> None:
    names = ["a", "b", "c", "d"]
    paths = {}
    for name in names:
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "token"
        write_atomic(paths[name], secrets.token())
    config = tmp_path / "broker.toml"
    body = (
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "lim"\nresync_interval = "1h"\n'
    )
    for name in names:
        body += f'\n[[credentials]]\nname = "{name}"\nfiles = {{ token = "{paths[name]}" }}\n'
    config.write_text(body)

    # check, in the same kind of namespace, says which files are polled and how to fix it.
    check = subprocess.run(
        limited([sys.executable, "-m", "broker", "check", "-c", str(config), "--json"], 2),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    states = {s["credential"]: s for s in json.loads(check.stdout)["credentials"]}
    polled = [n for n, s in states.items() if "watch-polling" in [p["code"] for p in s["problems"]]]
    assert len(polled) == 2, states
    problem = next(p for p in states[polled[0]]["problems"] if p["code"] == "watch-polling")
    assert "max_user_watches" in problem["remedy"]

    argv = [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"]
    proc = subprocess.Popen(limited(argv, 2), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    log: list[dict[str, Any]] = []

    def wait_for(predicate: Any, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "the daemon exited"
            log.append(json.loads(line))
            if predicate(log[-1]):
                return log[-1]
        raise AssertionError("timed out waiting for the daemon's log")

    try:
        wait_for(lambda r: r["message"] == "broker started")
        refused = [r for r in log if r["message"] == "inotify watch limit reached; polling instead"]
        assert len(refused) == 2
        polled_dirs = {r["directory"] for r in refused}
        polled_names = sorted(n for n in names if str(paths[n].parent) in polled_dirs)
        assert len(polled_names) == 2
        # A change on a polled path is still delivered (by the poll, within seconds).
        started = time.monotonic()
        for name in (polled_names[0], next(n for n in names if n not in polled_names)):
            write_atomic(paths[name], secrets.token())
            record = wait_for(
                lambda r, n=name: r["message"] == "credentials.refreshed" and r["credential"] == n
            )
            assert record["generation"] == 2
        delivered_in = time.monotonic() - started
        assert delivered_in < 10
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    secrets.assert_absent(json.dumps(log), "daemon log")
    record_figures("inotify_limit", watch_limit=2, polled=len(polled_names),
                   both_changes_delivered_seconds=round(delivered_in, 2))


def test_a_path_refused_a_watch_after_start_is_polled(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    # Nothing is polled at start (the poll loop then sleeps); a reload adds a credential in a
    # third directory beyond the limit of 2, which must wake the polling.
    paths = {}
    for name in ("a", "b", "late"):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "token"
        write_atomic(paths[name], secrets.token())
    config = tmp_path / "broker.toml"
    head = (
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "lim"\nresync_interval = "1h"\n'
    )

    def write_config(names: list[str]) -> None:
        body = head
        for name in names:
            body += f'\n[[credentials]]\nname = "{name}"\nfiles = {{ token = "{paths[name]}" }}\n'
        config.write_text(body)

    write_config(["a", "b"])
    argv = [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"]
    proc = subprocess.Popen(limited(argv, 2), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    log: list[dict[str, Any]] = []

    def wait_for(predicate: Any, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "the daemon exited"
            log.append(json.loads(line))
            if predicate(log[-1]):
                return log[-1]
        raise AssertionError("timed out waiting for the daemon's log")

    try:
        wait_for(lambda r: r["message"] == "broker started")
        assert not [r for r in log if "polling instead" in r["message"]]
        write_config(["a", "b", "late"])
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda r: r["message"] == "inotify watch limit reached; polling instead")
        wait_for(lambda r: r["message"] == "configuration applied")
        started = time.monotonic()
        write_atomic(paths["late"], secrets.token())
        record = wait_for(
            lambda r: r["message"] == "credentials.refreshed" and r["credential"] == "late"
            and r["generation"] == 2
        )
        assert record["generation"] == 2
        assert time.monotonic() - started < 10
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    secrets.assert_absent(json.dumps(log), "daemon log")

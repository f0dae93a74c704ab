"""The README's quick start, replayed as a newcomer types it (HOME is a fresh directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SecretRegistry, write_atomic
from tests.daemon import ROOT, run_daemon, shipped_config
from tests.mosquitto import free_port


def test_quick_start(tmp_path: Path, secrets: SecretRegistry) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    env.pop("CREDBROKER_CONFIG", None)
    env.pop("CREDBROKER_URL", None)
    config = shipped_config(tmp_path, free_port())

    def credbroker(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker", *args, "-c", str(config)],
                              capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=timeout, check=False)

    # 1. make run (the daemon, on the shipped config)
    with run_daemon(config, env) as daemon:
        daemon.wait_for("broker started")
        page = daemon.wait_for("status page: http://127.0.0.1:")
        tries = daemon.wait_for("try: credbroker status")
        remedy = daemon.wait_for("nebius is missing:")
        assert "nebius iam get-access-token > ~/.nebius/NEBIUS_IAM_TOKEN.txt" in remedy["message"]
        assert "NEBIUS_TENANT_ID.txt" in daemon.wait_for("nebius is missing: find your tenant")[
            "message"]
        assert page["message"].split()[2].endswith("/")

        # ... in another shell, `credbroker status` answers, with the remedy.
        status = credbroker("status")
        assert status.returncode == 0, status.stderr
        assert "nebius" in status.stdout and "missing" in status.stdout
        assert "nebius iam get-access-token" in status.stdout
        assert str(config) in tries["message"]

        # 2. write the token (the nebius preset also reads the tenant id beside it)
        (home / ".nebius").mkdir()
        write_atomic(home / ".nebius" / "NEBIUS_TENANT_ID.txt", "tenant-e00example")
        write_atomic(home / ".nebius" / "NEBIUS_IAM_TOKEN.txt", secrets.token())

        # 3. watch the event: `credbroker events --since 0` replays what the daemon published
        events = subprocess.Popen(
            [sys.executable, "-m", "broker", "events", "--since", "0", "-c", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        try:
            assert events.stdout is not None
            seen = [json.loads(events.stdout.readline()) for _ in range(2)]
        finally:
            events.terminate()
            out, err = events.communicate(timeout=10)
        assert [(e["type"], e["data"]["status"]) for e in seen] == [
            ("credentials.missing", "missing"), ("credentials.refreshed", "valid")]
        assert all(e["subject"] == "nebius" for e in seen)
        secrets.assert_absent(out + err, "credbroker events")
        # The daemon's JSON line for that event names it by its CloudEvent id, and every
        # line says which host it comes from.
        logged = daemon.wait_for("credentials.refreshed", credential="nebius")
        assert logged["event_id"] == seen[1]["id"]
        host = seen[1]["source"].removeprefix("urn:credbroker:")
        assert {r.get("host_id") for r in daemon.lines} == {host}

        status = credbroker("status")
        assert status.returncode == 0 and "valid" in status.stdout
        code, rest = daemon.stop()
        assert code == 0
        secrets.assert_absent(daemon.log_text() + rest + status.stdout, "the quick start")



def test_first_lines_say_where_to_look() -> None:
    from broker.cli.hints import first_lines
    from broker.core.state import Problem, State, Status

    missing = State(credential="svc", status=Status.MISSING,
                    problems=(Problem("file-missing", "gone", "write it"),
                              Problem("watch-polling", "polling", None)))
    tcp = first_lines([missing], "http://127.0.0.1:8790", "c.toml")
    assert tcp == [
        "status page: http://127.0.0.1:8790/  API: http://127.0.0.1:8790/v1/credentials",
        "try: credbroker status -c c.toml   follow events: credbroker events -c c.toml",
        "svc is missing: write it",
    ]
    unix = first_lines([], "unix:/run/c.sock", "c.toml")
    assert "--url unix:/run/c.sock" in unix[1]
    assert "add one" in first_lines([], None, "c.toml")[0]

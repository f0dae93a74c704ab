"""`credbroker check`, `credbroker run` and `credbroker presets` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SecretRegistry, write_atomic
from tests.daemon import shipped_config
from tests.mosquitto import free_port

ROOT = Path(__file__).resolve().parent.parent


def credbroker(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or os.environ.copy(),
        cwd=ROOT,
        check=False,
    )


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "cli"\n\n{body}')
    return path


def test_check_all_valid_exits_0(tmp_path: Path, secrets: SecretRegistry) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = write_config(
        tmp_path, f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
    )
    result = credbroker("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CREDENTIAL", "STATUS", "EXPIRES", "IN", "FINGERPRINT"]
    assert lines[1].split()[:2] == ["svc", "valid"]
    assert "hmac-sha256:" in lines[1]
    secrets.assert_absent(result.stdout + result.stderr, "check output")


def test_check_reports_problems_with_remedies_and_exits_1(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    good = tmp_path / "good"
    write_atomic(good, secrets.token(), mode=0o644)
    expired = tmp_path / "expired.jwt"
    write_atomic(expired, secrets.jwt(exp=int(time.time()) - 60))
    config = write_config(
        tmp_path,
        '[[credentials]]\nname = "nebius"\npreset = "nebius"\n\n'
        f'[[credentials]]\nname = "loose"\nfiles = {{ token = "{good}" }}\n\n'
        f'[[credentials]]\nname = "old"\nfiles = {{ token = "{expired}" }}\n'
        'format = "jwt"\nexpiry = "jwt"\n',
    )
    env = {**os.environ, "HOME": str(home)}
    result = credbroker("check", "-c", str(config), env=env)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "nebius  missing" in " ".join(out.split("\n")) or "missing" in out
    assert "file-missing" in out
    assert "nebius iam get-access-token > ~/.nebius/NEBIUS_IAM_TOKEN.txt" in out
    assert f"chmod 600 {good}" in out
    assert "expired" in out
    secrets.assert_absent(out + result.stderr, "check output")

    # One name at a time, as JSON.
    result = credbroker("check", "loose", "-c", str(config), "--json", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [s["credential"] for s in doc["credentials"]] == ["loose"]
    assert doc["credentials"][0]["status"] == "valid"
    assert doc["credentials"][0]["problems"][0]["code"] == "insecure-permissions"


def test_check_usage_errors_exit_2(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, '[[credentials]]\nname = "svc"\nfiles = { token = "/nonexistent" }\n'
    )
    result = credbroker("check", "nope", "-c", str(config))
    assert result.returncode == 2
    assert "unknown credential nope" in result.stderr


def test_bad_config_exits_2_and_names_the_key(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        '[[credentials]]\nname = "a"\nfiles = { token = "/x" }\n\n'
        '[[credentials]]\nname = "b"\nfiles = { token = "/y" }\n\n'
        '[[credentials]]\nname = "c"\nfiles = { token = "/z" }\nexpiry = "jwtt"\n',
    )
    for command in ("run", "check"):
        result = credbroker(command, "-c", str(config))
        assert result.returncode == 2, (command, result.stderr)
        assert 'credentials[2].expiry: unknown source "jwtt"; expected jwt' in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = credbroker("run", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_presets_lists_nebius(tmp_path: Path) -> None:
    result = credbroker("presets")
    assert result.returncode == 0
    assert "nebius" in result.stdout
    assert "~/.nebius/NEBIUS_IAM_TOKEN.txt" in result.stdout


def test_run_with_the_shipped_config_and_no_nebius(tmp_path: Path, secrets: SecretRegistry) -> None:
    """What `make run` does on a fresh machine.

    It starts, reports missing with the remedy, picks the token up, stops on SIGTERM.
    """
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "run",
            "-c",
            str(shipped_config(tmp_path, free_port())),
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[dict[str, object]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if lines[-1]["message"] == "broker started":
                break
        missing = [r for r in lines if r["message"] == "credentials.missing"]
        assert missing and missing[0]["credential"] == "nebius", lines
        assert "NEBIUS_IAM_TOKEN.txt" in str(missing[0]["reason"])

        # It keeps running and notices the token once it appears.
        (home / ".nebius").mkdir()
        write_atomic(home / ".nebius" / "NEBIUS_TENANT_ID.txt", "tenant-e00abc")
        write_atomic(home / ".nebius" / "NEBIUS_IAM_TOKEN.txt", secrets.token())
        while time.monotonic() < deadline:
            record = json.loads(proc.stderr.readline())
            lines.append(record)
            if record["message"] == "credentials.refreshed":
                assert record["status"] == "valid"
                break
        else:
            pytest.fail("no refreshed event")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        rest = proc.stderr.read()
        assert "broker stopped" in rest
        secrets.assert_absent("".join(str(r) for r in lines) + rest, "daemon log")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_config_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[credentials]]\nname = "svc"\nfiles = { token = "/x" }\n')
    config.chmod(0o666)
    result = credbroker("check", "-c", str(config))
    assert result.returncode == 2
    assert "writable by others" in result.stderr
    assert f"chmod o-w {config}" in result.stderr

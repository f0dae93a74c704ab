"""Only ``localhost`` and literal loopback addresses count as loopback for secrets sent in
clear (plain-http validators, MQTT passwords over mqtt://): ``*.localhost`` may resolve
through DNS when nss-myhostname is absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SecretRegistry, write_atomic

ROOT = Path(__file__).resolve().parent.parent


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "run", "-c", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("host", ["svc.localhost", "a.b.localhost", "localhost.example"])
def test_plain_http_validator_to_a_non_loopback_name_is_refused(
    tmp_path: Path, secrets: SecretRegistry, host: str
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
        f'validate = {{ url = "http://{host}:8080/whoami", header = "X: {{token}}" }}\n'
    )
    result = _run(config)
    assert result.returncode == 2, result.stderr
    assert "credentials[0].validate.url" in result.stderr


@pytest.mark.parametrize("host", ["broker.localhost", "mqtt.localhost."])
def test_mqtt_password_in_clear_to_a_non_loopback_name_is_refused(
    tmp_path: Path, secrets: SecretRegistry, host: str
) -> None:
    password = tmp_path / "password"
    write_atomic(password, secrets.token("pw"))
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nurl = "mqtt://{host}:1883"\nusername = "u"\npassword_file = "{password}"\n'
    )
    result = _run(config)
    assert result.returncode == 2, result.stderr
    assert "mqtt.url" in result.stderr and "unencrypted" in result.stderr


def test_localhost_and_loopback_literals_still_count(tmp_path: Path) -> None:
    from broker.config import parse_config

    for host in ("localhost", "127.0.0.1", "127.8.9.10", "[::1]", "LOCALHOST"):
        config = parse_config({
            "broker": {"state_dir": str(tmp_path)},
            "mqtt": {"url": f"mqtt://{host}:1883", "password_file": "/p"},
            "credentials": [{"name": "svc", "files": {"t": "/t"},
                             "validate": {"url": f"http://{host}:1/x"}}],
        })
        assert config.mqtt is not None

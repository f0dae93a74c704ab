"""Only ``localhost`` and literal loopback addresses count as loopback for secrets sent in
clear (plain-http validators, MQTT passwords over mqtt://): ``*.localhost`` may resolve
through DNS when nss-myhostname is absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import ConfigError, load_config
from tests.conftest import SecretRegistry, write_atomic

ROOT = Path(__file__).resolve().parent.parent


def _run(config: Path, *, daemon: bool) -> tuple[int, str]:
    """(exit code, stderr) of ``credbroker run`` on ``config``: the real daemon, or the
    config loading it starts with (fast)."""
    if daemon:
        result = subprocess.run(
            [sys.executable, "-m", "broker", "run", "-c", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
        return result.returncode, result.stderr
    try:
        load_config(config)
    except ConfigError as exc:
        return 2, str(exc)
    return 0, ""


@pytest.mark.parametrize(("host", "daemon"), [
    ("svc.localhost", True), ("a.b.localhost", False), ("localhost.example", False),
])
def test_plain_http_validator_to_a_non_loopback_name_is_refused(
    tmp_path: Path, secrets: SecretRegistry, host: str, daemon: bool
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
        f'validate = {{ url = "http://{host}:8080/whoami", header = "X: {{token}}" }}\n'
    )
    code, stderr = _run(config, daemon=daemon)
    assert code == 2, stderr
    assert "credentials[0].validate.url" in stderr


@pytest.mark.parametrize(("host", "daemon"), [
    ("broker.localhost", True), ("mqtt.localhost.", False),
])
def test_mqtt_password_in_clear_to_a_non_loopback_name_is_refused(
    tmp_path: Path, secrets: SecretRegistry, host: str, daemon: bool
) -> None:
    password = tmp_path / "password"
    write_atomic(password, secrets.token("pw"))
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nurl = "mqtt://{host}:1883"\nusername = "u"\npassword_file = "{password}"\n'
    )
    code, stderr = _run(config, daemon=daemon)
    assert code == 2, stderr
    assert "mqtt.url" in stderr and "unencrypted" in stderr


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


def test_a_loopback_name_that_resolves_elsewhere_at_connect_time_gets_nothing(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    # `localhost` resolving to a non-loopback address (a hostile /etc/hosts, bind-mounted in
    # a user and mount namespace of its own): the validator sends nothing in clear.
    import shutil
    import socket

    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "-U", "-r", "-m", "true"], capture_output=True, check=False
    ).returncode != 0:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -U -r -m)")
    # Nobody accepts: a connection that reached it would wait in its backlog, seen below.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.1 localhost\n")  # TEST-NET-1: never routed
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
        f'validate = {{ url = "http://localhost:{port}/whoami", '
        f'header = "Authorization: Bearer {{token}}", timeout = "2s" }}\n'
    )
    script = (f"mount --bind {hosts} /etc/hosts && "
              f"exec {sys.executable} -m broker check -c {config} --json")
    result = subprocess.run(["unshare", "-U", "-r", "-m", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=False)
    secrets.observe("check output", result.stdout + result.stderr)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError), listener:
        listener.accept()
    assert "resolves to a non-loopback address" in result.stdout, result.stdout + result.stderr

"""A SIGHUP reload never blocks the daemon: configs are regular files opened non-blocking,
a reload runs under a timeout, and SIGTERM is acted on at once whatever a reload does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SecretRegistry, write_atomic
from tests.daemon import ROOT, run_daemon


def _config(tmp_path: Path, token: Path) -> Path:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "hup"\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
    )
    return config


def test_a_config_replaced_by_a_fifo_neither_blocks_reload_nor_stop(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = _config(tmp_path, token)
    with run_daemon(config) as daemon:
        daemon.wait_for("broker started")
        config.unlink()
        os.mkfifo(config, 0o600)
        daemon.proc.send_signal(signal.SIGHUP)
        record = daemon.wait_for("reload refused; keeping the running config", timeout=5)
        assert "not a regular file" in record["error"]
        # Still serving: a rotation is published under the running config.
        write_atomic(token, secrets.token())
        daemon.wait_for("credentials.refreshed", generation=2)
        started = time.monotonic()
        code, rest = daemon.stop(timeout=5)
        assert code == 0
        assert time.monotonic() - started < 3.0
        secrets.observe("daemon log", daemon.log_text() + rest)


@pytest.mark.parametrize("runs", [
    pytest.param(3, id="3"),
    pytest.param(20, id="20", marks=[pytest.mark.soak, pytest.mark.timeout(300)]),
])
def test_sigterm_during_a_reload_stops_at_once(
    tmp_path: Path, secrets: SecretRegistry, runs: int
) -> None:
    # Repeated: SIGHUP and SIGTERM back to back, whatever the reload is doing then.
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = _config(tmp_path, token)
    for _ in range(runs):
        with run_daemon(config) as daemon:
            daemon.wait_for("broker started")
            daemon.proc.send_signal(signal.SIGHUP)
            started = time.monotonic()
            code, rest = daemon.stop(timeout=5)
            assert code == 0
            assert time.monotonic() - started < 3.0
            secrets.observe("daemon log", daemon.log_text() + rest)


def test_starting_on_a_fifo_config_is_a_prompt_config_error(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    os.mkfifo(config, 0o600)
    result = subprocess.run(
        [sys.executable, "-m", "broker", "run", "-c", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "not a regular file" in result.stderr

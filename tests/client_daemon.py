"""A real `credbroker run` subprocess (on a free port, log to a file) for the consumer
client's tests, and consumer worker processes; tests/daemon.py reads a daemon's JSON log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.mosquitto import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


@dataclass
class Daemon:
    """`credbroker run -c <directory>/broker.toml`, its HTTP API on a free loopback port."""

    directory: Path
    credentials: dict[str, Path]
    mqtt: dict[str, str] | None = None
    #: More keys of every ``[[credentials]]`` table, e.g. ``{"lag_after": "2s"}``.
    credential_options: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    host_id: str = "daemon"
    _proc: subprocess.Popen[bytes] | None = None
    _starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    def config(self) -> str:
        lines = ["[broker]", f'state_dir = "{self.directory / "state"}"',
                 f'host_id = "{self.host_id}"', 'resync_interval = "30s"', "",
                 "[http]", f'listen = "127.0.0.1:{self.port}"', ""]
        if self.mqtt is not None:
            lines += ["[mqtt]", *(f'{k} = "{v}"' for k, v in self.mqtt.items()), ""]
        for name, path in self.credentials.items():
            lines += ["[[credentials]]", f'name = "{name}"', f'files = {{ token = "{path}" }}',
                      *(f'{k} = "{v}"' for k, v in self.credential_options.items()), ""]
        return "\n".join(lines)

    def start(self) -> Daemon:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "broker.toml"
        config.write_text(self.config())
        config.chmod(0o600)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "run", "-c", str(config)],
                cwd=ROOT, stdout=log, stderr=log,
            )
        self._starts += 1
        wait_http(self.url + "/healthz", self._proc)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def states(self) -> dict[str, dict[str, Any]]:
        doc = get_json(self.url + "/v1/credentials")
        return {s["credential"]: s for s in doc["credentials"]}

    def kill(self) -> None:
        """SIGKILL: no goodbye; only what the servers do for a dead client happens."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = START_TIMEOUT
              ) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            get_json(url, timeout=1.0)
            return
        except (OSError, urllib.error.URLError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {timeout}s") from None
            time.sleep(0.02)


@dataclass
class Worker:
    """One process of ``tests/consumer_worker.py``: a small sync server following the daemon."""

    directory: Path
    args: list[str]
    port: int = field(default_factory=free_port)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / f"worker-{self.port}.log"

    def start(self) -> Worker:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "consumer_worker.py"),
                 "--port", str(self.port), *self.args],
                cwd=ROOT, stdout=log, stderr=log, env=env,
            )
        wait_http(f"http://127.0.0.1:{self.port}/ready", self._proc)
        return self

    def ask(self) -> dict[str, Any]:
        doc: dict[str, Any] = get_json(f"http://127.0.0.1:{self.port}/token")
        return doc

    def held(self) -> dict[str, Any]:
        """The generation its cache holds and its counters (loads, failures, reports)."""
        doc: dict[str, Any] = get_json(f"http://127.0.0.1:{self.port}/held")
        return doc

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: no goodbye; only what the servers do for a dead client happens."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

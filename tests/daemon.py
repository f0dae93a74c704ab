"""A ``credbroker run`` subprocess, as an operator or systemd starts it, for the tests."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config" / "broker.toml"


def shipped_config(tmp_path: Path, port: int) -> Path:
    """``config/broker.toml`` as shipped, but on ``port``: tests run side by side and cannot
    all have 8790."""
    text = SHIPPED_CONFIG.read_text()
    assert 'listen = "127.0.0.1:8790"' in text
    path = tmp_path / "broker.toml"
    path.write_text(text.replace('"127.0.0.1:8790"', f'"127.0.0.1:{port}"'))
    return path


class Daemon:
    """A running daemon whose JSON log lines are read on demand."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []

    def wait_for(self, message: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        """The first log record (already read or next) with ``message`` and ``fields``."""
        def matches(record: dict[str, Any]) -> bool:
            return str(record.get("message", "")).startswith(message) and all(
                record.get(k) == v for k, v in fields.items()
            )

        for record in self.lines:
            if matches(record):
                return record
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"daemon exited before logging {message!r}: {self.lines}")
            try:
                record = json.loads(line)
            except ValueError:
                raise AssertionError(f"daemon wrote a line that is not JSON: {line!r}") from None
            self.lines.append(record)
            if matches(record):
                return record
        raise AssertionError(f"no {message!r} log line within {timeout}s: {self.lines}")

    def stop(self, timeout: float = 10.0) -> tuple[int, str]:
        """SIGTERM; the exit code and the rest of the log."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def log_text(self) -> str:
        return "\n".join(json.dumps(r) for r in self.lines)


@contextmanager
def run_daemon(
    config: Path, env: dict[str, str] | None = None, *, nofile: int | None = None
) -> Iterator[Daemon]:
    """``python -m broker run -c config --log-format json``; killed if the test did not stop it.

    ``nofile`` sets the daemon's ``RLIMIT_NOFILE`` (soft and hard, as systemd's
    ``LimitNOFILE=`` does).
    """

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit if nofile is not None else None,
    )
    try:
        yield Daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

"""systemd's notify protocol, against a NOTIFY_SOCKET the test owns, and the unit file."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli.sdnotify import Notifier, status_line
from broker.core.state import State, Status
from tests.conftest import SecretRegistry, write_atomic
from tests.daemon import ROOT, run_daemon
from tests.mosquitto import free_port

UNIT = ROOT / "deploy" / "systemd" / "credbroker.service"


class NotifySocket:
    """The service manager's end: every datagram received, with its arrival time."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as NOTIFY_SOCKET names it
        self.received: list[tuple[float, dict[str, str]]] = []

    def next(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """The next datagram that sets ``key`` (others are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                raw = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in raw.decode().splitlines())
            self.received.append((time.monotonic(), fields))
            if key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout}s; got {self.received}")


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        address = path
    else:
        name = f"credbroker-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    with sock:
        yield NotifySocket(sock, address)


def test_status_line_counts_in_status_order() -> None:
    def state(name: str, status: Status) -> State:
        return State(credential=name, status=status)

    states = [state("a", Status.MISSING), state("b", Status.VALID), state("c", Status.MISSING)]
    assert status_line(states) == "3 credentials: 1 valid, 2 missing"
    assert status_line(states[:1]) == "1 credential: 1 missing"
    assert status_line([]) == "0 credentials"


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_watchdog_is_only_ours_when_the_pid_matches() -> None:
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval == 1.0
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 1.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_a_vanished_manager_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.send("READY=1") is False  # logged, not raised


def _config(tmp_path: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "sd"\n\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[[credentials]]\nname = "present"\nfiles = {{ token = "{tmp_path / "present"}" }}\n\n'
        f'[[credentials]]\nname = "absent"\nfiles = {{ token = "{tmp_path / "absent"}" }}\n'
        + extra
    )
    return path


def test_ready_reload_stopping_and_status(
    tmp_path: Path, notify_socket: NotifySocket, secrets: SecretRegistry
) -> None:
    write_atomic(tmp_path / "present", secrets.token())
    port = free_port()
    config = _config(tmp_path, port)
    env = {"NOTIFY_SOCKET": notify_socket.address}
    with run_daemon(config, env) as daemon:
        ready = notify_socket.next("READY")
        # At READY every credential has its state, and the HTTP API already answers.
        assert ready["STATUS"] == "2 credentials: 1 valid, 1 missing"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        assert not [f for _, f in notify_socket.received if "WATCHDOG" in f]  # not asked for

        # STATUS= follows the counts.
        write_atomic(tmp_path / "absent", secrets.token())
        assert notify_socket.next("STATUS")["STATUS"] == "2 credentials: 2 valid"

        # SIGHUP: RELOADING=1 (with the monotonic time) then READY=1 once the new config runs.
        config.write_text(config.read_text() + (
            f'\n[[credentials]]\nname = "third"\nfiles = {{ token = "{tmp_path / "third"}" }}\n'
        ))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = notify_socket.next("RELOADING")
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= before + 20_000_000
        again = notify_socket.next("READY")
        assert again["STATUS"] == "3 credentials: 2 valid, 1 missing"

        # A refused reload still ends in READY, with the running config.
        config.write_text("[broker\n")
        daemon.proc.send_signal(signal.SIGHUP)
        notify_socket.next("RELOADING")
        assert notify_socket.next("READY")["STATUS"] == "3 credentials: 2 valid, 1 missing"

        code, rest = daemon.stop()
        assert notify_socket.next("STOPPING")["STOPPING"] == "1"
        assert code == 0
        secrets.assert_absent(daemon.log_text() + rest, "daemon log")


def test_watchdog_pings_every_half_interval(
    tmp_path: Path, notify_socket: NotifySocket, secrets: SecretRegistry
) -> None:
    write_atomic(tmp_path / "present", secrets.token())
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    with run_daemon(_config(tmp_path, free_port()), env) as daemon:
        notify_socket.next("READY")
        for _ in range(8):
            notify_socket.next("WATCHDOG")
        pings = [t for t, f in notify_socket.received if f.get("WATCHDOG") == "1"][1:]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # Half of WATCHDOG_USEC (0.2 s) on average: receive times jitter when this test
        # process is descheduled (one late read makes the next gap short), their mean not.
        mean = (pings[-1] - pings[0]) / (len(pings) - 1)
        assert 0.17 <= mean <= 0.3, gaps
        assert max(gaps) < 1.5, gaps  # no ping lost
        assert daemon.stop()[0] == 0




# -- the unit file ------------------------------------------------------------------------


def test_unit_file_is_hardened() -> None:
    text = UNIT.read_text()
    for setting in (
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/credbroker",
        "StateDirectory=credbroker",
        "LimitNOFILE=",
        "WatchdogSec=",
        "ExecReload=",
    ):
        assert setting in text, setting


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's.
    credbroker = shutil.which("credbroker") or str(ROOT / ".venv" / "bin" / "credbroker")
    if not os.access(credbroker, os.X_OK):
        pytest.skip("no credbroker console script installed")
    text = UNIT.read_text().replace("/usr/local/bin/credbroker", credbroker)
    unit = tmp_path / "credbroker.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

"""systemd's notify protocol (``Type=notify``): readiness, reload, stop, status, watchdog.

The protocol is one datagram of ``KEY=value`` lines to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket). Without that variable every
call does nothing, so the daemon runs the same under systemd, in a terminal or in a test.
A failed send is logged and forgotten: the service manager being away must never stop
the broker from serving.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping

import anyio
from anyio.abc import TaskStatus

from broker.core.state import State, Status

log = logging.getLogger("broker.sdnotify")


class Notifier:
    """Sends notifications to the service manager named by the environment, if any."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        #: The socket address as ``socket.sendto`` takes it; ``None``: not under systemd.
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog_interval = _watchdog_interval(env)
        self._status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; ``False`` when not under systemd or it failed."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager",
                        extra={"error": exc.strerror or str(exc)})
            return False
        return True

    def ready(self, states: Iterable[State]) -> bool:
        """Every credential has a state and the sinks serve."""
        if self.address is None:
            return False  # no counts made for nobody (10,000 states: a hundredth of a second)
        return self.send("READY=1", self._status_line(states))

    def reloading(self) -> bool:
        """A SIGHUP reload begins; ``ready`` tells when it is done (``Type=notify-reload``
        needs ``MONOTONIC_USEC`` to match the reload to the signal)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def status(self, states: Iterable[State]) -> bool:
        """Update ``STATUS=`` (shown by ``systemctl status``) when the counts changed."""
        line = status_line(states)
        if line == self._status:
            return False
        return self.send(self._status_line(line))

    def _status_line(self, states: Iterable[State] | str) -> str:
        self._status = states if isinstance(states, str) else status_line(states)
        return f"STATUS={self._status}"

    async def watchdog(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` until cancelled (run it in a task
        group; a loop too busy to run this is what the watchdog is there to catch)."""
        interval = self.watchdog_interval
        task_status.started()
        if interval is None or not self.enabled:
            return
        while True:
            self.send("WATCHDOG=1")
            await anyio.sleep(interval)


def status_line(states: Iterable[State]) -> str:
    """``2 credentials: 1 valid, 1 missing`` (statuses in their declared order)."""
    counts = Counter(s.status for s in states)
    total = sum(counts.values())
    parts = ", ".join(f"{counts[status]} {status.value}" for status in Status if counts[status])
    noun = "credential" if total == 1 else "credentials"
    return f"{total} {noun}: {parts}" if parts else f"0 {noun}"


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` (systemd's advice), if the watchdog is meant for us."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # set for another process (our parent, say): not ours to answer
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC: not a number of microseconds")
        return None
    return usec / 2e6 if usec > 0 else None

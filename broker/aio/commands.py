"""A command run as its own process group: its output kept bounded, then stopped and reaped.

Shared by the refresh runner and actions, which both run argv (no shell) under a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

import anyio
import anyio.abc
from anyio.abc import ByteReceiveStream

__all__ = [
    "KILL_GRACE",
    "PIPE_GRACE",
    "STDERR_KEEP",
    "Head",
    "Tail",
    "drain",
    "reap",
    "signal_group",
    "signal_name",
]

#: stderr kept in memory (the tail is cut from it after redaction).
STDERR_KEEP = 16 * 1024
#: After the command exits, how long a leftover child may keep its pipes open.
PIPE_GRACE = 2.0
#: After SIGTERM to the process group on timeout, how long before SIGKILL.
KILL_GRACE = 1.0


class Head:
    """Keeps the first ``limit`` bytes of a stream, counting the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]


class Tail:
    """Keeps the last ``limit`` bytes of a stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]
            self.truncated = True


async def drain(stream: ByteReceiveStream | None, sink: Callable[[bytes], None]) -> None:
    if stream is None:
        return
    try:
        async for chunk in stream:
            sink(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def reap(proc: anyio.abc.Process, *, kill: bool) -> None:
    """Stop (if asked) and reap the command, closing its pipes. Caller shields."""
    if kill:
        signal_group(proc.pid, signal.SIGTERM)
        with anyio.move_on_after(KILL_GRACE):
            await proc.wait()
        signal_group(proc.pid, signal.SIGKILL)
    with anyio.move_on_after(KILL_GRACE + PIPE_GRACE):
        await proc.aclose()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"

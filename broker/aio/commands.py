"""A command run as its own process group: its output kept bounded, then stopped and reaped.

Shared by the refresh runner and actions, which both run argv (no shell) under a timeout,
in a minimal environment, retried with backoff, and show a redacted tail of its stderr.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import ByteReceiveStream

from broker.core.backoff import backoff_delay
from broker.core.redaction import Redactor

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "KILL_GRACE",
    "PIPE_GRACE",
    "STDERR_KEEP",
    "CommandTunables",
    "Head",
    "Tail",
    "command_env",
    "drain",
    "open_command",
    "reap",
    "redact",
    "secret_needles",
    "signal_group",
    "signal_name",
    "stderr_tail",
]

#: stderr kept in memory (the tail is cut from it after redaction).
STDERR_KEEP = 16 * 1024
#: After the command exits, how long a leftover child may keep its pipes open.
PIPE_GRACE = 2.0
#: After SIGTERM to the process group on timeout, how long before SIGKILL.
KILL_GRACE = 1.0
#: Full-jitter backoff between failed runs: the n-th retry waits up to min(cap, base * 2**n).
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
#: What of the command's stderr a problem shows: the last lines, at most this many characters.
STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2048
_ENV_PASSED = ("LANG", "TZ")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class CommandTunables:
    """How a sink that runs commands (refresh, actions) retries them, and in what environment.

    ``base``/``cap`` (seconds) and ``rand`` (a ``[0, 1)`` source) shape the retry backoff;
    the defaults are the SPEC's 1 s .. 5 m with :func:`random.random`. ``env`` replaces the
    base environment of the commands (default :func:`command_env`).
    """

    base: float
    cap: float
    rand: Callable[[], float]
    env: Mapping[str, str]

    @classmethod
    def of(
        cls,
        base: float | None = None,
        cap: float | None = None,
        rand: Callable[[], float] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandTunables:
        """The tunables a sink constructor was given, defaults filled in."""
        return cls(
            BACKOFF_BASE if base is None else base,
            BACKOFF_CAP if cap is None else cap,
            rand or random.random,
            dict(env) if env is not None else command_env(),
        )

    def delay(self, attempt: int) -> float:
        """How long to wait before retry number ``attempt`` (0 for the first retry)."""
        return backoff_delay(attempt, self.base, self.cap, self.rand)


def command_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A command's environment: ``HOME``, ``PATH`` and ``LANG``/``TZ`` if set.

    Nothing else: the broker's environment may hold other credentials.
    """
    source = os.environ if environ is None else environ
    home = source.get("HOME") or _passwd_home() or "/"
    env = {"HOME": home, "PATH": source.get("PATH") or os.defpath}
    env.update({k: source[k] for k in _ENV_PASSED if source.get(k)})
    return env


def _passwd_home() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


def secret_needles(values: Iterable[bytes]) -> Redactor:
    """What to redact for these secret values (see :mod:`broker.core.redaction`)."""
    return Redactor.of(values)


def redact(data: bytes, redactor: Redactor) -> bytes:
    """``data`` with everything that could reveal one of the redactor's secrets blanked."""
    return redactor.redact(data)


def stderr_tail(data: bytes, redactor: Redactor, *, truncated: bool = False) -> str:
    """The last lines of stderr, redacted, on one line (``" | "`` between lines).

    ``truncated``: ``data`` is the end of a longer stream, so its first line may be the tail
    of a secret cut in two; that partial first line is dropped before redaction.
    """
    if truncated:
        newline = data.find(b"\n")
        if newline >= 0:
            data = data[newline + 1 :]
        else:
            # One long line: drop up to the first whitespace (the possibly cut token).
            parts = data.split(None, 1)
            data = parts[1] if len(parts) == 2 else b""
    text = redactor.redact(data).decode("utf-8", "replace").replace("\t", " ")
    lines = [_CONTROL.sub("?", line).rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line.strip()][-STDERR_TAIL_LINES:]
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        if size + len(line) + 3 > STDERR_TAIL_CHARS:
            if not kept:  # one huge last line: its end
                kept.append("..." + line[-(STDERR_TAIL_CHARS - 3) :])
            break
        kept.append(line)
        size += len(line) + 3
    return " | ".join(reversed(kept))


async def open_command(
    argv: Sequence[str], env: Mapping[str, str], *, stdout: int
) -> anyio.abc.Process | str:
    """Start ``argv`` (no shell) in its own session, stdin from ``/dev/null``, cwd ``$HOME``.

    Returns the process, or why it could not start (``"command not found: ..."``): a new
    session so that a timeout kills the whole process group; ``/dev/null`` so that a
    command that prompts gets EOF instead of hanging.
    """
    home = env.get("HOME", "/")
    cwd = home if await anyio.Path(home).is_dir() else "/"
    program = argv[0]
    try:
        return await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError:
        return f"command not found: {program}"
    except PermissionError:
        return f"permission denied running {program}"
    except OSError as exc:
        return f"cannot start {program}: {exc.strerror or type(exc).__name__}"


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

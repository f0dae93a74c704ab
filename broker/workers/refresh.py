"""Auto-refresh (SPEC section 2, ``refresh``): run the credential's command before it expires.

A :class:`Refresher` is a sink of the broker. It watches the bus (and, at start, the current
states) and runs a credential's ``refresh.command`` once the credential is *expiring* (or
*expired*, with ``on = "expired"``). The command's stdout, when ``output`` names a role, is
written atomically to that role's file; the watcher then reports ``refreshed`` like for any
other change, so this module never publishes ``refreshed`` itself.

Decisions worth knowing:

- **argv, never a shell**, in a new session (so a timeout kills the whole process group),
  stdin from ``/dev/null`` (a command that prompts gets EOF instead of hanging), cwd ``$HOME``,
  and an environment of ``HOME`` and ``PATH`` (plus ``LANG``/``TZ`` when set) and nothing else:
  the broker's environment may hold other credentials.
- **Output is checked before it is written.** stdout for the expiry role must parse as the
  credential's format and carry a readable expiry; for another role it must be non-empty. A
  bad or oversized output is never written: the last good content stays in use.
- **One run at a time per credential** (one worker task each), retried with capped exponential
  backoff and full jitter (``uniform(0, min(cap, base * 2**n))``, 1 s .. 5 m by default) while
  the same content stays due. New content (a new generation, whoever wrote it) stops the
  retries; a success clears the ``refresh-failed`` problem. A success that leaves the state
  unchanged (the command printed the same token) is not repeated until the status moves on
  (expiring -> expired), so a command that cannot help is not run in a loop.
- **Failures are findings**, attached with ``Engine.set_problem(..., source="refresh")`` and
  announced as ``credentials.refresh_failed``. The finding is tied to the content's
  fingerprint: once the content changes it is dropped. Its message carries the command's
  stderr tail with every secret redacted (see :func:`redact`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import random
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from broker.aio.commands import PIPE_GRACE, STDERR_KEEP, Head, Tail, drain, reap, signal_name
from broker.aio.safefile import UnsafeFile, read_regular
from broker.aio.wakeup import Wakeup
from broker.config import CredentialSettings, RefreshSettings
from broker.core.backoff import backoff_delay
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import REFRESH_FAILED, observe
from broker.core.redaction import REDACTED, Redactor
from broker.core.state import FileInfo, Problem, State, Status
from broker.engine.reader import FileRead, read_credential
from broker.engine.store import JOURNAL, MAX_STATE_FILE, SNAPSHOT

if TYPE_CHECKING:
    from broker.app import Broker

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "REDACTED",
    "REFRESH_FAILED_CODE",
    "Refresher",
    "RunResult",
    "backoff_delay",
    "command_env",
    "persisted_refresh_problems",
    "read_contents",
    "redact",
    "run_refresh",
    "secret_needles",
    "stderr_tail",
]

log = logging.getLogger("broker.refresh")

REFRESH_FAILED_CODE = "refresh-failed"
#: Full-jitter backoff between failed runs: the n-th retry waits up to min(cap, base * 2**n).
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
#: What of the command's stderr a problem shows: the last lines, at most this many characters.
STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2048
_ENV_PASSED = ("LANG", "TZ")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# --------------------------------------------------------------------------------------------
# Pure helpers


def command_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The refresh command's environment: ``HOME``, ``PATH`` and ``LANG``/``TZ`` if set."""
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


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _configured_remedy(spec: CredentialSettings, code: str, role: str) -> str | None:
    """A remedy the preset or the user wrote for ``code``, if any (not a generic default)."""
    if f"{code}:{role}" in spec.remedies or code in spec.remedies:
        return spec.remedy(code, role)
    return None


def refresh_remedy(spec: CredentialSettings) -> str:
    """``run it by hand to see: <argv>``, unless the config or preset says otherwise."""
    settings = spec.refresh
    role = (settings.output if settings else None) or spec.expiry_file
    configured = _configured_remedy(spec, REFRESH_FAILED_CODE, role)
    if configured is not None:
        return configured
    command = shlex.join(settings.command) if settings else "the refresh command"
    return f"run it by hand to see: {command}"


# --------------------------------------------------------------------------------------------
# One run of the command


@dataclass(frozen=True, slots=True)
class RunResult:
    """How one run of a refresh command went. Never holds secret bytes."""

    ok: bool
    reason: str = ""  # what went wrong: "exit code 1", "timed out after 60s", ...
    stderr: str | None = None  # redacted tail; None when the command never started
    written: bool = False
    duration: float = 0.0

    def problem(self, spec: CredentialSettings) -> Problem:
        message = self.reason
        if self.stderr is not None:
            message += f"; stderr: {self.stderr or '(empty)'}"
        return Problem(REFRESH_FAILED_CODE, message, refresh_remedy(spec))


def read_contents(spec: CredentialSettings) -> list[bytes]:
    """Every file's content now (for redaction: these are the secrets in use)."""
    return [r.content for r in read_credential(spec).reads if r.content]


def _check_output(spec: CredentialSettings, role: str, data: bytes) -> str | None:
    """Why ``data`` must not be written to ``role``'s file, or ``None`` when it is fine.

    The very checks a read of the file would make (format, expiry, non-empty), applied to
    the output as if it were already that file.
    """
    path = str(spec.files[role])
    info = FileInfo(role, path, present=True, size=len(data), mtime=time.time(), mode=0o600)
    obs = observe(spec, [FileRead(info, content=data)], Fingerprinter(os.urandom(32)))
    if obs.outcome is Status.VALID:
        return None
    detail = "; ".join(p.message for p in obs.problems) or "unusable"
    if role == spec.expiry_file:
        return f"output is not valid {spec.format} ({detail})"
    return f"output is not usable ({detail})"


def write_output(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file beside it, fsync, rename, 0600.

    A symlink at ``path`` is followed (like ``cmd > path`` would), so the link stays.
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".refresh", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


async def run_refresh(spec: CredentialSettings, env: Mapping[str, str] | None = None) -> RunResult:
    """Run ``spec.refresh.command`` once; write its stdout to the ``output`` role if good.

    Never raises for anything the command does (exit code, timeout, bad output, missing
    program); only cancellation propagates, after the process group has been killed.
    """
    settings = spec.refresh
    if settings is None:
        raise ValueError(f"credential {spec.name!r} has no refresh command")
    env = dict(env) if env is not None else command_env()
    program = settings.command[0]
    started = anyio.current_time()
    before = await anyio.to_thread.run_sync(read_contents, spec)
    home = env.get("HOME", "/")
    cwd = home if await anyio.Path(home).is_dir() else "/"
    try:
        proc = await anyio.open_process(
            list(settings.command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError:
        return RunResult(False, f"command not found: {program}")
    except PermissionError:
        return RunResult(False, f"permission denied running {program}")
    except OSError as exc:
        return RunResult(False, f"cannot start {program}: {exc.strerror or type(exc).__name__}")

    out = Head(spec.max_size + 1)
    err = Tail(STDERR_KEEP)
    timed_out = False
    leftovers = False
    try:
        with anyio.move_on_after(settings.timeout) as deadline:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, proc.stdout, out.feed)
                tg.start_soon(drain, proc.stderr, err.feed)
                await proc.wait()
                # A child it left behind may hold the pipes open; do not wait for it long.
                tg.cancel_scope.deadline = min(
                    tg.cancel_scope.deadline, anyio.current_time() + PIPE_GRACE
                )
            leftovers = tg.cancel_scope.cancelled_caught
        timed_out = deadline.cancelled_caught
    finally:
        with anyio.CancelScope(shield=True):
            await reap(proc, kill=timed_out or leftovers or proc.returncode is None)
    duration = anyio.current_time() - started

    stdout = bytes(out.data)
    after: list[bytes] = []
    if settings.output is None:
        after = await anyio.to_thread.run_sync(read_contents, spec)
    needles = secret_needles([*before, stdout, *after])
    tail = await anyio.to_thread.run_sync(
        lambda: stderr_tail(bytes(err.data), needles, truncated=err.truncated)
    )

    def failed(reason: str) -> RunResult:
        return RunResult(False, reason, tail, duration=duration)

    if timed_out:
        return failed(f"timed out after {_seconds(settings.timeout)}")
    code = proc.returncode
    if code is None or code < 0:
        name = signal_name(-code) if code is not None else "an unknown signal"
        return failed(f"killed by {name}")
    if code != 0:
        return failed(f"exit code {code}")
    if settings.output is None:
        return RunResult(True, stderr=tail, duration=duration)
    if out.total > spec.max_size:
        return failed(f"output is {out.total} bytes, larger than max_size ({spec.max_size})")
    role = settings.output
    why = _check_output(spec, role, stdout)
    if why is not None:
        return failed(why + "; not written")
    path = spec.files[role]
    try:
        await anyio.to_thread.run_sync(write_output, path, stdout)
    except OSError as exc:
        return failed(f"cannot write {path}: {exc.strerror or type(exc).__name__}")
    return RunResult(True, stderr=tail, written=True, duration=duration)


# --------------------------------------------------------------------------------------------
# The sink


def is_due(settings: RefreshSettings, state: State) -> bool:
    """Whether ``state`` asks for a run of the refresh command."""
    if settings.on == "expired":
        return state.status is Status.EXPIRED
    return state.status in (Status.EXPIRING, Status.EXPIRED)


def _has_refresh_problem(state: State) -> bool:
    return any(p.code == REFRESH_FAILED_CODE for p in state.problems)


class Refresher:
    """Runs each credential's ``refresh`` command when it falls due (a broker sink).

    ``base``/``cap`` (seconds) and ``rand`` (a ``[0, 1)`` source) shape the retry backoff;
    the defaults are the SPEC's 1 s .. 5 m with :func:`random.random`.
    """

    name = "refresh"

    def __init__(
        self,
        broker: Broker,
        *,
        base: float | None = None,
        cap: float | None = None,
        rand: Callable[[], float] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._broker = broker
        self.base = BACKOFF_BASE if base is None else base
        self.cap = BACKOFF_CAP if cap is None else cap
        self._rand = rand or random.random
        self._env = dict(env) if env is not None else command_env()
        self._wakeups: dict[str, Wakeup] = {}
        self._tg: TaskGroup | None = None
        #: Command runs started, and of those failed (for metrics).
        self.runs = 0
        self.failures = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        engine = self._broker.engine
        async with (
            self._broker.subscribe("credentials.*") as events,
            anyio.create_task_group() as tg,
        ):
            self._tg = tg
            # Subscribed first, so nothing published after this look is missed.
            for name in engine.names:
                self._poke(name)
            task_status.started()
            async for event in events:
                self._poke(event.subject)

    def _poke(self, name: str) -> None:
        try:
            spec = self._broker.engine.spec(name)
        except KeyError:
            return
        if spec.refresh is None or self._tg is None:
            return
        wakeup = self._wakeups.get(name)
        if wakeup is None:
            wakeup = self._wakeups[name] = Wakeup()
            self._tg.start_soon(self._work, name, wakeup, name=f"refresh {name}")
        wakeup.poke()

    async def _work(self, name: str, wakeup: Wakeup) -> None:
        engine = self._broker.engine
        # (generation, status) a run already succeeded for: not run again for the same.
        done: tuple[int, Status] | None = None
        try:
            while True:
                try:
                    spec, state = engine.spec(name), engine.state(name)
                except KeyError:
                    return  # dropped from the config
                if spec.refresh is not None and is_due(spec.refresh, state):
                    key = (state.generation, state.status)
                    if key != done:
                        try:
                            done = await self._attempts(name, wakeup, state)
                        except KeyError:
                            return  # dropped from the config meanwhile
                        except Exception:
                            # A bug here must not stop the broker, nor spin: wait for news.
                            log.exception("refresh error", extra={"credential": name})
                            done = key
                        continue  # look again at once: new content may already be due
                await wakeup.wait()
        finally:
            self._wakeups.pop(name, None)

    async def _attempts(self, name: str, wakeup: Wakeup, state: State) -> tuple[int, Status] | None:
        """Run until success, or until the content changes or is no longer due."""
        engine = self._broker.engine
        generation, fingerprint = state.generation, state.fingerprint
        attempt = 0
        while True:
            try:
                spec = engine.spec(name)
            except KeyError:
                return None
            if spec.refresh is None:
                return None
            self.runs += 1
            log.info(
                "running refresh command",
                extra={"credential": name, "status": state.status.value, "attempt": attempt + 1},
            )
            result = await run_refresh(spec, self._env)
            current = engine.state(name)
            if result.ok:
                log.info(
                    "refresh command succeeded",
                    extra={
                        "credential": name,
                        "written": result.written,
                        "seconds": round(result.duration, 3),
                    },
                )
                if _has_refresh_problem(current):
                    await engine.set_problem(name, "refresh", None)
                return (generation, state.status)
            self.failures += 1
            delay = backoff_delay(attempt, self.base, self.cap, self._rand)
            attempt += 1
            log.warning(
                "refresh command failed",
                extra={
                    "credential": name,
                    "error": result.reason,
                    "attempt": attempt,
                    "retry_in": round(delay, 3),
                },
            )
            if current.generation != generation:
                return None  # someone else renewed it meanwhile
            await engine.set_problem(
                name,
                "refresh",
                result.problem(spec),
                fingerprint=fingerprint,
                announce=REFRESH_FAILED,
            )
            until = anyio.current_time() + delay
            while True:
                current = engine.state(name)
                if current.generation != generation or not is_due(spec.refresh, current):
                    return None
                remaining = until - anyio.current_time()
                if remaining <= 0:
                    break
                await wakeup.wait(remaining)
            state = current


# --------------------------------------------------------------------------------------------
# For `credbroker check`: what the daemon last reported


def persisted_refresh_problems(state_dir: Path) -> dict[str, tuple[str | None, Problem]]:
    """``name -> (fingerprint, refresh-failed problem)`` from the daemon's persisted states.

    Read-only (unlike :meth:`broker.engine.store.Store.load`, nothing is set aside or rewritten),
    and tolerant: anything unreadable is simply not reported.
    """
    latest: dict[str, Any] = {}
    try:
        snapshot = json.loads(read_regular(state_dir / SNAPSHOT, MAX_STATE_FILE)[0])
        creds = snapshot.get("credentials", {}) if isinstance(snapshot, dict) else {}
        if isinstance(creds, dict):
            latest.update({n: d for n, d in creds.items() if isinstance(d, dict)})
    except (OSError, UnsafeFile, ValueError, RecursionError):
        pass
    try:
        lines = read_regular(state_dir / JOURNAL, MAX_STATE_FILE)[0].splitlines()
    except (OSError, UnsafeFile):
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
            for doc in entry["states"]:
                latest[str(doc["credential"])] = doc
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue
    found: dict[str, tuple[str | None, Problem]] = {}
    for name, doc in latest.items():
        try:
            problems = [Problem.from_dict(p) for p in doc.get("problems", ())]
            fingerprint = doc.get("fingerprint")
        except (KeyError, TypeError, AttributeError, ValueError):
            continue
        for problem in problems:
            if problem.code == REFRESH_FAILED_CODE:
                found[name] = (fingerprint if isinstance(fingerprint, str) else None, problem)
    return found

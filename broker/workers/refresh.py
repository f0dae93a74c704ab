"""Auto-refresh (SPEC section 2, ``refresh``): run the credential's command before it expires.

A :class:`Refresher` is a worker of the broker. It watches the bus (and, at start, the current
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
- **Failures are findings**, attached with ``port.report(..., source="refresh")`` and
  announced as ``credentials.refresh_failed``. The finding is tied to the content's
  fingerprint: once the content changes it is dropped. Its message carries the command's
  stderr tail with every secret redacted (see :func:`broker.aio.commands.stderr_tail`).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus

from broker.aio.atomicfile import atomic_write
from broker.aio.commands import (
    PIPE_GRACE,
    STDERR_KEEP,
    CommandTunables,
    Head,
    Tail,
    drain,
    open_command,
    reap,
    secret_needles,
    signal_name,
    stderr_tail,
)
from broker.aio.wakeup import Wakeup
from broker.config import CredentialSettings, RefreshSettings
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import REFRESH_FAILED, observe
from broker.core.reads import FileRead
from broker.core.state import FileInfo, Problem, State, Status
from broker.port import SinkContext, SinkHealth

if TYPE_CHECKING:
    from broker.port import BrokerPort

__all__ = [
    "REFRESH_FAILED_CODE",
    "Refresher",
    "RunResult",
    "run_refresh",
]

log = logging.getLogger("broker.refresh")

REFRESH_FAILED_CODE = "refresh-failed"


# --------------------------------------------------------------------------------------------
# Pure helpers


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


def _contents(port: BrokerPort, name: str) -> list[bytes]:
    """Every file's content now (for redaction: these are the secrets in use)."""
    return [r.content for r in port.read_files(name) if r.content]


def _check_output(spec: CredentialSettings, role: str, data: bytes, now: float) -> str | None:
    """Why ``data`` must not be written to ``role``'s file, or ``None`` when it is fine.

    The very checks a read of the file would make (format, expiry, non-empty), applied to
    the output as if it were already that file.
    """
    path = str(spec.files[role])
    info = FileInfo(role, path, present=True, size=len(data), mtime=now, mode=0o600)
    obs = observe(spec, [FileRead(info, content=data)], Fingerprinter(os.urandom(32)))
    if obs.outcome is Status.VALID:
        return None
    detail = "; ".join(p.message for p in obs.problems) or "unusable"
    if role == spec.expiry_file:
        return f"output is not valid {spec.format} ({detail})"
    return f"output is not usable ({detail})"


async def run_refresh(
    spec: CredentialSettings,
    env: Mapping[str, str],
    *,
    contents: Callable[[], list[bytes]],
    clock: Callable[[], float],
) -> RunResult:
    """Run ``spec.refresh.command`` once; write its stdout to the ``output`` role if good.

    ``contents`` reads the credential's files now (blocking: the secrets stderr must not
    show). Never raises for anything the command does (exit code, timeout, bad output,
    missing program); only cancellation propagates, after the process group has been killed.
    """
    settings = spec.refresh
    if settings is None:
        raise ValueError(f"credential {spec.name!r} has no refresh command")
    started = anyio.current_time()
    before = await anyio.to_thread.run_sync(contents)
    proc = await open_command(settings.command, env, stdout=subprocess.PIPE)
    if isinstance(proc, str):
        return RunResult(False, proc)

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
        after = await anyio.to_thread.run_sync(contents)
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
    why = _check_output(spec, role, stdout, clock())
    if why is not None:
        return failed(why + "; not written")
    path = spec.files[role]
    try:
        # Through a symlink (like ``cmd > path``); the directory may be the user's own.
        await anyio.to_thread.run_sync(
            lambda: atomic_write(path, stdout, follow_symlink=True, strict_dir_sync=False)
        )
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
    """Runs each credential's ``refresh`` command when it falls due (a broker worker).

    ``base``/``cap``/``rand``/``env``: see :class:`~broker.aio.commands.CommandTunables`.
    """

    name = "refresh"

    def __init__(
        self,
        context: SinkContext,
        *,
        base: float | None = None,
        cap: float | None = None,
        rand: Callable[[], float] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._port = context.port
        self.tunables = CommandTunables.of(base, cap, rand, env)
        self._wakeups: dict[str, Wakeup] = {}
        self._tg: TaskGroup | None = None
        #: Command runs started, and of those failed (for metrics).
        self.runs = 0
        self.failures = 0

    @property
    def base(self) -> float:
        """The retry backoff's first step, in seconds."""
        return self.tunables.base

    def health(self) -> SinkHealth:
        """Command runs (``delivered``: those that succeeded) and failed runs."""
        return SinkHealth(
            self.name, delivers=False, delivered=self.runs - self.failures,
            failures=self.failures,
        )

    def close(self) -> None:
        """Nothing to let go of: the subscription is made by ``run``."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with (
            self._port.subscribe("credentials.*") as events,
            anyio.create_task_group() as tg,
        ):
            self._tg = tg
            # Subscribed first, so nothing published after this look is missed.
            for name in self._port.names():
                self._poke(name)
            task_status.started()
            async for event in events:
                self._poke(event.subject)

    def _poke(self, name: str) -> None:
        try:
            spec = self._port.settings(name)
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
        port = self._port
        # (generation, status) a run already succeeded for: not run again for the same.
        done: tuple[int, Status] | None = None
        try:
            while True:
                try:
                    spec, state = port.settings(name), port.state(name)
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
        port = self._port
        generation, fingerprint = state.generation, state.fingerprint
        attempt = 0
        while True:
            try:
                spec = port.settings(name)
            except KeyError:
                return None
            if spec.refresh is None:
                return None
            self.runs += 1
            log.info(
                "running refresh command",
                extra={"credential": name, "status": state.status.value, "attempt": attempt + 1},
            )
            result = await run_refresh(
                spec, self.tunables.env, contents=lambda: _contents(port, name), clock=port.clock
            )
            current = port.state(name)
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
                    await port.report(name, "refresh", None)
                return (generation, state.status)
            self.failures += 1
            delay = self.tunables.delay(attempt)
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
            await port.report(
                name,
                "refresh",
                result.problem(spec),
                fingerprint=fingerprint,
                announce=REFRESH_FAILED,
            )
            until = anyio.current_time() + delay
            while True:
                current = port.state(name)
                if current.generation != generation or not is_due(spec.refresh, current):
                    return None
                remaining = until - anyio.current_time()
                if remaining <= 0:
                    break
                await wakeup.wait(remaining)
            state = current

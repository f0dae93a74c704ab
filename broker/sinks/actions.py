"""Actions (SPEC section 2, ``[[actions]]``): signal a process or run argv when credentials change.

:class:`Actions` is a broker sink. It subscribes to the bus, so an action only ever sees
published events (a state that ``settle`` withdrew is never published, so never acted on).
Each configured action has one worker task, so one action never runs twice at once.

Decisions worth knowing:

- **Coalescing**: the first matching event opens a window of ``coalesce``; every matching
  event that arrives before it closes joins the same run (a certificate and its key, or ten
  certificates renewed together, reload nginx once). Events that arrive *during* a run are
  kept and make exactly one more run after it.
- **Environment**: that of refresh commands (``HOME``, ``PATH``, ``LANG``/``TZ``) plus
  ``CREDBROKER_*`` metadata; never content. ``CREDBROKER_CREDENTIALS`` lists the run's
  credentials, space-separated; ``CREDBROKER_GENERATION``, ``CREDBROKER_FINGERPRINT`` and
  ``CREDBROKER_STATUS`` give each one's latest value in the same order, and
  ``CREDBROKER_EVENT_TYPE`` the distinct event types in order of arrival.
  ``CREDBROKER_EVENTS_FILE`` is a 0600 file of the run's CloudEvents, one JSON a line,
  removed after the run.
- **Failures** (exit code, timeout, a missing or stale pidfile) are findings attached to each
  credential of the run with ``port.report`` and announced as
  ``credentials.action_failed`` (stderr tail redacted as a refresh command's is);
  the run is retried with capped exponential backoff and full jitter, merged with any event
  that arrived meanwhile. A success clears the finding.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from broker.aio.commands import (
    STDERR_KEEP,
    CommandTunables,
    Tail,
    drain,
    open_command,
    reap,
    secret_needles,
    signal_name,
    stderr_tail,
)
from broker.aio.wakeup import Wakeup
from broker.config import ActionSettings
from broker.core.events import Event
from broker.core.state import Problem
from broker.port import SinkContext, SinkHealth
from broker.sinks.deliveries import Outcome, OutcomeFile

__all__ = [
    "ACTION_FAILED",
    "ACTION_FAILED_CODE",
    "ActionResult",
    "Actions",
    "action_env",
    "matches",
    "run_action",
    "send_signal",
    "wants",
]

log = logging.getLogger("broker.actions")

ACTION_FAILED = "credentials.action_failed"
ACTION_FAILED_CODE = "action-failed"
#: A pidfile holds a number; anything longer than this is not a pidfile.
_PIDFILE_MAX = 64
#: Events kept for one run; beyond it, only each credential's latest is kept.
_RUN_EVENTS_MAX = 1000


# --------------------------------------------------------------------------------------------
# Pure helpers


def matches(action_patterns: Sequence[str], value: str) -> bool:
    """Whether ``value`` matches one of the names or globs."""
    return any(fnmatch.fnmatchcase(value, p) for p in action_patterns)


def own_failure(action: str, event: Event) -> bool:
    """Whether ``event`` announces this action's own failure (never a reason to run it)."""
    return event.type == ACTION_FAILED and event.data.reason.startswith(f"action {action}:")


def wants(action: ActionSettings, event: Event) -> bool:
    """Whether ``event`` is one for ``action`` to run on.

    ``credentials.action_failed`` counts only when ``on`` names it literally (a glob such
    as ``credentials.*`` does not take it), and never an action's own: two failing actions
    must not keep each other running.
    """
    if not matches(action.credentials, event.subject):
        return False
    if event.type == ACTION_FAILED:
        return ACTION_FAILED in action.on and not own_failure(action.name, event)
    return matches(action.on, event.type)


def action_env(
    events: Sequence[Event], base: Mapping[str, str], events_file: str
) -> dict[str, str]:
    """The run's environment: ``base`` plus the ``CREDBROKER_*`` metadata of ``events``."""
    latest: dict[str, Event] = {}
    for event in events:
        latest.pop(event.subject, None)
        latest[event.subject] = event
    types = list(dict.fromkeys(e.type for e in events))
    env = dict(base)
    env.update(
        CREDBROKER_EVENT_TYPE=" ".join(types),
        CREDBROKER_CREDENTIALS=" ".join(latest),
        CREDBROKER_GENERATION=" ".join(str(e.data.generation) for e in latest.values()),
        CREDBROKER_FINGERPRINT=" ".join(e.data.fingerprint or "-" for e in latest.values()),
        CREDBROKER_STATUS=" ".join(e.data.status.value for e in latest.values()),
        CREDBROKER_EVENTS_FILE=events_file,
    )
    return env


# --------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True, slots=True)
class ActionResult:
    """How one run went. Never holds secret bytes."""

    ok: bool
    reason: str = ""
    stderr: str | None = None
    remedy: str = ""
    exit_code: int | None = None
    duration: float = 0.0


def send_signal(pidfile: Path, signame: str) -> ActionResult:
    """Send ``SIG<signame>`` to the pid in ``pidfile``; a bad pidfile is a result, not an error."""
    remedy = f"check that the process is running and writes its pid to {pidfile}"
    try:
        with open(pidfile, "rb") as fh:
            raw = fh.read(_PIDFILE_MAX + 1)
    except FileNotFoundError:
        return ActionResult(False, f"pidfile {pidfile} not found", remedy=remedy)
    except OSError as exc:
        return ActionResult(
            False,
            f"cannot read pidfile {pidfile}: {exc.strerror or type(exc).__name__}",
            remedy=remedy,
        )
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > _PIDFILE_MAX or not re.fullmatch(r"[0-9]+", text) or int(text) <= 0:
        # kill(0) or kill(-1) would signal a whole group or every process: never.
        return ActionResult(False, f"pidfile {pidfile} does not hold a process id", remedy=remedy)
    pid = int(text)
    try:
        os.kill(pid, signal.Signals[f"SIG{signame}"])
    except ProcessLookupError:
        return ActionResult(
            False,
            f"no process with pid {pid} (stale pidfile {pidfile})",
            remedy=f"start the process, or remove the stale pidfile {pidfile}",
        )
    except PermissionError:
        return ActionResult(
            False,
            f"not permitted to signal pid {pid} from {pidfile}",
            remedy="run the broker as the process's user, or use a command action",
        )
    return ActionResult(True)


async def run_action(
    action: ActionSettings,
    events: Sequence[Event],
    *,
    env: Mapping[str, str],
    secrets: Callable[[], list[bytes]],
) -> ActionResult:
    """Run ``action`` once for ``events``. Only cancellation propagates (after a kill).

    ``secrets`` returns the credentials' current contents, for redacting stderr.
    """
    started = anyio.current_time()
    if action.signal is not None:
        sig = action.signal
        result = await anyio.to_thread.run_sync(send_signal, sig.pidfile, sig.name)
        return result
    assert action.command is not None
    argv = list(action.command)
    remedy = f"run it by hand to see: {shlex.join(argv)}"
    fd, events_file = tempfile.mkstemp(prefix="credbroker-action-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp made it 0600
            fh.write(b"".join(e.payload + b"\n" for e in events))
        run_env = action_env(events, env, events_file)
        proc = await open_command(argv, run_env, stdout=subprocess.DEVNULL)
        if isinstance(proc, str):
            return ActionResult(False, proc, remedy=remedy)
        err = Tail(STDERR_KEEP)
        timed_out = False
        try:
            with anyio.move_on_after(action.timeout) as deadline:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain, proc.stderr, err.feed)
                    await proc.wait()
                    tg.cancel_scope.cancel()  # a leftover child may hold stderr open
            timed_out = deadline.cancelled_caught
        finally:
            with anyio.CancelScope(shield=True):
                await reap(proc, kill=timed_out or proc.returncode is None)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(events_file)
    duration = anyio.current_time() - started
    needles = secret_needles(await anyio.to_thread.run_sync(secrets))
    tail = stderr_tail(bytes(err.data), needles, truncated=err.truncated)
    code = proc.returncode
    if timed_out:
        reason = f"timed out after {action.timeout:g}s"
        return ActionResult(False, reason, tail, remedy, duration=duration)
    if code is None or code < 0:
        name = signal_name(-code) if code is not None else "an unknown signal"
        return ActionResult(False, f"killed by {name}", tail, remedy, code, duration)
    if code != 0:
        return ActionResult(False, f"exit code {code}", tail, remedy, code, duration)
    return ActionResult(True, stderr=tail, exit_code=0, duration=duration)


# --------------------------------------------------------------------------------------------
# The sink


class _Worker:
    """One action's queue and loop: one run at a time, coalesced, retried."""

    def __init__(self, owner: Actions, action: ActionSettings) -> None:
        self.owner = owner
        self.action = action
        self.pending: list[Event] = []
        self.wakeup = Wakeup()
        self.running = False
        self.outcome = Outcome("action", action.name)

    def offer(self, event: Event) -> None:
        self.pending.append(event)
        if len(self.pending) > _RUN_EVENTS_MAX:
            # Keep each credential's latest event (the run still names every credential).
            latest = {e.subject: e for e in self.pending}
            self.pending = [e for e in self.pending if latest[e.subject] is e]
        self.wakeup.poke()

    async def loop(self) -> None:
        action = self.action
        while True:
            while not self.pending:
                await self.wakeup.wait()
            if action.coalesce > 0:
                await anyio.sleep(action.coalesce)
            batch, self.pending = self.pending, []
            attempt = 0
            while True:
                result = await self._run(batch)
                if result.ok:
                    await self.owner._cleared(action, batch)
                    break
                delay = self.owner.tunables.delay(attempt)
                attempt += 1
                await self.owner._failed(action, batch, result, attempt, delay)
                await anyio.sleep(delay)
                # What came meanwhile joins the retry (it would make the next run anyway).
                batch, self.pending = [*batch, *self.pending], []

    async def _run(self, batch: list[Event]) -> ActionResult:
        action = self.action
        names = list(dict.fromkeys(e.subject for e in batch))
        self.running = True
        self.outcome.runs += 1
        self.owner.started_at.append(self.owner.clock())
        log.info("running action", extra={"action": action.name, "credentials": names})
        try:
            result = await run_action(
                action, batch, env=self.owner.tunables.env,
                secrets=lambda: self.owner.secrets(names),
            )
        except Exception as exc:  # a bug here must not stop the broker
            log.exception("action error", extra={"action": action.name})
            result = ActionResult(False, f"internal error: {type(exc).__name__}")
        finally:
            self.running = False
        self.outcome.last_at = self.owner.clock()
        self.outcome.last_ok = result.ok
        self.outcome.last_reason = result.reason
        if not result.ok:
            self.outcome.failures += 1
        self.owner.outcome_file.changed()
        return result


class Actions:
    """Runs the configured ``[[actions]]`` on matching events (a broker sink).

    ``base``/``cap``/``rand``/``env``: see :class:`~broker.aio.commands.CommandTunables`.
    """

    name = "actions"

    def __init__(
        self,
        context: SinkContext,
        *,
        base: float | None = None,
        cap: float | None = None,
        rand: Callable[[], float] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        port = self._port = context.port
        self.tunables = CommandTunables.of(base, cap, rand, env)
        self.clock = port.clock
        self.workers = [_Worker(self, a) for a in context.config.actions]
        #: Wall-clock start time of every run (benchmarks, tests).
        self.started_at: list[float] = []
        # Subscribed now, before the engine's first read: first-sight events count too.
        self._events = port.subscribe("credentials.*", buffer=65536)
        self.outcome_file = OutcomeFile(port.state_dir, self.name, self.outcomes)

    @property
    def base(self) -> float:
        """The retry backoff's first step, in seconds."""
        return self.tunables.base

    def close(self) -> None:
        self._events.close()

    def outcomes(self) -> list[Outcome]:
        return [w.outcome for w in self.workers]

    def health(self) -> SinkHealth:
        """Runs ok (``delivered``), runs failed, events waiting; each action's outcome."""
        runs = sum(w.outcome.runs for w in self.workers)
        failures = sum(w.outcome.failures for w in self.workers)
        pending = sum(len(w.pending) for w in self.workers)
        return SinkHealth(
            self.name, delivered=runs - failures, failures=failures, pending=pending,
            outcomes=tuple(self.outcomes()),
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with self._events as events, anyio.create_task_group() as tg:
            tg.start_soon(self.outcome_file.run, name="actions outcome file")
            for worker in self.workers:
                tg.start_soon(worker.loop, name=f"action {worker.action.name}")
            task_status.started()
            async for event in events:
                for worker in self.workers:
                    if wants(worker.action, event):
                        worker.offer(event)

    def secrets(self, names: Sequence[str]) -> list[bytes]:
        """The current content of these credentials' files (what redaction must hide)."""
        out: list[bytes] = []
        for name in names:
            with contextlib.suppress(KeyError, OSError):
                out.extend(r.content for r in self._port.read_files(name) if r.content)
        return out

    async def _failed(
        self,
        action: ActionSettings,
        batch: Sequence[Event],
        result: ActionResult,
        attempt: int,
        delay: float,
    ) -> None:
        log.warning(
            "action failed",
            extra={
                "action": action.name,
                "error": result.reason,
                "attempt": attempt,
                "retry_in": round(delay, 3),
            },
        )
        message = f"action {action.name}: {result.reason}"
        if result.stderr is not None:
            message += f"; stderr: {result.stderr or '(empty)'}"
        problem = Problem(ACTION_FAILED_CODE, message, result.remedy or "see the broker log")
        await self._each(batch, action, problem)

    async def _cleared(self, action: ActionSettings, batch: Sequence[Event]) -> None:
        log.info("action succeeded", extra={"action": action.name})
        await self._each(batch, action, None)

    async def _each(
        self, batch: Sequence[Event], action: ActionSettings, problem: Problem | None
    ) -> None:
        port = self._port
        source = f"action:{action.name}"
        for name in dict.fromkeys(e.subject for e in batch):
            try:
                state = port.state(name)
                had = any(
                    p.code == ACTION_FAILED_CODE and p.message.startswith(f"action {action.name}:")
                    for p in state.problems
                )
                if problem is None and not had:
                    continue
                await port.report(
                    name,
                    source,
                    problem,
                    fingerprint=state.fingerprint,
                    announce=ACTION_FAILED if problem is not None else None,
                )
            except KeyError:
                continue  # dropped from the config meanwhile

"""Actions: real commands and real signals, run by a running broker on published events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config import ActionSettings
from broker.core.events import make_event
from broker.core.state import Problem, State, Status
from broker.sinks.actions import (
    ACTION_FAILED,
    Actions,
    action_env,
    matches,
    own_failure,
    send_signal,
    wants,
)
from tests.conftest import Harness, SecretRegistry, write_atomic

TIMEOUT = 15.0

# argv: work dir, mode ("ok" | "slow" | "hang" | "fail"), then credential files whose content
# it prints to stderr (which must come out redacted). It records every run's start and end,
# flags overlapping runs with an O_EXCL marker, and keeps the environment and events file
# of every run.
SCRIPT = """#!{python}
import json, os, stat, sys, time

work, mode, creds = sys.argv[1], sys.argv[2], sys.argv[3:]
path = lambda name: os.path.join(work, name)
try:
    os.close(os.open(path("running"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    mine = True
except FileExistsError:
    mine = False
    open(path("overlap"), "a").write("overlap\\n")
with open(path("starts"), "a") as f:
    f.write(f"{{time.time()}}\\n")
events_file = os.environ.get("CREDBROKER_EVENTS_FILE", "")
events = open(events_file).read().splitlines() if events_file else []
mode_bits = stat.S_IMODE(os.stat(events_file).st_mode) if events_file else None
with open(path("runs"), "a") as f:
    f.write(json.dumps({{"env": dict(os.environ), "events": events, "mode": mode_bits}}) + "\\n")
for cred in creds:
    sys.stderr.write("the token " + open(cred).read() + " was refused\\n")
code = 0
if mode == "slow":
    time.sleep(1.5)
elif mode == "hang":
    time.sleep(60)
elif mode == "fail":
    code = 3
elif mode.startswith("fail-until-"):
    code = 4 if len(open(path("starts")).read().splitlines()) < int(mode[11:]) else 0
if mine:
    os.remove(path("running"))
sys.exit(code)
"""


def make_script(tmp_path: Path) -> Path:
    script = tmp_path / "action-cmd"
    script.write_text(SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    return script


def starts(work: Path) -> list[float]:
    try:
        return [float(x) for x in (work / "starts").read_text().split()]
    except FileNotFoundError:
        return []


def runs(work: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (work / "runs").read_text().splitlines()]
    except FileNotFoundError:
        return []


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def action_harness(harness_factory: Any) -> Any:
    """``harness_factory`` with the Actions sink's backoff injected."""

    @asynccontextmanager
    async def start(
        credentials: list[dict[str, Any]],
        actions: list[dict[str, Any]],
        *,
        base: float = 0.2,
        cap: float = 0.4,
        rand: Any = lambda: 1.0,
    ) -> AsyncIterator[Harness]:
        sinks = [partial(Actions, base=base, cap=cap, rand=rand)]
        async with harness_factory(credentials, sinks=sinks, actions=actions) as h:
            assert h.broker.sinks["actions"].base == base  # ours replaced the default
            yield h

    return start


async def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


def cred(name: str, path: Path) -> dict[str, Any]:
    return {"name": name, "files": {"token": str(path)}}


# -- against a running broker ---------------------------------------------------------------


@pytest.mark.anyio
async def test_changes_within_coalesce_make_one_run_with_metadata_and_no_secret(
    action_harness: Any,
    tmp_path: Path,
    work: Path,
    secrets: SecretRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDBROKER_TEST_LEAKY", secrets.token("env"))
    script = make_script(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    write_atomic(a, secrets.token())
    write_atomic(b, secrets.token())
    action = {
        "name": "reload",
        "credentials": ["a", "b"],
        "command": [str(script), str(work), "ok"],
        "coalesce": "1s",  # wide enough for a loaded machine to see both changes in it
    }
    async with action_harness([cred("a", a), cred("b", b)], [action]) as h:
        # First sight of both is one run (their refreshed events came within the window).
        await wait_for(lambda: len(runs(work)) == 1)
        await anyio.sleep(0.3)
        write_atomic(a, secrets.token())
        write_atomic(b, secrets.token())
        await wait_for(lambda: len(runs(work)) == 2)
        await anyio.sleep(1.2)  # no further run comes
        await h.fence()
        assert len(runs(work)) == 2
        run = runs(work)[1]
        env = run["env"]
        assert env["CREDBROKER_CREDENTIALS"].split() == ["a", "b"]
        assert env["CREDBROKER_EVENT_TYPE"] == "credentials.refreshed"
        assert env["CREDBROKER_GENERATION"] == "2 2"
        assert env["CREDBROKER_STATUS"] == "valid valid"
        assert env["CREDBROKER_FINGERPRINT"].split() == [
            h.broker.state("a").fingerprint,
            h.broker.state("b").fingerprint,
        ]
        names = set(env) - {"HOME", "PATH", "LANG", "TZ"}
        assert all(n.startswith("CREDBROKER_") for n in names)
        assert "CREDBROKER_TEST_LEAKY" not in env
        assert run["mode"] == 0o600
        lines = [json.loads(line) for line in run["events"]]
        assert [(e["subject"], e["type"]) for e in lines] == [
            ("a", "credentials.refreshed"),
            ("b", "credentials.refreshed"),
        ]
        assert not Path(env["CREDBROKER_EVENTS_FILE"]).exists()  # removed after the run
    secrets.observe("action runs", (work / "runs").read_text())


@pytest.mark.anyio
async def test_events_during_a_run_make_exactly_one_more_and_never_two_at_once(
    action_harness: Any, tmp_path: Path, work: Path, secrets: SecretRegistry
) -> None:
    script = make_script(tmp_path)
    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    action = {
        "name": "slow",
        "credentials": ["a"],
        "command": [str(script), str(work), "slow"],
        "coalesce": 0,
    }
    async with action_harness([cred("a", a)], [action]) as h:
        await wait_for(lambda: len(starts(work)) == 1)
        for _ in range(4):  # all during the first (1.5 s) run
            write_atomic(a, secrets.token())
            await anyio.sleep(0.05)
        await wait_for(lambda: len(starts(work)) == 2)
        await wait_for(lambda: not (work / "running").exists())
        await anyio.sleep(0.8)
        await h.fence()
    assert len(starts(work)) == 2
    assert not (work / "overlap").exists()
    second = runs(work)[1]
    assert len(second["events"]) >= 1
    assert second["env"]["CREDBROKER_GENERATION"] == "5"  # the latest, after 4 changes


@pytest.mark.anyio
async def test_a_failing_command_is_reported_redacted_retried_with_backoff_and_cleared(
    action_harness: Any, tmp_path: Path, work: Path, secrets: SecretRegistry
) -> None:
    script = make_script(tmp_path)
    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    action = {
        "name": "flaky",
        "credentials": ["a"],
        "command": [str(script), str(work), "fail-until-3", str(a)],
        "coalesce": 0,
    }
    async with action_harness([cred("a", a)], [action], base=0.2, cap=0.4) as h:
        failed = [await h.next("a", timeout=TIMEOUT) for _ in range(3)]
        assert [e.type for e in failed] == ["credentials.refreshed", ACTION_FAILED, ACTION_FAILED]
        reason = failed[1].data.reason
        assert reason.startswith("action flaky: exit code 4; stderr: the token [redacted]")
        assert [p.code for p in failed[1].data.problems] == ["action-failed"]
        assert failed[1].data.problems[0].remedy.startswith("run it by hand to see:")
        await wait_for(lambda: len(starts(work)) == 3)
        await wait_for(lambda: not h.broker.state("a").problems)  # success cleared it
        await h.fence()
        outcome = h.broker.sinks["actions"].outcomes()[0]
        assert (outcome.runs, outcome.failures, outcome.last_ok) == (3, 2, True)
    t = starts(work)
    # rand = 1.0: the retries wait base * 2**n, capped: 0.2 s, then 0.4 s.
    assert t[1] - t[0] >= 0.2
    assert t[2] - t[1] >= 0.4
    assert not (work / "overlap").exists()
    assert ACTION_FAILED not in h.types("fence")


@pytest.mark.anyio
async def test_a_hanging_command_times_out_and_is_killed(
    action_harness: Any, tmp_path: Path, work: Path, secrets: SecretRegistry
) -> None:
    script = make_script(tmp_path)
    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    action = {
        "name": "stuck",
        "credentials": ["a"],
        "command": [str(script), str(work), "hang", str(a)],
        "coalesce": 0,
        "timeout": "500ms",
    }
    async with action_harness([cred("a", a)], [action], base=5.0, cap=5.0) as h:
        await h.next("a")
        event = await h.next("a")
        assert event.type == ACTION_FAILED
        assert "timed out after 0.5s" in event.data.reason
        assert "[redacted]" in event.data.reason
        assert (work / "running").exists()  # killed mid-run: it never got to clean up
    assert len(starts(work)) == 1  # the retry waits 5 s


@pytest.mark.anyio
async def test_signal_through_a_pidfile_and_a_stale_pidfile_is_a_problem(
    action_harness: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    a = tmp_path / "a"
    write_atomic(a, secrets.token())
    got = tmp_path / "got"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGUSR1, lambda *_: open(sys.argv[1], 'a').write('usr1\\n'))\n"
            "open(sys.argv[1] + '.ready', 'w').close()\n"
            "while True: time.sleep(1)\n",
            str(got),
        ]
    )
    try:
        await wait_for(lambda: Path(f"{got}.ready").exists())
        pidfile = tmp_path / "app.pid"
        pidfile.write_text(f"{child.pid}\n")
        action = {
            "name": "hup",
            "credentials": ["a"],
            "signal": {"pidfile": str(pidfile), "name": "USR1"},
            "coalesce": 0,
        }
        async with action_harness([cred("a", a)], [action], base=0.1, cap=0.1) as h:
            assert (await h.next("a")).data.generation == 1  # first sight
            await wait_for(lambda: got.exists() and got.read_text() == "usr1\n")
            child.kill()
            child.wait()
            write_atomic(a, secrets.token())
            assert (await h.next("a")).type == "credentials.refreshed"
            event = await h.next("a")
            assert event.type == ACTION_FAILED
            assert f"no process with pid {child.pid} (stale pidfile" in event.data.reason
            assert event.data.problems[-1].remedy.startswith("start the process, or remove")
            pidfile.unlink()
            event = await h.next("a")  # the retry: now the pidfile is gone
            assert event.data.reason.startswith(f"action hup: pidfile {pidfile} not found")
            assert h.broker.state("a").status is Status.VALID  # a problem, not a status
    finally:
        child.kill()
        child.wait()


# -- pure helpers -----------------------------------------------------------------------------


def _state(name: str, generation: int, sequence: int) -> State:
    return State(
        credential=name,
        status=Status.VALID,
        generation=generation,
        sequence=sequence,
        fingerprint=f"hmac-sha256:{generation:016x}",
        expires_at=None,
        expiring_at=None,
        changed_at=0.0,
        files=(),
        problems=(),
        reason="content changed",
    )


def test_action_env_lists_each_credential_once_with_its_latest_values() -> None:
    events = [
        make_event("credentials.refreshed", _state("b", 1, 1), source="urn:x", now=0),
        make_event("credentials.refreshed", _state("a", 4, 2), source="urn:x", now=0),
        make_event("credentials.expiring", _state("b", 2, 3), source="urn:x", now=0),
    ]
    env = action_env(events, {"PATH": "/bin"}, "/tmp/events")
    assert env == {
        "PATH": "/bin",
        "CREDBROKER_EVENT_TYPE": "credentials.refreshed credentials.expiring",
        "CREDBROKER_CREDENTIALS": "a b",
        "CREDBROKER_GENERATION": "4 2",
        "CREDBROKER_FINGERPRINT": f"hmac-sha256:{4:016x} hmac-sha256:{2:016x}",
        "CREDBROKER_STATUS": "valid valid",
        "CREDBROKER_EVENTS_FILE": "/tmp/events",
    }


def test_an_action_never_runs_for_its_own_failure_but_for_anothers() -> None:
    from dataclasses import replace

    failed = replace(
        _state("a", 1, 1),
        reason="action nginx: exit code 1",
        problems=(Problem("action-failed", "action nginx: exit code 1", "x"),),
    )
    event = make_event(ACTION_FAILED, failed, source="urn:x", now=0)
    assert own_failure("nginx", event)
    assert not own_failure("nginx-2", event)
    refreshed = make_event("credentials.refreshed", failed, source="urn:x", now=0)
    assert not own_failure("nginx", refreshed)


def test_action_failed_is_taken_only_when_named_literally() -> None:
    from dataclasses import replace

    failed = replace(_state("a", 1, 1), reason="action other: exit code 1")
    event = make_event(ACTION_FAILED, failed, source="urn:x", now=0)
    glob = ActionSettings(name="n", command=("true",), on=("credentials.*",))
    literal = ActionSettings(name="n", command=("true",), on=(ACTION_FAILED,))
    own = ActionSettings(name="other", command=("true",), on=(ACTION_FAILED,))
    assert not wants(glob, event)  # two failing actions on "*" must not feed each other
    assert wants(literal, event)
    assert not wants(own, event)
    refreshed = make_event("credentials.refreshed", failed, source="urn:x", now=0)
    assert wants(glob, refreshed)
    assert not wants(glob.model_copy(update={"credentials": ("b*",)}), refreshed)


@given(st.text(alphabet="ab-*?", min_size=1, max_size=6), st.text(alphabet="ab-", max_size=6))
def test_matches_is_fnmatch_of_any_pattern(pattern: str, value: str) -> None:
    import fnmatch

    assert matches([pattern], value) == fnmatch.fnmatchcase(value, pattern)
    assert matches(["nothing-like-it", pattern], value) == matches([pattern], value)
    assert matches(["*"], value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        ("", "does not hold a process id"),
        ("0\n", "does not hold a process id"),
        ("-1\n", "does not hold a process id"),
        ("12abc", "does not hold a process id"),
        ("9" * 200, "does not hold a process id"),
    ],
)
def test_bad_pidfiles_are_clear_problems_never_signals(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    pidfile = tmp_path / "x.pid"
    if content is not None:
        pidfile.write_text(content)
    result = send_signal(pidfile, "HUP")
    assert not result.ok
    assert expected in result.reason
    assert result.remedy


def test_a_dead_pid_is_a_stale_pidfile(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(str(proc.pid))
    result = send_signal(pidfile, "HUP")
    assert not result.ok and "stale pidfile" in result.reason
    os.kill(os.getpid(), 0)  # sanity: signalling a live process works at all
    assert send_signal(_own_pidfile(tmp_path), "WINCH").ok


def _own_pidfile(tmp_path: Path) -> Path:
    path = tmp_path / "self.pid"
    path.write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGWINCH, signal.SIG_IGN)
    return path

"""Auto-refresh: real commands (small scripts in tmp_path) run by a running broker."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.aio.commands import command_env, redact, secret_needles, stderr_tail
from broker.core.backoff import backoff_delay
from broker.core.redaction import REDACTED, _field_values
from broker.core.state import Status
from broker.engine.store import persisted_problems
from broker.workers.refresh import REFRESH_FAILED_CODE, Refresher
from tests.conftest import Harness, SecretRegistry, write_atomic

TIMEOUT = 15.0

# One script, several behaviours (argv: work dir, mode, credential file, failures before
# success). It records every run's start and end, flags overlapping runs with an O_EXCL
# marker, dumps the environment it was given, and writes the credential it was started
# with to stderr (which must come out redacted).
SCRIPT = """#!{python}
import os, subprocess, sys, time

work, mode, cred = sys.argv[1], sys.argv[2], sys.argv[3]
fails = int(sys.argv[4]) if len(sys.argv) > 4 else 0


def path(name):
    return os.path.join(work, name)


start = time.time()
try:
    os.close(os.open(path("running"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    mine = True
except FileExistsError:
    mine = False
    with open(path("overlap"), "a") as f:
        f.write("overlap\\n")
with open(path("starts"), "a") as f:
    f.write(f"{{start}} {{os.getpid()}}\\n")
with open(path("starts")) as f:
    run = len(f.read().splitlines())
with open("/proc/self/environ", "rb") as src, open(path("environ"), "wb") as dst:
    dst.write(src.read())
with open(cred) as f:
    current = f.read()
sys.stderr.write("starting refresh\\nerror: the token " + current + " was refused\\n")
code = 0
if mode == "hang":
    child = subprocess.Popen(["sleep", "60"])
    with open(path("children"), "a") as f:
        f.write(f"{{child.pid}}\\n")
    time.sleep(60)
elif mode == "flaky" and run <= fails:
    code = 1
else:
    with open(path("next")) as f:
        out = f.read()
    sys.stdout.write(out)
    if mode == "garbage":
        sys.stderr.write("printed: " + out + "\\n")
with open(path("ends"), "a") as f:
    f.write(f"{{time.time()}}\\n")
if mine:
    os.remove(path("running"))
sys.exit(code)
"""


def make_script(tmp_path: Path) -> Path:
    script = tmp_path / "refresh-cmd"
    script.write_text(SCRIPT.format(python=sys.executable))
    script.chmod(0o755)
    return script


def times(work: Path, name: str) -> list[float]:
    try:
        lines = (work / name).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [float(line.split()[0]) for line in lines]


@pytest.fixture
def refresh_harness(harness_factory: Any) -> Any:
    """``harness_factory`` with the Refresher's backoff injected (base, cap, rand)."""

    @asynccontextmanager
    async def start(
        credentials: list[dict[str, Any]],
        *,
        base: float = 0.1,
        cap: float = 1.0,
        rand: Any = lambda: 1.0,
    ) -> AsyncIterator[Harness]:
        sinks = [partial(Refresher, base=base, cap=cap, rand=rand)]
        async with harness_factory(credentials, sinks=sinks) as h:
            assert isinstance(h.broker.sinks["refresh"], Refresher)
            assert h.broker.sinks["refresh"].base == base  # ours replaced the default
            yield h

    return start


def credential(
    token: Path, script: Path, work: Path, mode: str, *extra: str, **refresh: Any
) -> dict[str, Any]:
    return {
        "name": "svc",
        "files": {"token": str(token)},
        "expiry": "ttl:6s",
        "expiring_before": "5s",  # expiring 1 s after the file's mtime
        "refresh": {
            "command": [str(script), str(work), mode, str(token), *extra],
            "output": "token",
            "timeout": "10s",
            **refresh,
        },
    }


async def next_types(h: Harness, count: int) -> list[str]:
    return [(await h.next("svc", timeout=TIMEOUT)).type for _ in range(count)]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


# -- against a running broker ---------------------------------------------------------------


@pytest.mark.anyio
async def test_expiring_credential_is_refreshed_with_a_minimal_environment(
    refresh_harness: Any,
    tmp_path: Path,
    work: Path,
    secrets: SecretRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDBROKER_TEST_LEAKY", secrets.token("env"))
    script = make_script(tmp_path)
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    fresh = secrets.token()
    (work / "next").write_text(fresh + "\n")
    async with refresh_harness([credential(token, script, work, "ok")]) as h:
        assert await next_types(h, 3) == [
            "credentials.refreshed",  # first sight
            "credentials.expiring",
            "credentials.refreshed",  # the command's output, reported by the watcher
        ]
        event = h.of("svc")[-1]
        assert event.data.generation == 2
        assert event.data.status is Status.VALID
        assert event.data.reason == "content changed"
        assert token.read_text() == fresh + "\n"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        await h.fence()
    assert "credentials.refresh_failed" not in h.types("svc")
    assert len(times(work, "starts")) == 1
    environ = (work / "environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert {"HOME", "PATH"} <= names <= {"HOME", "PATH", "LANG", "TZ"}


@pytest.mark.anyio
async def test_failures_retry_with_backoff_then_succeed(
    refresh_harness: Any, tmp_path: Path, work: Path, secrets: SecretRegistry
) -> None:
    script = make_script(tmp_path)
    token = tmp_path / "token"
    old = secrets.token()
    write_atomic(token, old)
    fresh = secrets.token()
    (work / "next").write_text(fresh)
    base, cap = 0.3, 1.0
    cred = credential(token, script, work, "flaky", "2")
    async with refresh_harness([cred], base=base, cap=cap) as h:
        assert await next_types(h, 5) == [
            "credentials.refreshed",
            "credentials.expiring",
            "credentials.refresh_failed",
            "credentials.refresh_failed",
            "credentials.refreshed",
        ]
        failed = [e for e in h.of("svc") if e.type == "credentials.refresh_failed"]
        for event in failed:
            assert event.data.status is Status.EXPIRING  # the old token is still in use
            problem = next(p for p in event.data.problems if p.code == "refresh-failed")
            assert problem.message.startswith("exit code 1; stderr: starting refresh | ")
            assert f"error: the token {REDACTED} was refused" in problem.message
            assert problem.remedy == (f"run it by hand to see: {script} {work} flaky {token} 2")
        done = h.of("svc")[-1].data
        assert done.generation == 2
        assert "refresh-failed" not in [p.code for p in done.problems]
        assert token.read_text() == fresh
        await h.fence()
    starts, ends = times(work, "starts"), times(work, "ends")
    assert len(starts) == len(ends) == 3
    assert not (work / "overlap").exists()
    gaps = [starts[i + 1] - ends[i] for i in range(2)]
    # rand() == 1.0: the n-th retry waits exactly min(cap, base * 2**n), plus overhead.
    assert all(gap >= 0 for gap in gaps)
    assert gaps[0] >= base * 0.95
    assert gaps[1] >= 2 * base * 0.95
    assert gaps[1] > gaps[0]
    assert all(gap <= cap + 1.0 for gap in gaps)


@pytest.mark.anyio
async def test_a_hanging_command_is_killed_with_its_process_group(
    refresh_harness: Any, tmp_path: Path, work: Path, secrets: SecretRegistry
) -> None:
    script = make_script(tmp_path)
    token = tmp_path / "token"
    old = secrets.token()
    write_atomic(token, old)
    cred = credential(token, script, work, "hang", timeout="500ms")
    async with refresh_harness([cred], base=5.0, cap=5.0) as h:
        assert await next_types(h, 3) == [
            "credentials.refreshed",
            "credentials.expiring",
            "credentials.refresh_failed",
        ]
        problem = next(p for p in h.of("svc")[-1].data.problems if p.code == "refresh-failed")
        assert problem.message.startswith("timed out after 0.5s; stderr: starting refresh")
        assert REDACTED in problem.message
        assert token.read_text() == old
        children = [int(pid) for pid in (work / "children").read_text().split()]
        pids = [int(line.split()[1]) for line in (work / "starts").read_text().splitlines()]
        await wait_dead([*children, *pids])
        assert not (work / "ends").exists()


async def wait_dead(pids: list[int]) -> None:
    """Processes end (or turn zombie, awaiting a reaper that is not us) soon after SIGKILL."""
    with anyio.fail_after(5):
        while any(alive(pid) for pid in pids):
            await anyio.sleep(0.02)  # no event tells of another process's death


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] not in ("Z", "X")


@pytest.mark.anyio
async def test_output_that_does_not_parse_is_not_written(
    refresh_harness: Any, tmp_path: Path, work: Path, secrets: SecretRegistry
) -> None:
    script = make_script(tmp_path)
    token = tmp_path / "token.jwt"
    now = int(time.time())
    old = secrets.jwt(iat=now, exp=now + 6)
    write_atomic(token, old)
    (work / "next").write_text(secrets.token("garbage"))
    cred = credential(token, script, work, "garbage")
    cred.update(format="jwt", expiry="jwt")
    async with refresh_harness([cred], base=5.0, cap=5.0) as h:
        assert await next_types(h, 3) == [
            "credentials.refreshed",
            "credentials.expiring",
            "credentials.refresh_failed",
        ]
        state = h.of("svc")[-1].data
        assert state.status is Status.EXPIRING
        assert state.generation == 1
        problem = next(p for p in state.problems if p.code == "refresh-failed")
        assert problem.message.startswith("output is not valid jwt (")
        assert "; not written; stderr: " in problem.message
        assert f"printed: {REDACTED}" in problem.message
        assert token.read_text() == old
        await h.fence()
    assert h.types("svc")[-1] == "credentials.refresh_failed"


@pytest.mark.anyio
async def test_already_expiring_at_start_and_command_not_found(
    refresh_harness: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    # Written 55 min ago with a 1 h lifetime: inside the 15 min window before the broker starts.
    then = time.time() - 55 * 60
    os.utime(token, (then, then))
    cred = {
        "name": "svc",
        "files": {"token": str(token)},
        "expiry": "ttl:1h",
        "refresh": {"command": [str(tmp_path / "no-such-command"), "--flag"], "output": "token"},
    }
    async with refresh_harness([cred], base=5.0, cap=5.0) as h:
        # Both published before any sink ran: the refresher finds it from the state.
        assert await next_types(h, 3) == [
            "credentials.refreshed",
            "credentials.expiring",
            "credentials.refresh_failed",
        ]
        problem = next(p for p in h.of("svc")[-1].data.problems if p.code == "refresh-failed")
        assert problem.message == f"command not found: {tmp_path / 'no-such-command'}"
        assert problem.remedy == (f"run it by hand to see: {tmp_path / 'no-such-command'} --flag")
        # New content from elsewhere ends the retries and drops the finding.
        write_atomic(token, secrets.token())
        event = await h.next("svc", timeout=TIMEOUT)
        assert event.type == "credentials.refreshed"
        assert event.data.status is Status.VALID
        assert "refresh-failed" not in [p.code for p in event.data.problems]
        await h.fence()
    # What `credbroker check` shows without the daemon: the last report, for the same content
    # only.
    found = persisted_problems(tmp_path / "state", REFRESH_FAILED_CODE)
    assert "svc" not in found


@pytest.mark.anyio
async def test_on_expired_waits_for_expiry(
    refresh_harness: Any, tmp_path: Path, work: Path, secrets: SecretRegistry
) -> None:
    script = make_script(tmp_path)
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    fresh = secrets.token()
    (work / "next").write_text(fresh)
    cred = credential(token, script, work, "ok", on="expired")
    cred.update(expiry="ttl:2s", expiring_before="1s")
    async with refresh_harness([cred]) as h:
        assert await next_types(h, 4) == [
            "credentials.refreshed",
            "credentials.expiring",
            "credentials.expired",
            "credentials.refreshed",
        ]
        assert token.read_text() == fresh
        await h.fence()
    assert len(times(work, "starts")) == 1


# -- pure helpers -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2000),
    st.floats(0.001, 100),
    st.floats(0.001, 1000),
    st.floats(0, 1, exclude_max=True),
)
def test_backoff_is_full_jitter_capped(attempt: int, base: float, cap: float, r: float) -> None:
    delay = backoff_delay(attempt, base, cap, lambda: r)
    ceiling = min(cap, base * 2.0 ** min(attempt, 1000))
    assert 0 <= delay <= ceiling
    assert delay == pytest.approx(ceiling * r)


def test_backoff_defaults_follow_the_spec() -> None:
    assert backoff_delay(0, 1.0, 300.0, lambda: 1.0) == 1.0
    assert backoff_delay(3, 1.0, 300.0, lambda: 1.0) == 8.0
    assert backoff_delay(40, 1.0, 300.0, lambda: 1.0) == 300.0
    assert backoff_delay(40, 1.0, 300.0, lambda: 0.0) == 0.0


def test_command_env_is_minimal() -> None:
    env = command_env({"HOME": "/h", "PATH": "/bin", "LANG": "C.UTF-8", "AWS_SECRET": "x"})
    assert env == {"HOME": "/h", "PATH": "/bin", "LANG": "C.UTF-8"}
    env = command_env({"TZ": "UTC", "LANG": ""})
    assert set(env) == {"HOME", "PATH", "TZ"}


_text = st.text(st.characters(codec="utf-8"), max_size=80)
_secret = st.text(
    st.characters(codec="ascii", min_codepoint=33, max_codepoint=126), min_size=8, max_size=60
)


@settings(max_examples=300, deadline=None)
@given(_text, _secret, _text, _secret)
def test_redaction_removes_every_secret(before: str, secret: str, after: str, other: str) -> None:
    data = f"{before}{secret}{after}{other}{before}{secret}".encode()
    out = redact(data, secret_needles([secret.encode(), f"x {other} y".encode()]))
    out = out.replace(REDACTED.encode(), b"\0")  # a secret may look like part of the marker
    assert secret.encode() not in out
    assert other.encode() not in out


_noise = st.text(st.characters(min_codepoint=0x100, max_codepoint=0x2000) | st.just(" "))


@settings(max_examples=200, deadline=None)
@given(st.lists(_secret, min_size=1, max_size=5), st.integers(0, 400), _noise)
def test_a_truncated_tail_never_shows_part_of_a_secret(
    words: list[str], cut: int, noise: str
) -> None:
    # A multi-line secret (PEM-like) cut anywhere: no 8+ character end of a line shows.
    value = "\n".join(words).encode()
    # Lines that happen to read as an INI or JSON document are a structured file, whose
    # keys stay readable by design (test_redaction covers those).
    assume(not [v for v in _field_values(value) if v])
    stream = b"noise " + noise.encode() + b"\n" + value + b"\n" + value + b" end\n"
    out = stderr_tail(stream[cut:], secret_needles([value]), truncated=cut > 0).encode()
    out = out.replace(REDACTED.encode(), b"\0")  # a secret may look like part of the marker
    for word in words:
        for i in range(len(word) - 7):
            assert word[i:].encode() not in out


def test_json_and_jwt_pieces_are_redacted() -> None:
    value = b'{"access_token": "abcdefgh12345678", "region": "eu"}'
    out = redact(b"got abcdefgh12345678 back", secret_needles([value]))
    assert out == f"got {REDACTED} back".encode()
    jwt_value = b"aaaaaaaaaa.bbbbbbbbbbbb.cccccccccc"
    assert redact(b"payload bbbbbbbbbbbb!", secret_needles([jwt_value])) == (
        f"payload {REDACTED}!".encode()
    )


def test_stderr_tail_keeps_the_last_lines_on_one_line() -> None:
    data = "".join(f"line {i}\n" for i in range(100)).encode() + b"\x1b[31mred\x1b[0m\n"
    out = stderr_tail(data, secret_needles([]))
    parts = out.split(" | ")
    assert len(parts) == 20
    assert parts[0] == "line 81"
    assert parts[-1] == "?[31mred?[0m"
    long = ("x" * 5000).encode()
    out = stderr_tail(long, secret_needles([]))
    assert len(out) <= 2048
    assert out.startswith("...")


def test_persisted_refresh_problems_reads_without_writing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text("{not json")
    journal = (
        '{"sequence": 3, "states": [{"credential": "svc", "status": "expiring", '
        '"generation": 1, "sequence": 3, "fingerprint": "hmac-sha256:00", "problems": '
        '[{"code": "refresh-failed", "message": "exit code 1", "remedy": "run it"}]}]}\n'
        "torn line"
    )
    (state_dir / "journal.jsonl").write_text(journal)
    before = sorted(p.name for p in state_dir.iterdir())
    found = persisted_problems(state_dir, REFRESH_FAILED_CODE)
    assert found["svc"][0] == "hmac-sha256:00"
    assert found["svc"][1].message == "exit code 1"
    assert sorted(p.name for p in state_dir.iterdir()) == before
    assert persisted_problems(tmp_path / "nowhere", REFRESH_FAILED_CODE) == {}


def test_a_token_that_reads_as_ini_without_values_is_redacted_whole() -> None:
    # Found by the truncated-tail property: every "key" of such a value is the secret itself.
    value = b"[000000]\n0000000:"
    out = stderr_tail(b"noise\n" + value + b" end\n", secret_needles([value]), truncated=False)
    assert "000000" not in out.replace(REDACTED, "")

"""Expiry over real time, restarts, bad input, slow subscribers: the engine end to end."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker import Broker
from broker.core.state import Status
from broker.engine.reader import read_file
from tests.conftest import SecretRegistry, make_config, write_atomic

pytestmark = pytest.mark.anyio


async def test_jwt_refreshed_then_expiring_then_expired(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "jwt"
    exp = int(time.time()) + 5
    write_atomic(path, secrets.jwt(sub="svc", exp=exp))
    cred = {
        "name": "svc",
        "files": {"token": str(path)},
        "format": "jwt",
        "expiry": "jwt",
        "expiring_before": "2s",
    }
    started = time.time()
    async with harness_factory([cred]) as h:
        first = await h.next("svc")
        assert first.type == "credentials.refreshed"
        assert first.data.status is Status.VALID
        assert first.data.expires_at == exp
        assert first.data.expiring_at == exp - 2
        expiring = await h.next("svc", timeout=10)
        assert expiring.type == "credentials.expiring"
        assert time.time() >= exp - 2
        assert time.time() - (exp - 2) < 1.0, "the scheduler woke late"
        assert expiring.data.generation == first.data.generation
        assert expiring.data.sequence > first.data.sequence
        assert [p.code for p in expiring.data.problems][:1] == ["expiring"]
        expired = await h.next("svc", timeout=10)
        assert expired.type == "credentials.expired"
        assert time.time() >= exp
        assert time.time() - exp < 1.0
        assert expired.data.status is Status.EXPIRED
        assert started < exp  # the test really watched the moments pass
        await h.fence()
        assert h.types("svc") == [
            "credentials.refreshed",
            "credentials.expiring",
            "credentials.expired",
        ]


async def test_new_content_already_inside_the_window(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "jwt"
    now = int(time.time())
    write_atomic(path, secrets.jwt(exp=now + 600, iat=now - 6000))  # 80% of lifetime passed
    cred = {"name": "svc", "files": {"token": str(path)}, "format": "jwt", "expiry": "jwt"}
    async with harness_factory([cred]) as h:
        await h.fence()
        assert h.types("svc") == ["credentials.refreshed", "credentials.expiring"]
        seqs = [e.sequence for e in h.of("svc")]
        assert seqs == sorted(seqs) and len(set(seqs)) == 2


async def test_far_past_expiry_is_expired_and_absurd_expiry_is_invalid(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    past, absurd, future = tmp_path / "past", tmp_path / "absurd", tmp_path / "future"
    write_atomic(past, secrets.jwt(exp=1))
    write_atomic(absurd, secrets.jwt(exp=-(10**12)))
    write_atomic(future, secrets.jwt(exp=10**15))
    creds = [
        {"name": n, "files": {"token": str(p)}, "format": "jwt", "expiry": "jwt"}
        for n, p in (("past", past), ("absurd", absurd), ("future", future))
    ]
    async with harness_factory(creds) as h:
        await h.fence()
        assert h.types("past") == ["credentials.refreshed", "credentials.expired"]
        assert h.broker.state("past").status is Status.EXPIRED
        for name in ("absurd", "future"):
            state = h.broker.state(name)
            assert state.status is Status.INVALID
            assert [p.code for p in state.problems] == ["expiry-out-of-range"]
            assert h.types(name) == ["credentials.invalid"]


async def test_restart_reports_changes_made_while_stopped(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_atomic(a, secrets.token())
    write_atomic(b, secrets.token())
    config = make_config(
        tmp_path,
        [
            {"name": "a", "files": {"token": str(a)}},
            {"name": "b", "files": {"token": str(b)}},
        ],
    )

    async def run_once() -> tuple[list[Any], dict[str, Any]]:
        broker = Broker(config)
        async with broker.subscribe("*") as events:
            async with broker:
                states = {s.credential: s for s in broker.states()}
            seen = []
            while (event := events.get_nowait()) is not None:
                secrets.observe("event", event.payload)
                seen.append(event)
        return seen, states

    first, states1 = await run_once()
    assert sorted(e.subject for e in first) == ["a", "b"]
    last_sequence = max(e.sequence for e in first)

    # Unchanged: nothing at all.
    second, states2 = await run_once()
    assert second == []
    assert states2 == states1

    write_atomic(a, secrets.token())
    third, states3 = await run_once()
    assert [(e.subject, e.type) for e in third] == [("a", "credentials.refreshed")]
    assert third[0].data.generation == states1["a"].generation + 1
    assert third[0].data.reason == "content changed while the broker was stopped"
    assert third[0].sequence == last_sequence + 1
    assert states3["b"] == states1["b"]


async def test_corrupt_store_is_reported_and_rebuilt(
    tmp_path: Path, secrets: SecretRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    config = make_config(tmp_path, [{"name": "svc", "files": {"token": str(path)}}])
    async with Broker(config):
        pass
    (tmp_path / "state" / "state.json").write_text("{not json")
    (tmp_path / "state" / "journal.jsonl").write_text('{"sequence": 9, "states": [}\n{"torn')
    async with Broker(config) as broker:
        assert broker.state("svc").status is Status.VALID
    assert any("corrupt" in str(r.__dict__.get("problem", "")) for r in caplog.records)
    assert list((tmp_path / "state").glob("state.json.corrupt-*"))
    # And the rebuilt store is good again.
    doc = json.loads((tmp_path / "state" / "state.json").read_text())
    assert doc["credentials"]["svc"]["status"] == "valid"


async def test_state_dir_and_key_are_private(tmp_path: Path, secrets: SecretRegistry) -> None:
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    async with Broker(make_config(tmp_path, [{"name": "svc", "files": {"token": str(path)}}])):
        pass
    state_dir = tmp_path / "state"
    assert state_dir.stat().st_mode & 0o777 == 0o700
    for name in ("fingerprint.key", "state.json"):
        assert (state_dir / name).stat().st_mode & 0o777 == 0o600


BAD_INPUTS: list[tuple[str, bytes, str, str, str]] = [
    # name, content, format, expected status, expected problem code
    ("garbage", b"\x00\x01\x02garbage", "jwt", "invalid", "binary-content"),
    ("empty", b"", "text", "invalid", "empty"),
    ("blank", b"  \n\t ", "text", "invalid", "empty"),
    ("binary", bytes(range(256)), "text", "invalid", "binary-content"),
    ("latin1", "caf\xe9-t\xf6ken".encode("latin-1"), "text", "invalid", "not-utf8"),
    ("jwtjunk", b"eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln", "jwt", "invalid", "malformed-jwt"),
    ("notjson", b"[1, 2]", "json", "invalid", "not-a-json-object"),
    ("notpem", b"-----BEGIN NOTHING-----\n", "pem", "invalid", "no-certificate"),
]


async def test_bad_inputs_are_reported_never_raised(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    creds = []
    for name, content, fmt, _, _ in BAD_INPUTS:
        path = tmp_path / name
        path.write_bytes(content)
        creds.append({"name": name, "files": {"token": str(path)}, "format": fmt})
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        fh.truncate(10 * 1024 * 1024)
    creds.append({"name": "big", "files": {"token": str(big)}})
    unreadable = tmp_path / "unreadable"
    write_atomic(unreadable, secrets.token(), mode=0o000)
    creds.append({"name": "unreadable", "files": {"token": str(unreadable)}})
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    creds.append({"name": "loop", "files": {"token": str(loop)}})
    directory = tmp_path / "adir"
    directory.mkdir()
    creds.append({"name": "adir", "files": {"token": str(directory)}})
    expected = {name: (status, code) for name, _, _, status, code in BAD_INPUTS}
    expected["big"] = ("invalid", "too-large")
    expected["loop"] = ("missing", "symlink-loop")
    expected["adir"] = ("invalid", "not-a-file")
    # root reads anything; the unreadable case only means something for other users
    expected["unreadable"] = (
        ("valid", "insecure-permissions") if os.geteuid() == 0 else ("missing", "file-unreadable")
    )
    if os.geteuid() == 0:
        os.chmod(unreadable, 0o000)

    async with harness_factory(creds) as h:
        await h.fence()
        for name, (status, code) in expected.items():
            state = h.broker.state(name)
            assert state.status.value == status, (name, state)
            if name != "unreadable" or os.geteuid() != 0:
                assert code in [p.code for p in state.problems], (name, state.problems)
                assert all(p.message for p in state.problems)
            assert len(h.of(name)) == 1, (name, h.types(name))
        # The daemon is still alive and still working.
        write_atomic(tmp_path / "empty", secrets.token())
        assert (await h.next("empty")).type == "credentials.refreshed"


def test_unreadable_file_as_another_user(tmp_path: Path, secrets: SecretRegistry) -> None:
    """chmod 000 means missing (unreadable) for a non-root broker: run one as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    # pytest's tmp_path lives under a 0700 directory; nobody needs a way in.
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    path = base / "secret"
    write_atomic(path, secrets.token(), mode=0o000)
    os.seteuid(65534)  # briefly, in this process: nobody cannot import from root's home
    try:
        read = read_file("token", str(path), 1024)
    finally:
        os.seteuid(0)
    shutil.rmtree(base)
    assert read.problem is not None
    assert read.problem.code == "file-unreadable"
    assert read.content is None


async def test_slow_subscriber_never_blocks_others_and_stays_bounded(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    paths = {n: tmp_path / n for n in ("one", "two")}
    for p in paths.values():
        write_atomic(p, secrets.token())
    creds = [{"name": n, "files": {"token": str(p)}} for n, p in paths.items()]
    async with harness_factory(creds) as h:
        await h.fence()
        stalled = h.broker.subscribe("*", buffer=4)
        fast = h.broker.subscribe("*", credential="two")
        last = {}
        for _ in range(30):
            for name, p in paths.items():
                last[name] = secrets.token()
                write_atomic(p, last[name])
            got = await fast.get()  # the fast reader keeps up, change by change
            assert got.subject == "two"
            assert got.data.files[0].size == len(last["two"])
        assert stalled.pending <= 4
        queued = []
        while (event := stalled.get_nowait()) is not None:
            queued.append(event)
        # The latest event of every credential survived the coalescing.
        latest = {e.subject: e for e in queued}
        for name in paths:
            assert latest[name].data == h.broker.state(name)
        assert stalled.coalesced >= 60 - 4
        stalled.close()
        fast.close()


async def test_reload_adds_removes_and_changes_credentials_keeping_state(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    now = int(time.time())
    write_atomic(a, secrets.jwt(exp=now + 3600))
    write_atomic(b, secrets.token())
    write_atomic(c, secrets.token())
    jwt_a = {"name": "a", "files": {"token": str(a)}, "format": "jwt", "expiry": "jwt"}
    first = make_config(tmp_path, [jwt_a, {"name": "b", "files": {"token": str(b)}}])
    broker = Broker(first)
    async with broker.subscribe("*") as events:
        async with broker:
            before = broker.state("a")
            assert before.status is Status.VALID
            # a: the expiring window widens past now; b: removed; c: added.
            second = make_config(
                tmp_path,
                [{**jwt_a, "expiring_before": "2h"}, {"name": "c", "files": {"token": str(c)}}],
            )
            await broker.reload(second)
            await broker.engine.quiesce()
            assert broker.engine.names == ["a", "c"]
            after = broker.state("a")
            assert after.generation == before.generation
            assert after.status is Status.EXPIRING
            assert broker.state("c").status is Status.VALID
            with pytest.raises(KeyError):
                broker.state("b")
            # The removed credential is no longer watched; the added one is.
            write_atomic(b, secrets.token())
            write_atomic(c, secrets.token())
            with anyio.fail_after(5):
                while (event := await events.get()).subject != "c" or event.data.generation < 2:
                    pass
        seen = [(e.subject, e.type) for e in iter(events.get_nowait, None)]
    assert ("b", "credentials.refreshed") not in seen


def test_sighup_reloads_the_daemon(tmp_path: Path, secrets: SecretRegistry) -> None:
    import signal
    import subprocess

    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = tmp_path / "broker.toml"
    base = f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "hup"\n'
    other = tmp_path / "other"
    write_atomic(other, secrets.token())
    base += f'\n[[credentials]]\nname = "other"\nfiles = {{ token = "{other}" }}\n'
    config.write_text(base)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        cwd=Path(__file__).resolve().parent.parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:

        def wait_for(message: str) -> dict[str, Any]:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                line = proc.stderr.readline()  # type: ignore[union-attr]
                assert line, "daemon exited"
                record: dict[str, Any] = json.loads(line)
                if record["message"] == message:
                    return record
            raise AssertionError(f"no {message!r} in the log")

        wait_for("broker started")
        config.write_text(
            base + f'\n[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
        )
        proc.send_signal(signal.SIGHUP)
        record = wait_for("credentials.refreshed")
        assert record["credential"] == "svc"
        # A broken config on reload is refused; the daemon keeps running the old one.
        config.write_text(base + "\n[[credentials]]\nname = 'BAD NAME'\nfiles = { t = '/x' }\n")
        proc.send_signal(signal.SIGHUP)
        record = wait_for("reload refused; keeping the running config")
        assert "credentials[1].name" in record["error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_external_findings_reject_and_announce(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    from broker.core.state import Problem

    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    async with harness_factory([{"name": "svc", "files": {"token": str(path)}}]) as h:
        await h.fence()
        h.seen.clear()
        engine = h.broker.engine
        fp = h.broker.state("svc").fingerprint
        rejected = Problem("rejected-by-validator", "the API answered 401")
        state = await engine.report_finding("svc", "validate", rejected, fingerprint=fp)
        assert state.status is Status.INVALID
        assert state.generation == 1
        assert state.problems[0].code == "rejected-by-validator"
        # Unreachable is advice, not a verdict: the status stays.
        await engine.report_finding("svc", "validate", None)
        unreachable = Problem("validator-unreachable", "timed out", "retry later")
        state = await engine.report_finding("svc", "validate", unreachable)
        assert state.status is Status.VALID
        assert [p.code for p in state.problems][-1] == "validator-unreachable"
        failed = Problem("refresh-failed", "exit code 1")
        state = await engine.report_finding(
            "svc", "refresh", failed, event_type="credentials.refresh_failed"
        )
        await h.fence()
        assert h.types("svc") == [
            "credentials.invalid",
            "credentials.refreshed",
            "credentials.refresh_failed",
        ]
        assert "refresh-failed" in [p.code for p in h.of("svc")[-1].data.problems]
        # A rejection is about one version of the content: new content drops it.
        await engine.report_finding("svc", "validate", rejected, fingerprint=fp)
        assert h.broker.state("svc").status is Status.INVALID
        assert (await h.next("svc")).type == "credentials.invalid"
        write_atomic(path, secrets.token())
        event = await h.next("svc")
        assert event.type == "credentials.refreshed"
        assert event.data.generation == 2
        assert "rejected-by-validator" not in [p.code for p in event.data.problems]


class SteppedClock:
    """A wall clock the test steps by hand, forward and back."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_wall_clock_jumps_neither_miss_nor_repeat_a_stage(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    clock = SteppedClock()
    path = tmp_path / "jwt"
    write_atomic(path, secrets.jwt(exp=int(clock.now) + 1000))
    cred = {
        "name": "svc",
        "files": {"token": str(path)},
        "format": "jwt",
        "expiry": "jwt",
        "expiring_before": "100s",
    }
    async with harness_factory([cred], clock=clock) as h:
        assert (await h.next("svc")).type == "credentials.refreshed"

        async def step(seconds: float) -> None:
            clock.now += seconds
            h.broker.engine.poke()
            await h.fence()

        await step(950)  # past the expiring moment
        assert h.types("svc") == ["credentials.refreshed", "credentials.expiring"]
        await step(-900)  # stepped back (NTP, a VM restored)
        await step(800)  # crosses the expiring moment a second time
        assert h.types("svc") == ["credentials.refreshed", "credentials.expiring"]
        await step(1000)  # past expiry
        await step(-2000)
        await step(3000)
        assert h.types("svc") == [
            "credentials.refreshed",
            "credentials.expiring",
            "credentials.expired",
        ]
        assert h.broker.state("svc").status is Status.EXPIRED


async def test_strict_permissions_make_loose_files_invalid(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    loose, tight = tmp_path / "loose", tmp_path / "tight"
    write_atomic(loose, secrets.token(), mode=0o640)
    write_atomic(tight, secrets.token(), mode=0o600)
    creds = [
        {"name": "loose", "files": {"token": str(loose)}},
        {"name": "tight", "files": {"token": str(tight)}},
        {"name": "lenient", "files": {"token": str(loose)}, "strict_permissions": False},
    ]
    async with harness_factory(creds, broker={"strict_permissions": True}) as h:
        await h.fence()
        state = h.broker.state("loose")
        assert state.status is Status.INVALID
        assert state.problems[0].code == "insecure-permissions"
        assert state.problems[0].remedy == f"chmod 600 {loose}"
        assert h.broker.state("tight").status is Status.VALID
        lenient = h.broker.state("lenient")
        assert lenient.status is Status.VALID
        assert [p.code for p in lenient.problems] == ["insecure-permissions"]
        # Fixing the mode is an event: the content was there all along, now it may be used.
        os.chmod(loose, 0o600)
        event = await h.next("loose")
        assert event.type == "credentials.refreshed"
        assert event.data.status is Status.VALID

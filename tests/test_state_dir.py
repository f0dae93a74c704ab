"""A hostile or corrupt ``state_dir``: set aside and rebuilt, never a crash or a hang; and
its permissions enforced on every start, not only at creation."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core.events import encode
from broker.engine.store import JOURNAL, KEY_FILE, SNAPSHOT
from tests.conftest import SecretRegistry, write_atomic

pytestmark = pytest.mark.anyio
START_TIMEOUT = 10.0


def _cred(path: Path) -> dict[str, Any]:
    return {"name": "svc", "files": {"token": str(path)}, "expiry": "ttl:1h"}


async def _serving(harness_factory: Any, token: Path, caplog: pytest.LogCaptureFixture) -> Any:
    """Start the broker on the corrupt state_dir; it must run and serve every state."""
    with anyio.fail_after(START_TIMEOUT):
        async with harness_factory([_cred(token)]) as h:
            await h.fence()
            for state in h.broker.states():
                encode(state.to_dict())  # what GET /v1/credentials sends
            return h.broker.state("svc")


def _problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(r, "problem", "")) for r in caplog.records
            if r.getMessage() == "state store problem"]


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("case", [
    "snapshot-1e400", "snapshot-deep", "snapshot-expires-1e300", "snapshot-fifo",
    "snapshot-dev-zero", "journal-1e400", "journal-deep", "journal-dev-zero", "journal-fifo",
    "key-dev-zero", "key-fifo", "snapshot-huge-generation",
])
async def test_a_corrupt_state_dir_is_set_aside_and_rebuilt(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
    caplog: pytest.LogCaptureFixture, case: str,
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    state_dir = tmp_path / "state"
    with anyio.fail_after(START_TIMEOUT):
        async with harness_factory([_cred(token)]) as h:
            await h.fence()
    snapshot, journal, key = state_dir / SNAPSHOT, state_dir / JOURNAL, state_dir / KEY_FILE
    doc = json.loads(snapshot.read_bytes())
    target, kind = case.split("-", 1)
    path = {"snapshot": snapshot, "journal": journal, "key": key}[target]
    if kind in ("fifo", "dev-zero"):
        path.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(path, 0o600)
        else:
            path.symlink_to("/dev/zero")
    elif target == "snapshot":
        if kind == "1e400":
            snapshot.write_text(json.dumps(doc).replace(f'"sequence": {doc["sequence"]}',
                                                        '"sequence": 1e400', 1))
        elif kind == "deep":
            deep = _deep(100_000)
            snapshot.write_text('{"version": 1, "sequence": 1, "credentials": ' + deep + "}")
        elif kind == "expires-1e300":
            doc["credentials"]["svc"]["_expires_at"] = 1e300
            snapshot.write_text(json.dumps(doc))
        else:
            doc["credentials"]["svc"]["generation"] = 10**30
            snapshot.write_text(json.dumps(doc))
    else:
        line = ('{"sequence": 1e400, "states": []}' if kind == "1e400"
                else '{"sequence": 9, "states": ' + _deep(100_000) + "}")
        journal.write_text(line + "\n" + '{"sequence": 10, "states": []}\n')
    state = await _serving(harness_factory, token, caplog)
    assert state.status.value == "valid"
    if target != "key":
        problems = _problems(caplog)
        assert problems, "the corruption was not reported"
        assert any("moved to" in p or "skipped" in p for p in problems), problems
    else:
        assert any(r.getMessage() == "fingerprint key set aside; a new one is generated"
                   for r in caplog.records)
    for entry in state_dir.iterdir():  # rebuilt: the state files are regular files again
        if entry.name in (SNAPSHOT, JOURNAL, KEY_FILE):
            assert stat.S_ISREG(entry.lstat().st_mode), entry.name


async def test_a_kept_state_survives_the_restart_and_generations_do_not_go_back(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Only a corrupt snapshot is set aside: an intact journal still restores the state.
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    async with harness_factory([_cred(token)]) as h:
        await h.fence()
        write_atomic(token, secrets.token())
        await h.next("svc")
    state = await _serving(harness_factory, token, caplog)
    assert state.generation == 2


_mutation = st.tuples(
    st.sampled_from(["flip", "insert", "cut", "number"]),
    st.integers(0, 1000),  # where, as a fraction of the length (which varies run to run)
    st.integers(1, 255),
    st.sampled_from([b"1e400", b"-1e300", b"[[[[[[[[", b"\x00", b"null", b'"', b"NaN",
                     b"99999999999999999999999", b"{}", b"\n"]),
    st.sampled_from([b"1e400", b"-1", b"1.5", b"true"]),
)


def _mutate(raw: bytes, mutations: list[tuple[str, int, int, bytes, bytes]]) -> bytes:
    data = bytearray(raw)
    for op, where, xor, inserted, number in mutations:
        at = len(data) * where // 1000
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= xor
        elif op == "insert":
            data[at:at] = inserted
        elif op == "cut":
            del data[at:]
        elif op == "number":
            data = bytearray(bytes(data).replace(b"1", number, 1))
    return bytes(data)


# Synchronous, with its own event loop per example: hypothesis draws outside any loop.
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(snapshot_ops=st.lists(_mutation, max_size=4), journal_ops=st.lists(_mutation, max_size=4))
def test_any_mutation_of_the_state_files_leaves_a_running_broker(
    tmp_path_factory: pytest.TempPathFactory,
    snapshot_ops: list[tuple[str, int, int, bytes, bytes]],
    journal_ops: list[tuple[str, int, int, bytes, bytes]],
) -> None:
    from broker import Broker
    from tests.conftest import make_config

    tmp = tmp_path_factory.mktemp("mut")
    token = tmp / "token"
    write_atomic(token, "tok-" + os.urandom(16).hex())
    config = make_config(tmp, [_cred(token)])

    async def scenario() -> None:
        async with Broker(config):
            pass
        write_atomic(token, "tok-" + os.urandom(16).hex())
        async with Broker(config):
            pass  # a journal line and a snapshot
        for name, ops in ((SNAPSHOT, snapshot_ops), (JOURNAL, journal_ops)):
            path = tmp / "state" / name
            path.write_bytes(_mutate(path.read_bytes(), ops))
        with anyio.fail_after(START_TIMEOUT):
            async with Broker(config) as broker:
                for state in broker.states():
                    encode(state.to_dict())
                assert broker.state("svc").status.value == "valid"

    anyio.run(scenario)


async def test_permissions_are_enforced_on_every_start(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    async with harness_factory([_cred(token)]) as h:
        await h.fence()
        write_atomic(token, secrets.token())
        await h.next("svc")  # a journal line
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((state_dir / JOURNAL).stat().st_mode) == 0o600
    key = state_dir / KEY_FILE
    key.chmod(0o644)
    (state_dir / SNAPSHOT).chmod(0o644)
    state_dir.chmod(0o755)
    async with harness_factory([_cred(token)]) as h:
        await h.fence()
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE((state_dir / SNAPSHOT).stat().st_mode) == 0o600


async def test_a_fresh_journal_is_created_0600(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry,
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    old = os.umask(0o022)
    try:
        async with harness_factory([_cred(token)]) as h:
            await h.fence()
            journal = tmp_path / "state" / JOURNAL
            journal.unlink(missing_ok=True)
            write_atomic(token, secrets.token())
            await h.next("svc")
            assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    finally:
        os.umask(old)

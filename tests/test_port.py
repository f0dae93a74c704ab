"""The port: what a sink made by the broker is given, and what it shows back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from broker.aio.atomicfile import atomic_write
from broker.app import Broker
from broker.core.state import Problem, Status
from broker.port import BrokerPort, SinkContext, SinkHealth
from tests.conftest import SecretRegistry, make_config, write_atomic


class Probe:
    """A sink of the caller's: keeps its context, shows fixed figures."""

    name = "probe"

    def __init__(self, context: SinkContext) -> None:
        self.port: BrokerPort = context.port
        self.closed = False

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep_forever()

    def health(self) -> SinkHealth:
        return SinkHealth(self.name, delivers=False, delivered=7)

    def close(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_a_sink_sees_the_broker_through_its_port(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    async with harness_factory([{"name": "svc", "files": {"token": str(path)}}],
                               sinks=[Probe]) as h:
        probe = h.broker.sinks["probe"]
        assert isinstance(probe, Probe)
        port = probe.port
        assert port.host_id in port.source and port.state_dir.is_dir()
        assert port.names() == ["svc", "fence"]
        assert port.state("svc") == h.broker.state("svc")
        assert port.settings("svc").files["token"] == path
        assert [r.content for r in port.read_files("svc")] == [path.read_bytes()]
        assert port.sequence == port.engine_health().sequence >= 2
        assert port.engine_health().store_error is None
        assert [s.name for s in port.health()] == ["probe"]
        assert port.health()[0].delivered == 7
        assert port.consumers is None  # neither [mqtt] nor [http]
        assert port.verdict_at("svc") is None  # no validator
        # A finding through the port is the engine's, and clearing it restores the state.
        problem = Problem("refresh-failed", "exit code 1", "run it")
        fingerprint = port.state("svc").fingerprint
        state = await port.report("svc", "refresh", problem, fingerprint=fingerprint)
        assert problem in state.problems and state.status is Status.VALID
        state = await port.report("svc", "refresh", None)
        assert problem not in state.problems
        # A context made by hand (tests, embedders) is the same port.
        by_hand = h.broker.sink_context()
        assert by_hand.port.names() == port.names() and by_hand.config is h.broker.config


@pytest.mark.anyio
async def test_a_callers_sink_replaces_the_built_in_of_its_name(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    made: list[Probe] = []

    def factory(context: SinkContext) -> Probe:
        made.append(Probe(context))
        return made[-1]

    async with harness_factory([], sinks=[factory, factory]) as h:
        assert h.broker.sinks["probe"] is made[1]
        assert made[0].closed and not made[1].closed


@pytest.mark.anyio
async def test_persisted_states_are_there_for_sinks_at_start_and_let_go_of_after(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    path = tmp_path / "token"
    write_atomic(path, secrets.token())
    config = make_config(tmp_path, [{"name": "svc", "files": {"token": str(path)}}])
    async with Broker(config) as first:
        persisted = first.state("svc")
    seen: dict[str, Any] = {}

    class Recovering(Probe):
        async def run(self, *, task_status: TaskStatus[None]) -> None:
            seen.update(self.port.loaded_states)  # what a crash-recovering sink reads
            task_status.started()
            await anyio.sleep_forever()

    async with Broker(config, sinks=[Recovering]) as again:
        assert list(seen) == ["svc"]
        assert (seen["svc"].generation, seen["svc"].sequence, seen["svc"].fingerprint) == (
            persisted.generation, persisted.sequence, persisted.fingerprint
        )
        # Every sink started: a second copy of every state is not kept for good.
        assert dict(again.sinks["probe"].port.loaded_states) == {}  # type: ignore[attr-defined]


def test_atomic_write_replaces_and_follows_a_symlink_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_bytes(b"old")
    link = tmp_path / "link"
    link.symlink_to(target)
    atomic_write(link, b"through", follow_symlink=True)
    assert link.is_symlink() and target.read_bytes() == b"through"
    assert os.stat(target).st_mode & 0o777 == 0o600
    atomic_write(link, b"replaced")
    assert not link.is_symlink() and link.read_bytes() == b"replaced"
    assert target.read_bytes() == b"through"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temp left


def test_atomic_write_takes_chunks_and_a_failure_midway_keeps_the_old_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "doc"
    atomic_write(path, iter([b"one,", b"two,", b"three"]))
    assert path.read_bytes() == b"one,two,three"

    def chunks() -> Iterator[bytes]:
        yield b"half a"
        raise ValueError("cannot encode the rest")

    with pytest.raises(ValueError, match="the rest"):
        atomic_write(path, chunks())
    assert path.read_bytes() == b"one,two,three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc"]  # no temp left


def test_atomic_write_leaves_nothing_behind_when_it_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing-dir" / "file", b"x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "dir", b"x")  # a directory in the way: the rename fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]

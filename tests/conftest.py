"""Shared fixtures: the secret-leak guard, a running broker harness, credential writers."""

from __future__ import annotations

import json
import logging
import os
import secrets as pysecrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest

from broker import Broker, Event
from broker.cli.logs import TextFormatter
from broker.config import Config, parse_config
from broker.engine.bus import Subscription

EVENT_TIMEOUT = 5.0
#: When set, ``record_figures`` appends its figures here (one JSON object a line), for
#: docs/reliability.md: ``CREDBROKER_FIGURES=/tmp/figures.jsonl make soak``.
FIGURES_ENV = "CREDBROKER_FIGURES"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-soak",
        action="store_true",
        default=False,
        help="also run the long fault-injection tests marked soak (make soak)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``soak`` tests run only with ``--run-soak``: ``make test`` skips them, ``make soak``
    (``-m soak --run-soak``) runs only them."""
    if config.getoption("--run-soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --run-soak (make soak)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


def record_figures(test: str, **figures: Any) -> None:
    """Print a test's measured figures, and append them to ``$CREDBROKER_FIGURES`` if set."""
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    target = os.environ.get(FIGURES_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


class SecretRegistry:
    """Every secret a test writes; nothing registered may show up anywhere observable."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.observed: list[tuple[str, str]] = []  # (where, text) seen during the test

    def add(self, value: str) -> str:
        self.values.append(value)
        return value

    def token(self, prefix: str = "tok") -> str:
        return self.add(f"{prefix}-{pysecrets.token_hex(16)}")

    def jwt(self, **claims: Any) -> str:
        claims.setdefault("jti", pysecrets.token_hex(12))
        token = jwt.encode(claims, pysecrets.token_hex(32), algorithm="HS256")
        self.add(token)
        for part in token.split("."):
            self.add(part)
        return token

    def observe(self, where: str, text: str | bytes) -> None:
        self.observed.append(
            (where, text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
        )

    def assert_absent(self, text: str | bytes, where: str = "output") -> None:
        haystack = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        for value in self.values:
            assert value not in haystack, f"a secret written by the test leaked into {where}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def secrets(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> Iterator[SecretRegistry]:
    """Suite-wide leak guard: logs, stdout/stderr and everything a harness observed."""
    registry = SecretRegistry()
    caplog.set_level(logging.DEBUG, logger="broker")
    yield registry
    formatter = TextFormatter()
    for record in caplog.records:
        registry.assert_absent(formatter.format(record), "a log line")
    out, err = capsys.readouterr()
    registry.assert_absent(out, "stdout")
    registry.assert_absent(err, "stderr")
    for where, text in registry.observed:
        registry.assert_absent(text, where)
    # Let a failing test still show what it printed.
    print(out, end="")


def write_atomic(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write a temp file in the same directory and rename it over ``path``."""
    raw = data.encode() if isinstance(data, str) else data
    # A plain string: ``Path.with_name`` interns every part, and a fresh temp name each time
    # grows the interpreter's interned-string table, which the memory tests would count.
    base = os.fspath(path)
    tmp = f"{os.path.dirname(base)}/.{os.path.basename(base)}.tmp-{pysecrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    os.replace(tmp, path)


def make_config(
    tmp_path: Path,
    credentials: list[dict[str, Any]],
    *,
    env: dict[str, str] | None = None,
    **sections: Any,
) -> Config:
    broker = {
        "state_dir": str(tmp_path / "state"),
        "host_id": "test-host",
        "resync_interval": "30s",
    }
    broker.update(sections.pop("broker", {}))
    return parse_config({"broker": broker, "credentials": credentials, **sections}, env=env)


@dataclass
class Harness:
    """A running broker, a subscription to everything, and a fence to wait on."""

    broker: Broker
    events: Subscription
    fence_path: Path
    registry: SecretRegistry
    seen: list[Event] = field(default_factory=list)
    fence_generation: int = 1

    async def next(self, credential: str | None = None, timeout: float = EVENT_TIMEOUT) -> Event:
        """The next event (of ``credential``), recording every event read on the way."""
        with anyio.fail_after(timeout):
            while True:
                event = await self.events.get()
                self._record(event)
                if credential is None or event.subject == credential:
                    return event

    async def fence(self) -> None:
        """Wait until every file change made before this call has been fully processed.

        inotify delivers one instance's events in order, so once a change written after
        them has come through, so have they; then wait out evaluation and grace periods.
        """
        # Each fence write is one new generation of the "fence" credential; wait for exactly
        # that one, not for an earlier fence event still in the queue.
        self.fence_generation += 1
        write_atomic(self.fence_path, pysecrets.token_hex(8))
        while True:
            event = await self.next("fence")
            if event.data.generation >= self.fence_generation:
                break
        with anyio.fail_after(EVENT_TIMEOUT):
            await self.broker.engine.quiesce()
        while (event := self.events.get_nowait()) is not None:
            self._record(event)

    def of(self, credential: str) -> list[Event]:
        return [e for e in self.seen if e.subject == credential]

    def types(self, credential: str) -> list[str]:
        return [e.type for e in self.of(credential)]

    def _record(self, event: Event) -> None:
        self.seen.append(event)
        self.registry.observe(f"event {event.type}", event.payload)


@pytest.fixture
def harness_factory(tmp_path: Path, secrets: SecretRegistry) -> Any:
    """``async with harness_factory(credentials, **sections) as h``: a running broker."""
    from contextlib import asynccontextmanager

    fence_dir = tmp_path / "fence"
    fence_dir.mkdir(exist_ok=True)
    fence_path = fence_dir / "token"
    write_atomic(fence_path, "initial")

    @asynccontextmanager
    async def start(
        credentials: list[dict[str, Any]],
        *,
        clock: Any = None,
        sinks: list[Any] | None = None,
        env: dict[str, str] | None = None,
        **sections: Any,
    ) -> AsyncIterator[Harness]:
        creds = [*credentials, {"name": "fence", "files": {"token": str(fence_path)}}]
        config = make_config(tmp_path, creds, env=env, **sections)
        broker = Broker(config, clock=clock, sinks=sinks)
        # Subscribing before start sees the first-sight events too.
        async with broker.subscribe("*") as events:
            async with broker:
                h = Harness(broker, events, fence_path, secrets)
                h.fence_generation = broker.state("fence").generation
                yield h
            while (event := events.get_nowait()) is not None:
                h._record(event)
            for state in broker.states():
                secrets.observe("state", repr(state.to_dict()))

    return start

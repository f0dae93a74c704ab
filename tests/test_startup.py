"""Start-up's first pass: the next pass's files are read while one pass is committed, and no
more than two passes' reads are held; the CLI's heap policy around building the heap."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise
from typing import Any

import anyio
import pytest

import broker.engine.engine as engine_module
import broker.engine.holdback as holdback_module
import broker.engine.readahead as readahead_module
from broker.cli import heap
from broker.config import Config, CredentialSettings
from broker.core.fingerprint import Fingerprinter
from broker.core.state import State, Status
from broker.engine.bus import Bus
from broker.engine.engine import Engine
from broker.engine.reader import CredentialRead
from broker.engine.store import Store
from broker.engine.tuning import EngineTuning
from tests.conftest import make_config, write_atomic

FP = Fingerprinter(b"k" * 32)


def _tokens(tmp_path: Any, count: int) -> tuple[Config, Store]:
    """Credentials c0..c{count-1}, a token file each, and a prepared store."""
    config = make_config(tmp_path, [
        {"name": f"c{i}", "files": {"token": str(tmp_path / f"t{i}")}} for i in range(count)
    ])
    for i in range(count):
        write_atomic(tmp_path / f"t{i}", f"secret-value-{i}")
    store = Store(config.broker.state_dir)
    store.prepare()
    return config, store


@pytest.mark.anyio
async def test_start_up_in_threads_reads_up_to_two_passes_ahead_while_committing_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Passes of one credential. While a pass commits, the worker thread reads the next two
    # (one waits in the stream's slack), and not a third: what is held stays bounded by
    # three passes, however many credentials there are.
    count = 7
    config, store = _tokens(tmp_path, count)
    reads: list[list[str]] = []
    read_started = [threading.Event() for _ in range(count)]
    real_read_all = engine_module.read_all

    def counted_read_all(specs: Mapping[str, CredentialSettings]) -> dict[str, CredentialRead]:
        reads.append(list(specs))
        read_started[len(reads) - 1].set()
        return real_read_all(specs)

    monkeypatch.setattr(engine_module, "read_all", counted_read_all)
    passes: list[list[str]] = []
    ahead: list[bool] = []
    beyond: list[bool] = []
    held: list[int] = []
    record = store.record

    def recorded(changed: Iterable[State], sequence: int,
                 everything: Callable[[], Mapping[str, State]], *rest: Any) -> None:
        changed = list(changed)
        index = len(passes)
        passes.append([s.credential for s in changed])
        # Committing pass `index` waits here: only reads made ahead get past it.
        for later in (index + 1, index + 2):
            if later < count:
                ahead.append(read_started[later].wait(10))
        if index + 3 < count:
            # Not a third: bounded, so the wait for it runs out (briefly).
            beyond.append(read_started[index + 3].wait(0.2))
        held.append(len(reads) - index)
        record(changed, sequence, everything, *rest)

    store.record = recorded  # type: ignore[method-assign]
    bus = Bus()
    engine = Engine(
        config.credentials, bus=bus, store=store, fingerprinter=FP, source="urn:credbroker:t",
        resync_interval=30.0, tuning=EngineTuning(max_batch=1, read_worker=False),
    )
    async with bus.subscribe("*") as events, anyio.create_task_group() as tg:
        await tg.start(engine.run)
        assert reads == [[f"c{i}"] for i in range(count)]
        assert passes == reads
        assert ahead == [True] * (2 * count - 3)
        assert beyond == [False] * (count - 3)
        # Read but not yet committed, while a pass commits: that pass and two more at most.
        assert held == [3, 3, 3, 3, 3, 2, 1]
        seen = []
        while (event := events.get_nowait()) is not None:
            seen.append((event.subject, event.sequence))
        assert seen == [(f"c{i}", i + 1) for i in range(count)]
        assert all(engine.state(f"c{i}").status is Status.VALID for i in range(count))
        tg.cancel_scope.cancel()
    engine.flush()


def test_building_the_heap_collects_nothing_and_freezes_it() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    collections: list[str] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append(phase)

    gc.callbacks.append(callback)
    try:
        frozen = gc.get_freeze_count()
        with heap.building():
            assert not gc.isenabled()
            for _ in range(50_000):  # far past the threshold of an automatic collection
                Cycle()
        assert gc.isenabled()
        assert collections == []
        assert gc.get_freeze_count() >= frozen + 50_000  # the heap built, garbage and all
        heap.settle()  # the next settle (a reload) collects what garbage was frozen
        assert collections
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()


#: Run in a fresh interpreter: what glibc does with a freed block depends on the heap's
#: layout, and in a test worker that layout is whatever the tests before it left (there,
#: freeing gave back 34 MB by itself in one run, and the heap grew by 30 of 64 MB in another).
_TRIM_PROBE = """
import sys
from pathlib import Path
from broker.cli import heap

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

heap.release_free_memory()
start = rss()
kept, freed = [], []
for i in range(2_000):
    kept.append(bytes(600) + i.to_bytes(4, "little"))
    freed.append(bytes(32_768) + i.to_bytes(4, "little"))
allocated = rss()
del freed
before = rss()
trimmed = heap.release_free_memory()
after = rss()
print(start, allocated, before, after, trimmed, len(kept))
"""


def test_free_memory_between_long_lived_blocks_goes_back_to_the_system() -> None:
    # As at start-up: blocks that stay (a state's documents) between blocks freed soon after
    # (the first-sight events' payloads), all past pymalloc's 512 bytes, so from glibc.
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    start, allocated, before, after = (int(x) for x in out[:4])
    assert out[4:] == ["True", "2000"]
    assert allocated - start > 50_000, out  # the 64 MB of blocks to be freed
    # Freed, but held: each hole lies between blocks still in use, so glibc keeps it mapped.
    assert allocated - before < 10_000, out
    assert before - after > 40_000, out  # handed back


@pytest.mark.anyio
@pytest.mark.parametrize("worker", [True, False], ids=["read-worker", "threads"])
async def test_start_up_screens_for_writers_what_it_publishes_and_asks_nothing_of_the_rest(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, worker: bool
) -> None:
    # Passes of one credential, so that every pass is read ahead. A first run, then a
    # restart with: "new" seen for the first time and "changed" changed while stopped, both
    # held open by a writer (this process); "fresh" new and whole; "same" unchanged.
    def configured(names: list[str]) -> list[CredentialSettings]:
        return make_config(tmp_path, [
            {"name": n, "files": {"token": str(tmp_path / n)}} for n in names
        ]).credentials

    for n in ("same", "changed"):
        write_atomic(tmp_path / n, f"secret-value-{n}")
    store = Store(tmp_path / "state")
    store.prepare()

    def engine(names: list[str], states: Mapping[str, State], bus: Bus) -> Engine:
        return Engine(
            configured(names), bus=bus, store=store, fingerprinter=FP,
            source="urn:credbroker:t", resync_interval=30.0,
            tuning=EngineTuning(max_batch=1, read_worker=worker),
            states=states, sequence=max((s.sequence for s in states.values()), default=0),
        )

    async with anyio.create_task_group() as tg:
        first = engine(["same", "changed"], {}, Bus())
        await tg.start(first.run)
        before = {n: first.state(n) for n in ("same", "changed")}
        tg.cancel_scope.cancel()

    asked: list[str] = []
    real = holdback_module.writers_and_moves

    def counted(paths: list[str], signatures: Any) -> tuple[set[str], set[str]]:
        asked.extend(paths)
        return real(paths, signatures)

    monkeypatch.setattr(holdback_module, "writers_and_moves", counted)
    real_plan = readahead_module.plan_pass

    def planned(specs: Any, new: set[str]) -> readahead_module.PassPlan:
        plan = real_plan(specs, new)
        asked.extend(plan.request[1])  # asked of the read worker, right after its reads
        return plan

    monkeypatch.setattr(engine_module, "plan_pass", planned)
    write_atomic(tmp_path / "fresh", "secret-value-fresh")
    held = []
    for n in ("changed", "new"):
        fd = os.open(tmp_path / n, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, f"secret-value-{n}-half".encode())
        held.append(fd)
    try:
        bus = Bus()
        second = engine(["same", "changed", "new", "fresh"], before, bus)
        async with bus.subscribe("*") as events, anyio.create_task_group() as tg:
            await tg.start(second.run)
            seen = []
            while (event := events.get_nowait()) is not None:
                seen.append(event.subject)
            tg.cancel_scope.cancel()
    finally:
        for fd in held:
            os.close(fd)
    # What a writer holds is not published: neither the new credential nor the change.
    assert seen == ["fresh"]
    assert second.state("changed") == before["changed"]
    assert "new" not in {s.credential for s in second.read_states()}
    assert second.state("same") == before["same"]
    # Asked of what was to be published, never of the unchanged credential.
    assert str(tmp_path / "same") not in asked
    assert {str(tmp_path / n) for n in ("changed", "new", "fresh")} <= set(asked)


@pytest.mark.anyio
async def test_a_pass_gives_the_event_loop_back_while_it_evaluates_and_publishes(
    tmp_path: Any,
) -> None:
    # One pass of 120 credentials. Another task, ready to run all along, must get a turn at
    # least every `yield_every` evaluations and every `yield_every` events: the sinks send
    # while a pass runs instead of after it.
    count, every = 120, 10
    config, store = _tokens(tmp_path, count)

    class Counted(Fingerprinter):
        calls = 0

        def fingerprint(self, parts: Iterable[tuple[str, bytes | None]]) -> str:
            Counted.calls += 1
            return super().fingerprint(parts)

    class CountedBus(Bus):
        published = 0

        def publish(self, event: Any) -> None:
            CountedBus.published += 1
            super().publish(event)

    bus = CountedBus()
    engine = Engine(
        config.credentials, bus=bus, store=store, fingerprinter=Counted(b"k" * 32),
        source="urn:credbroker:t", resync_interval=30.0,
        tuning=EngineTuning(max_batch=1000, yield_every=every),
    )
    turns: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        async def other_task() -> None:
            while True:
                turns.append((Counted.calls, CountedBus.published))
                await anyio.lowlevel.checkpoint()

        tg.start_soon(other_task)
        await tg.start(engine.run)
        tg.cancel_scope.cancel()
    assert Counted.calls == count and turns[-1] == (count, count)
    evaluated = [b[0] - a[0] for a, b in pairwise(turns)]
    published = [b[1] - a[1] for a, b in pairwise(turns)]
    assert max(evaluated) <= every and max(published) <= every
    # And it did give way mid-pass, not only at the thread hand-offs around the pass.
    assert sum(1 for d in evaluated if d) >= count // every
    assert sum(1 for d in published if d) >= count // every

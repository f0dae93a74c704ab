"""The engine's parts on their own: the pure machine fed plain rules, deadlines, the settle
window, writer hold-back, and an engine run on injected clocks and event ids."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import anyio
import pytest

from broker.core.events import REFRESHED, encode
from broker.core.expiry import ExpirySource, Lifetime
from broker.core.fingerprint import Fingerprinter
from broker.core.formats import Selector
from broker.core.machine import Observation, observe, transition
from broker.core.problems import ProblemCode
from broker.core.reads import FileRead
from broker.core.state import Consumer, FileInfo, Problem, Stage, State, Status
from broker.engine.bus import Bus
from broker.engine.consumers_file import Tracked, _tracked, encode_consumers, load_consumers
from broker.engine.engine import Engine
from broker.engine.holdback import WriterHoldBack
from broker.engine.schedule import Deadlines, Kind
from broker.engine.settle import SettleWindow
from broker.engine.store import Store
from broker.engine.tracking import WorkQueue
from broker.engine.tuning import EngineTuning
from tests.conftest import make_config, write_atomic

pytestmark = pytest.mark.anyio

FP = Fingerprinter(b"k" * 32)


@dataclass(frozen=True)
class PlainRules:
    """Rules that are no pydantic model: all the machine needs of a credential's settings."""

    name: str = "svc"
    files: Mapping[str, PurePath] = field(default_factory=lambda: {"token": PurePath("/t")})
    format: str = "text"
    expiry_sources: Sequence[ExpirySource] = (ExpirySource("none"),)
    expiry_file: str = "token"
    select: Selector | None = None
    key_file: str | None = None
    private_roles: Collection[str] | None = None
    strict_permissions: bool | None = None
    expiring_before: float = 10.0
    expiring_fraction: float = 0.8

    def remedy(self, code: str, role: str) -> str | None:
        return f"fix {code} on {role}"


def read(content: bytes | None, mode: int = 0o600) -> FileRead:
    info = FileInfo("token", "/t", content is not None, len(content or b""), 0.0, mode)
    if content is None:
        return FileRead(info, problem=Problem(ProblemCode.FILE_MISSING, "gone"))
    return FileRead(info, content=content)


def test_the_machine_judges_plain_rules_without_the_config() -> None:
    rules = PlainRules()
    obs = observe(rules, [read(b"secret-token")], FP)
    assert obs.outcome is Status.VALID
    tr = transition(rules, None, obs, now=5.0)
    assert tr.state.status is Status.VALID and [t for t, _ in tr.events] == [REFRESHED]
    loose = observe(rules, [read(b"secret-token", mode=0o644)], FP)
    assert [p.code for p in loose.problems] == [ProblemCode.INSECURE_PERMISSIONS]
    assert loose.problems[0].remedy == "fix insecure-permissions on token"
    gone = observe(rules, [read(None)], FP)
    assert gone.outcome is Status.MISSING and gone.problems[0].code == "file-missing"


def test_problem_codes_are_their_text() -> None:
    assert ProblemCode.WRITER_ACTIVE == "writer-active"
    assert Problem(ProblemCode.SETTLING, "m") == Problem("settling", "m")
    assert State("x", Status.VALID, problems=(Problem(ProblemCode.EXPIRED, "m"),)).to_dict()[
        "problems"
    ][0]["code"] == "expired"


def lived(expires: float, expiring: float) -> State:
    return State(
        "svc", Status.VALID, generation=1, fingerprint="f", expires_at=expires,
        expiring_at=expiring, stage=Stage.VALID,
    )


def test_deadlines_keep_only_the_live_lifetime_and_every_reread() -> None:
    deadlines = Deadlines()
    assert deadlines.follow("svc", lived(100.0, 80.0))
    assert not deadlines.follow("svc", lived(100.0, 80.0))  # unchanged
    assert deadlines.follow("svc", lived(200.0, 160.0))  # superseded: 80 no longer counts
    deadlines.at(90.0, "svc", Kind.SETTLE)
    deadlines.at(95.0, "other", Kind.RETRY)
    assert deadlines.delay(0.0, cap=30.0) == 30.0
    # The superseded entry still wakes the scheduler (lazy deletion), and then counts for nothing.
    assert deadlines.delay(70.0, cap=30.0) == 10.0
    assert deadlines.take_due(85.0).tick == set()
    due = deadlines.take_due(100.0)
    assert due.tick == set() and due.reread == {"svc", "other"}
    assert deadlines.take_due(160.0).tick == {"svc"}
    for i in range(500):  # many rotations: the heap stays bounded
        deadlines.follow("svc", lived(1000.0 + i, 900.0 + i))
    assert len(deadlines) <= 2 * deadlines.followed + 64 + 1
    assert (deadlines.life("svc"), "svc", "life") in deadlines


def observed(status: Status, fp: str | None) -> Observation:
    problems = () if status is Status.VALID else (Problem(ProblemCode.EMPTY, "empty"),)
    return Observation((read(b"x"),), status, fp, problems, Lifetime(None, None))


def test_the_settle_window_withholds_a_bad_change_then_dates_it_when_first_seen() -> None:
    window = SettleWindow(1.0)
    prev = transition(PlainRules(), None, observed(Status.VALID, "a"), 0.0).state
    bad = observed(Status.INVALID, "b")
    tr = transition(PlainRules(), prev, bad, 10.0)
    assert window.consider("svc", bad, tr, 10.0, exempt=False) is None
    assert window.open and window.due("svc") == 11.0
    answer = window.answer("svc")
    assert answer is not None and answer.problems[-1].code == ProblemCode.SETTLING
    # Still bad after the window: published as of the first bad read.
    assert window.consider("svc", bad, tr, 11.5, exempt=False) == 10.0
    assert not window.open
    # Start-up, or nothing bad: at once.
    assert window.consider("svc", bad, tr, 12.0, exempt=True) == 12.0
    good = transition(PlainRules(), prev, observed(Status.VALID, "c"), 13.0)
    assert window.consider("svc", observed(Status.VALID, "c"), good, 13.0, exempt=False) == 13.0


def test_writer_hold_back_publishes_content_that_held_still_on_its_clock() -> None:
    now = [100.0]
    holdback = WriterHoldBack(quiet=lambda: (0.25, 5.0), monotonic=lambda: now[0])
    state = State("svc", Status.VALID, fingerprint="a")
    assert not holdback.held_still("svc", state)
    holdback.hold("svc", state)
    assert holdback.unpublished("svc") == state
    now[0] += 0.2
    assert not holdback.held_still("svc", state)
    now[0] += 0.1
    assert holdback.held_still("svc", state)
    holdback.hold("svc", State("svc", Status.VALID, fingerprint="b"))  # new content: clock restarts
    assert not holdback.held_still("svc", State("svc", Status.VALID, fingerprint="b"))
    unusable = State("svc", Status.INVALID, fingerprint="c")
    holdback.hold("svc", unusable)
    now[0] += 1.0
    assert not holdback.held_still("svc", unusable)  # unparsable content waits longer
    now[0] += 4.0
    assert holdback.held_still("svc", unusable)
    holdback.release("svc")
    assert holdback.unpublished("svc") is None


async def test_an_engine_takes_its_clock_and_event_ids_from_its_caller(tmp_path: Path) -> None:
    token = tmp_path / "token"
    write_atomic(token, "first-secret-value")
    config = make_config(tmp_path, [{"name": "svc", "files": {"token": str(token)}}])
    store = Store(config.broker.state_dir)
    store.prepare()
    bus = Bus()
    ids = (f"id-{i}" for i in itertools.count(1))
    engine = Engine(
        config.credentials, bus=bus, store=store, fingerprinter=FP, source="urn:credbroker:t",
        resync_interval=30.0, clock=lambda: 1_700_000_000.0, new_id=lambda: next(ids),
    )
    async with bus.subscribe("*") as events, anyio.create_task_group() as tg:
        await tg.start(engine.run)
        first = events.get_nowait()
        assert first is not None and first.id == "id-1"
        assert first.time == "2023-11-14T22:13:20.000Z"
        assert engine.state("svc").changed_at == 1_700_000_000.0
        write_atomic(token, "second-secret-value")
        with anyio.fail_after(10):
            second = await events.get()
        assert second.id == "id-2" and second.data.generation == 2
        tg.cancel_scope.cancel()
    engine.flush()


async def test_the_work_queue_hands_out_at_most_limit_longest_queued_first() -> None:
    queue = WorkQueue()
    queue.mark(["a", "b", "c", "d", "e"], scan=False)
    queue.mark(["b"], scan=True)
    with anyio.fail_after(5):  # the rest is taken at once, with no new mark
        first = await queue.take(2)
        second = await queue.take(2)
        third = await queue.take(2)
    assert list(first) == ["a", "b"] and first["b"].scan and not first["a"].scan
    assert list(second) == ["c", "d"] and list(third) == ["e"]
    assert not queue
    queue.mark(["f", "g"], scan=False)
    with anyio.fail_after(5):
        assert list(await queue.take()) == ["f", "g"]  # no limit: everything


async def test_start_up_reads_and_commits_in_passes_of_max_batch(tmp_path: Path) -> None:
    # What one pass holds (every file's bytes, the evaluations, the journal line, the events)
    # is bounded by max_batch, however many credentials there are: 7 go 3 + 3 + 1.
    config = make_config(tmp_path, [
        {"name": f"c{i}", "files": {"token": str(tmp_path / f"t{i}")}} for i in range(7)
    ])
    for i in range(7):
        write_atomic(tmp_path / f"t{i}", f"secret-value-{i}")
    store = Store(config.broker.state_dir)
    store.prepare()
    passes: list[list[str]] = []
    record = store.record

    def recorded(changed: Iterable[State], sequence: int,
                 everything: Callable[[], Mapping[str, State]], *rest: Any) -> None:
        changed = list(changed)
        passes.append([s.credential for s in changed])
        record(changed, sequence, everything, *rest)

    store.record = recorded  # type: ignore[method-assign]
    bus = Bus()
    engine = Engine(
        config.credentials, bus=bus, store=store, fingerprinter=FP, source="urn:credbroker:t",
        resync_interval=30.0, tuning=EngineTuning(max_batch=3),
    )
    async with bus.subscribe("*") as events, anyio.create_task_group() as tg:
        await tg.start(engine.run)
        assert passes == [["c0", "c1", "c2"], ["c3", "c4", "c5"], ["c6"]]
        seen = []
        while (event := events.get_nowait()) is not None:
            seen.append((event.subject, event.sequence))
        assert seen == [(f"c{i}", i + 1) for i in range(7)]
        assert all(engine.state(f"c{i}").status is Status.VALID for i in range(7))
        tg.cancel_scope.cancel()
    engine.flush()
    assert Store(config.broker.state_dir).load().sequence == 7


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        EngineTuning(max_batch=0)


def test_the_consumer_table_is_encoded_a_credential_at_a_time_and_reads_back(
    tmp_path: Path,
) -> None:
    creds = {
        "svc": Tracked({"web-1": Consumer("web-1", 2, "fp-2", 1.5, "mqtt", seen=2.5, lagged=True)},
                       converged=1, refreshed=(2, 1.25), known={1: "fp-1", 2: "fp-2"}),
        "d\u00e9j\u00e0": Tracked({}),
    }
    data = encode_consumers(creds)
    assert json.loads(data) == {"version": 1, "credentials": {
        "svc": {"converged": 1, "refreshed": [2, 1.25], "known": {"1": "fp-1", "2": "fp-2"},
                "consumers": [{"id": "web-1", "generation": 2, "fingerprint": "fp-2",
                               "since": "1970-01-01T00:00:01.500Z", "via": "mqtt",
                               "seen": 2.5, "lagged": True}]},
        "d\u00e9j\u00e0": {"converged": 0, "refreshed": None, "known": {}, "consumers": []},
    }}
    assert data == encode(json.loads(data))  # the one compact encoding, to the byte
    assert encode_consumers({}) == encode({"version": 1, "credentials": {}})
    (tmp_path / "consumers.json").write_bytes(data)
    loaded = load_consumers(tmp_path / "consumers.json")
    assert loaded == {"svc": creds["svc"], "d\u00e9j\u00e0": Tracked({}, known={})}
    assert loaded["svc"].consumers["web-1"].lagged and loaded["svc"].consumers["web-1"].seen == 2.5


@pytest.mark.parametrize("gap", [0.0, 0.1])
async def test_a_burst_is_taken_in_passes_at_most_burst_gap_apart(
    tmp_path: Path, gap: float
) -> None:
    # A writer rotating files one by one, each while the previous pass is still running:
    # with a burst gap the engine takes what arrived in few passes instead of one or two
    # files per pass; without one it chases the writer (the contrast shows the test can
    # fail). A change that finds the engine idle never waits for the gap.
    names = [f"c{i}" for i in range(200)]
    config = make_config(tmp_path, [
        {"name": n, "files": {"token": str(tmp_path / f"{n}.tok")}} for n in names
    ])
    for n in names:
        write_atomic(tmp_path / f"{n}.tok", f"secret-value-{n}-0")
    store = Store(config.broker.state_dir)
    store.prepare()
    bus = Bus()
    engine = Engine(
        config.credentials, bus=bus, store=store, fingerprinter=FP, source="urn:credbroker:t",
        resync_interval=3600.0, tuning=EngineTuning(burst_gap=gap),
    )
    passes: list[int] = []
    record = store.record

    def recorded(changed: Iterable[State], *rest: Any) -> None:
        changed = list(changed)
        passes.append(len(changed))
        record(changed, *rest)

    store.record = recorded  # type: ignore[method-assign]
    async with bus.subscribe("*") as events, anyio.create_task_group() as tg:
        await tg.start(engine.run)
        while events.get_nowait() is not None:
            pass
        # Lone changes: each waits for the previous one's event, so none finds work queued.
        for round_ in range(1, 4):
            began = anyio.current_time()
            write_atomic(tmp_path / "c0.tok", f"secret-value-c0-{round_}")
            with anyio.fail_after(10):
                while (await events.get()).subject != "c0":
                    pass
            if gap:
                assert anyio.current_time() - began < gap, "a lone change waited"
        passes.clear()

        def rotate() -> float:
            # Another thread, as a writer process would be: its files land while a pass runs.
            began = time.monotonic()
            for n in names:
                write_atomic(tmp_path / f"{n}.tok", f"secret-value-{n}-burst")
                time.sleep(0.001)
            return time.monotonic() - began

        reads = 0
        inotify = engine.watcher._inotify
        assert inotify is not None
        read = inotify.read

        async def counted() -> bytes:
            nonlocal reads
            reads += 1
            return await read()

        inotify.read = counted  # type: ignore[method-assign]
        written = await anyio.to_thread.run_sync(rotate)
        want = set(names)
        with anyio.fail_after(20):
            while want:
                want.discard((await events.get()).subject)
        tg.cancel_scope.cancel()
    assert sum(passes) == len(names)
    if gap:
        # While each pass finds the queue empty the engine keeps up file by file; once
        # changes arrive during a pass, one pass per gap while the writer works, and one
        # for the tail.
        first_burst = next(i for i, n in enumerate(passes) if n > 1)
        assert len(passes[first_burst:]) <= written / gap + 2, passes
        # Meanwhile the watcher reads a few times per pass, not once per few events.
        assert reads <= first_burst * 3 + written / (gap / 5) + 5, (reads, passes)
    else:
        assert len(passes) > written / 0.1 + 2, passes
        assert reads > written / 0.02 + 5, reads  # the contrast: unpaced, it reads more


def _consumers_as_json_loads_read_them(path: Path) -> dict[str, Tracked]:
    """The oracle: consumers.json read as it was before entries were read one at a time."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    creds = doc.get("credentials") if isinstance(doc, dict) else None
    if not isinstance(creds, dict) or doc.get("version") != 1:
        return {}
    out = {}
    for name, entry in creds.items():
        tracked = _tracked(entry)
        if tracked is not None:
            out[name] = tracked
    return out


_GOOD = '{"converged": 1, "refreshed": [2, 1.5], "known": {"2": "f"}, "consumers": []}'
_CONSUMER_DOCUMENTS = [d.replace("@", _GOOD) for d in [  # @: a good entry
    '{"version": 1, "credentials": {"a": @, "b": @}}',
    '{"credentials": {"a": @}, "version": 1}',  # the version after
    '{"version": 1, "credentials": {"a": @, "a": {"consumers": 3}}}',
    '{"version": 1, "credentials": {"a": {"x": 1}, "a": @}}',
    '{"version": 1, "credentials": {"a": @}, "credentials": []}',
    '{"version": 1, "credentials": [], "credentials": {"b": @}}',
    '{"version": 2, "credentials": {"a": @}}',
    '{"version": 1, "version": 2, "credentials": {}}',
    '{"version": 1}', "[1, 2]", '"text"', "", "{", '{"version": 1, "credentials": {}} x',
    ' \n {"version" : 1 , "credentials" : { "c" : @ } } \n',
    '\ufeff{"version": 1, "credentials": {"a": @}}',
    '{"version": 1, "credentials": {"a": [1], "b": null, "c": @}}',
]]


@pytest.mark.parametrize("document", _CONSUMER_DOCUMENTS)
def test_consumers_read_an_entry_at_a_time_are_what_json_loads_gave(
    tmp_path: Path, document: str
) -> None:
    # Duplicate keys, the version after the credentials, bad entries, not JSON, not ours.
    path = tmp_path / "consumers.json"
    path.write_bytes(document.encode())
    assert load_consumers(path) == _consumers_as_json_loads_read_them(path)


def test_some_of_those_consumer_documents_do_load(tmp_path: Path) -> None:
    path = tmp_path / "consumers.json"
    loaded = []
    for document in _CONSUMER_DOCUMENTS:
        path.write_bytes(document.encode())
        loaded.append(sorted(load_consumers(path)))
    assert loaded[:6] == [["a", "b"], ["a"], [], ["a"], [], ["b"]]
    assert loaded[-3:] == [["c"], ["a"], ["c"]]

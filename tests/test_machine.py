"""The pure state machine: unit tests and hypothesis properties over random histories."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import CredentialSettings, parse_config
from broker.expiry import Lifetime
from broker.machine import (
    EXPIRED,
    EXPIRING,
    INVALID,
    MISSING,
    REFRESHED,
    Observation,
    next_deadline,
    tick,
    transition,
)
from broker.reader import FileRead
from broker.state import FileInfo, Problem, Stage, State, Status

SPEC: CredentialSettings = parse_config(
    {
        "broker": {"state_dir": "/tmp/unused", "host_id": "t"},
        "credentials": [
            {
                "name": "svc",
                "files": {"token": "/tmp/unused/token"},
                "expiring_before": "10s",
                "expiring_fraction": 0.8,
            }
        ],
    }
).credentials[0]
FILES = (FileRead(FileInfo("token", "/tmp/unused/token", True, 10, 0.0, 0o600)),)


def valid(fp: str, expires: float | None = None, issued: float | None = None) -> Observation:
    return Observation(FILES, Status.VALID, fp, (), Lifetime(issued, expires))


def invalid(fp: str) -> Observation:
    return Observation(FILES, Status.INVALID, fp, (Problem("empty", "token file: file is empty"),))


MISSING_OBS = Observation(FILES, Status.MISSING, None, (Problem("file-missing", "gone"),))


def types(tr: object) -> list[str]:
    return [t for t, _ in tr.events]  # type: ignore[attr-defined]


def test_first_sight_valid_is_refreshed_generation_1() -> None:
    tr = transition(SPEC, None, valid("a", expires=1000), now=0)
    assert types(tr) == [REFRESHED]
    assert tr.state.generation == 1
    assert tr.state.status is Status.VALID
    assert tr.state.expiring_at == 990
    assert next_deadline(tr.state) == 990


def test_fraction_of_lifetime_wins_when_earlier() -> None:
    tr = transition(SPEC, None, valid("a", expires=1000, issued=0), now=0)
    assert tr.state.expiring_at == 800  # min(1000 - 10, 0 + 0.8 * 1000)


def test_same_content_is_silent_and_keeps_its_lifetime() -> None:
    first = transition(SPEC, None, valid("a", expires=1000), now=0).state
    again = transition(SPEC, first, valid("a", expires=5000), now=1)
    assert types(again) == []
    assert again.state.expires_at == 1000  # a touch on a ttl: file renews nothing


def test_change_is_refreshed_with_next_generation() -> None:
    first = transition(SPEC, None, valid("a", expires=1000), now=0).state
    tr = transition(SPEC, first, valid("b", expires=2000), now=5)
    assert types(tr) == [REFRESHED]
    assert tr.state.generation == 2
    assert tr.state.reason == "content changed"
    assert transition(SPEC, first, valid("b"), now=5, startup=True).state.reason == (
        "content changed while the broker was stopped"
    )


def test_stages_are_announced_once_each() -> None:
    state = transition(SPEC, None, valid("a", expires=100), now=0).state
    tr = tick(SPEC, state, 89)
    assert types(tr) == []
    tr = tick(SPEC, tr.state, 90)
    assert types(tr) == [EXPIRING]
    assert tr.state.problems[0].code == "expiring"
    assert types(tick(SPEC, tr.state, 95)) == []
    tr = tick(SPEC, tr.state, 100)
    assert types(tr) == [EXPIRED]
    assert tr.state.status is Status.EXPIRED
    assert [p.code for p in tr.state.problems] == ["expired"]
    assert types(tick(SPEC, tr.state, 10_000)) == []
    assert next_deadline(tr.state) is None


def test_clock_jumping_back_does_not_repeat_or_undo_a_stage() -> None:
    state = transition(SPEC, None, valid("a", expires=100), now=0).state
    state = tick(SPEC, state, 95).state
    tr = tick(SPEC, state, 10)  # wall clock stepped back
    assert types(tr) == []
    assert tr.state.status is Status.EXPIRING
    assert types(tick(SPEC, tr.state, 95)) == []


def test_sleeping_through_both_moments_announces_only_expired() -> None:
    state = transition(SPEC, None, valid("a", expires=100), now=0).state
    assert types(tick(SPEC, state, 500)) == [EXPIRED]


def test_new_content_already_expiring_or_expired() -> None:
    assert types(transition(SPEC, None, valid("a", expires=100), now=95)) == [REFRESHED, EXPIRING]
    tr = transition(SPEC, None, valid("a", expires=100), now=100)
    assert types(tr) == [REFRESHED, EXPIRED]
    assert all(s.status is Status.EXPIRED for _, s in tr.events)


def test_missing_then_back() -> None:
    first = transition(SPEC, None, valid("a"), now=0).state
    gone = transition(SPEC, first, MISSING_OBS, now=1)
    assert types(gone) == [MISSING]
    assert gone.state.generation == 1 and gone.state.fingerprint == "a"
    assert types(transition(SPEC, gone.state, MISSING_OBS, now=2)) == []
    back = transition(SPEC, gone.state, valid("a"), now=3)
    assert types(back) == [REFRESHED]
    assert back.state.generation == 1
    assert back.state.reason == "restored after missing"


def test_invalid_content_counts_as_a_generation() -> None:
    first = transition(SPEC, None, valid("a"), now=0).state
    bad = transition(SPEC, first, invalid("x"), now=1)
    assert types(bad) == [INVALID]
    assert bad.state.generation == 2
    assert types(transition(SPEC, bad.state, invalid("x"), now=2)) == []
    worse = transition(SPEC, bad.state, invalid("y"), now=3)
    assert types(worse) == [INVALID] and worse.state.generation == 3
    fixed = transition(SPEC, worse.state, valid("b"), now=4)
    assert types(fixed) == [REFRESHED] and fixed.state.generation == 4


def test_time_never_moves_invalid_or_missing() -> None:
    bad = transition(SPEC, None, invalid("x"), now=0).state
    assert types(tick(SPEC, bad, 10**9)) == []
    assert next_deadline(bad) is None


# -- properties over random histories -------------------------------------------------------

observations = st.one_of(
    st.builds(
        valid,
        st.sampled_from(["a", "b", "c"]),
        st.one_of(st.none(), st.floats(0, 1000)),
        st.one_of(st.none(), st.floats(0, 1000)),
    ),
    st.builds(invalid, st.sampled_from(["x", "y"])),
    st.just(MISSING_OBS),
)
steps = st.lists(
    st.tuples(st.sampled_from(["observe", "tick"]), observations, st.floats(-200, 400)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_history_invariants(history: list[tuple[str, Observation, float]]) -> None:
    state: State | None = None
    now = 0.0
    announced: Counter[tuple[int, str]] = Counter()
    for kind, obs, dt in history:
        now += dt  # the wall clock may jump either way
        prev = state
        tr = (
            transition(SPEC, prev, obs, now)
            if kind == "observe" or prev is None
            else tick(SPEC, prev, now)
        )
        state = tr.state
        if prev is not None:
            # Generations never go back, and move exactly when the fingerprint changes.
            assert state.generation >= prev.generation
            changed = obs.fingerprint is not None and obs.fingerprint != prev.fingerprint
            if kind == "observe":
                assert (state.generation == prev.generation + 1) == changed
            if (
                state.generation == prev.generation
                and state.status in (Status.VALID, Status.EXPIRING, Status.EXPIRED)
                and prev.status in (Status.VALID, Status.EXPIRING, Status.EXPIRED)
            ):
                assert state.stage >= prev.stage
        for event_type, event_state in tr.events:
            assert event_state.credential == "svc"
            if event_type in (EXPIRING, EXPIRED):
                announced[(event_state.generation, event_type)] += 1
        # Every event's state is the state it leaves behind, but for the status sequence.
        if tr.events:
            assert tr.events[-1][1].status == state.status
        # Re-applying the same observation at the same moment says nothing new.
        if kind == "observe":
            assert transition(SPEC, state, obs, now).events == ()
        assert tick(SPEC, tick(SPEC, state, now).state, now).events == ()
    # Each stage is announced at most once per generation (a generation can come back
    # after missing, which re-announces "restored", never a stage twice without a change).
    assert all(count <= 2 for count in announced.values())


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 10_000), st.floats(0, 10_000), st.floats(0, 20_000))
def test_expiring_at_is_reached_before_expiry(expires: float, issued: float, now: float) -> None:
    tr = transition(SPEC, None, valid("a", expires=expires, issued=issued), now)
    s = tr.state
    assert s.expiring_at is not None and s.expiring_at <= expires
    if now >= expires:
        assert s.stage is Stage.EXPIRED
    elif now >= s.expiring_at:
        assert s.stage is Stage.EXPIRING
    else:
        assert s.stage is Stage.VALID

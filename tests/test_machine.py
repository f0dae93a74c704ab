"""The pure state machine: unit tests and hypothesis properties over random histories."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import CredentialSettings, parse_config
from broker.core.events import EXPIRED, EXPIRING, INVALID, MISSING, REFRESHED
from broker.core.expiry import Lifetime
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import Observation, next_deadline, observe, tick, transition
from broker.core.reads import FileRead
from broker.core.state import FileInfo, Problem, Stage, State, Status

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


# ---------------------------------------------------------------------------------------------
# observe(): selectors, expiry fallbacks, pattern roles, the key pair check, the fallback note

FP = Fingerprinter(b"k" * 32)


def spec_of(**table: object) -> CredentialSettings:
    return parse_config(
        {"broker": {"state_dir": "/tmp/unused", "host_id": "t"},
         "credentials": [{"name": "svc", **table}]},
        env={"HOME": "/home/u"},
    ).credentials[0]


def read(role: str, path: str, content: bytes, mtime: float = 0.0) -> FileRead:
    return FileRead(FileInfo(role, path, True, len(content), mtime, 0o600), content=content)


AWS = spec_of(preset="aws", profile="dev", files={"credentials": "/h/creds"})


def aws_file(dev: str, other: str = "aws_access_key_id = A1") -> bytes:
    return f"[default]\n{other}\n\n[dev]\n{dev}\n".encode()


def test_selector_fingerprints_only_the_profile() -> None:
    dev = "aws_session_token = s1\nx_security_token_expires = 2026-11-25T18:00:00Z"
    obs = observe(AWS, [read("credentials", "/h/creds", aws_file(dev))], FP)
    assert obs.outcome is Status.VALID
    assert obs.lifetime == Lifetime(None, 1795629600.0)
    other = observe(AWS, [read("credentials", "/h/creds", aws_file(dev, "k = other"))], FP)
    assert other.fingerprint == obs.fingerprint
    renewed = dev.replace("s1", "s2").replace("18:00", "19:00")
    changed = observe(AWS, [read("credentials", "/h/creds", aws_file(renewed))], FP)
    assert changed.fingerprint != obs.fingerprint
    assert changed.lifetime == Lifetime(None, 1795633200.0)


def test_expiry_sources_fall_through_in_order() -> None:
    with_second = observe(AWS, [read("credentials", "/h/creds",
                                     aws_file("aws_expiration = 2026-11-25T18:00:00Z"))], FP)
    assert with_second.lifetime == Lifetime(None, 1795629600.0)
    static = observe(AWS, [read("credentials", "/h/creds", aws_file("aws_secret = x"))], FP)
    assert static.outcome is Status.VALID and static.lifetime == Lifetime(None, None)
    bad = observe(AWS, [read("credentials", "/h/creds",
                             aws_file("x_security_token_expires = soon"))], FP)
    assert bad.outcome is Status.INVALID  # a field that is there but wrong does not fall through
    assert [p.code for p in bad.problems] == ["bad-expiry"]
    strict = spec_of(files={"t": "/t"}, format="json", expiry=["json:a", "json:b"])
    obs = observe(strict, [read("t", "/t", b'{"c": 1}')], FP)
    assert [p.code for p in obs.problems] == ["no-expiry"]


def test_missing_section_is_missing_with_the_profile_remedy() -> None:
    obs = observe(AWS, [read("credentials", "/h/creds", b"[default]\nk = v\n")], FP)
    assert obs.outcome is Status.MISSING
    (problem,) = obs.problems
    assert problem.code == "section-missing"
    assert "[dev]" in problem.message
    assert problem.remedy is not None and "aws configure --profile dev" in problem.remedy
    broken = observe(AWS, [read("credentials", "/h/creds", b"no section\n")], FP)
    assert broken.outcome is Status.INVALID
    assert [p.code for p in broken.problems] == ["malformed-ini"]
    assert broken.fingerprint is not None


SSO = spec_of(files={"cache": "/h/cache/*.json"}, format="json", expiry="json:expiresAt")


def test_pattern_role_takes_the_soonest_expiry_and_names_count() -> None:
    token = read("cache", "/h/cache/a.json", b'{"expiresAt": "2026-11-25T18:00:00Z"}')
    registration = read("cache", "/h/cache/b.json", b'{"expiresAt": "2027-02-23T18:00:00Z"}')
    other = read("cache", "/h/cache/c.json", b'{"startUrl": "x"}')  # no field: skipped
    obs = observe(SSO, [token, registration, other], FP)
    assert obs.outcome is Status.VALID
    assert obs.lifetime == Lifetime(None, 1795629600.0)
    renamed = read("cache", "/h/cache/z.json", token.content or b"")
    assert observe(SSO, [renamed, registration, other], FP).fingerprint != obs.fingerprint
    none = observe(SSO, [other], FP)
    assert [p.code for p in none.problems] == ["no-expiry"]
    broken = read("cache", "/h/cache/d.json", b"{")
    assert observe(SSO, [token, broken], FP).problems[0].message.startswith(
        "cache file /h/cache/d.json:"
    )


def test_key_pair_check_is_generic() -> None:
    tls = spec_of(preset="tls", files={"cert": "/t/c.pem", "key": "/t/k.pem"})
    cert = read("cert", "/t/c.pem", b"not a certificate")
    key = read("key", "/t/k.pem", b"not a key")
    obs = observe(tls, [cert, key], FP)
    assert [p.code for p in obs.problems] == ["no-certificate"]  # the cert is checked first


def test_note_goes_into_the_reason() -> None:
    obs = valid("a", expires=1000)
    noted = Observation(obs.files, obs.outcome, obs.fingerprint, (), obs.lifetime, "using x")
    assert transition(SPEC, None, noted, now=0).state.reason == "first seen; using x"
    gone = Observation(FILES, Status.MISSING, None, (Problem("file-missing", "gone"),),
                       note="using y")
    assert transition(SPEC, None, gone, now=0).state.reason == "gone; using y"

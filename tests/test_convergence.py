"""The pure rules of consumer tracking (broker.core.convergence): units and properties."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cli.fleet import FleetView
from broker.core.convergence import (
    CONSUMER_ID_RE,
    ReportError,
    assess,
    check_consumer_id,
    check_report,
    forget_silent,
    is_lagging,
    record,
)
from broker.core.state import Consumer, State, Status
from broker.engine.consumers import parse_report

FP = [f"hmac-sha256:{i:016x}" for i in range(10)]
LAG = 60.0
T0 = 1_000_000.0


def state(generation: int = 2, status: Status = Status.VALID) -> State:
    return State("svc", status, generation=generation, fingerprint=FP[generation],
                 changed_at=T0)


def consumer(cid: str, generation: int, *, lagged: bool = False) -> Consumer:
    return Consumer(cid, generation, FP[generation], T0 - 5, "http", seen=T0, lagged=lagged)


# -- reports ---------------------------------------------------------------------------------


def test_check_report_accepts_the_current_and_older_generations() -> None:
    s = state(3)
    assert check_report(s, 3, FP[3]) == (3, FP[3])
    assert check_report(s, 1, FP[1]) == (1, FP[1])  # older, fingerprint not known: taken
    assert check_report(s, 2, FP[2], known={2: FP[2]}) == (2, FP[2])


@pytest.mark.parametrize(
    ("generation", "fingerprint", "code"),
    [
        (4, FP[4], "unknown-generation"),  # from the future
        (3, FP[1], "fingerprint-mismatch"),  # not this generation's
        (2, FP[1], "fingerprint-mismatch"),  # an older one whose fingerprint is known
        (0, FP[0], "invalid-report"),
        (-1, FP[0], "invalid-report"),
        (True, FP[1], "invalid-report"),
        ("3", FP[3], "invalid-report"),
        (3.5, FP[3], "invalid-report"),
        (None, FP[3], "invalid-report"),
        (3, "hmac-sha256:XYZ", "invalid-report"),
        (3, None, "invalid-report"),
        (3, 12, "invalid-report"),
    ],
)
def test_check_report_refuses(generation: object, fingerprint: object, code: str) -> None:
    with pytest.raises(ReportError) as info:
        check_report(state(3), generation, fingerprint, known={2: FP[2]})
    assert info.value.code == code


@pytest.mark.parametrize("cid", ["", "-x", "a/b", "a+b", "#", "a b", "ä", "x" * 129, "a\0"])
def test_bad_consumer_ids_are_refused(cid: str) -> None:
    with pytest.raises(ReportError) as info:
        check_consumer_id(cid)
    assert info.value.code == "invalid-consumer-id"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid-report"),
        (b"not json", "invalid-report"),
        (b"[1, 2]", "invalid-report"),
        (b"\xff\xfe", "invalid-report"),
        (b"[" * 4000, "invalid-report"),
        (b'{"generation": 1, "fingerprint": "x", "extra": 1}', "invalid-report"),
        (b'{"generation": 1, "time": "yesterday"}', "invalid-report"),
        (b'{"generation": 1, "consumer": 5}', "invalid-report"),
        (b"x" * 5000, "report-too-large"),
    ],
)
def test_parse_report_refuses_garbage_without_echoing_it(body: bytes, code: str) -> None:
    with pytest.raises(ReportError) as info:
        parse_report(body)
    assert info.value.code == code


@pytest.mark.parametrize("template", ['{"generation": %s}', '{"%s": 1}', '["%s"]', "%s"])
def test_a_refused_report_never_echoes_its_body(template: str) -> None:
    marker = "tok-3f9a8c7d6e5b4a39"
    with pytest.raises(ReportError) as info:
        parse_report((template % marker).encode())
    assert marker not in info.value.message and marker not in str(info.value)


def test_an_integral_float_is_an_integer_generation() -> None:
    report = parse_report(b'{"generation": 3.0, "fingerprint": "%s"}' % FP[3].encode())
    assert report.generation == 3 and isinstance(report.generation, int)


def test_a_repeated_report_keeps_since_and_the_lagged_mark() -> None:
    table = {"a": consumer("a", 1, lagged=True)}
    again = record(table, "a", 1, FP[1], via="mqtt", now=T0 + 100)
    assert again["a"].since == T0 - 5 and again["a"].lagged and again["a"].seen == T0 + 100
    moved = record(again, "a", 2, FP[2], via="mqtt", now=T0 + 200)
    assert moved["a"].since == T0 + 200 and not moved["a"].lagged


def test_silent_consumers_are_forgotten_after_the_ttl() -> None:
    table = {"a": replace(consumer("a", 1), seen=T0), "b": replace(consumer("b", 1), seen=T0 + 5)}
    kept, due = forget_silent(table, 10.0, T0 + 10)
    assert set(kept) == {"b"} and due == T0 + 15


# -- lagging and converged -------------------------------------------------------------------


def test_lagging_exactly_at_lag_after_not_before() -> None:
    s = state(2)
    old = consumer("old", 1)
    assert not is_lagging(old, s, T0, LAG, T0 + LAG - 0.001)
    assert is_lagging(old, s, T0, LAG, T0 + LAG)
    verdict = assess(s, {"old": old, "new": consumer("new", 2)}, refreshed_at=T0,
                     converged_generation=1, lag_after=LAG, now=T0 + 1)
    assert verdict.lagging == () and not verdict.converged and verdict.deadline == T0 + LAG


@pytest.mark.parametrize("status", [Status.EXPIRED, Status.INVALID])
def test_holding_an_expired_or_invalid_generation_is_lagging_at_once(status: Status) -> None:
    verdict = assess(state(2, status), {"a": consumer("a", 2)}, refreshed_at=T0,
                     converged_generation=0, lag_after=LAG, now=T0 + 1)
    assert [c.id for c in verdict.lagging] == ["a"] and not verdict.converged


def test_nobody_lags_behind_a_missing_credential() -> None:
    verdict = assess(state(2, Status.MISSING), {"a": consumer("a", 1)}, refreshed_at=T0,
                     converged_generation=0, lag_after=LAG, now=T0 + 10 * LAG)
    assert verdict.lagging == () and verdict.deadline is None


def test_converged_once_and_only_with_consumers() -> None:
    s = state(2)
    assert not assess(s, {}, refreshed_at=T0, converged_generation=0, lag_after=LAG,
                      now=T0).converged
    table = {"a": consumer("a", 2), "b": consumer("b", 2)}
    first = assess(s, table, refreshed_at=T0, converged_generation=1, lag_after=LAG, now=T0)
    assert first.converged
    again = assess(s, first.consumers, refreshed_at=T0, converged_generation=2, lag_after=LAG,
                   now=T0 + 1)
    assert not again.converged


statuses = st.sampled_from(list(Status))
tables = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.tuples(st.integers(1, 5), st.booleans()),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(
    generation=st.integers(1, 5),
    status=statuses,
    table=tables,
    converged=st.integers(0, 5),
    offset=st.floats(0, 3 * LAG),
)
def test_assess_properties(
    generation: int, status: Status, table: dict[str, tuple[int, bool]], converged: int,
    offset: float,
) -> None:
    s = state(generation, status)
    consumers = {
        cid: consumer(cid, min(gen, generation), lagged=lagged)
        for cid, (gen, lagged) in table.items()
    }
    now = T0 + offset
    v = assess(s, consumers, refreshed_at=T0, converged_generation=converged, lag_after=LAG,
               now=now)
    # Announced lagging: exactly the unmarked consumers that lag now; marked afterwards.
    expected = sorted(c.id for c in consumers.values()
                      if not c.lagged and is_lagging(c, s, T0, LAG, now))
    assert [c.id for c in v.lagging] == expected
    assert all(v.consumers[c.id].lagged for c in v.lagging)
    assert set(v.consumers) == set(consumers)  # assess never adds or drops anyone
    # Never lagging before lag_after behind a usable generation.
    if status in (Status.VALID, Status.EXPIRING) and offset < LAG:
        assert v.lagging == ()
    # Converged: only with consumers, all on the current generation, usable, not yet said.
    if v.converged:
        assert consumers and converged != generation
        assert status in (Status.VALID, Status.EXPIRING)
        assert all(c.generation == generation for c in consumers.values())
    # Once: the same assessment again (marks kept, convergence recorded) announces nothing.
    again = assess(s, v.consumers, refreshed_at=T0,
                   converged_generation=generation if v.converged else converged,
                   lag_after=LAG, now=now)
    assert again.lagging == () and not again.converged
    # Someone still to lag is waited for, no later than lag_after.
    if any(c.generation < generation and not v.consumers[c.id].lagged
           for c in consumers.values()) and status not in (Status.MISSING, Status.INVALID):
        assert v.deadline == T0 + LAG


@given(st.text(max_size=140))
def test_consumer_ids_are_safe_mqtt_topic_levels(cid: str) -> None:
    if CONSUMER_ID_RE.fullmatch(cid):
        assert not any(c in cid for c in "/+#\0") and cid.isascii() and cid.isprintable()


# -- the fleet view --------------------------------------------------------------------------


def test_fleet_view_folds_states_reports_and_removals() -> None:
    from broker.core.events import make_event

    view = FleetView("cb")
    s = state(2)
    payload = make_event("credentials.refreshed", replace(s, sequence=7), source="urn:x",
                         now=T0).payload
    assert view.take("cb/web-1/status", b"online", T0)
    assert view.take("cb/web-1/state/svc", payload, T0)
    report = b'{"consumer":"api","credential":"svc","generation":1,"fingerprint":"%s"}' % (
        FP[1].encode())
    assert view.take("cb/web-1/consumers/svc/api", report, T0)
    rows = view.rows(lag_after=LAG, now=T0 + 2 * LAG)
    assert [(r.host, r.state.credential, [c.id for c in r.lagging]) for r in rows] == [
        ("web-1", "svc", ["api"])
    ]
    older = make_event("credentials.refreshed", replace(s, sequence=3), source="urn:x",
                       now=T0).payload
    assert not view.take("cb/web-1/state/svc", older, T0)  # a late, older copy
    assert not view.take("cb/web-1/state/svc", b"garbage", T0) and view.ignored == 1
    assert view.take("cb/web-1/consumers/svc/api", b"", T0)
    assert view.rows(lag_after=LAG, now=T0)[0].consumers == ()
    assert view.take("cb/web-1/state/svc", b"", T0)
    assert view.rows(lag_after=LAG, now=T0) == []

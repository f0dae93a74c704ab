"""The per-event fast paths give exactly what the plain code they replaced gave: numbering a
state, fingerprints, event ids, the glob test, event payloads and journal lines made from a
document made once, the watched paths cached per settings object, and the log formatters."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import uuid
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.cli import logs
from broker.config import parse_config
from broker.core.events import make_event, new_event_id, payload_of, without_payload
from broker.core.fingerprint import PREFIX, Fingerprinter
from broker.core.globs import GLOB_CHARS, is_glob
from broker.core.state import Consumer, FileInfo, Problem, Stage, State, Status
from broker.engine.store import JOURNAL, Store
from broker.engine.tracking import CredentialTable
from tests.conftest import make_config

_text = st.text(max_size=20)
_times = st.none() | st.floats(min_value=0, max_value=4e9, allow_nan=False)
_files = st.builds(
    FileInfo,
    role=_text,
    path=_text,
    present=st.booleans(),
    size=st.none() | st.integers(0, 2**40),
    mtime=_times,
    mode=st.none() | st.integers(0, 0o7777),
)
_problems = st.builds(Problem, code=_text, message=_text, remedy=st.none() | _text)
_consumers = st.builds(
    Consumer,
    id=_text,
    generation=st.integers(0, 100),
    fingerprint=_text,
    since=st.floats(min_value=0, max_value=4e9),
    via=st.sampled_from(["mqtt", "http"]),
    seen=st.floats(min_value=0, max_value=4e9),
    lagged=st.booleans(),
)
_states = st.builds(
    State,
    credential=_text,
    status=st.sampled_from(list(Status)),
    generation=st.integers(0, 2**53),
    sequence=st.integers(0, 2**53),
    fingerprint=st.none() | _text,
    expires_at=_times,
    expiring_at=_times,
    changed_at=_times,
    files=st.lists(_files, max_size=3).map(tuple),
    problems=st.lists(_problems, max_size=3).map(tuple),
    reason=_text,
    consumers=st.lists(_consumers, max_size=2).map(tuple),
    issued_at=_times,
    stage=st.sampled_from(list(Stage)),
)


@given(_states, st.integers(0, 2**53))
def test_with_sequence_is_replace_field_for_field(state: State, sequence: int) -> None:
    fast, plain = state.with_sequence(sequence), replace(state, sequence=sequence)
    # Field by field: equality alone would not look at consumers, issued_at and stage.
    for f in fields(State):
        assert getattr(fast, f.name) == getattr(plain, f.name), f.name
    assert fast.sequence == sequence
    assert state.sequence != sequence or fast == state


def _reference_fingerprint(key: bytes, parts: list[tuple[str, bytes | None]]) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for role, content in parts:
        encoded = role.encode()
        mac.update(len(encoded).to_bytes(4, "big") + encoded)
        if content is None:
            mac.update(b"\xff" * 8)
        else:
            mac.update(len(content).to_bytes(8, "big"))
            mac.update(content)
    return PREFIX + mac.hexdigest()[:16]


@given(
    st.binary(min_size=16, max_size=64),
    st.lists(st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=64)), max_size=4),
)
def test_a_keyed_copy_fingerprints_as_a_fresh_hmac(
    key: bytes, parts: list[tuple[str, bytes | None]]
) -> None:
    fp = Fingerprinter(key)
    assert fp.fingerprint(parts) == _reference_fingerprint(key, parts)
    # The keyed state is copied, never consumed: the same input, the same answer again.
    assert fp.fingerprint(parts) == _reference_fingerprint(key, parts)


def test_a_fingerprint_did_not_change_for_stored_states() -> None:
    # A fingerprint is persisted and published: the same content must keep its fingerprint
    # across versions, or every credential would be a new generation after an upgrade.
    fp = Fingerprinter(b"k" * 32)
    assert fp.fingerprint([("token", b"secret-1")]) == _reference_fingerprint(
        b"k" * 32, [("token", b"secret-1")]
    )
    assert fp.fingerprint([("token", b"secret-1"), ("key", None)]) != fp.fingerprint(
        [("token", b"secret-1")]
    )


def test_event_ids_are_version_4_uuids() -> None:
    ids = {new_event_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@given(st.text(alphabet="/ab*?[].x", max_size=30))
def test_is_glob_as_before(path: str) -> None:
    assert is_glob(path) == (not GLOB_CHARS.isdisjoint(os.path.basename(path)))
    assert is_glob(Path(path or ".")) == (
        not GLOB_CHARS.isdisjoint(os.path.basename(str(Path(path or "."))))
    )


@given(_states)
def test_an_event_made_from_its_document_is_the_same_event(state: State) -> None:
    plain = make_event("credentials.refreshed", state, source="s", now=1.5, id="i")
    fast = make_event(
        "credentials.refreshed", state, source="s", now=1.5, id="i", document=state.to_dict()
    )
    assert fast.payload == plain.payload
    assert fast == plain


@given(_states, st.sampled_from(["credentials.refreshed", "credentials.missing"]), st.booleans())
def test_an_event_kept_without_its_payload_encodes_to_the_same_bytes(
    state: State, event_type: str, from_document: bool
) -> None:
    # The MQTT sink keeps each credential's latest event without its payload once sent and
    # encodes it again for the next connection: the retained message must not change.
    event = make_event(
        event_type, state, source="s", now=1.5, id=new_event_id(),
        document=state.to_dict() if from_document else None,
    )
    bare = without_payload(event)
    assert bare.payload == b"" and bare.id == event.id and bare == event
    assert payload_of(bare) == event.payload
    assert payload_of(event) is event.payload
    assert without_payload(bare) is bare


def test_journal_lines_made_from_documents_are_the_same(tmp_path: Path) -> None:
    info = FileInfo("token", "/x/token", True, 20, 1764093601.25, 0o600)
    states = [
        State(f"c{i}", Status.VALID, 1, i + 1, "hmac-sha256:0123456789abcdef",
              changed_at=1764093601.5, files=(info,), issued_at=3.0, stage=Stage.VALID)
        for i in range(3)
    ]
    journals = []
    for documents in (None, {s.credential: s.to_dict() for s in states[:2]}):
        store = Store(tmp_path / str(documents is None))
        store.prepare()
        store.load()
        store.record(states, 3, lambda: {s.credential: s for s in states}, documents)
        if documents is not None:  # the caller's documents are left as they were
            assert documents == {s.credential: s.to_dict() for s in states[:2]}
        journals.append((store.state_dir / JOURNAL).read_bytes())
    assert journals[0] == journals[1]
    lines = journals[0].splitlines()
    assert len(lines) == 1
    assert [s["credential"] for s in json.loads(lines[0])["states"]] == ["c0", "c1", "c2"]


def test_watched_paths_follow_replaced_settings(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    first = make_config(tmp_path, [{"name": "svc", "files": {"token": str(a)}}])
    table = CredentialTable()
    table.replace_all(first.credentials, {})
    assert table["svc"].paths == (str(a),)
    assert set(table.by_path) == {str(a)}
    second = make_config(tmp_path, [{"name": "svc", "files": {"token": str(b)}}])
    table.replace_all(second.credentials, {})
    assert table["svc"].paths == (str(b),)
    assert set(table.by_path) == {str(b)}


def test_watched_paths_as_text_are_the_settings_paths_in_order_once_each(tmp_path: Path) -> None:
    # The nebius preset's fallback shares the tenant file with the credential itself: that
    # path is watched once, where the settings list it first.
    home = tmp_path / "home"
    (config,) = [parse_config({"credentials": [{"preset": "nebius"}, {
        "name": "twice", "files": {"a": str(tmp_path / "x"), "b": str(tmp_path / "y")},
        "fallback": {"files": {"c": str(tmp_path / "y"), "d": str(tmp_path / "z")},
                     "format": "json", "expiry": ["none"]},
    }]}, env={"HOME": str(home)})]
    table = CredentialTable()
    table.replace_all(config.credentials, {})
    for spec in config.credentials:
        assert table[spec.name].paths == tuple(str(p) for p in spec.watched_paths)
        assert spec.watched_path_texts == table[spec.name].paths
    assert table["twice"].paths == tuple(str(tmp_path / n) for n in "xyz")
    assert len(table["nebius"].paths) == 3


def _record(**extra: Any) -> logging.LogRecord:
    return logging.getLogger("broker.events").makeRecord(
        "broker.events", logging.INFO, "f", 1, "credentials.refreshed", (), None, extra=extra
    )


@given(st.dictionaries(st.sampled_from(["credential", "reason", "n", "path"]),
                       st.text(max_size=12) | st.integers() | st.none() | st.booleans()
                       | st.floats(allow_nan=False, allow_infinity=False)))
def test_log_lines_as_before(extra: dict[str, Any]) -> None:
    record = _record(**extra)
    line = logs.JsonFormatter("h").format(record)
    doc = json.loads(line)
    expected = {
        "time": doc["time"], "level": "info", "logger": "broker.events",
        "message": "credentials.refreshed", "host_id": "h", **extra,
    }
    assert doc == expected
    if not any(isinstance(v, float) for v in extra.values()):
        # Byte for byte the standard library's compact JSON (a float may spell its exponent
        # differently: 1e-07 there, 1e-7 here; the same number).
        assert line == json.dumps(
            expected, default=str, ensure_ascii=False, separators=(",", ":")
        )
    text = logs.TextFormatter().format(record)
    for key, value in extra.items():
        shown = str(value)
        if shown == "" or any(c in shown for c in ' "=\\\n'):
            shown = json.dumps(shown, ensure_ascii=False)
        assert f"{key}={shown}" in text


@pytest.mark.parametrize("value", [Path("/etc/credbroker/token"), 2**70, {1: "a"}])
def test_log_values_orjson_refuses_are_logged_as_the_standard_encoder_would(value: Any) -> None:
    # A path (default=str), an integer beyond 64 bits, a non-string key: one line each,
    # the standard library's compact JSON.
    line = logs.JsonFormatter().format(_record(path=value))
    assert json.loads(line)["path"] == json.loads(json.dumps(value, default=str))

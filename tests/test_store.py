"""The durable store: journal + snapshot, torn writes, unwritable directories."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import broker.engine.store as store_module
from broker.core.events import encode
from broker.core.state import FileInfo, Stage, State, Status
from broker.engine.store import FORMAT_VERSION, Store


def state(name: str, generation: int, sequence: int) -> State:
    return State(
        name,
        Status.EXPIRING,
        generation,
        sequence,
        f"hmac-sha256:{generation:016x}",
        expires_at=1234.5678,
        expiring_at=1200.25,
        changed_at=1000.0,
        issued_at=900.0,
        stage=Stage.EXPIRING,
    )


def test_round_trip_keeps_exact_times_and_stage(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.prepare()
    a1, b1 = state("a", 1, 1), state("b", 1, 2)
    store.record([a1, b1], 2, lambda: {"a": a1, "b": b1})
    a2 = state("a", 2, 3)
    store.record([a2], 3, lambda: {"a": a2, "b": b1})
    loaded = Store(tmp_path / "s").load()
    assert loaded.problems == []
    assert loaded.sequence == 3
    assert loaded.states["a"] == a2
    assert loaded.states["a"].expires_at == 1234.5678
    assert loaded.states["a"].stage is Stage.EXPIRING
    assert loaded.states["a"].issued_at == 900.0


def test_the_snapshot_is_the_one_encoding_of_the_whole_document(tmp_path: Path) -> None:
    # Written a credential at a time (the document is never in memory whole), it is still
    # byte for byte what encoding the document at once gives, and reads back.
    states = {f"c{i}": state(f"c{i}", i + 1, i + 1) for i in range(3)}
    states["c1"] = State("c1", Status.VALID, 2, 2, "hmac-sha256:2", reason="erneuert \u2713",
                         files=(FileInfo("token", "/run/s\u00e9crets/t", True, 9, 1.5, 0o600),))
    store = Store(tmp_path)
    store.prepare()
    store.flush(states, 3)
    expected = encode({
        "version": FORMAT_VERSION,
        "sequence": 3,
        "credentials": {name: store_module._encode_state(s) for name, s in states.items()},
    })
    assert (tmp_path / "state.json").read_bytes() == expected
    loaded = Store(tmp_path).load()
    assert loaded.problems == [] and loaded.sequence == 3 and loaded.states == states
    store.flush({}, 3)
    assert json.loads((tmp_path / "state.json").read_bytes()) == {
        "version": FORMAT_VERSION, "sequence": 3, "credentials": {}
    }


def test_a_snapshot_reads_as_json_loads_would_read_it(tmp_path: Path) -> None:
    # Read a credential at a time, it still takes any layout of the same JSON, the last of
    # duplicate keys winning, and refuses what json.loads refuses.
    a1, b1, b2 = state("a", 1, 1), state("b", 1, 2), state("b", 2, 3)
    docs = {n: store_module._encode_state(s) for n, s in (("a", a1), ("b", b1))}
    pretty = json.dumps({"credentials": docs, "version": 1, "sequence": 3}, indent=2)
    (tmp_path / "state.json").write_text(pretty + "\n")
    loaded = Store(tmp_path).load()
    assert loaded.problems == [] and loaded.sequence == 3 and loaded.states == {"a": a1, "b": b1}
    b2_doc = json.dumps(store_module._encode_state(b2))
    a_doc = json.dumps(docs["a"])
    (tmp_path / "state.json").write_text(
        f'{{"sequence": 1, "credentials": {{"b": {json.dumps(docs["b"])}}}, "sequence": 3, '
        f'"credentials": {{"a": {a_doc}, "b": {json.dumps(docs["b"])}, "b": {b2_doc}}}}}'
    )
    loaded = Store(tmp_path).load()
    assert loaded.sequence == 3 and loaded.states == {"a": a1, "b": b2}
    for broken in (
        pretty + " {}",  # extra data
        '{"version": 1, "sequence": 3}',  # no credentials
        '{"sequence": 3, "credentials": []}',
        '{"sequence": 3, "credentials": {"a": ' + a_doc + ",}}",
        '{"sequence": 3 "credentials": {}}',
        "[]",
        "",
    ):
        (tmp_path / "state.json").write_text(broken)
        loaded = Store(tmp_path).load()
        assert loaded.states == {} and loaded.sequence == 0, broken
        assert "corrupt" in loaded.problems[0], broken
        assert not (tmp_path / "state.json").exists()


def test_torn_last_journal_line_is_ignored_silently(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    a1 = state("a", 1, 1)
    store.flush({"a": a1}, 1)
    a2 = state("a", 2, 2)
    store.record([a2], 2, lambda: {"a": a2})
    with open(tmp_path / "journal.jsonl", "ab") as fh:
        fh.write(b'{"sequence": 3, "states": [{"credential"')
    loaded = Store(tmp_path).load()
    assert loaded.problems == []
    assert loaded.sequence == 2
    assert loaded.states["a"].generation == 2


def test_corrupt_snapshot_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"sequence": "x"}')
    loaded = Store(tmp_path).load()
    assert loaded.states == {}
    assert "corrupt" in loaded.problems[0]
    assert not (tmp_path / "state.json").exists()
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def test_unwritable_directory_is_reported_then_recovers(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.prepare()
    a1 = state("a", 1, 1)
    os.chmod(tmp_path / "s", 0o500)
    os.chmod(tmp_path / "s", 0o500)
    try:
        if os.geteuid() == 0:
            # root ignores modes: make the journal path a directory instead.
            (tmp_path / "s" / "journal.jsonl").mkdir()
        store.record([a1], 1, lambda: {"a": a1})
        assert store.error is not None and "cannot write state" in store.error
    finally:
        os.chmod(tmp_path / "s", 0o700)
        if (tmp_path / "s" / "journal.jsonl").is_dir():
            (tmp_path / "s" / "journal.jsonl").rmdir()
    a2 = state("a", 2, 2)
    store.record([a2], 2, lambda: {"a": a2})
    assert store.error is None
    # The recovery wrote everything, not just the last change.
    doc = json.loads((tmp_path / "s" / "state.json").read_text())
    assert doc["sequence"] == 2 and doc["credentials"]["a"]["generation"] == 2


def test_a_failed_snapshot_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a snapshot that failed half-way (a full disk) left its temp copy behind,
    # holding the space (and, after a restart under a new pid, for good).
    store = Store(tmp_path / "s")
    store.prepare()
    a1 = state("a", 1, 1)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(store_module.os, "fsync", full)
        store.flush({"a": a1}, 1)
    assert store.error is not None and "No space left" in store.error
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []
    store.flush({"a": a1}, 1)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["journal.jsonl", "state.json"]


def test_a_key_that_cannot_be_written_is_used_and_saved_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: an unwritable state_dir at first start raised out of load_key (and so out
    # of Broker.__aenter__) instead of serving from memory like every other write failure.
    store = Store(tmp_path / "s")
    store.prepare()
    real_write = store_module.atomic_write

    def refused(path: Path, data: bytes) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(store_module, "atomic_write", refused)
    key = store.load_key()
    assert len(key) >= 32 and store.error is not None and "fingerprint key" in store.error
    a1 = state("a", 1, 1)
    store.record([a1], 1, lambda: {"a": a1})
    assert store.error is not None
    monkeypatch.setattr(store_module, "atomic_write", real_write)
    store.record([a1], 1, lambda: {"a": a1})
    assert store.error is None
    assert Store(tmp_path / "s").load_key() == key  # the same key after a restart


def test_key_is_generated_once_0600(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.prepare()
    key = store.load_key()
    assert len(key) >= 32
    assert (tmp_path / "s" / "fingerprint.key").stat().st_mode & 0o777 == 0o600
    assert Store(tmp_path / "s").load_key() == key

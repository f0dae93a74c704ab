"""Durable broker state: generation, sequence, fingerprint and status of every credential.

A snapshot file plus an append-only journal. Every batch of events is appended (and
fsync'ed) *before* it is published, so after a crash no sequence or generation number
is reused for different content. The journal is folded into the snapshot now and then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from broker.events import encode
from broker.state import Stage, State

log = logging.getLogger("broker.store")

FORMAT_VERSION = 1
SNAPSHOT = "state.json"
JOURNAL = "journal.jsonl"
KEY_FILE = "fingerprint.key"
COMPACT_EVERY = 2000  # journal lines


class StoreError(Exception):
    """The state directory cannot be used (the message says why and where)."""


@dataclass(slots=True)
class Loaded:
    """What the store held at start-up."""

    states: dict[str, State] = field(default_factory=dict)
    sequence: int = 0
    problems: list[str] = field(default_factory=list)


def _encode_state(state: State) -> dict[str, Any]:
    doc = state.to_dict()
    doc["_issued_at"] = state.issued_at
    doc["_stage"] = int(state.stage)
    doc["_expires_at"] = state.expires_at
    doc["_expiring_at"] = state.expiring_at
    doc["_changed_at"] = state.changed_at
    return doc


def _decode_state(doc: Mapping[str, Any]) -> State:
    state = State.from_dict(doc)
    # Exact floats, not the millisecond-rounded text, so deadlines survive a restart intact.
    return replace(
        state,
        issued_at=doc.get("_issued_at"),
        stage=Stage(int(doc.get("_stage", 0))),
        expires_at=doc.get("_expires_at", state.expires_at),
        expiring_at=doc.get("_expiring_at", state.expiring_at),
        changed_at=doc.get("_changed_at", state.changed_at),
    )


class Store:
    """The files in ``state_dir``. Methods are blocking; the engine runs them in a thread."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._snapshot = state_dir / SNAPSHOT
        self._journal = state_dir / JOURNAL
        self._journal_lines = 0
        self._needs_full_write = False
        #: The last write error, or None when the store is healthy.
        self.error: str | None = None
        #: (path, content) of a generated fingerprint key not written yet (a full or
        #: read-only state_dir at first start): saved by the first write that works, so
        #: that a restart fingerprints with the same key.
        self._unsaved_key: tuple[Path, bytes] | None = None

    def prepare(self) -> None:
        """Create ``state_dir`` (0700)."""
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state_dir {self.state_dir}: {exc.strerror}") from None

    def load_key(self, key_file: Path | None = None) -> bytes:
        """The fingerprint key: ``key_file`` if given (shared by a fleet), else generated 0600."""
        path = key_file or self.state_dir / KEY_FILE
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            if key_file is not None:
                raise StoreError(f"fingerprint_key_file {path} does not exist") from None
            key = secrets.token_hex(32).encode()
            try:
                _atomic_write(path, key + b"\n")
            except OSError as exc:
                # Serve anyway (from memory, like any other write failure) with this key.
                self._unsaved_key = (path, key + b"\n")
                self._report(f"cannot write the fingerprint key to {path}: "
                             f"{exc.strerror or exc}")
            return key
        except OSError as exc:
            raise StoreError(f"cannot read fingerprint key {path}: {exc.strerror}") from None
        if len(key) < 16:
            raise StoreError(f"fingerprint key {path} is too short (need at least 16 bytes)")
        return key

    def load(self) -> Loaded:
        """Read snapshot + journal. Corruption is reported and the bad part set aside."""
        loaded = Loaded()
        try:
            raw = self._snapshot.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            loaded.problems.append(f"cannot read {self._snapshot}: {exc.strerror}")
            raw = None
        if raw is not None:
            try:
                doc = json.loads(raw)
                loaded.sequence = int(doc["sequence"])
                for name, state_doc in doc["credentials"].items():
                    loaded.states[name] = _decode_state(state_doc)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                loaded.states.clear()
                loaded.sequence = 0
                aside = self._set_aside(self._snapshot)
                loaded.problems.append(
                    f"state snapshot {self._snapshot} was corrupt ({type(exc).__name__}); "
                    f"moved to {aside} and rebuilt"
                )
        self._replay_journal(loaded)
        return loaded

    def _replay_journal(self, loaded: Loaded) -> None:
        try:
            lines = self._journal.read_bytes().splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            loaded.problems.append(f"cannot read {self._journal}: {exc.strerror}")
            return
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                states = [_decode_state(d) for d in entry["states"]]
                sequence = int(entry["sequence"])
            except (ValueError, KeyError, TypeError, AttributeError):
                # A torn last line is a write cut short by a crash: it was never published.
                if number != len(lines):
                    loaded.problems.append(
                        f"journal {self._journal} line {number} is corrupt; skipped"
                    )
                continue
            loaded.sequence = max(loaded.sequence, sequence)
            for state in states:
                loaded.states[state.credential] = state
        self._journal_lines = len(lines)
        # Fold what was replayed into a fresh snapshot at the next write.
        self._needs_full_write = bool(lines)

    def record(
        self,
        changed: Iterable[State],
        sequence: int,
        everything: Callable[[], Mapping[str, State]],
    ) -> None:
        """Durably record a batch before it is published.

        ``everything`` is called only when a full snapshot is due (it is O(credentials)).
        Never raises: a failure is kept in ``error`` and the next write is a full snapshot.
        """
        try:
            self._save_key()
            if self._needs_full_write or self._journal_lines >= COMPACT_EVERY:
                self._write_snapshot(everything(), sequence)
            else:
                line = encode({"sequence": sequence, "states": [_encode_state(s) for s in changed]})
                with open(self._journal, "ab") as fh:
                    fh.write(line + b"\n")
                    fh.flush()
                    os.fdatasync(fh.fileno())
                self._journal_lines += 1
        except OSError as exc:
            self._needs_full_write = True
            self._report(f"cannot write state to {self.state_dir}: {exc.strerror or exc}")
            return
        if self.error is not None:
            log.info("store recovered", extra={"state_dir": str(self.state_dir)})
            self.error = None

    def flush(self, everything: Mapping[str, State], sequence: int) -> None:
        """Write a full snapshot (clean shutdown). Never raises."""
        try:
            self._save_key()
            self._write_snapshot(everything, sequence)
        except OSError as exc:
            self._report(f"cannot write state to {self.state_dir}: {exc.strerror or exc}")

    def _write_snapshot(self, everything: Mapping[str, State], sequence: int) -> None:
        doc = {
            "version": FORMAT_VERSION,
            "sequence": sequence,
            "credentials": {name: _encode_state(s) for name, s in everything.items()},
        }
        _atomic_write(self._snapshot, encode(doc))
        with open(self._journal, "wb") as fh:
            os.fsync(fh.fileno())
        self._journal_lines = 0
        self._needs_full_write = False

    def _save_key(self) -> None:
        if self._unsaved_key is not None:
            _atomic_write(*self._unsaved_key)
            self._unsaved_key = None

    def _report(self, message: str) -> None:
        if message != self.error:
            log.error("store write failed", extra={"error": message})
        self.error = message

    def _set_aside(self, path: Path) -> Path:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            path.replace(aside)
        return aside


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full or failing disk: leave no half-written copy behind to hold the space.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

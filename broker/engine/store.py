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
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from broker.aio.atomicfile import atomic_write
from broker.aio.safefile import UnsafeFile, read_regular
from broker.core.errors import BrokerError
from broker.core.events import encode
from broker.core.state import Problem, Stage, State
from broker.engine.jsonmembers import DECODER, object_members, skip_space

log = logging.getLogger("broker.store")

FORMAT_VERSION = 1
SNAPSHOT = "state.json"
JOURNAL = "journal.jsonl"
KEY_FILE = "fingerprint.key"
TOMBSTONES = "tombstones.json"
#: Removed credentials remembered (generation and fingerprint), the most recent kept.
MAX_TOMBSTONES = 1024
COMPACT_EVERY = 2000  # journal lines
#: Larger files in state_dir are not read (set aside): the broker writes far less.
MAX_STATE_FILE = 64 * 1024 * 1024
MAX_KEY_FILE = 4096
#: Times outside [0, this] (the year 3000) and counters above 2**53 are corruption.
_MAX_TIME = 32503680000.0
_MAX_COUNT = 2**53
#: Everything a malformed document can raise while being decoded.
_DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                  RecursionError, IndexError)


class StoreError(BrokerError):
    """The state directory cannot be used (the message says why and where)."""


@dataclass(slots=True)
class Loaded:
    """What the store held at start-up."""

    states: dict[str, State] = field(default_factory=dict)
    sequence: int = 0
    problems: list[str] = field(default_factory=list)
    #: Credentials no longer configured (their retained MQTT state is to be cleared).
    removed: list[str] = field(default_factory=list)


def _encode_state(state: State, document: Mapping[str, Any] | None = None) -> dict[str, Any]:
    # ``document``: ``state.to_dict()`` already made (for the event that announces it).
    doc = state.to_dict() if document is None else dict(document)
    doc["_issued_at"] = state.issued_at
    doc["_stage"] = int(state.stage)
    doc["_expires_at"] = state.expires_at
    doc["_expiring_at"] = state.expiring_at
    doc["_changed_at"] = state.changed_at
    return doc


def _decode_state(doc: Mapping[str, Any]) -> State:
    """A stored state, range-checked; ``ValueError`` (or another decode error) if corrupt."""
    state = State.from_dict(doc)
    # Exact floats, not the millisecond-rounded text, so deadlines survive a restart intact.
    state = replace(
        state,
        issued_at=_time(doc.get("_issued_at")),
        stage=Stage(int(doc.get("_stage", 0))),
        expires_at=_time(doc.get("_expires_at", state.expires_at)),
        expiring_at=_time(doc.get("_expiring_at", state.expiring_at)),
        changed_at=_time(doc.get("_changed_at", state.changed_at)),
    )
    for count in (state.generation, state.sequence, *(f.size for f in state.files)):
        if count is not None and not (isinstance(count, int) and 0 <= count <= _MAX_COUNT):
            raise ValueError("a counter is out of range")
    for info in state.files:
        _time(info.mtime)
    if state.fingerprint is not None and not isinstance(state.fingerprint, str):
        raise ValueError("the fingerprint is not a string")
    # Whatever made it this far must serve: the document is what every GET and event sends.
    encode(state.to_dict())
    return state


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("a time is not a number")
    if not 0.0 <= value <= _MAX_TIME:  # also refuses NaN and infinities (1e400)
        raise ValueError("a time is out of range")
    return float(value)


class Store:
    """The files in ``state_dir``. Methods are blocking; the engine runs them in a thread."""

    def __init__(
        self, state_dir: Path, *, clock: Callable[[], float] = time.time, read_only: bool = False
    ) -> None:
        self.state_dir = state_dir
        # Read-only: a reader beside the daemon (``credbroker check``) changes nothing: no
        # corrupt file is set aside, no mode tightened.
        self._read_only = read_only
        # When a credential was removed (tombstones) and when a corrupt file was set aside.
        self._clock = clock
        self._snapshot = state_dir / SNAPSHOT
        self._journal = state_dir / JOURNAL
        self._tombstones_path = state_dir / TOMBSTONES
        #: name -> (removed at, last state) of removed credentials, oldest first.
        self.tombstones: dict[str, tuple[float, State]] = {}
        self._journal_lines = 0
        self._needs_full_write = False
        #: The last write error, or None when the store is healthy.
        self.error: str | None = None
        #: (path, content) of a generated fingerprint key not written yet (a full or
        #: read-only state_dir at first start): saved by the first write that works, so
        #: that a restart fingerprints with the same key.
        self._unsaved_key: tuple[Path, bytes] | None = None

    def prepare(self) -> None:
        """Create ``state_dir`` (0700), or tighten an existing one that others can enter."""
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create state_dir {self.state_dir}: {exc.strerror}") from None
        _tighten(self.state_dir, 0o700, "state_dir")

    def load_key(self, key_file: Path | None = None) -> bytes:
        """The fingerprint key: ``key_file`` if given (shared by a fleet), else generated 0600.

        A readable key lets anyone brute-force short secrets from published fingerprints:
        a key others can read is tightened to 0600, or refused when that is not possible.
        """
        path = key_file or self.state_dir / KEY_FILE
        try:
            # A configured key may be a symlink (a mounted secret); the generated one not.
            raw, _ = read_regular(path, MAX_KEY_FILE, follow=key_file is not None)
        except FileNotFoundError:
            if key_file is not None:
                raise StoreError(f"fingerprint_key_file {path} does not exist") from None
            return self._new_key(path)
        except UnsafeFile as exc:
            if key_file is not None:
                raise StoreError(f"fingerprint_key_file: {exc}") from None
            aside = self._set_aside(path)
            log.warning("fingerprint key set aside; a new one is generated",
                        extra={"problem": str(exc), "moved_to": str(aside)})
            return self._new_key(path)
        except OSError as exc:
            raise StoreError(f"cannot read fingerprint key {path}: {exc.strerror}") from None
        key = raw.strip()
        if len(key) < 16:
            raise StoreError(f"fingerprint key {path} is too short (need at least 16 bytes)")
        _tighten(path, 0o600, "fingerprint key")
        return key

    def _new_key(self, path: Path) -> bytes:
        key = secrets.token_hex(32).encode()
        try:
            atomic_write(path, key + b"\n")
        except OSError as exc:
            # Serve anyway (from memory, like any other write failure) with this key.
            self._unsaved_key = (path, key + b"\n")
            self._report(f"cannot write the fingerprint key to {path}: {exc.strerror or exc}")
        return key

    def load(self) -> Loaded:
        """Read snapshot + journal. Corruption is reported and the bad part set aside."""
        loaded = Loaded()
        raw = self._read(self._snapshot, "state snapshot", loaded)
        if raw is not None:
            try:
                text = raw.decode(json.detect_encoding(raw), "surrogatepass")
                del raw
                loaded.sequence = _count(_read_snapshot(text, loaded.states)["sequence"])
            except _DECODE_ERRORS as exc:
                loaded.states.clear()
                loaded.sequence = 0
                aside = self._set_aside(self._snapshot)
                loaded.problems.append(
                    f"state snapshot {self._snapshot} was corrupt ({type(exc).__name__}); "
                    f"moved to {aside} and rebuilt"
                )
        self._replay_journal(loaded)
        return loaded

    def reconcile(self, loaded: Loaded, configured: Iterable[str]) -> None:
        """Bury loaded states no longer configured, and bring back those re-added (start)."""
        self._load_tombstones(loaded)
        names = set(configured)
        gone = {n: s for n, s in loaded.states.items() if n not in names}
        for name in gone:
            del loaded.states[name]
        back = {n: s for n in names if n not in loaded.states
                and (s := self.exhume(n, save=False)) is not None}
        loaded.states.update(back)
        self.bury(gone.values(), save=False)
        if gone or back:
            self.save_tombstones()
        loaded.removed = list(self.tombstones)

    def bury(self, states: Iterable[State], *, save: bool = True) -> None:
        """Remember removed credentials' states (bounded, the most recent kept)."""
        now = self._clock()
        for state in states:
            self.tombstones.pop(state.credential, None)
            self.tombstones[state.credential] = (now, state)
        while len(self.tombstones) > MAX_TOMBSTONES:
            del self.tombstones[next(iter(self.tombstones))]
        if save:
            self.save_tombstones()

    def exhume(self, name: str, *, save: bool = True) -> State | None:
        """The last state of a re-added credential (and forget its tombstone), or ``None``."""
        entry = self.tombstones.pop(name, None)
        if entry is not None and save:
            self.save_tombstones()
        return entry[1] if entry is not None else None

    def swap_tombstones(self, gone: Iterable[State], back: Iterable[str]) -> dict[str, State]:
        """A reload: exhume the credentials ``back`` (their last states, returned), bury the
        ``gone`` ones, and save the tombstones once (blocking)."""
        found = {n: s for n in back if (s := self.exhume(n, save=False)) is not None}
        self.bury(gone)
        return found

    def save_tombstones(self) -> None:
        """Write the tombstones. Never raises (a failure is reported like any write's)."""
        doc = {
            "version": FORMAT_VERSION,
            "tombstones": {n: {"removed_at": t, "state": _encode_state(s)}
                           for n, (t, s) in self.tombstones.items()},
        }
        try:
            atomic_write(self._tombstones_path, encode(doc))
        except OSError as exc:
            self._report(f"cannot write state to {self.state_dir}: {exc.strerror or exc}")

    def _load_tombstones(self, loaded: Loaded) -> None:
        raw = self._read(self._tombstones_path, "tombstones", loaded)
        if raw is None:
            return
        try:
            doc = json.loads(raw)
            entries = sorted(
                ((float(_time(e["removed_at"]) or 0.0), n, _decode_state(e["state"]))
                 for n, e in doc["tombstones"].items()),
                key=lambda item: item[0],
            )
        except _DECODE_ERRORS as exc:
            aside = self._set_aside(self._tombstones_path)
            loaded.problems.append(
                f"tombstones {self._tombstones_path} were corrupt ({type(exc).__name__}); "
                f"moved to {aside}"
            )
            return
        self.tombstones = {n: (t, s) for t, n, s in entries[-MAX_TOMBSTONES:]}

    def _read(self, path: Path, what: str, loaded: Loaded) -> bytes | None:
        """A state file's bytes; ``None`` when absent, or unusable (then set aside, reported)."""
        try:
            raw, mode = read_regular(path, MAX_STATE_FILE)
        except FileNotFoundError:
            return None
        except UnsafeFile as exc:
            aside = self._set_aside(path)
            loaded.problems.append(f"{what}: {exc}; moved to {aside} and rebuilt")
            return None
        except OSError as exc:
            # The environment (EMFILE, EACCES, EIO), not corruption: keep the file for later.
            loaded.problems.append(f"cannot read {path}: {exc.strerror}")
            return None
        if stat.S_IMODE(mode) & 0o077 and not self._read_only:
            try:
                _tighten(path, 0o600, what)
            except StoreError as exc:
                loaded.problems.append(str(exc))
        return raw

    def _replay_journal(self, loaded: Loaded) -> None:
        raw = self._read(self._journal, "journal", loaded)
        if raw is None:
            return
        lines = raw.splitlines()
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                states = [_decode_state(d) for d in entry["states"]]
                sequence = _count(entry["sequence"])
            except _DECODE_ERRORS:
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
        documents: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Durably record a batch before it is published.

        ``everything`` is called only when a full snapshot is due (it is O(credentials)).
        ``documents``: credential -> ``to_dict()`` of its state in ``changed``, where the
        caller already made it (each is copied, never changed).
        Never raises: a failure is kept in ``error`` and the next write is a full snapshot.
        """
        try:
            self._save_key()
            if self._needs_full_write or self._journal_lines >= COMPACT_EVERY:
                self._write_snapshot(everything(), sequence)
            else:
                made = documents or {}
                states = [_encode_state(s, made.get(s.credential)) for s in changed]
                line = encode({"sequence": sequence, "states": states})
                fd = os.open(self._journal, _JOURNAL_FLAGS | os.O_APPEND, 0o600)
                with os.fdopen(fd, "ab") as fh:
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
        atomic_write(self._snapshot, _snapshot_chunks(everything, sequence))
        fd = os.open(self._journal, _JOURNAL_FLAGS | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            os.fsync(fh.fileno())
        self._journal_lines = 0
        self._needs_full_write = False

    def _save_key(self) -> None:
        if self._unsaved_key is not None:
            atomic_write(*self._unsaved_key)
            self._unsaved_key = None

    def _report(self, message: str) -> None:
        if message != self.error:
            log.error("store write failed", extra={"error": message})
        self.error = message

    def _set_aside(self, path: Path) -> Path:
        if self._read_only:
            return path
        aside = path.with_name(f"{path.name}.corrupt-{int(self._clock())}")
        with contextlib.suppress(OSError):
            path.replace(aside)
        return aside


def _snapshot_chunks(everything: Mapping[str, State], sequence: int) -> Iterator[bytes]:
    """The snapshot document, ``encode({"version": ..., "sequence": ..., "credentials":
    {name: state, ...}})`` to the byte, one credential at a time: the whole document (and a
    dict per state) is never in memory at once, which at 10,000 credentials was the
    daemon's peak at every stop."""
    head = encode({"version": FORMAT_VERSION, "sequence": sequence})
    yield head[:-1] + b',"credentials":{'
    separator = b""
    for name, state in everything.items():
        yield separator + encode(name) + b":" + encode(_encode_state(state))
        separator = b","
    yield b"}}"


def _read_snapshot(text: str, states: dict[str, State]) -> dict[str, Any]:
    """Parse the snapshot document ``text``: each credential's state goes into ``states`` as
    it is read, the other members are returned (``"credentials"`` must be one of them).

    What ``json.loads`` accepts and how (the last of duplicate keys wins), but without the
    parsed documents of every state in memory at once beside the states made from them:
    at 10,000 credentials those were 16 MB, the peak of a restart. ``ValueError`` (or
    another of the decode errors) for anything else.
    """
    members: dict[str, Any] = {}

    def state(name: str, pos: int) -> int:
        document, end = DECODER.raw_decode(text, pos)
        states[name] = _decode_state(document)
        return end

    def member(key: str, pos: int) -> int:
        if key == "credentials":
            states.clear()  # a duplicate "credentials" replaces the first, as in json.loads
            members[key] = None
            return object_members(text, pos, state)
        members[key], end = DECODER.raw_decode(text, pos)
        return end

    end = skip_space(text, object_members(text, skip_space(text, 0), member))
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    if "credentials" not in members:
        raise KeyError("credentials")
    return members


# O_NOFOLLOW: a symlink put in place of the journal must not redirect the broker's writes.
_JOURNAL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNT:
        raise ValueError("a sequence number is out of range")
    return value


def _tighten(path: Path, mode: int, what: str) -> None:
    """Make ``path`` private (``mode``) if others can read it; refuse if that fails."""
    try:
        current = stat.S_IMODE(os.lstat(path).st_mode)
    except OSError as exc:
        raise StoreError(f"cannot stat {what} {path}: {exc.strerror}") from None
    if not current & 0o077:
        return
    try:
        os.chmod(path, mode, follow_symlinks=False)
    except OSError as exc:
        raise StoreError(
            f"{what} {path} is {current:04o} (readable by other users) and cannot be made "
            f"{mode:04o}: {exc.strerror}; run: chmod {mode:o} {path}"
        ) from None
    log.warning(
        "permissions tightened",
        extra={"path": str(path), "what": what, "was": f"{current:04o}", "now": f"{mode:04o}"},
    )



def persisted_problems(state_dir: Path, code: str) -> dict[str, tuple[str | None, Problem]]:
    """``name -> (fingerprint, problem coded code)`` from the daemon's persisted states.

    For ``credbroker check``, which runs without the daemon (a failing refresh is only known
    to it). The store's own reader, read-only: nothing is set aside or rewritten, and what
    cannot be read is simply not reported.
    """
    loaded = Store(state_dir, read_only=True).load()
    found: dict[str, tuple[str | None, Problem]] = {}
    for name, state in loaded.states.items():
        for problem in state.problems:
            if problem.code == code:
                found[name] = (state.fingerprint, problem)
    return found

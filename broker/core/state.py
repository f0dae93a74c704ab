"""The state document of SPEC section 3: what the broker says about one credential."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum, StrEnum
from typing import Any

from broker.core.timefmt import format_time, parse_time


class Status(StrEnum):
    """A credential's status, as published."""

    VALID = "valid"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    INVALID = "invalid"
    MISSING = "missing"


class Stage(IntEnum):
    """How far a generation has moved through its lifetime; it only moves forward."""

    VALID = 0
    EXPIRING = 1
    EXPIRED = 2

    @property
    def status(self) -> Status:
        return (Status.VALID, Status.EXPIRING, Status.EXPIRED)[self]


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with a credential, with the command or step that fixes it."""

    code: str
    message: str
    remedy: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "remedy": self.remedy}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        return cls(str(data["code"]), str(data["message"]), data.get("remedy"))


@dataclass(frozen=True, slots=True)
class FileInfo:
    """Metadata of one credential file; never its content."""

    role: str
    path: str
    present: bool
    size: int | None = None
    mtime: float | None = None
    mode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "path": self.path,
            "present": self.present,
            "size": self.size,
            "mtime": format_time(self.mtime),
            "mode": None if self.mode is None else f"{self.mode & 0o7777:04o}",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileInfo:
        mtime = data.get("mtime")
        mode = data.get("mode")
        return cls(
            role=str(data["role"]),
            path=str(data["path"]),
            present=bool(data["present"]),
            size=data.get("size"),
            mtime=None if mtime is None else parse_time(mtime),
            mode=None if mode is None else int(mode, 8),
        )


@dataclass(frozen=True, slots=True)
class Consumer:
    """A consuming service's report of the generation it uses (never the content).

    ``since`` is when it first reported this generation, ``seen`` when it last reported at
    all (for ``consumer_ttl``), ``via`` how it reports (``mqtt`` or ``http``). ``lagged``
    records that ``credentials.lagging`` was announced for this consumer and generation, so
    it is announced once; ``seen`` and ``lagged`` are not part of the document.
    """

    id: str
    generation: int
    fingerprint: str
    since: float
    via: str
    seen: float = field(default=0.0, compare=False)
    lagged: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "generation": self.generation,
            "fingerprint": self.fingerprint,
            "since": format_time(self.since),
            "via": self.via,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Consumer:
        since = parse_time(data["since"])
        return cls(
            id=str(data["id"]),
            generation=int(data["generation"]),
            fingerprint=str(data["fingerprint"]),
            since=since,
            via=str(data["via"]),
            seen=since,
        )


@dataclass(frozen=True, slots=True)
class State:
    """One credential's state document (HTTP body and the ``data`` of every event)."""

    credential: str
    status: Status
    generation: int = 0
    sequence: int = 0
    fingerprint: str | None = None
    expires_at: float | None = None
    expiring_at: float | None = None
    changed_at: float | None = None
    files: tuple[FileInfo, ...] = ()
    problems: tuple[Problem, ...] = ()
    reason: str = ""
    #: Who reported using which generation; filled in by the consumer tracker when the
    #: document is shown or published, never stored with the state.
    consumers: tuple[Consumer, ...] = field(default=(), compare=False)
    # Not part of the document: kept so the state machine can resume after a restart.
    issued_at: float | None = field(default=None, compare=False)
    stage: Stage = field(default=Stage.VALID, compare=False)

    def with_sequence(self, sequence: int) -> State:
        """This state numbered ``sequence`` (``dataclasses.replace(self, sequence=...)``).

        Every event is numbered so, once each: a field-by-field copy costs half of
        ``replace``, which validates its arguments and runs the frozen ``__init__``.
        """
        new = object.__new__(State)
        for name in _STATE_FIELDS:
            object.__setattr__(new, name, getattr(self, name))
        object.__setattr__(new, "sequence", sequence)
        return new

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready document of SPEC section 3."""
        return {
            "credential": self.credential,
            "status": self.status.value,
            "generation": self.generation,
            "sequence": self.sequence,
            "fingerprint": self.fingerprint,
            "expires_at": format_time(self.expires_at),
            "expiring_at": format_time(self.expiring_at),
            "changed_at": format_time(self.changed_at),
            "files": [f.to_dict() for f in self.files],
            "problems": [p.to_dict() for p in self.problems],
            "reason": self.reason,
            "consumers": [c.to_dict() for c in self.consumers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> State:
        """Parse a state document (as received from HTTP or MQTT)."""

        def when(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else parse_time(value)

        return cls(
            credential=str(data["credential"]),
            status=Status(data["status"]),
            generation=int(data["generation"]),
            sequence=int(data["sequence"]),
            fingerprint=data.get("fingerprint"),
            expires_at=when("expires_at"),
            expiring_at=when("expiring_at"),
            changed_at=when("changed_at"),
            files=tuple(FileInfo.from_dict(f) for f in data.get("files", ())),
            problems=tuple(Problem.from_dict(p) for p in data.get("problems", ())),
            reason=str(data.get("reason", "")),
            consumers=tuple(Consumer.from_dict(c) for c in data.get("consumers", ())),
        )


#: Every field of a state, for :meth:`State.with_sequence` (kept in step with the class).
_STATE_FIELDS = tuple(f.name for f in fields(State))

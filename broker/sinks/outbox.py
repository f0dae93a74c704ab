"""A webhook's persisted outbox: the events not yet delivered, surviving SIGKILL and restart.

One append-only file per webhook in ``state_dir`` (``outbox-<name>.jsonl``), a JSON record a
line: ``{"add": <CloudEvent>}`` when an event is queued, ``{"done": "<event id>"}`` once it
was delivered (or coalesced away), ``{"seen": {credential: sequence}}`` for the newest event
of each credential the webhook took in (queued or not its type). ``seen`` is what lets a
restart tell that the broker published something a SIGKILL kept from the outbox. Every
append is fsync'ed before it counts. Loading replays the file (a torn last line, from a
crash mid-write, is skipped); the file is rewritten atomically with only what is pending
once mostly ``done`` records.

The outbox is bounded: past ``limit`` events, older events of a credential that has a newer
one queued are dropped, so each credential's latest event is never lost. The ordering
unit is the credential: events of one credential leave in ``sequence`` order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from broker.aio.atomicfile import atomic_write
from broker.core.events import Event, encode

log = logging.getLogger("broker.outbox")

DEFAULT_LIMIT = 10_000


class Outbox:
    """Undelivered events of one webhook, per credential in ``sequence`` order.

    Not thread-safe: the owner calls it from one thread at a time (a worker thread, since
    every method that writes fsyncs).
    """

    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT) -> None:
        self.path = path
        self.limit = limit
        self._queues: dict[str, deque[Event]] = {}
        #: Per credential, the sequence of the newest event taken in.
        self.seen: dict[str, int] = {}
        #: Whether the file existed at load (a webhook that ran before).
        self.existed = False
        self._size = 0
        self._lines = 0
        #: Events dropped because the outbox was full (their credential had a newer one).
        self.coalesced = 0
        #: Problems met while loading (a corrupt line), for the log.
        self.problems: list[str] = []

    def __len__(self) -> int:
        return self._size

    def credentials(self) -> list[str]:
        """Credentials with events waiting."""
        return [name for name, q in self._queues.items() if q]

    def head(self, credential: str) -> Event | None:
        """The oldest undelivered event of ``credential``."""
        queue = self._queues.get(credential)
        return queue[0] if queue else None

    def events(self) -> Iterator[Event]:
        for queue in self._queues.values():
            yield from queue

    # -- persistence ----------------------------------------------------------------------

    def load(self) -> None:
        """Replay the file (missing = empty). Never raises for bad content."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problems.append(f"cannot read {self.path}: {exc.strerror or exc}")
            self.existed = True  # it did run: do not mistake this for a first start
            return
        self.existed = True
        added: dict[str, Event] = {}
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "add" in record:
                    event = Event.from_dict(record["add"])
                    added[event.id] = event
                    self._see(event.subject, event.sequence)
                elif "seen" in record:
                    for name, sequence in record["seen"].items():
                        self._see(str(name), int(sequence))
                else:
                    added.pop(str(record["done"]), None)
            except (ValueError, KeyError, TypeError, AttributeError):
                self.problems.append(f"{self.path} line {number} unreadable; skipped")
        for event in sorted(added.values(), key=lambda e: e.sequence):
            self._queues.setdefault(event.subject, deque()).append(event)
            self._size += 1
        self._lines = len(raw.splitlines())
        self._rewrite()

    def add(self, events: Iterable[Event], seen: Mapping[str, int] | None = None) -> None:
        """Queue ``events`` durably (one write and fsync for all of them).

        ``seen``: the newest sequence per credential taken in, queued or not.
        """
        lines: list[bytes] = []
        advanced = {n: q for n, q in (seen or {}).items() if q > self.seen.get(n, 0)}
        if advanced:
            for name, sequence in advanced.items():
                self._see(name, sequence)
            lines.append(encode({"seen": advanced}))
        for event in events:
            queue = self._queues.setdefault(event.subject, deque())
            if queue and queue[-1].sequence >= event.sequence:
                continue  # already queued (a replay of what was loaded)
            queue.append(event)
            self._size += 1
            self._see(event.subject, event.sequence)
            lines.append(encode({"add": event.to_dict()}))
        if len(self) > self.limit:
            lines.extend(self._coalesce())
        self._append(lines)

    def done(self, event_ids: Iterable[str]) -> None:
        """Mark events delivered (the heads of their credentials), durably."""
        gone = set(event_ids)
        lines: list[bytes] = []
        for name, queue in list(self._queues.items()):
            while queue and queue[0].id in gone:
                lines.append(encode({"done": queue.popleft().id}))
                self._size -= 1
            if not queue:
                del self._queues[name]
        self._append(lines)
        if self._lines > 1000 and self._lines > 4 * self._size:
            self._rewrite()

    def _see(self, name: str, sequence: int) -> None:
        if sequence > self.seen.get(name, 0):
            self.seen[name] = sequence

    def _coalesce(self) -> list[bytes]:
        """Drop the oldest events of credentials that have newer ones, down to ``limit``.

        Each credential's head (it may be in flight) and latest event stay.
        """
        lines: list[bytes] = []
        for queue in sorted(self._queues.values(), key=len, reverse=True):
            while len(queue) > 2 and self._size > self.limit:
                dropped = queue[1]
                del queue[1]
                self._size -= 1
                self.coalesced += 1
                lines.append(encode({"done": dropped.id}))
            if self._size <= self.limit:
                break
        return lines

    def _append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "ab") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))
            fh.flush()
            os.fdatasync(fh.fileno())
        self._lines += len(lines)

    def _rewrite(self) -> None:
        head = [encode({"seen": self.seen}) + b"\n"] if self.seen else []
        data = b"".join([*head, *(encode({"add": e.to_dict()}) + b"\n" for e in self.events())])
        try:
            atomic_write(self.path, data)
            self._lines = self._size + len(head)
        except OSError as exc:
            with contextlib.suppress(Exception):
                log.warning("outbox compaction failed", extra={"error": str(exc)})

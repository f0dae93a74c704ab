"""``consumers.json``: what the consumer tracker keeps across restarts, and what
``credbroker check`` (no daemon) reads of it.

Reports, the ``lagged`` marks and the generation last announced as converged, so a
restart neither forgets an HTTP consumer nor repeats an announcement. Read tolerantly:
anything unreadable is skipped (consumers report again).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from broker.core.convergence import forget_silent
from broker.core.events import encode
from broker.core.state import Consumer, State
from broker.engine.jsonmembers import DECODER, object_members, skip_space

__all__ = [
    "CONSUMERS_FILE",
    "Tracked",
    "encode_consumers",
    "load_consumers",
    "persisted_consumers",
]

log = logging.getLogger("broker.consumers")

CONSUMERS_FILE = "consumers.json"
FORMAT_VERSION = 1


@dataclass(slots=True)
class Tracked:
    """What the tracker knows of one credential's consumers."""

    consumers: dict[str, Consumer]
    converged: int = 0
    #: (generation, when it was refreshed), from the bus.
    refreshed: tuple[int, float] | None = None
    known: dict[int, str] | None = None


def encode_consumers(creds: Mapping[str, Tracked]) -> bytes:
    """The ``consumers.json`` document of what the tracker knows.

    Encoded a credential at a time and joined: the bytes are what encoding the whole
    document gives, without a dict per credential of all of them at once (at 10,000
    credentials that was a peak of every save).
    """
    parts = [encode({"version": FORMAT_VERSION})[:-1], b',"credentials":{']
    for index, (name, cred) in enumerate(creds.items()):
        entry = {
            "converged": cred.converged,
            "refreshed": list(cred.refreshed) if cred.refreshed else None,
            "known": {str(g): f for g, f in (cred.known or {}).items()},
            "consumers": [
                {**c.to_dict(), "seen": c.seen, "lagged": c.lagged}
                for c in cred.consumers.values()
            ],
        }
        parts.append((b"," if index else b"") + encode(name) + b":" + encode(entry))
    parts.append(b"}}")
    return b"".join(parts)


def load_consumers(path: Path) -> dict[str, Tracked]:
    """What ``consumers.json`` holds; anything unreadable is skipped (reports come again).

    Read a credential at a time (:mod:`.jsonmembers`): ``json.loads`` of the whole file
    held every entry's parsed dicts at once, 7.6 MB at a restart with 10,000 credentials.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        _not_loaded(path, exc)
        return {}
    try:
        return _read_document(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        _not_loaded(path, exc)
        return {}


def _not_loaded(path: Path, exc: BaseException) -> None:
    log.warning("consumer reports not loaded; consumers will report again",
                extra={"path": str(path), "error": type(exc).__name__})


def _read_document(text: str) -> dict[str, Tracked]:
    """The credentials of the ``consumers.json`` document ``text``, as ``json.loads`` of it
    would have given them (the last of duplicate keys wins); ``{}`` for another version."""
    start = skip_space(text, 0)
    if text[start : start + 1] != "{":
        json.loads(text)  # not JSON: the error; JSON but not an object: nothing to load
        return {}
    out: dict[str, Tracked] = {}
    version: list[Any] = [None]
    creds_object = [False]

    def entry(name: str, pos: int) -> int:
        document, end = DECODER.raw_decode(text, pos)
        tracked = _tracked(document)
        if tracked is None:
            out.pop(name, None)  # the last of duplicates wins, even when it is skipped
        else:
            out[name] = tracked
        return end

    def member(key: str, pos: int) -> int:
        if key == "credentials":
            out.clear()  # a duplicate "credentials" replaces the first, as in json.loads
            creds_object[0] = text[pos : pos + 1] == "{"
            if creds_object[0]:
                return object_members(text, pos, entry)
        value, end = DECODER.raw_decode(text, pos)
        if key == "version":
            version[0] = value
        return end

    end = skip_space(text, object_members(text, start, member))
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    if not creds_object[0] or version[0] != FORMAT_VERSION:
        return {}
    return out


def _tracked(entry: Any) -> Tracked | None:
    """One credential's entry, or ``None`` if it is not one."""
    try:
        consumers = {}
        for raw in entry["consumers"]:
            consumer = replace(
                Consumer.from_dict(raw), seen=float(raw["seen"]), lagged=bool(raw["lagged"])
            )
            consumers[consumer.id] = consumer
        refreshed = entry.get("refreshed")
        return Tracked(
            consumers,
            converged=int(entry.get("converged", 0)),
            refreshed=(int(refreshed[0]), float(refreshed[1])) if refreshed else None,
            known={int(g): str(f) for g, f in entry.get("known", {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None


def persisted_consumers(
    state_dir: Path, states: Iterable[State], specs: Mapping[str, Any], now: float
) -> list[State]:
    """``states`` with the consumers the daemon last persisted (``credbroker check``),
    less those silent for longer than their credential's ``consumer_ttl``."""
    known = load_consumers(state_dir / CONSUMERS_FILE)
    out = []
    for state in states:
        cred = known.get(state.credential)
        spec = specs.get(state.credential)
        if cred is None or spec is None:
            out.append(state)
            continue
        kept, _ = forget_silent(cred.consumers, spec.consumer_ttl, now)
        out.append(replace(state, consumers=tuple(kept[i] for i in sorted(kept))))
    return out

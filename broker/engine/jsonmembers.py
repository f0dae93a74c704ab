"""A JSON object read a member at a time: each value parsed by the caller as it is reached.

For the state files that hold an entry per credential (the snapshot, ``consumers.json``):
``json.loads`` of the whole document has every entry's parsed dict in memory at once beside
what is made of them, the peak of a restart at 10,000 credentials. Accepts what
``json.loads`` accepts, the same way (the last of duplicate keys wins, as the caller's
``member`` decides); raises ``json.JSONDecodeError`` for anything else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

__all__ = ["DECODER", "object_members", "skip_space"]

DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def object_members(text: str, pos: int, member: Callable[[str, int], int]) -> int:
    """Parse the JSON object at ``pos``: ``member(key, position of its value)`` parses each
    value and returns the position after it. Returns the position after the ``}``."""
    if text[pos : pos + 1] != "{":
        raise json.JSONDecodeError("Expecting an object", text, pos)
    pos = skip_space(text, pos + 1)
    if text[pos : pos + 1] == "}":
        return pos + 1
    while True:
        if text[pos : pos + 1] != '"':
            raise json.JSONDecodeError("Expecting a property name", text, pos)
        key, pos = DECODER.raw_decode(text, pos)  # a string: it starts with '"'
        pos = skip_space(text, pos)
        if text[pos : pos + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = skip_space(text, member(key, skip_space(text, pos + 1)))
        if text[pos : pos + 1] == "}":
            return pos + 1
        if text[pos : pos + 1] != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = skip_space(text, pos + 1)


def skip_space(text: str, pos: int) -> int:
    """The position of the first character at or after ``pos`` that is not JSON whitespace."""
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()

"""Redaction of secrets from text a program printed (pure: no clock, no I/O).

A :class:`Redactor` is built from the secret values in play (the credential's files before
and after a command, the command's stdout) and blanks, in any text, whatever could reveal
them:

- every run of :data:`MIN_RUN` or more characters that is a substring of a secret: a token
  prefix a CLI echoed, either half of a line-wrapped token, one part of a JWT;
- the same case-insensitively, and for the URL-encoded (``%2B``), base64 (standard and
  URL-safe, at every byte alignment, so a piece of a secret encoded on its own is caught)
  and JSON-escaped (``\\u00e9``, ``\\/``) forms of every secret;
- every field value of a structured secret (JSON strings and numbers, INI values) whatever
  its length, and every whole unstructured secret of :data:`MIN_VALUE`+ characters, as a
  whole word: a 7-character password in an INI file is as secret as a long one. (The runs
  of a structured secret are taken from its values, so its keys stay readable.)

Substring runs are found with an index of every :data:`MIN_RUN`-gram of every form of every
secret: one set lookup per position of the text, so the cost is linear in the text and in
the secrets, never their product. Matches are found on the original text and overlapping or
touching matches merge into one marker, so no replacement can create or expose another match.
"""

from __future__ import annotations

import base64
import configparser
import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_RUN", "MIN_VALUE", "REDACTED", "Redactor"]

REDACTED = "[redacted]"
#: Runs of a secret this long or longer are redacted wherever they appear.
MIN_RUN = 8
#: A whole unstructured secret shorter than this is not redacted on its own (a one-character
#: file would otherwise blank every such word; such a value is no secret anyway). Field
#: values of structured secrets are redacted whatever their length.
MIN_VALUE = 4
#: How deep a JSON secret is walked for field values (the broker's own files are shallow).
_MAX_DEPTH = 64
# Both base64 alphabets (and URL-safe text) compare alike: '-' and '_' read as '+' and '/'.
_FOLD = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_", b"abcdefghijklmnopqrstuvwxyz+/"
)
_WORD = rb"A-Za-z0-9"


def _fold(data: bytes) -> bytes:
    """The comparison form: ASCII lower-case, URL-safe base64 as standard."""
    return data.translate(_FOLD)


def _encoded_forms(secret: bytes) -> Iterator[bytes]:
    """``secret`` as it may appear when a program prints it encoded."""
    yield secret
    yield urllib.parse.quote(secret, safe="").encode()
    yield urllib.parse.quote_plus(secret, safe="").encode()
    text = secret.decode("utf-8", "replace")
    yield json.dumps(text)[1:-1].encode()
    yield json.dumps(text, ensure_ascii=False)[1:-1].encode()
    yield json.dumps(text).replace("/", "\\/")[1:-1].encode()
    # A piece of the secret base64-encoded on its own starts at some byte offset: one of
    # these three encodings holds it, group-aligned, as a substring (all but its last group).
    for offset in range(3):
        yield base64.b64encode(secret[offset:]).rstrip(b"=")


def _field_values(secret: bytes) -> Iterator[bytes]:
    """The field values of ``secret`` read as JSON or INI (nothing when it is neither)."""
    text = secret.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        pass
    else:
        # Only an object or an array is structured: a token that happens to be a JSON
        # scalar ("Infinity", "12345678") is redacted as text, whole.
        if isinstance(doc, (dict, list)):
            yield from _json_strings(doc, 0)
        return
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(text)
    except (configparser.Error, ValueError, RecursionError):
        return
    for section in parser.sections():
        for _key, value in parser.items(section, raw=True):
            yield value.strip().encode()
    for value in parser.defaults().values():
        yield value.strip().encode()


def _json_strings(doc: Any, depth: int) -> Iterator[bytes]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(doc, str):
        yield doc.encode()
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield str(doc).encode()
    elif isinstance(doc, dict):
        for value in doc.values():
            yield from _json_strings(value, depth + 1)
    elif isinstance(doc, list):
        for value in doc:
            yield from _json_strings(value, depth + 1)


def _whole_word(value: bytes) -> bytes:
    # An alphanumeric edge must not touch another alphanumeric character, so a short value
    # ("eu") blanks the word "eu", not every "eu" inside other words.
    head = rf"(?<![{_WORD.decode()}])".encode() if value[:1].isalnum() else b""
    tail = rf"(?![{_WORD.decode()}])".encode() if value[-1:].isalnum() else b""
    return head + re.escape(value) + tail


@dataclass(frozen=True, slots=True)
class Redactor:
    """What to blank for a set of secrets; build it with :meth:`of`, apply :meth:`redact`."""

    grams: frozenset[bytes]
    words: re.Pattern[bytes] | None

    @classmethod
    def of(cls, secrets: Iterable[bytes]) -> Redactor:
        """A redactor for these secret values (empty values are ignored)."""
        grams: set[bytes] = set()
        short: set[bytes] = set()
        for secret in secrets:
            values = [v for v in _field_values(secret) if v]
            # A structured file's secrets are its values: its keys ("password") and
            # punctuation stay readable in the text. One with no value at all (a token that
            # happens to read as INI: "[abc]\nkey:") is nothing but keys, so it is text.
            for value in values or [secret]:
                # Most forms of a plain token are the token itself: slice each form once.
                for folded in {_fold(form) for form in _encoded_forms(value)}:
                    grams.update(folded[i : i + MIN_RUN] for i in range(len(folded) - MIN_RUN + 1))
            whole = secret.strip()
            if not values and len(whole) >= MIN_VALUE:
                values.append(whole)
            for value in values:
                if 0 < len(value) < MIN_RUN:
                    short.update(v for v in _encoded_forms(value) if 0 < len(v) < MIN_RUN)
                    short.add(value)
        words = None
        if short:
            # Longest first, so that a value that extends another is blanked whole.
            alternatives = sorted(short, key=len, reverse=True)
            words = re.compile(b"|".join(_whole_word(v) for v in alternatives), re.IGNORECASE)
        return cls(frozenset(grams), words)

    def redact(self, data: bytes) -> bytes:
        """``data`` with every revealing run replaced by ``[redacted]``."""
        spans = list(self._spans(data))
        if not spans:
            return data
        spans.sort()
        out = bytearray()
        pos = 0
        cur_start, cur_end = spans[0]
        for start, end in spans[1:]:
            if start <= cur_end:
                cur_end = max(cur_end, end)
                continue
            out += data[pos:cur_start] + REDACTED.encode()
            pos = cur_end
            cur_start, cur_end = start, end
        out += data[pos:cur_start] + REDACTED.encode()
        out += data[cur_end:]
        return bytes(out)

    def _spans(self, data: bytes) -> Iterator[tuple[int, int]]:
        if self.grams:
            folded = _fold(data)
            grams = self.grams
            run_start = -1
            run_end = -1
            for i in range(len(folded) - MIN_RUN + 1):
                if folded[i : i + MIN_RUN] in grams:
                    if i > run_end:
                        if run_start >= 0:
                            yield run_start, run_end
                        run_start = i
                    run_end = i + MIN_RUN
            if run_start >= 0:
                yield run_start, run_end
        if self.words is not None:
            for match in self.words.finditer(data):
                if match.end() > match.start():
                    yield match.start(), match.end()

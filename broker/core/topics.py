"""MQTT topic rules (SPEC section 4): which strings an MQTT server takes, and how every topic
the broker publishes or subscribes to is built.

Pure: the config checks ``topic_prefix``, ``client_id`` and ``username`` with these rules, the
publisher builds its topics with them, and the consumer client its subscription filters, so
none of them needs to import another's module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MAX_TOPIC_BYTES", "Topics", "join_topic", "mqtt_text_problem"]

#: MQTT's limit on a topic (a UTF-8 string with a 16-bit length).
MAX_TOPIC_BYTES = 65535


def mqtt_text_problem(text: str) -> str | None:
    """Why an MQTT server would refuse ``text`` in a topic, client id or user name, or None.

    MQTT strings must not hold NUL, control characters (C0, DEL, C1) or Unicode
    non-characters; mosquitto drops the connection of a client that sends one, so a topic
    with one would never be delivered. Checked in config (``topic_prefix``, ``client_id``,
    ``username``) and again for every topic built here.
    """
    for char in text:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"control character U+{code:04X}"
        if 0xD800 <= code <= 0xDFFF:
            return f"surrogate U+{code:04X}"
        if 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE:
            return f"Unicode non-character U+{code:04X}"
    return None


#: What no topic segment may hold: a level separator, a wildcard, NUL.
_FORBIDDEN = frozenset("/+#\0")


def _check_segment(segment: str, *, wildcard: bool = False) -> str:
    if wildcard and segment == "+":
        return segment
    # The common case at C speed: printable ASCII holds no control character, surrogate or
    # non-character, so only the separators are left to look for.
    if segment and segment.isascii() and segment.isprintable() and _FORBIDDEN.isdisjoint(segment):
        return segment
    if not segment or any(c in segment for c in "/+#\0"):
        raise ValueError(f"invalid MQTT topic segment {segment!r}")
    problem = mqtt_text_problem(segment)
    if problem is not None:
        raise ValueError(f"invalid MQTT topic segment {segment!r}: {problem}")
    return segment


# No cache: at 10,000 credentials there are more distinct topics than any cache worth its
# memory holds (an LRU of 16,384 missed on every publish of a rotation), and the ASCII fast
# path of _check_segment makes building one cheaper than a cache miss was.
def join_topic(prefix: str, *segments: str, wildcards: bool = False) -> str:
    """``prefix/seg/seg``, refusing anything that could widen or split the topic.

    Every topic the broker publishes is built here, so a name can never inject a wildcard
    (``+``, ``#``), a NUL or an extra level (``/``). With ``wildcards=True`` (subscription
    filters of the client), a segment may be exactly ``+``.
    """
    if not prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"invalid MQTT topic prefix {prefix!r}")
    for level in prefix.split("/"):
        _check_segment(level)
    return _extend(prefix, segments, wildcards=wildcards)


def _extend(base: str, segments: tuple[str, ...], *, wildcards: bool = False) -> str:
    """``base/seg/seg`` for a ``base`` already checked."""
    topic = "/".join([base, *(_check_segment(s, wildcard=wildcards) for s in segments)])
    if len(topic) * 4 > MAX_TOPIC_BYTES and len(topic.encode()) > MAX_TOPIC_BYTES:
        raise ValueError("MQTT topic too long")
    return topic


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one broker (``host_id``) under ``prefix``."""

    prefix: str
    host_id: str
    #: ``prefix/host_id``, checked once, up front: every topic of this broker starts so.
    _base: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_base", join_topic(self.prefix, self.host_id))

    @property
    def status(self) -> str:
        """``online`` / ``offline`` (retained; ``offline`` is also the Last Will)."""
        return _extend(self._base, ("status",))

    def state(self, credential: str) -> str:
        """The credential's latest event, retained."""
        return _extend(self._base, ("state", credential))

    def event(self, credential: str, event_type: str) -> str:
        """Every event of the credential of that type (not retained)."""
        return _extend(self._base, ("events", credential, event_type))

"""MQTT topic rules (SPEC section 4): which strings an MQTT server takes, and how every topic
the broker publishes or subscribes to is built.

Pure: the config checks ``topic_prefix``, ``client_id`` and ``username`` with these rules, the
publisher builds its topics with them, and the consumer client its subscription filters, so
none of them needs to import another's module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


def _check_segment(segment: str, *, wildcard: bool = False) -> str:
    if wildcard and segment == "+":
        return segment
    if not segment or any(c in segment for c in "/+#\0"):
        raise ValueError(f"invalid MQTT topic segment {segment!r}")
    problem = mqtt_text_problem(segment)
    if problem is not None:
        raise ValueError(f"invalid MQTT topic segment {segment!r}: {problem}")
    return segment


# Topics repeat (one per credential and event type) and checking one walks every character:
# a burst of 10,000 events spent half a second here before the cache. Bounded, so a flood
# of distinct names cannot grow it.
@functools.lru_cache(maxsize=16384)
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
    topic = "/".join([prefix, *(_check_segment(s, wildcard=wildcards) for s in segments)])
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise ValueError("MQTT topic too long")
    return topic


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one broker (``host_id``) under ``prefix``."""

    prefix: str
    host_id: str

    def __post_init__(self) -> None:
        join_topic(self.prefix, self.host_id)  # validate once, up front

    @property
    def status(self) -> str:
        """``online`` / ``offline`` (retained; ``offline`` is also the Last Will)."""
        return join_topic(self.prefix, self.host_id, "status")

    def state(self, credential: str) -> str:
        """The credential's latest event, retained."""
        return join_topic(self.prefix, self.host_id, "state", credential)

    def event(self, credential: str, event_type: str) -> str:
        """Every event of the credential of that type (not retained)."""
        return join_topic(self.prefix, self.host_id, "events", credential, event_type)

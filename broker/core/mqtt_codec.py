"""The MQTT packets the publisher sends and receives, as bytes (MQTT 5 and 3.1.1).

Pure: no sockets, no clock. The publisher's link (:mod:`broker.aio.mqtt_link`) writes what
these functions encode and feeds what it reads to :class:`PacketReader`. Only what a
publisher needs is here: CONNECT (with a Will, user name and password), CONNACK, QoS 1
PUBLISH, PUBACK, PINGREQ/PINGRESP and DISCONNECT.

Why our own codec rather than paho's: paho reads a packet with three ``recv`` calls and
builds a ``Properties`` and two ``ReasonCode`` objects for every PUBACK, and re-encodes the
topic and properties of every PUBLISH; at 10,000 credentials (20,000 publishes a rotation)
that was most of the daemon's CPU (``python -m benchmarks.mqtt_clients``). Here a PUBLISH is
one ``bytes`` join and a PUBACK four bytes sliced from a buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "CONNACK",
    "DISCONNECT",
    "DISCONNECT_PACKET",
    "PINGREQ_PACKET",
    "PINGRESP",
    "PUBACK",
    "V5",
    "V311",
    "Connack",
    "MessageProperties",
    "PacketReader",
    "ProtocolError",
    "connect_packet",
    "decode_connack",
    "decode_disconnect",
    "decode_puback",
    "publish_packet",
    "topic_field",
]

#: Protocol levels (the byte in CONNECT).
V311: Final = 4
V5: Final = 5

# Packet types (the high nibble of the first byte).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

PINGREQ_PACKET: Final = b"\xc0\x00"

#: The largest remaining length MQTT can express (four length bytes).
MAX_REMAINING: Final = 268_435_455

# MQTT 5 property identifiers used here.
_PAYLOAD_FORMAT = 0x01
_CONTENT_TYPE = 0x03
_SERVER_KEEP_ALIVE = 0x13
_REASON_STRING = 0x1F
_RECEIVE_MAXIMUM = 0x21
_MAXIMUM_QOS = 0x24
_RETAIN_AVAILABLE = 0x25
_MAXIMUM_PACKET_SIZE = 0x27

# How each MQTT 5 property's value is encoded, to skip the ones we do not use.
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_KINDS: Final = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _STRING, 0x13: _TWO, 0x15: _STRING, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _STRING, 0x1C: _STRING, 0x1F: _STRING, 0x21: _TWO,
    0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ProtocolError(ValueError):
    """The server sent something that is not MQTT (or not what a publisher can receive)."""


def varint(value: int) -> bytes:
    """MQTT's variable byte integer (remaining lengths, property lengths)."""
    if value < 0x80:
        return bytes((value,))
    if value > MAX_REMAINING:
        raise ValueError(f"{value} is too large for an MQTT length")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text: str) -> bytes:
    return _binary(text.encode())


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string or binary field holds at most 65,535 bytes")
    return _U16.pack(len(data)) + data


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """The MQTT 5 properties of a PUBLISH or a Will, encoded once (property length included).

    Every publish of a connection carries the same ones, so they are packed at construction.
    """

    content_type: str | None = None
    #: Payload Format Indicator 1: the payload is UTF-8 text.
    utf8: bool = False
    packed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        body = b""
        if self.utf8:
            body += bytes((_PAYLOAD_FORMAT, 1))
        if self.content_type is not None:
            body += bytes((_CONTENT_TYPE,)) + _string(self.content_type)
        object.__setattr__(self, "packed", varint(len(body)) + body)


_NO_PROPERTIES: Final = b"\x00"


def connect_packet(
    *,
    protocol: int,
    client_id: str,
    keepalive: int,
    clean: bool = True,
    username: str | None = None,
    password: str | None = None,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_qos: int = 1,
    will_retain: bool = True,
    will_properties: MessageProperties | None = None,
) -> bytes:
    """CONNECT. A password is sent only with a user name (3.1.1 allows nothing else)."""
    if protocol not in (V311, V5):
        raise ValueError(f"unsupported MQTT protocol level {protocol}")
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError("keepalive must fit in 16 bits")
    flags = 0x02 if clean else 0
    payload = _string(client_id)
    if will_topic is not None:
        flags |= 0x04 | (will_qos & 3) << 3 | (0x20 if will_retain else 0)
        if protocol == V5:
            payload += will_properties.packed if will_properties else _NO_PROPERTIES
        payload += _string(will_topic) + _binary(will_payload)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _binary(password.encode())
    variable = _string("MQTT") + bytes((protocol, flags)) + _U16.pack(keepalive)
    if protocol == V5:
        variable += _NO_PROPERTIES
    body = variable + payload
    return bytes((CONNECT << 4,)) + varint(len(body)) + body


def publish_packet(
    topic: bytes, mid: int, payload: bytes, retain: bool, properties: bytes | None
) -> bytes:
    """A QoS 1 PUBLISH. ``topic`` is the length-prefixed UTF-8 topic (see :func:`topic_field`);
    ``properties`` the packed MQTT 5 properties (``MessageProperties.packed``), ``None`` for
    3.1.1."""
    head = topic + _U16.pack(mid)
    if properties is not None:
        head += properties
    remaining = len(head) + len(payload)
    return b"".join((b"\x33" if retain else b"\x32", varint(remaining), head, payload))


def topic_field(topic: str) -> bytes:
    """A topic as it goes on the wire: its UTF-8 length, then the bytes."""
    return _string(topic)


#: DISCONNECT, normal: the server discards the Will (in MQTT 5 no reason code means 0x00).
DISCONNECT_PACKET: Final = b"\xe0\x00"


@dataclass(frozen=True, slots=True)
class Connack:
    """What the server said to our CONNECT."""

    #: 0 = accepted; MQTT 5 reason codes >= 0x80 or 3.1.1 return codes 1-5 = refused.
    code: int
    session_present: bool = False
    #: How many QoS 1 publishes may be unacknowledged at once (MQTT 5; ``None``: no limit).
    receive_maximum: int | None = None
    #: Keepalive the server imposes instead of ours (MQTT 5).
    server_keep_alive: int | None = None
    maximum_packet_size: int | None = None
    maximum_qos: int | None = None
    retain_available: bool | None = None
    reason_string: str | None = None

    @property
    def accepted(self) -> bool:
        return self.code == 0


def decode_connack(body: bytes, protocol: int) -> Connack:
    """CONNACK's variable header and (MQTT 5) properties."""
    if len(body) < 2:
        raise ProtocolError("CONNACK too short")
    session_present, code = bool(body[0] & 1), body[1]
    if protocol != V5 or len(body) == 2:
        return Connack(code, session_present)
    props = dict(_properties(body, 2))
    return Connack(
        code,
        session_present,
        receive_maximum=_int_or_none(props.get(_RECEIVE_MAXIMUM)),
        server_keep_alive=_int_or_none(props.get(_SERVER_KEEP_ALIVE)),
        maximum_packet_size=_int_or_none(props.get(_MAXIMUM_PACKET_SIZE)),
        maximum_qos=_int_or_none(props.get(_MAXIMUM_QOS)),
        retain_available=(
            None if _RETAIN_AVAILABLE not in props else bool(props[_RETAIN_AVAILABLE])
        ),
        reason_string=_str_or_none(props.get(_REASON_STRING)),
    )


def decode_puback(body: bytes) -> tuple[int, int]:
    """PUBACK -> (packet id, reason code); a 2-byte PUBACK is a success (0)."""
    if len(body) < 2:
        raise ProtocolError("PUBACK too short")
    mid = body[0] << 8 | body[1]
    return mid, body[2] if len(body) > 2 else 0


def decode_disconnect(body: bytes) -> tuple[int, str | None]:
    """A server's DISCONNECT (MQTT 5) -> (reason code, reason string)."""
    if not body:
        return 0, None
    code = body[0]
    if len(body) == 1:
        return code, None
    return code, _str_or_none(dict(_properties(body, 1)).get(_REASON_STRING))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _properties(body: bytes, offset: int) -> Iterator[tuple[int, object]]:
    """The (identifier, value) pairs of a property block starting at ``offset``."""
    length, offset = _read_varint(body, offset)
    end = offset + length
    if end > len(body):
        raise ProtocolError("properties run past the packet")
    while offset < end:
        ident = body[offset]
        offset += 1
        kind = _PROPERTY_KINDS.get(ident)
        if kind is None:
            raise ProtocolError(f"unknown MQTT property 0x{ident:02x}")
        value: object
        if kind == _BYTE:
            value, offset = body[offset], offset + 1
        elif kind == _TWO:
            (value,), offset = _U16.unpack_from(body, offset), offset + 2
        elif kind == _FOUR:
            (value,), offset = _U32.unpack_from(body, offset), offset + 4
        elif kind == _VARINT:
            value, offset = _read_varint(body, offset)
        elif kind == _PAIR:
            _key, offset = _read_field(body, offset)
            raw, offset = _read_field(body, offset)
            value = raw.decode("utf-8", "replace")
        else:
            raw, offset = _read_field(body, offset)
            value = raw.decode("utf-8", "replace") if kind == _STRING else raw
        if offset > end:
            raise ProtocolError("a property runs past the packet")
        yield ident, value


def _read_field(body: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 2 > len(body):
        raise ProtocolError("a field runs past the packet")
    (length,) = _U16.unpack_from(body, offset)
    start = offset + 2
    if start + length > len(body):
        raise ProtocolError("a field runs past the packet")
    return body[start : start + length], start + length


def _read_varint(data: bytes | bytearray, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(4):
        if offset + i >= len(data):
            raise ProtocolError("a length runs past the packet")
        byte = data[offset + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset + i + 1
        shift += 7
    raise ProtocolError("a length longer than four bytes")


class PacketReader:
    """Splits a byte stream into packets: feed it what the socket gave, take whole packets.

    ``max_size`` bounds one packet, so a hostile server cannot make us buffer without end.
    """

    __slots__ = ("_buffer", "max_size")

    def __init__(self, max_size: int = 1 << 20) -> None:
        self._buffer = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Append ``data``; return every whole packet now buffered as (type, flags, body)."""
        buffer = self._buffer
        buffer += data
        packets: list[tuple[int, int, bytes]] = []
        offset, size = 0, len(buffer)
        while offset + 2 <= size:
            first = buffer[offset]
            second = buffer[offset + 1]
            if second < 0x80:  # the common case: a one-byte length
                remaining, start = second, offset + 2
            else:
                try:
                    remaining, start = _read_varint(buffer, offset + 1)
                except ProtocolError:
                    if size - offset - 1 >= 4:
                        raise
                    break  # the length itself is not all here yet
            if remaining > self.max_size:
                raise ProtocolError(f"a packet of {remaining} bytes is larger than allowed")
            end = start + remaining
            if end > size:
                break
            packets.append((first >> 4, first & 0x0F, bytes(buffer[start:end])))
            offset = end
        if offset:
            del buffer[:offset]
        return packets

"""What the publisher puts on the wire besides events: the ``online``/``offline`` status
payloads, the Last Will, and the MQTT 5 properties of its publishes.

The connect material shared with the consumer client (password, TLS, protocol versions, the
classification of connect errors) is :mod:`broker.aio.mqtt_material`.
"""

from __future__ import annotations

from aiomqtt import ProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.aio.mqtt_link import WillMessage

__all__ = [
    "OFFLINE",
    "ONLINE",
    "STATUS_CONTENT_TYPE",
    "publish_properties",
    "will",
]

ONLINE = b"online"
OFFLINE = b"offline"
STATUS_CONTENT_TYPE = "text/plain; charset=utf-8"


class _PackedOnce(Properties):
    """Properties that encode themselves once: every publish carries the same ones, and
    paho would otherwise encode them anew each time (a sixth of its cost per publish)."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()  # type: ignore[no-untyped-call]
            self.__dict__["_packed"] = packed  # past Properties.__setattr__, which checks names
        return packed


def publish_properties(protocol: ProtocolVersion, content_type: str) -> Properties | None:
    """MQTT 5 publish properties carrying ``content_type``; ``None`` for 3.1.1.

    Set up once per connection and never changed: they are encoded at the first publish.
    """
    if protocol != ProtocolVersion.V5:
        return None
    props = _PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = content_type
    # Every payload we publish is UTF-8 text (JSON or ``online``/``offline``): saying so
    # lets MQTT 5 consumers and bridges treat it as text without sniffing.
    props.PayloadFormatIndicator = 1
    return props


def will(status_topic: str, protocol: ProtocolVersion) -> WillMessage:
    """The Last Will: a retained ``offline`` on the status topic, published by the server
    when the connection dies without a DISCONNECT."""
    props = None
    if protocol == ProtocolVersion.V5:
        props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
        props.ContentType = STATUS_CONTENT_TYPE
        props.PayloadFormatIndicator = 1
    return WillMessage(status_topic, OFFLINE, props)

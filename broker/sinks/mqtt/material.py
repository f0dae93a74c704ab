"""What the publisher puts on the wire besides events: the ``online``/``offline`` status
payloads, the Last Will, and the MQTT 5 properties of its publishes.

The connect material shared with the consumer client (password, TLS, protocol versions, the
classification of connect errors) is :mod:`broker.aio.mqtt_material`.
"""

from __future__ import annotations

from aiomqtt import ProtocolVersion

from broker.aio.mqtt_link import WillMessage
from broker.core.mqtt_codec import MessageProperties

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


def publish_properties(protocol: ProtocolVersion, content_type: str) -> MessageProperties | None:
    """MQTT 5 publish properties carrying ``content_type``; ``None`` for 3.1.1.

    Encoded once (every publish of a connection carries the same ones). Every payload we
    publish is UTF-8 text (JSON or ``online``/``offline``): saying so lets MQTT 5 consumers
    and bridges treat it as text without sniffing.
    """
    if protocol != ProtocolVersion.V5:
        return None
    return MessageProperties(content_type=content_type, utf8=True)


def will(status_topic: str, protocol: ProtocolVersion) -> WillMessage:
    """The Last Will: a retained ``offline`` on the status topic, published by the server
    when the connection dies without a DISCONNECT."""
    props = None
    if protocol == ProtocolVersion.V5:
        props = MessageProperties(content_type=STATUS_CONTENT_TYPE, utf8=True)
    return WillMessage(status_topic, OFFLINE, props)

"""MQTT delivery (SPEC section 4): retained state, online/offline status, QoS 1 events.

Topics, under ``<prefix>/<host_id>`` (:class:`~broker.core.topics.Topics`):

- ``status``: ``online`` (retained, after every connect) / ``offline`` (retained: the Last Will,
  and published explicitly before a clean disconnect);
- ``state/<credential>``: the latest event of the credential (retained, QoS 1);
- ``events/<credential>/<type>``: every event (QoS 1, not retained).

The modules: :mod:`.publisher` (the sink, :class:`MqttPublisher`), :mod:`.connection`
(getting connected, retried with backoff), :mod:`.outbox` (what waits
for the server, and the window of publishes in flight), :mod:`.retained` (what the retained
state topics hold), :mod:`.material` (status payloads, the Will, publish properties). What the
consumer client shares with the publisher lives below the sinks: topic rules in
:mod:`broker.core.topics`, connect material and error classification in
:mod:`broker.aio.mqtt_material`, the connect-with-fallback in :mod:`broker.aio.mqtt_link`.
"""

from __future__ import annotations

# Re-exported from where they live (broker.core, broker.aio) for code written against the
# single module this package was; new code imports them from their homes.
from broker.aio.mqtt_link import close_client
from broker.aio.mqtt_material import (
    CONNECT_TIMEOUT,
    PROTOCOLS,
    connect_material,
    describe_connect_error,
    is_auth_refusal,
    is_protocol_refusal,
    protocol_name,
    read_password_file,
    tls_context,
)
from broker.core.backoff import BACKOFF_CAP, BACKOFF_INITIAL, Backoff
from broker.core.topics import Topics, join_topic, mqtt_text_problem

from .connection import Connector
from .material import publish_properties
from .outbox import Outbox, Pipeline
from .publisher import FLUSH_TIMEOUT, SHUTDOWN_TIMEOUT, WINDOW, MqttPublisher
from .retained import RetainedStates

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_INITIAL",
    "CONNECT_TIMEOUT",
    "FLUSH_TIMEOUT",
    "PROTOCOLS",
    "SHUTDOWN_TIMEOUT",
    "WINDOW",
    "Backoff",
    "Connector",
    "MqttPublisher",
    "Outbox",
    "Pipeline",
    "RetainedStates",
    "Topics",
    "close_client",
    "connect_material",
    "describe_connect_error",
    "is_auth_refusal",
    "is_protocol_refusal",
    "join_topic",
    "mqtt_text_problem",
    "protocol_name",
    "publish_properties",
    "read_password_file",
    "tls_context",
]

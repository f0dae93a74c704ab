"""The MQTT transport: retained state topics first, then the event topics.

Imported only when a :class:`~broker.client.BrokerClient` is given an ``mqtt://`` or
``mqtts://`` URL, so a service on the HTTP API never loads an MQTT library. A gap (a hole in
the broker-wide sequence, or in a credential's generation) re-subscribes to the retained state
topics, which makes the server send every credential's latest state again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
from aiomqtt import Client, Message, MqttError, ProtocolVersion, Will

from broker.aio.mqtt_link import ProtocolFallback, close_client, open_client
from broker.aio.mqtt_material import (
    PROTOCOLS,
    connect_material,
    describe_connect_error,
    is_auth_refusal,
)
from broker.core.errors import BrokerError
from broker.core.events import Event
from broker.core.timefmt import parse_time
from broker.core.topics import join_topic
from broker.core.urls import MQTT_SCHEMES, split_url

from .origin import SOURCE_PREFIX
from .reports import report_document

if TYPE_CHECKING:
    from .owner import TransportOwner

__all__ = ["MqttReporter", "MqttTransport"]

log = logging.getLogger("broker.client")


def split_mqtt_url(url: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of an ``mqtt://`` / ``mqtts://`` URL (``ValueError`` if unusable)."""
    parts = split_url(url, MQTT_SCHEMES, "mqtt://host[:port] or mqtts://host[:port]",
                      credentials_hint="pass username/password_file")
    return parts.host, parts.port, parts.scheme == "mqtts"


class MqttTransport:
    """Follow one broker's (``host_id``) or a fleet's (``host_id="+"``) topics."""

    def __init__(
        self,
        url: str,
        *,
        host_id: str,
        prefix: str,
        credential: str | None,
        username: str | None,
        password: str | None,
        password_file: str | Path | None,
        ca_file: str | Path | None,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        client_id: str | None,
        keepalive: int,
        max_payload: int,
        protocols: Sequence[ProtocolVersion] | None,
    ) -> None:
        self._host, self._port, self._tls = split_mqtt_url(url)
        if password is not None and password_file is not None:
            raise ValueError("pass password or password_file, not both")
        self._fallback = ProtocolFallback(PROTOCOLS if protocols is None else protocols)
        self.description = f"{self._host}:{self._port}"
        self.prefix = prefix
        self._credential = credential
        # Validated here, so a bad name fails at construction rather than at subscribe.
        self._filters = (
            join_topic(prefix, host_id, "state", credential or "+", wildcards=True),
            join_topic(prefix, host_id, "status", wildcards=True),
            join_topic(prefix, host_id, "events", credential or "+", "+", wildcards=True),
        )
        self._username = username
        self._password = password
        self._password_file = password_file
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self._client_id = client_id
        self._keepalive = keepalive
        self._max_payload = max_payload
        #: Re-subscriptions to the retained state after a gap.
        self.rereads = 0

    def reporter(self, credential: str, consumer_id: str, host: str) -> MqttReporter:
        return MqttReporter(self, join_topic(self.prefix, host, "consumers", credential,
                                             consumer_id), credential, consumer_id)

    async def connect(self, *, will: Will | None = None, client_id: str | None = None) -> Client:
        """A connected client, trying each protocol in turn (MQTT 5, then 3.1.1).

        Not retried here: the client's connection loop backs off, whatever the transport.
        """
        try:
            return await self._fallback.connect(partial(self._connect, will, client_id))
        except (MqttError, OSError) as exc:
            raise ConnectFailed(describe_connect_error(exc), is_auth_refusal(exc)) from None

    async def _connect(
        self, will: Will | None, client_id: str | None, protocol: ProtocolVersion
    ) -> Client:
        from_file, context = await connect_material(
            self._password_file, self._tls, self._ca_file, self._cert_file, self._key_file
        )
        return await open_client(
            self._host,
            self._port,
            protocol=protocol,
            username=self._username,
            password=self._password if from_file is None else from_file,
            tls_context=context,
            client_id=client_id,
            keepalive=self._keepalive,
            will=will,
            logger=logging.getLogger("broker.client.paho"),
        )

    async def session(self, client: TransportOwner) -> None:
        mqtt = await self.connect(client_id=self._client_id)
        try:
            # State first: the server sends a filter's retained messages right after its
            # SUBACK, so subscribing to the state topics before the events puts it first.
            for topic in self._filters:
                await mqtt.subscribe(topic, qos=1)
            client.connected_now()
            log.info(
                "broker client connected",
                extra={"server": self.description,
                       "protocol": self._fallback.name,
                       "filters": ",".join(self._filters)},
            )
            async for message in mqtt.messages:
                self._on_message(client, message)
                if client.take_resync():
                    self.rereads += 1
                    # Subscribing again to the same filter makes the server send its
                    # retained messages again (MQTT 3.1.1 3.8.4, MQTT 5 retain handling 0).
                    await mqtt.subscribe(self._filters[0], qos=1)
        finally:
            await close_client(mqtt)

    def _on_message(self, client: TransportOwner, message: Message) -> None:
        topic = message.topic.value
        payload = message.payload
        rest = topic[len(self.prefix) + 1:] if topic.startswith(self.prefix + "/") else ""
        parts = rest.split("/")
        if len(parts) == 2 and parts[1] == "status":
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
            if not text:
                client.status.pop(parts[0], None)  # its retained status was cleared
            elif text in ("online", "offline"):
                client.status[parts[0]] = text
            else:
                client.ignore(topic, "status is neither online nor offline")
            return
        if len(parts) == 3 and parts[1] == "state":
            host, credential, event_type = parts[0], parts[2], None
        elif len(parts) == 4 and parts[1] == "events":
            host, credential, event_type = parts[0], parts[2], parts[3]
        else:
            client.ignore(topic, "unexpected topic")
            return
        if not payload:
            return  # an emptied retained message: a credential that was removed
        if len(payload) > self._max_payload:
            client.ignore(topic, f"payload larger than {self._max_payload} bytes")
            return
        try:
            event = Event.from_json(bytes(payload))
            parse_time(event.time)
        except Exception as exc:  # hostile input: nothing may escape
            # Only the kind of problem: parser messages can quote the payload.
            client.ignore(topic, "not JSON" if "not JSON" in str(exc) else
                          "not a credbroker event")
            return
        if (
            event.subject != credential
            or event.source != SOURCE_PREFIX + host
            or (event_type is not None and event.type != event_type)
        ):
            client.ignore(topic, "the event does not match its topic")
            return
        # Retained messages are the current state (sent because we subscribed): never a gap.
        client.accept(event, live=not message.retain, contiguous=self._credential is None)


class ConnectFailed(BrokerError):
    """Connecting to the MQTT server failed (described without secrets)."""

    def __init__(self, description: str, auth: bool) -> None:
        super().__init__(description + ("; check the username and password" if auth else ""))


class MqttReporter:
    """A consumer's retained report on ``<prefix>/<host_id>/consumers/<credential>/<id>``.

    MQTT allows one Last Will per connection, so each reporter has a connection of its own,
    whose Will (an empty retained message) clears the report if the consumer dies.
    """

    def __init__(
        self, transport: MqttTransport, topic: str, credential: str, consumer_id: str
    ) -> None:
        self._transport = transport
        self.topic = topic
        self._credential = credential
        self._consumer_id = consumer_id
        self._client: Client | None = None

    def __repr__(self) -> str:
        return f"MqttReporter({self.topic})"

    async def __aenter__(self) -> Self:
        will = Will(self.topic, b"", qos=1, retain=True)
        self._client = await self._transport.connect(will=will)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            try:
                await client.publish(self.topic, b"", qos=1, retain=True)
            except MqttError as err:
                log.info("consumer report not withdrawn",
                         extra={"topic": self.topic, "error": type(err).__name__})
        await close_client(client)

    async def send(self, generation: int, fingerprint: str | None, now: float) -> None:
        assert self._client is not None, "use async with"
        doc: dict[str, Any] = report_document(self._consumer_id, self._credential, generation,
                                              fingerprint, now)
        await self._client.publish(self.topic, json.dumps(doc).encode(), qos=1, retain=True)

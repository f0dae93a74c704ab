"""How the publisher gets connected: the connect material read anew each time, MQTT 5 then
3.1.1 (:class:`~broker.aio.mqtt_link.ProtocolFallback`), the Last Will, and failures logged
(secret-free, with a hint on a refused password) and retried with backoff.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
from aiomqtt import ProtocolVersion

from broker.aio.mqtt_link import MqttLink, ProtocolFallback
from broker.aio.mqtt_material import (
    connect_material,
    describe_connect_error,
    is_auth_refusal,
    protocol_name,
)
from broker.core.backoff import Backoff

from .material import will

if TYPE_CHECKING:
    from broker.config import MqttSettings

__all__ = ["Connector"]

log = logging.getLogger("broker.mqtt")


class Connector:
    """Connects the publisher to ``settings``' server as ``client_id``, retrying until it works.

    ``failures`` counts failed attempts (a refusal of the protocol version is not one). The
    backoff is reset by the publisher once a connection has proved itself.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        status_topic: str,
        backoff: Backoff,
        protocols: Sequence[ProtocolVersion],
        timeout: float,
    ) -> None:
        self._settings = settings
        self.client_id = client_id
        self._status_topic = status_topic
        self.backoff = backoff
        self._fallback = ProtocolFallback(protocols)
        self._timeout = timeout
        self.server = f"{settings.host}:{settings.port}"
        #: Failed connection attempts.
        self.failures = 0

    def __repr__(self) -> str:
        return f"Connector(server={self.server!r}, protocol={self.protocol!r})"

    @property
    def protocol(self) -> str:
        """The MQTT protocol version in use (or to be tried next): ``5`` or ``3.1.1``."""
        return self._fallback.name

    async def connect(self) -> tuple[MqttLink, ProtocolVersion]:
        """A connected link and its protocol version; waits (with backoff) until there is one."""
        link = await self._fallback.connect_retrying(
            self._open, self.backoff, on_failure=self._failed, on_fallback=self._fell_back
        )
        return link, self._fallback.protocol

    def _fell_back(self, refused: ProtocolVersion) -> None:
        log.info(
            "mqtt server refused the protocol version; falling back",
            extra={"server": self.server, "refused": protocol_name(refused),
                   "next": self.protocol},
        )

    def _failed(self, exc: BaseException, delay: float) -> None:
        self.failures += 1
        extra: dict[str, object] = {
            "server": self.server,
            "error": describe_connect_error(exc),
            "attempt": self.backoff.attempt,
            "retry_in": round(delay, 3),
            "protocol": self.protocol,
        }
        if is_auth_refusal(exc):
            extra["hint"] = "check mqtt.username and the password in mqtt.password_file"
        log.error("mqtt connect failed", extra=extra)

    async def _open(self, protocol: ProtocolVersion) -> MqttLink:
        settings = self._settings
        password, context = await connect_material(
            settings.password_file,
            settings.tls,
            settings.ca_file,
            settings.cert_file,
            settings.key_file,
        )
        with anyio.fail_after(self._timeout):
            return await MqttLink.open(
                settings.host,
                settings.port,
                # A fixed client id makes a restarted daemon take over its old session: the
                # server then sends the old session's Will (``offline``) *before* accepting
                # us, so it can never land after our ``online``.
                client_id=self.client_id,
                protocol=protocol,
                username=settings.username,
                password=password,
                tls_context=context,
                will=will(self._status_topic, protocol),
                keepalive=max(1, math.ceil(settings.keepalive)),
                logger=logging.getLogger("broker.mqtt.wire"),
            )

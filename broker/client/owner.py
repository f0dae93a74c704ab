"""What a transport hands its findings to: the :class:`~broker.client.BrokerClient`, seen as
the small interface the MQTT and HTTP transports need (so that they need not import it)."""

from __future__ import annotations

from typing import Protocol

from broker.core.events import Event

__all__ = ["TransportOwner"]


class TransportOwner(Protocol):
    """The client a transport session feeds."""

    #: The last status text (``online``/``offline``) per broker host, from MQTT.
    status: dict[str, str]

    def connected_now(self) -> None:
        """The current state is read and changes flow."""

    def take_resync(self) -> bool:
        """True (once) when a gap was seen and the transport should re-read the state."""

    def ignore(self, where: str, reason: str) -> None:
        """Count an input that was not accepted (logged without its content)."""

    def accept(self, event: Event, *, live: bool, contiguous: bool = False) -> None:
        """Take an event from the transport."""

    def rehost(self, source: str) -> None:
        """Give the states read before the broker's ``host_id`` was known their source."""

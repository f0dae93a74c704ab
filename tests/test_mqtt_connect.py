"""The one connect-with-fallback (broker.aio.mqtt_link.ProtocolFallback) and the publisher's
health, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError

from broker import Broker
from broker.aio.mqtt_link import ProtocolFallback
from broker.core.backoff import Backoff
from broker.sinks.mqtt import MqttPublisher
from tests.conftest import make_config

pytestmark = pytest.mark.anyio


class Attempts:
    """Connect attempts that fail with ``errors`` in turn, then succeed."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.tried: list[ProtocolVersion] = []

    async def __call__(self, protocol: ProtocolVersion) -> str:
        self.tried.append(protocol)
        if self.errors:
            raise self.errors.pop(0)
        return f"connected with {protocol}"


async def test_a_refused_version_falls_back_at_once_and_sticks() -> None:
    fallback = ProtocolFallback()
    attempts = Attempts(MqttConnectError(1))
    refused: list[ProtocolVersion] = []
    assert await fallback.connect(attempts, on_fallback=refused.append) == (
        f"connected with {ProtocolVersion.V311}"
    )
    assert attempts.tried == [ProtocolVersion.V5, ProtocolVersion.V311]
    assert refused == [ProtocolVersion.V5] and fallback.name == "3.1.1"
    again = Attempts()
    await fallback.connect(again)
    assert again.tried == [ProtocolVersion.V311]  # no second try of 5


async def test_other_failures_and_the_last_version_refused_are_the_callers() -> None:
    with pytest.raises(OSError, match="unreachable"):
        await ProtocolFallback().connect(Attempts(OSError("unreachable")))
    only = ProtocolFallback([ProtocolVersion.V311])
    with pytest.raises(MqttConnectError):
        await only.connect(Attempts(MqttConnectError(1)))
    with pytest.raises(ValueError, match="at least one"):
        ProtocolFallback([])


async def test_connect_retrying_backs_off_after_each_failure() -> None:
    failures: list[tuple[str, float]] = []
    backoff = Backoff(0.01, 0.02, rand=lambda: 1.0)
    attempts = Attempts(OSError("down"), MqttConnectError(0x84), MqttConnectError(5))
    result = await ProtocolFallback().connect_retrying(
        attempts, backoff, on_failure=lambda exc, delay: failures.append((str(exc), delay))
    )
    assert result == f"connected with {ProtocolVersion.V311}"
    # The refusal of 5 is no failure; the refused password is, on 3.1.1.
    assert [delay for _, delay in failures] == [0.01, 0.02]
    assert attempts.tried == [ProtocolVersion.V5, ProtocolVersion.V5, ProtocolVersion.V311,
                              ProtocolVersion.V311]
    assert backoff.attempt == 2  # reset by the caller once the connection proves itself


def test_the_publishers_health_is_what_metrics_read(tmp_path: Path) -> None:
    config = make_config(tmp_path, [{"name": "a", "files": {"token": str(tmp_path / "a")}}],
                         mqtt={"url": "mqtt://127.0.0.1:1"})
    publisher = MqttPublisher(Broker(config).sink_context(), window=3)
    try:
        health = publisher.health()
        assert health.name == "mqtt" and health.connected is False
        assert (health.delivered, health.failures, health.pending) == (0, 0, 0)
        assert health.counters == {"connects": 0, "connect_failures": 0, "coalesced": 0,
                                   "in_flight_peak": 0}
    finally:
        publisher.close()
    with pytest.raises(ValueError, match="window"):
        MqttPublisher(Broker(config).sink_context(), window=0)

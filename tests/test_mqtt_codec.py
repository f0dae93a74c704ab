"""The publisher's own MQTT codec (broker.core.mqtt_codec) and the link built on it, against
real servers and against sockets that misbehave on purpose."""

from __future__ import annotations

import contextlib
import logging
import secrets as pysecrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from aiomqtt import ProtocolVersion
from hypothesis import given
from hypothesis import strategies as st

from broker.aio.mqtt_link import LinkLost, MqttLink, WillMessage
from broker.core import mqtt_codec as wire
from broker.core.mqtt_codec import MessageProperties, PacketReader, ProtocolError
from tests.conftest import SecretRegistry
from tests.mosquitto import (
    Mosquitto,
    Subscriber,
    mosquitto_fixture,  # noqa: F401 - fixture "mosquitto"
)

WAIT = 10.0


def _split_publish(body: bytes, v5: bool) -> tuple[str, int, bytes, bytes]:
    (length,) = struct.unpack_from(">H", body)
    topic = body[2 : 2 + length].decode()
    offset = 2 + length
    (mid,) = struct.unpack_from(">H", body, offset)
    offset += 2
    props = b""
    if v5:
        size, start = wire._read_varint(body, offset)
        props = body[offset : start + size]
        offset = start + size
    return topic, mid, props, body[offset:]


# -- pure ------------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=wire.MAX_REMAINING))
def test_varint_round_trips(value: int) -> None:
    encoded = wire.varint(value)
    assert 1 <= len(encoded) <= 4
    assert wire._read_varint(encoded, 0) == (value, len(encoded))


def test_varint_refuses_what_mqtt_cannot_express() -> None:
    with pytest.raises(ValueError, match="too large"):
        wire.varint(wire.MAX_REMAINING + 1)
    with pytest.raises(ProtocolError):
        wire._read_varint(b"\xff\xff\xff\xff\x01", 0)


@given(
    topic=st.text(min_size=1, max_size=40).filter(lambda t: "\0" not in t),
    mid=st.integers(min_value=1, max_value=0xFFFF),
    payload=st.binary(max_size=300),
    retain=st.booleans(),
    v5=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_a_publish_reads_back_whole_however_the_stream_is_cut(
    topic: str, mid: int, payload: bytes, retain: bool, v5: bool, cuts: list[int]
) -> None:
    props = MessageProperties(content_type="application/json", utf8=True) if v5 else None
    packet = wire.publish_packet(
        wire.topic_field(topic), mid, payload, retain, props.packed if props else None
    )
    stream = packet + wire.PINGREQ_PACKET
    reader = PacketReader()
    packets: list[tuple[int, int, bytes]] = []
    last = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}):
        packets += reader.feed(stream[last:cut])
        last = cut
    packets += reader.feed(stream[last:])
    assert [(kind, flags) for kind, flags, _ in packets] == [
        (wire.PUBLISH, 0b0010 | retain), (wire.PINGREQ, 0)
    ]
    got_topic, got_mid, got_props, got_payload = _split_publish(packets[0][2], v5)
    assert (got_topic, got_mid, got_payload) == (topic, mid, payload)
    if props is not None:
        assert got_props == props.packed


def test_properties_are_packed_once_as_mqtt5_spells_them() -> None:
    props = MessageProperties(content_type="text/plain", utf8=True)
    assert props.packed == b"\x0f" + b"\x01\x01" + b"\x03\x00\x0atext/plain"
    assert MessageProperties().packed == b"\x00"


def test_connack_properties_are_read_and_the_unknown_refused() -> None:
    props = (
        b"\x21\x00\x14"  # Receive Maximum 20
        b"\x13\x00\x3c"  # Server Keep Alive 60
        b"\x27\x00\x01\x00\x00"  # Maximum Packet Size 65536
        b"\x26\x00\x01k\x00\x01v"  # a user property, skipped
        b"\x1f\x00\x02ok"  # Reason String
    )
    connack = wire.decode_connack(b"\x00\x00" + wire.varint(len(props)) + props, wire.V5)
    assert connack.accepted and connack.receive_maximum == 20
    assert connack.server_keep_alive == 60 and connack.maximum_packet_size == 65536
    assert connack.reason_string == "ok"
    assert wire.decode_connack(b"\x00\x05", wire.V311).code == 5
    for bad in (b"\x00", b"\x00\x00\x02\x99\x00", b"\x00\x00\x05\x21\x00"):
        with pytest.raises(ProtocolError):
            wire.decode_connack(bad, wire.V5)


def test_pubacks_with_and_without_a_reason_code() -> None:
    assert wire.decode_puback(b"\x01\x02") == (0x0102, 0)
    assert wire.decode_puback(b"\x00\x07\x87\x00") == (7, 0x87)
    with pytest.raises(ProtocolError):
        wire.decode_puback(b"\x01")


def test_the_reader_bounds_a_packet() -> None:
    reader = PacketReader(max_size=100)
    with pytest.raises(ProtocolError):
        reader.feed(b"\x30" + wire.varint(101))


def test_connect_sends_a_password_only_with_a_user_name() -> None:
    def flags(packet: bytes) -> int:
        kind, _, body = PacketReader().feed(packet)[0]
        assert kind == wire.CONNECT
        return body[7]  # after the protocol name (6) and level (1)

    assert flags(wire.connect_packet(protocol=wire.V5, client_id="c", keepalive=5)) == 0x02
    with_user = wire.connect_packet(
        protocol=wire.V311, client_id="c", keepalive=5, username="u", password="p"
    )
    assert flags(with_user) == 0x02 | 0x80 | 0x40
    will = wire.connect_packet(
        protocol=wire.V5, client_id="c", keepalive=5, will_topic="t", will_payload=b"x"
    )
    assert flags(will) == 0x02 | 0x04 | 0x08 | 0x20  # Will, QoS 1, retained
    with pytest.raises(ValueError, match="protocol level"):
        wire.connect_packet(protocol=3, client_id="c", keepalive=5)


# -- the link on real servers --------------------------------------------------------------


async def _open(port: int, *, client_id: str | None = None, keepalive: int = 5,
                protocol: ProtocolVersion = ProtocolVersion.V5,
                will: WillMessage | None = None) -> MqttLink:
    with anyio.fail_after(WAIT):
        return await MqttLink.open(
            "127.0.0.1", port, client_id=client_id or f"c{pysecrets.token_hex(3)}",
            protocol=protocol, username=None, password=None, tls_context=None,
            will=will or WillMessage("codec/status", b"offline", None),
            keepalive=keepalive, logger=logging.getLogger("test.link"),
        )


@pytest.mark.anyio
@pytest.mark.parametrize("protocol", [ProtocolVersion.V5, ProtocolVersion.V311])
async def test_a_burst_is_delivered_whole_in_order_with_properties(
    mosquitto: Mosquitto, secrets: SecretRegistry, protocol: ProtocolVersion
) -> None:
    mosquitto.extra = ["max_inflight_messages 0", "max_queued_messages 0"]
    mosquitto.start()
    prefix = f"codec{pysecrets.token_hex(3)}"
    count = 2000
    async with Subscriber(mosquitto.port, [f"{prefix}/#"], secrets) as sub:
        link = await _open(mosquitto.port, protocol=protocol)
        acked: list[int] = []
        link.on_ack = acked.append
        props = MessageProperties(content_type="application/json", utf8=True)
        mids = [link.publish(f"{prefix}/m", b'{"n":%d}' % i, False, props)
                for i in range(count)]
        await sub.wait_for(lambda messages: len(messages) >= count, timeout=30)
        with anyio.fail_after(WAIT):
            while len(acked) < count:
                await anyio.sleep(0.01)
        assert acked == mids  # every PUBACK, in order
        assert [m.payload for m in sub.messages] == [b'{"n":%d}' % i for i in range(count)]
        await link.close(2.0)
        assert isinstance(link.lost, LinkLost)


@pytest.mark.anyio
async def test_the_will_carries_its_properties_and_a_clean_close_drops_it(
    mosquitto: Mosquitto, secrets: SecretRegistry
) -> None:
    mosquitto.start()
    prefix = f"codec{pysecrets.token_hex(3)}"
    will = WillMessage(f"{prefix}/status", b"offline",
                       MessageProperties(content_type="text/plain; charset=utf-8", utf8=True))
    async with Subscriber(mosquitto.port, [f"{prefix}/#"], secrets) as sub:
        clean = await _open(mosquitto.port, will=will)
        await clean.close(2.0)
        aborted = await _open(mosquitto.port, will=will)
        aborted.abort()  # no DISCONNECT: the server publishes the Will
        await sub.wait_for(lambda messages: len(messages) >= 1)
        await anyio.sleep(0.5)  # a second Will (the clean one) would have arrived by now
        assert [m.payload for m in sub.messages] == [b"offline"]
        assert sub.messages[0].content_type == "text/plain; charset=utf-8"
        assert sub.messages[0].payload_format == 1


@pytest.mark.anyio
async def test_a_session_taken_over_is_a_loss(
    mosquitto: Mosquitto,
) -> None:
    mosquitto.start()
    client_id = f"c{pysecrets.token_hex(3)}"
    first = await _open(mosquitto.port, client_id=client_id)
    second = await _open(mosquitto.port, client_id=client_id)
    with anyio.fail_after(WAIT):
        reason = await first.wait_lost()
    # mosquitto 2.0 closes the old connection without a DISCONNECT (a server's DISCONNECT
    # and its reason are in the misbehaving-server test below).
    assert isinstance(reason, LinkLost)
    assert second.lost is None
    await second.close(2.0)


@pytest.mark.anyio
async def test_an_idle_link_stays_up_on_its_pings(mosquitto: Mosquitto) -> None:
    mosquitto.start()
    link = await _open(mosquitto.port, keepalive=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run)
        # mosquitto drops a client silent for 1.5 x its keepalive.
        await anyio.sleep(3.5)
        assert link.lost is None
        tg.cancel_scope.cancel()
    await link.close(2.0)


# -- the link on servers that misbehave ----------------------------------------------------


CONNACK_OK = b"\x20\x03\x00\x00\x00"


@contextlib.asynccontextmanager
async def _fake_server(script: Callable[[socket.socket], None]) -> AsyncIterator[int]:
    """A loopback server that accepts one connection and runs ``script`` on it (in a thread);
    yields its port."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                script(conn)

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, serve)
            yield listener.getsockname()[1]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("after_connack", "expect"),
    [
        (b"", "PINGRESP"),  # silent after the CONNACK: the keepalive notices
        (b"\x90\x03\x00\x01\x00", "protocol error"),  # a SUBACK nobody asked for
        (b"\x40\xff\xff\xff\xff\x7f", "protocol error"),  # a length past four bytes
        (b"\xe0\x02\x8b\x00", "shutting down"),  # DISCONNECT 0x8B Server shutting down
    ],
)
async def test_a_server_that_misbehaves_ends_the_link_with_a_reason(
    after_connack: bytes, expect: str
) -> None:
    def script(conn: socket.socket) -> None:
        conn.recv(4096)  # CONNECT
        conn.sendall(CONNACK_OK)
        time.sleep(0.3)  # after open() has returned: the link's own reading
        conn.sendall(after_connack)
        conn.settimeout(WAIT)
        try:
            while conn.recv(4096):
                pass  # swallow PINGREQs without an answer
        except OSError:
            pass

    async with _fake_server(script) as port:
        link = await _open(port, keepalive=1)
        with anyio.fail_after(WAIT):
            reason = await link.run()
        assert isinstance(reason, LinkLost)
        assert expect.lower() in str(reason).lower()
        link.abort()


@pytest.mark.anyio
async def test_a_3_1_1_server_refusing_version_5_reads_as_a_protocol_refusal() -> None:
    from aiomqtt.exceptions import MqttConnectError

    from broker.aio.mqtt_material import is_protocol_refusal

    def script(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"\x20\x02\x00\x01")  # 3.1.1: unacceptable protocol version

    async with _fake_server(script) as port:
        with pytest.raises(MqttConnectError) as refused:
            await _open(port)
    assert is_protocol_refusal(refused.value)

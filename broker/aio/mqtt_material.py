"""What an MQTT connect is made of, and how one fails: the protocol versions in the order
they are tried, the password and TLS context (read anew at every connect), and a secret-free
classification of connect errors.

Shared by the publisher, the consumer-report subscriber, the consumer client and ``credbroker
fleet``; it knows nothing of credentials.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import anyio
from aiomqtt import MqttCodeError, ProtocolVersion
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from broker.aio.secretfile import SecretFileError, load_secret_file

__all__ = [
    "CONNECT_TIMEOUT",
    "PROTOCOLS",
    "connect_material",
    "describe_connect_error",
    "is_auth_refusal",
    "is_protocol_refusal",
    "protocol_name",
    "read_password_file",
    "tls_context",
]

#: Waiting for a CONNACK.
CONNECT_TIMEOUT = 10.0
#: Protocols in the order they are tried.
PROTOCOLS: tuple[ProtocolVersion, ...] = (ProtocolVersion.V5, ProtocolVersion.V311)

_PROTOCOL_NAMES = {
    ProtocolVersion.V5: "5",
    ProtocolVersion.V311: "3.1.1",
    ProtocolVersion.V31: "3.1",
}
# CONNACK codes: 1 = "unacceptable protocol version" (3.1.1), 0x84 = "unsupported protocol
# version" (5; paho also maps a 3.1.1-style refusal of a v5 CONNECT to it).
_PROTOCOL_REFUSED = frozenset({1, 0x84})
# 4/5 = bad user name or password / not authorised (3.1.1); 0x86/0x87 the same in MQTT 5.
_AUTH_REFUSED = frozenset({4, 5, 0x86, 0x87})


def protocol_name(protocol: ProtocolVersion) -> str:
    """``5``, ``3.1.1`` or ``3.1``: the version as people write it."""
    return _PROTOCOL_NAMES.get(protocol, str(int(protocol)))


async def connect_material(
    password_file: Path | str | None,
    tls: bool,
    ca_file: Path | str | None,
    cert_file: Path | str | None,
    key_file: Path | str | None,
) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and TLS context of one connect.

    Read at every connect, so a rotated password or certificate is picked up.
    """
    password = None if password_file is None else await read_password_file(password_file)
    context = None
    if tls:
        context = await anyio.to_thread.run_sync(tls_context, ca_file, cert_file, key_file)
    return password, context


async def read_password_file(path: str | os.PathLike[str]) -> str:
    """An MQTT password from its file: one line, UTF-8 (read like every secret file).

    A file that cannot be used is a ``ValueError``, a connect failure the loops retry:
    the file may be written in place by the time of the next try.
    """
    try:
        raw = (await load_secret_file(path)).data
    except SecretFileError as exc:
        raise ValueError(str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # The codec's own message would quote the offending byte of the password.
        raise ValueError(f"{path}: the password is not valid UTF-8") from None
    return text.rstrip("\r\n")


def tls_context(
    ca_file: Path | str | None = None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> ssl.SSLContext:
    """A client TLS context that verifies the server (against ``ca_file``, else system CAs).

    Blocking (reads files): call it in a worker thread. Building it anew on every connect
    picks up rotated certificates.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def _rc_value(exc: BaseException) -> int | None:
    if not isinstance(exc, MqttCodeError):
        return None
    rc = exc.rc
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc


def is_protocol_refusal(exc: BaseException) -> bool:
    """True when the server refused the connection because of the protocol version."""
    return isinstance(exc, MqttConnectError) and _rc_value(exc) in _PROTOCOL_REFUSED


def is_auth_refusal(exc: BaseException) -> bool:
    """True when the server refused the credentials (user name, password, certificate)."""
    return isinstance(exc, MqttConnectError) and _rc_value(exc) in _AUTH_REFUSED


def describe_connect_error(exc: BaseException) -> str:
    """A one-line, secret-free description of why a connection failed."""
    if isinstance(exc, MqttConnectError):
        rc = exc.rc
        reason = str(rc) if isinstance(rc, ReasonCode) else str(exc)
        return f"refused by the server: {reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."

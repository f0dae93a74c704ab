"""A real mosquitto for the MQTT tests, plus a recording subscriber and test PKI.

``Mosquitto`` writes a config into a temp dir, starts ``/usr/sbin/mosquitto`` on a free (or
given) loopback port and waits until the port accepts connections. ``kill()`` is SIGKILL,
``stop()`` a clean stop, ``restart()`` starts again on the same port. Fixtures:

- ``mosquitto_server``: one server for the whole session (tests isolate by topic prefix);
- ``mosquitto``: a server of the test's own, not yet started, for tests that kill or
  reconfigure it (``mosquitto.start()``).

Import the fixtures into a test module with
``from tests.mosquitto import mosquitto_fixture, mosquitto_server_fixture``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc
import pytest
from aiomqtt import Client, ProtocolVersion
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import SecretRegistry

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
START_TIMEOUT = 10.0
WAIT = 10.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (never 1883)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Test PKI


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.client_cert, self.client_key)
        return context


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)


def make_tls(directory: Path) -> TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "credbroker test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
    ])
    client_cert, client_key = leaf("credbroker-test-client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key)
    _write_key(files.client_key, client_key)
    return files


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed with ``mosquitto_passwd``)."""
    if MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto_passwd is not installed")
    path.unlink(missing_ok=True)
    for i, (user, password) in enumerate(users.items()):
        args = [MOSQUITTO_PASSWD, "-b", *(["-c"] if i == 0 else []), str(path), user, password]
        # Output is discarded: it could echo a password.
        subprocess.run(args, check=True, capture_output=True, timeout=10)
    return path


# --------------------------------------------------------------------------------------------
# The server


@dataclass
class Mosquitto:
    """One mosquitto process with a generated config (see the module docstring)."""

    directory: Path
    port: int = field(default_factory=free_port)
    allow_anonymous: bool = True
    password_file: Path | None = None
    acl_file: Path | None = None
    tls: TlsFiles | None = None
    require_certificate: bool = False
    #: More config lines (a bridge, queue limits).
    extra: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to "mosquitto", who cannot read tmp
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        lines += self.extra
        return "\n".join(lines) + "\n"

    def start(self) -> Mosquitto:
        """Start on ``self.port`` and wait (bounded) until it accepts connections."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        self.config_path.write_text(self.config())
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode}:\n{self.log_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {self.port}") from None
                time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no goodbyes, no persistence."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait."""
        self._signal(signal.SIGTERM)

    def restart(self) -> Mosquitto:
        """Stop if running, then start again on the same port."""
        if self.running:
            self.stop()
        return self.start()

    def reload(self) -> None:
        """SIGHUP: re-read password and ACL files."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)

    def _signal(self, signum: int) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signum)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


@pytest.fixture(scope="session", name="mosquitto_server")
def mosquitto_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A mosquitto shared by the session: never kill it; isolate tests by topic prefix."""
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as server:
        server.start()
        yield server


@pytest.fixture(name="mosquitto")
def mosquitto_fixture(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto of the test's own (configure, then ``start()``); killed afterwards."""
    with Mosquitto(tmp_path / "mosquitto") as server:
        yield server


# --------------------------------------------------------------------------------------------
# A recording subscriber


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    content_type: str | None
    at: float  # time.monotonic()
    #: MQTT 5 payload-format indicator (1 = UTF-8 text), None when absent.
    payload_format: int | None = None

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")


class Subscriber:
    """An MQTT client recording every message; every payload is shown to the leak guard.

    ``async with Subscriber(port, ["prefix/#"], secrets) as sub`` returns once subscribed.
    """

    def __init__(
        self,
        port: int,
        topics: Sequence[str],
        registry: SecretRegistry,
        *,
        protocol: ProtocolVersion = ProtocolVersion.V5,
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._client = Client(
            "127.0.0.1", port, protocol=protocol, tls_context=tls_context,
            username=username, password=password, timeout=WAIT,
        )
        self._topics = list(topics)
        self._registry = registry
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.messages: list[Received] = []

    async def __aenter__(self) -> Subscriber:
        with anyio.fail_after(WAIT):
            await self._client.__aenter__()
            for topic in self._topics:
                await self._client.subscribe(topic, qos=1)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._read)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        with anyio.move_on_after(2):
            await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self._client.messages:
            payload = bytes(message.payload) if isinstance(message.payload, bytes) else b""
            self._registry.observe(f"mqtt {message.topic.value}", payload)
            props = message.properties
            self.messages.append(Received(
                topic=message.topic.value,
                payload=payload,
                retain=bool(message.retain),
                content_type=getattr(props, "ContentType", None) if props is not None else None,
                at=time.monotonic(),
                payload_format=getattr(props, "PayloadFormatIndicator", None),
            ))
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(
        self, condition: Callable[[list[Received]], bool], timeout: float = WAIT
    ) -> list[Received]:
        """Wait (bounded) until ``condition(messages)`` holds; returns the messages."""
        with anyio.fail_after(timeout):
            while not condition(self.messages):
                await self._changed.wait()
        return self.messages

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]

    def texts(self, topic: str) -> list[str]:
        return [m.text for m in self.on(topic)]

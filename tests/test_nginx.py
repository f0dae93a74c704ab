"""End to end: a real nginx serves a certificate the `tls` preset watches; an action reloads it.

The certificate is renewed the way certbot does it (new files in ``archive/``, then the
``live/`` symlinks swapped one after the other); the action sends HUP through nginx's pidfile;
``openssl s_client`` shows the new certificate; nginx's own log counts the reloads.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import SecretRegistry

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")
TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Certbot:
    """Writes certificate/key pairs like certbot: archive/<n>, then live/ symlinks."""

    def __init__(self, root: Path, secrets: SecretRegistry) -> None:
        self.archive = root / "archive" / "site"
        self.live = root / "live" / "site"
        self.archive.mkdir(parents=True)
        self.live.mkdir(parents=True)
        self.secrets = secrets
        self.serials: list[int] = []

    def issue(self) -> tuple[Path, Path]:
        n = len(self.serials) + 1
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.secrets.add(pem.decode())
        for line in pem.decode().splitlines()[1:-1]:
            self.secrets.add(line)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site.example.internal")])
        now = time.time()
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(datetime.fromtimestamp(int(now - 60), UTC))
            .not_valid_after(datetime.fromtimestamp(int(now + 90 * 86400), UTC))
            .sign(key, hashes.SHA256())
        )
        cert_path, key_path = self.archive / f"cert{n}.pem", self.archive / f"privkey{n}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        self.serials.append(serial)
        return cert_path, key_path

    def link(self, name: str, target: Path) -> None:
        """Point live/<name> at ``target`` atomically (a new link renamed over the old)."""
        tmp = self.live / f".{name}.new"
        os.symlink(os.path.relpath(target, self.live), tmp)
        os.replace(tmp, self.live / name)

    async def renew(self, pause: float = 0.0) -> None:
        cert, key = self.issue()
        self.link("cert.pem", cert)
        await anyio.sleep(pause)  # between the two swaps: a certificate with the old key
        self.link("privkey.pem", key)


class Nginx:
    def __init__(self, root: Path, live: Path) -> None:
        self.root = root
        self.port = free_port()
        self.pidfile = root / "nginx.pid"
        self.error_log = root / "error.log"
        temp = root / "temp"
        temp.mkdir()
        self.conf = root / "nginx.conf"
        temps = " ".join(
            f"{kind}_temp_path {temp / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf.write_text(
            f"daemon on;\nmaster_process on;\nworker_processes 1;\nuser root;\n"
            f"pid {self.pidfile};\nerror_log {self.error_log} notice;\n"
            "events { worker_connections 64; }\n"
            f"http {{\n  access_log off;\n  {temps}\n"
            f"  server {{\n    listen 127.0.0.1:{self.port} ssl;\n"
            f"    ssl_certificate {live / 'cert.pem'};\n"
            f"    ssl_certificate_key {live / 'privkey.pem'};\n"
            '    location / { return 200 "ok\\n"; }\n  }\n}\n'
        )

    def start(self) -> None:
        subprocess.run(
            [NGINX, "-p", str(self.root), "-c", str(self.conf)],
            check=True,
            timeout=20,
            capture_output=True,
        )

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGTERM)  # fast shutdown: nothing to drain here
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def reloads(self) -> int:
        try:
            text = self.error_log.read_text()
        except FileNotFoundError:
            return 0
        return sum("(SIGHUP) received" in line for line in text.splitlines())

    def served_serial(self) -> int | None:
        """The serial of the certificate nginx presents now, as openssl s_client sees it."""
        shown = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{self.port}",
                "-servername",
                "site.example.internal",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
        if b"BEGIN CERTIFICATE" not in shown.stdout:
            return None
        serial = subprocess.run(
            ["openssl", "x509", "-noout", "-serial"],
            input=shown.stdout,
            capture_output=True,
            timeout=10,
            check=True,
        )
        return int(serial.stdout.decode().strip().split("=", 1)[1], 16)


async def eventually(predicate: Any, timeout: float = TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not await anyio.to_thread.run_sync(predicate):
            await anyio.sleep(0.05)


@pytest.fixture
def site(tmp_path: Path, secrets: SecretRegistry) -> Any:
    certbot = Certbot(tmp_path / "letsencrypt", secrets)
    cert, key = certbot.issue()
    certbot.link("cert.pem", cert)
    certbot.link("privkey.pem", key)
    (tmp_path / "nginx").mkdir()
    nginx = Nginx(tmp_path / "nginx", certbot.live)
    nginx.start()
    try:
        yield certbot, nginx
    finally:
        nginx.stop()


def _config(certbot: Certbot, nginx: Nginx) -> dict[str, Any]:
    return {
        "credentials": [
            {
                "name": "web-tls",
                "preset": "tls",
                "files": {
                    "cert": str(certbot.live / "cert.pem"),
                    "key": str(certbot.live / "privkey.pem"),
                },
            }
        ],
        "actions": [
            {
                "name": "nginx",
                "credentials": ["web-tls"],
                "signal": {"pidfile": str(nginx.pidfile), "name": "HUP"},
                # Wider than the default 500ms, for a loaded test machine.
                "coalesce": "1s",
            }
        ],
    }


@pytest.mark.anyio
async def test_each_certbot_renewal_reloads_nginx_once_and_a_touch_never(
    harness_factory: Any, site: Any
) -> None:
    certbot, nginx = site
    await eventually(lambda: nginx.served_serial() == certbot.serials[0])
    cfg = _config(certbot, nginx)
    async with harness_factory(cfg["credentials"], actions=cfg["actions"]) as h:
        first = await h.next("web-tls")
        assert first.type == "credentials.refreshed"
        # First sight is a `refreshed` too: one reload (harmless: nginx already has it).
        await eventually(lambda: nginx.reloads() == 1)
        for renewal in range(2):
            await certbot.renew()
            await eventually(lambda: nginx.served_serial() == certbot.serials[-1])
            await h.fence()
            await anyio.sleep(1.2)  # past the coalesce window: any extra run would be seen
            assert nginx.reloads() == 2 + renewal
        for path in [*certbot.archive.iterdir(), *certbot.live.iterdir()]:
            os.utime(path, follow_symlinks=False)
            os.utime(path)
        await h.fence()
        await anyio.sleep(1.2)
        assert nginx.reloads() == 3  # a touch is no change
        outcome = h.broker.sinks["actions"].outcomes()[0]
        assert (outcome.runs, outcome.failures) == (3, 0)
    assert "credentials.action_failed" not in h.types("web-tls")


# The `settle` window withholds the certificate-with-the-old-key state that the second swap
# resolves: it is never published, so never acted on.
@pytest.mark.anyio
async def test_the_transient_key_mismatch_between_the_swaps_is_never_acted_on(
    harness_factory: Any, site: Any
) -> None:
    certbot, nginx = site
    cfg = _config(certbot, nginx)
    # An action that would also run for an invalid state: it must still see none.
    cfg["actions"][0]["on"] = ["credentials.refreshed", "credentials.invalid"]
    cfg["actions"][0]["coalesce"] = 0
    async with harness_factory(cfg["credentials"], actions=cfg["actions"]) as h:
        await h.next("web-tls")
        await eventually(lambda: nginx.reloads() == 1)
        await certbot.renew(pause=0.3)  # shorter than settle (default 1s), longer than coalesce
        await eventually(lambda: nginx.served_serial() == certbot.serials[-1])
        await h.fence()
        await anyio.sleep(0.5)
        assert "credentials.invalid" not in h.types("web-tls")
        assert nginx.reloads() == 2

"""Every preset against a fake home laid out the way the real tools lay it out.

Real files in tmp_path, real inotify, a real broker; ``HOME`` (and ``AWS_*``/``CLOUDSDK_*``)
come from the ``env`` mapping given to the config loader, or from a subprocess's environment
for ``credbroker check``. Also the generic mechanisms the presets are built from: pattern
roles, the fallback, selectors and the key pair check, as the reader and engine see them.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import CredentialSettings, parse_config
from broker.config.presets import PRESETS
from broker.core.fingerprint import Fingerprinter
from broker.core.machine import observe, transition
from broker.core.state import State, Status
from broker.engine.reader import read_credential, stat_signature
from tests.conftest import SecretRegistry, write_atomic

ROOT = Path(__file__).resolve().parent.parent
REFRESHED = "credentials.refreshed"
EXPIRED = "credentials.expired"
MISSING = "credentials.missing"
INVALID = "credentials.invalid"
FP = Fingerprinter(b"preset-tests-key-0123456789abcdef")


# ---------------------------------------------------------------------------------------------
# Helpers: a fake home, files with a chosen mtime, certificates, a broker on an env mapping


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return {"HOME": str(home)}


def write_at(path: Path, data: str | bytes, mtime: float) -> None:
    """Write atomically a file whose mtime is already ``mtime`` when it appears."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{pysecrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)


def put(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def iso(when: float) -> str:
    return datetime.fromtimestamp(int(when), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey, secrets: SecretRegistry) -> str:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    secrets.add(pem)
    for line in pem.splitlines()[1:-1]:
        secrets.add(line)
    return pem


def cert_pem(key: ec.EllipticCurvePrivateKey, not_before: float, not_after: float) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.example.internal")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.fromtimestamp(int(not_before), UTC))
        .not_valid_after(datetime.fromtimestamp(int(not_after), UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load(env: dict[str, str], tmp_path: Path, *tables: dict[str, Any]) -> list[CredentialSettings]:
    config = parse_config(
        {"broker": {"state_dir": str(tmp_path / "state"), "host_id": "t"},
         "credentials": list(tables)},
        env=env,
    )
    return list(config.credentials)


def check(spec: CredentialSettings) -> State:
    """What ``credbroker check`` derives: read now, observe, first transition."""
    read = read_credential(spec)
    obs = observe(read.spec, read.reads, FP, note=read.note)
    return transition(read.spec, None, obs, time.time()).state


def remedies(state: State) -> str:
    return "\n".join(p.remedy or "" for p in state.problems)


# ---------------------------------------------------------------------------------------------
# How each tool lays out its files


def nebius_token(home: Path, secrets: SecretRegistry, mtime: float | None = None) -> None:
    path = home / ".nebius/NEBIUS_IAM_TOKEN.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "v1." + secrets.token("neb") + "\n"
    if mtime is None:
        write_atomic(path, token)
    else:
        write_at(path, token, mtime)


def nebius_tenant(home: Path) -> None:
    put(home / ".nebius/NEBIUS_TENANT_ID.txt", "tenant-e00a1b2c3d4e5f6a7b\n")


def nebius_service_account(home: Path, secrets: SecretRegistry) -> None:
    key = key_pem(new_key(), secrets)
    put(home / ".nebius/credentials.json", json.dumps({"subject-credentials": {
        "type": "JWT", "alg": "RS256", "private-key": key, "kid": "publickey-e00abc",
        "iss": "serviceaccount-e00def", "sub": "serviceaccount-e00def",
    }}))


def aws_credentials(
    home: Path, secrets: SecretRegistry, dev_expires: float | None, default_key: str = "A"
) -> None:
    text = (
        "[default]\n"
        f"aws_access_key_id = AKIA{default_key}EXAMPLE\n"
        f"aws_secret_access_key = {secrets.token('aws')}\n"
    )
    if dev_expires is not None:
        text += (
            "\n[dev]\n"
            "aws_access_key_id = ASIAEXAMPLEDEV\n"
            f"aws_secret_access_key = {secrets.token('aws')}\n"
            f"aws_session_token = {secrets.token('aws')}\n"
            f"x_security_token_expires = {iso(dev_expires)}\n"
        )
    put(home / ".aws/credentials", text)


def sso_token(secrets: SecretRegistry, expires: float) -> str:
    return json.dumps({
        "startUrl": "https://d-1234567890.awsapps.com/start",
        "region": "eu-west-1",
        "accessToken": secrets.token("sso"),
        "expiresAt": iso(expires),
        "clientId": "cid-" + pysecrets.token_hex(4),
        "clientSecret": secrets.token("sso"),
        "registrationExpiresAt": iso(expires + 90 * 86400),
        "refreshToken": secrets.token("sso"),
    })


def sso_registration(secrets: SecretRegistry, expires: float) -> str:
    return json.dumps({
        "clientId": "cid-" + pysecrets.token_hex(4),
        "clientSecret": secrets.token("sso"),
        "expiresAt": iso(expires),
        "scopes": ["sso:account:access"],
    })


TOKEN_CACHE = "c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9.json"  # sha1 of the session name
REGISTRATION = "botocore-client-id-eu-west-1.json"


def gcp_adc(secrets: SecretRegistry) -> str:
    return json.dumps({
        "account": "",
        "client_id": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
        "client_secret": secrets.token("gcp"),
        "refresh_token": secrets.token("gcp"),
        "type": "authorized_user",
        "universe_domain": "googleapis.com",
    })


# ---------------------------------------------------------------------------------------------
# One scenario per preset: valid, a rotation, an expired version, and the credential gone


@dataclass
class Scenario:
    table: dict[str, Any]
    valid: Callable[[Path, SecretRegistry, dict[str, Any]], None]
    rotate: Callable[[Path, SecretRegistry, dict[str, Any]], None]
    expire: Callable[[Path, SecretRegistry, dict[str, Any]], None] | None
    remove: Callable[[Path], None]
    missing_code: str
    missing_remedy: str
    expired_remedy: str = ""

    @property
    def name(self) -> str:
        return str(self.table.get("name") or self.table["preset"])


def _nebius_valid(home: Path, secrets: SecretRegistry, ctx: dict[str, Any]) -> None:
    nebius_tenant(home)
    nebius_token(home, secrets)


def _aws_sso_valid(home: Path, secrets: SecretRegistry, ctx: dict[str, Any]) -> None:
    cache = home / ".aws/sso/cache"
    put(cache / REGISTRATION, sso_registration(secrets, time.time() + 90 * 86400))
    put(cache / TOKEN_CACHE, sso_token(secrets, time.time() + 8 * 3600))


def _k8s_valid(home: Path, secrets: SecretRegistry, ctx: dict[str, Any]) -> None:
    now = int(time.time())
    put(home / "sa/ca.crt", cert_pem(new_key(), now - 86400, now + 365 * 86400))
    put(home / "sa/namespace", "default")
    put(home / "sa/token", secrets.jwt(iss="https://kubernetes.default.svc", iat=now,
                                       exp=now + 3607, sub="system:serviceaccount:default:app"))


def _tls_valid(home: Path, secrets: SecretRegistry, ctx: dict[str, Any]) -> None:
    ctx["key"] = new_key()
    now = time.time()
    put(home / "tls/tls.key", key_pem(ctx["key"], secrets))
    put(home / "tls/tls.crt", cert_pem(ctx["key"], now - 10 * 86400, now + 80 * 86400))


def kubeconfig(secrets: SecretRegistry) -> str:
    return ("apiVersion: v1\nkind: Config\ncurrent-context: c\nusers:\n- name: u\n  user:\n"
            f"    token: {secrets.token('k8s')}\n")


def r2_ini(secrets: SecretRegistry) -> str:
    return (f"[r2]\naws_access_key_id = {secrets.token('r2id')}\n"
            f"aws_secret_access_key = {secrets.token('r2')}\n")


def r2_credentials(home: Path, secrets: SecretRegistry) -> None:
    put(home / ".cloudflare/accountid", "0123456789abcdef0123456789abcdef\n")
    put(home / ".cloudflare/r2.credentials", r2_ini(secrets))


def nebius_s3_ini(secrets: SecretRegistry) -> str:
    return (f"[default]\naws_access_key_id = A\naws_secret_access_key = {secrets.token()}\n\n"
            f"[nebius]\naws_access_key_id = {secrets.token('nbid')}\n"
            f"aws_secret_access_key = {secrets.token('nb')}\n")


SCENARIOS: dict[str, Scenario] = {
    "kubeconfig": Scenario(
        table={"preset": "kubeconfig"},
        valid=lambda home, secrets, ctx: put(home / ".kube/config", kubeconfig(secrets)),
        rotate=lambda home, secrets, ctx: put(home / ".kube/config", kubeconfig(secrets)),
        expire=None,  # no expiry the broker can read
        remove=lambda home: (home / ".kube/config").unlink(),
        missing_code="file-missing",
        missing_remedy="aws eks update-kubeconfig",
    ),
    "cloudflare-r2": Scenario(
        table={"preset": "cloudflare-r2"},
        valid=lambda home, secrets, ctx: r2_credentials(home, secrets),
        rotate=lambda home, secrets, ctx: put(home / ".cloudflare/r2.credentials",
                                              r2_ini(secrets)),
        expire=None,
        remove=lambda home: (home / ".cloudflare/r2.credentials").unlink(),
        missing_code="file-missing",
        missing_remedy="aws configure --profile r2",
    ),
    "nebius-object-storage": Scenario(
        table={"preset": "nebius-object-storage"},
        valid=lambda home, secrets, ctx: put(home / ".aws/credentials",
                                             nebius_s3_ini(secrets)),
        rotate=lambda home, secrets, ctx: put(home / ".aws/credentials",
                                              nebius_s3_ini(secrets)),
        expire=None,
        remove=lambda home: (home / ".aws/credentials").write_text("[default]\nregion = x\n"),
        missing_code="section-missing",
        missing_remedy="aws configure --profile nebius",
    ),
    "nebius": Scenario(
        table={"preset": "nebius"},
        valid=_nebius_valid,
        rotate=lambda home, secrets, ctx: nebius_token(home, secrets),
        expire=lambda home, secrets, ctx: nebius_token(home, secrets, time.time() - 13 * 3600),
        remove=lambda home: (home / ".nebius/NEBIUS_IAM_TOKEN.txt").unlink(),
        missing_code="file-missing",
        missing_remedy="nebius iam get-access-token > ~/.nebius/NEBIUS_IAM_TOKEN.txt",
        expired_remedy="nebius iam get-access-token > ~/.nebius/NEBIUS_IAM_TOKEN.txt",
    ),
    "aws": Scenario(
        table={"preset": "aws", "profile": "dev"},
        valid=lambda home, secrets, ctx: aws_credentials(home, secrets, time.time() + 3600),
        rotate=lambda home, secrets, ctx: aws_credentials(home, secrets, time.time() + 7200),
        expire=lambda home, secrets, ctx: aws_credentials(home, secrets, time.time() - 60),
        remove=lambda home: (home / ".aws/credentials").write_text("[default]\nregion = x\n"),
        missing_code="section-missing",
        missing_remedy="aws configure --profile dev",
        expired_remedy="saml2aws login --profile dev",
    ),
    "aws-sso": Scenario(
        table={"preset": "aws-sso"},
        valid=_aws_sso_valid,
        rotate=lambda home, secrets, ctx: write_atomic(
            home / ".aws/sso/cache" / TOKEN_CACHE, sso_token(secrets, time.time() + 9 * 3600)
        ),
        expire=lambda home, secrets, ctx: write_atomic(
            home / ".aws/sso/cache" / TOKEN_CACHE, sso_token(secrets, time.time() - 60)
        ),
        remove=lambda home: os.rename(home / ".aws/sso/cache", home / ".aws/sso/old-cache"),
        missing_code="file-missing",
        missing_remedy="aws sso login",
        expired_remedy="aws sso login",
    ),
    "gcp": Scenario(
        table={"preset": "gcp"},
        valid=lambda home, secrets, ctx: put(
            home / ".config/gcloud/application_default_credentials.json", gcp_adc(secrets)
        ),
        rotate=lambda home, secrets, ctx: put(
            home / ".config/gcloud/application_default_credentials.json", gcp_adc(secrets)
        ),
        expire=None,  # refresh-token based: no expiry of its own
        remove=lambda home: (home / ".config/gcloud/application_default_credentials.json")
        .unlink(),
        missing_code="file-missing",
        missing_remedy="gcloud auth application-default login",
    ),
    "gcp-token": Scenario(
        table={"preset": "gcp-token", "files": {"token": "~/.cache/gcloud-token"}},
        valid=lambda home, secrets, ctx: put(home / ".cache/gcloud-token", secrets.token("ya29")),
        rotate=lambda home, secrets, ctx: put(home / ".cache/gcloud-token", secrets.token("ya29")),
        expire=lambda home, secrets, ctx: write_at(
            home / ".cache/gcloud-token", secrets.token("ya29"), time.time() - 2 * 3600
        ),
        remove=lambda home: (home / ".cache/gcloud-token").unlink(),
        missing_code="file-missing",
        missing_remedy="gcloud auth print-access-token > ~/.cache/gcloud-token",
        expired_remedy="gcloud auth print-access-token > ~/.cache/gcloud-token",
    ),
    "kubernetes": Scenario(
        table={"preset": "kubernetes", "files": {
            "token": "~/sa/token", "ca": "~/sa/ca.crt", "namespace": "~/sa/namespace"}},
        valid=_k8s_valid,
        rotate=lambda home, secrets, ctx: put(home / "sa/token", secrets.jwt(
            iat=int(time.time()), exp=int(time.time()) + 3607)),
        expire=lambda home, secrets, ctx: put(home / "sa/token", secrets.jwt(
            iat=int(time.time()) - 7200, exp=int(time.time()) - 60)),
        remove=lambda home: (home / "sa/token").unlink(),
        missing_code="file-missing",
        missing_remedy="the kubelet mounts ~/sa/token",
        expired_remedy="the kubelet did not rotate ~/sa/token",
    ),
    "tls": Scenario(
        table={"preset": "tls", "files": {"cert": "~/tls/tls.crt", "key": "~/tls/tls.key"}},
        valid=_tls_valid,
        # A renewal that keeps the key (certbot --reuse-key, cert-manager rotationPolicy Never)
        rotate=lambda home, secrets, ctx: put(home / "tls/tls.crt", cert_pem(
            ctx["key"], time.time() - 86400, time.time() + 89 * 86400)),
        expire=lambda home, secrets, ctx: put(home / "tls/tls.crt", cert_pem(
            ctx["key"], time.time() - 90 * 86400, time.time() - 86400)),
        remove=lambda home: (home / "tls/tls.crt").unlink(),
        missing_code="file-missing",
        missing_remedy="create ~/tls/tls.crt",
        expired_remedy="has expired; renew it",
    ),
}


def test_every_preset_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(PRESETS)


@pytest.mark.anyio
@pytest.mark.parametrize("preset", sorted(SCENARIOS))
async def test_preset_lifecycle(harness_factory: Any,
    preset: str, tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    scenario = SCENARIOS[preset]
    name = scenario.name
    ctx: dict[str, Any] = {}
    scenario.valid(home, secrets, ctx)
    async with harness_factory([scenario.table], env=env) as h:
        await h.fence()
        assert h.types(name) == [REFRESHED]
        first = h.broker.state(name)
        assert first.status is Status.VALID, first.problems
        assert first.problems == ()
        assert first.generation == 1

        h.seen.clear()
        scenario.rotate(home, secrets, ctx)
        await h.fence()
        assert h.types(name) == [REFRESHED]
        assert h.broker.state(name).generation == 2
        assert h.broker.state(name).status is Status.VALID

        if scenario.expire is not None:
            h.seen.clear()
            scenario.expire(home, secrets, ctx)
            await h.fence()
            assert h.types(name) == [REFRESHED, EXPIRED]
            expired = h.broker.state(name)
            assert expired.status is Status.EXPIRED
            assert expired.problems[0].code == "expired"
            assert scenario.expired_remedy in remedies(expired)

        h.seen.clear()
        scenario.remove(home)
        event = await h.next(name)
        assert event.type == MISSING
        assert event.data.problems[0].code == scenario.missing_code
        assert scenario.missing_remedy in remedies(event.data)
        await h.fence()
        assert h.types(name) == [MISSING]


# ---------------------------------------------------------------------------------------------
# aws: only the chosen profile counts


@pytest.mark.anyio
async def test_aws_other_profile_is_not_a_change(harness_factory: Any,
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(home / "aws-creds")
    now = time.time()
    shared = home / "aws-creds"
    dev = (
        "[dev]\naws_access_key_id = ASIADEV\n"
        f"aws_secret_access_key = {secrets.token('aws')}\n"
        f"aws_session_token = {secrets.token('aws')}\n"
        f"x_security_token_expires = {iso(now + 3600)}\n"
    )
    put(shared, f"[default]\naws_access_key_id = A1\naws_secret_access_key = {secrets.token()}\n\n"
        + dev)
    async with harness_factory([{"preset": "aws", "profile": "dev"}], env=env) as h:
        await h.fence()
        state = h.broker.state("aws")
        assert state.status is Status.VALID
        assert state.expires_at == int(now + 3600)
        assert [f.path for f in state.files] == [str(shared)]
        h.seen.clear()

        # Another profile rotated, a new profile added, comments and order changed: silent.
        put(shared, "# managed by a tool\n" + dev + "\n[default]\naws_access_key_id = A2\n"
            f"aws_secret_access_key = {secrets.token()}\n\n[prod]\naws_access_key_id = P\n")
        await h.fence()
        assert h.types("aws") == []
        assert h.broker.state("aws").generation == 1

        # The chosen profile's session rotated: one refresh, with the new expiry.
        renewed = now + 2 * 3600
        put(shared, "[dev]\naws_access_key_id = ASIADEV2\n"
            f"aws_secret_access_key = {secrets.token('aws')}\n"
            f"aws_session_token = {secrets.token('aws')}\n"
            f"x_security_token_expires = {iso(renewed)}\n")
        await h.fence()
        assert h.types("aws") == [REFRESHED]
        state = h.broker.state("aws")
        assert (state.generation, state.expires_at) == (2, int(renewed))
        assert state.expiring_at == int(renewed) - 15 * 60


def test_aws_static_keys_have_no_expiry(
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    aws_credentials(home, secrets, dev_expires=None)
    (default, dev) = load(env, tmp_path, {"preset": "aws"},
                          {"preset": "aws", "name": "dev", "profile": "dev"})
    state = check(default)
    assert (state.status, state.expires_at) == (Status.VALID, None)
    # aws_expiration, the second source, when the first is not there.
    put(home / ".aws/credentials", "[default]\naws_access_key_id = A\n"
        "aws_expiration = 2030-01-01T00:00:00Z\n")
    assert check(default).expires_at == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    state = check(dev)
    assert state.status is Status.MISSING
    assert [p.code for p in state.problems] == ["section-missing"]
    assert "aws configure --profile dev" in remedies(state)


# ---------------------------------------------------------------------------------------------
# aws-sso: a pattern role, files appearing, being replaced and vanishing


@pytest.mark.anyio
async def test_aws_sso_cache_files_come_and_go(harness_factory: Any,
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    cache = home / ".aws/sso/cache"
    now = time.time()
    put(cache / REGISTRATION, sso_registration(secrets, now + 90 * 86400))
    async with harness_factory([{"preset": "aws-sso"}], env=env) as h:
        await h.fence()
        state = h.broker.state("aws-sso")
        assert state.status is Status.VALID
        assert state.expires_at == int(now + 90 * 86400)
        h.seen.clear()

        # `aws sso login` writes a new token cache the way botocore does: open, write, close.
        with open(cache / TOKEN_CACHE, "w") as fh:
            text = sso_token(secrets, now + 8 * 3600)
            fh.write(text[:40])
            fh.flush()
            fh.write(text[40:])
        await h.fence()
        assert h.types("aws-sso") == [REFRESHED]
        state = h.broker.state("aws-sso")
        assert state.expires_at == int(now + 8 * 3600)  # the soonest of the two
        assert [Path(f.path).name for f in state.files] == [REGISTRATION, TOKEN_CACHE]
        assert {f.role for f in state.files} == {"cache"}

        # Replaced (a refresh of the token): one event, the new expiry.
        h.seen.clear()
        write_atomic(cache / TOKEN_CACHE, sso_token(secrets, now + 9 * 3600))
        await h.fence()
        assert h.types("aws-sso") == [REFRESHED]
        assert h.broker.state("aws-sso").expires_at == int(now + 9 * 3600)

        # Files that do not match, and hidden temporary files, are not part of it.
        h.seen.clear()
        (cache / "notes.txt").write_text("x")
        write_atomic(cache / ".tmp.json", "{}")
        await h.fence()
        assert h.types("aws-sso") == []

        # One vanishing (aws sso logout of one session): one event, the other expiry counts.
        h.seen.clear()
        (cache / TOKEN_CACHE).unlink()
        await h.fence()
        assert h.types("aws-sso") == [REFRESHED]
        state = h.broker.state("aws-sso")
        assert state.expires_at == int(now + 90 * 86400)
        assert [Path(f.path).name for f in state.files] == [REGISTRATION]

        # The last one vanishing: missing, at the pattern, with the login command.
        h.seen.clear()
        (cache / REGISTRATION).unlink()
        event = await h.next("aws-sso")
        assert event.type == MISSING
        (info,) = event.data.files
        assert (info.path, info.present) == (str(cache / "*.json"), False)
        assert "aws sso login" in remedies(event.data)


@pytest.mark.anyio
async def test_aws_sso_cache_directory_that_appears_later(harness_factory: Any,
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    async with harness_factory([{"preset": "aws-sso"}], env=env) as h:
        await h.fence()
        assert h.types("aws-sso") == [MISSING]
        h.seen.clear()
        put(home / ".aws/sso/cache" / TOKEN_CACHE, sso_token(secrets, time.time() + 3600))
        await h.fence()
        assert h.types("aws-sso") == [REFRESHED]
        # Now watched in the new directory itself.
        h.seen.clear()
        write_atomic(home / ".aws/sso/cache" / TOKEN_CACHE, sso_token(secrets, time.time() + 60))
        assert (await h.next("aws-sso", timeout=2)).type == REFRESHED


@pytest.mark.anyio
async def test_pattern_resync_finds_what_inotify_missed(harness_factory: Any,
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    cache = home / ".aws/sso/cache"
    put(cache / TOKEN_CACHE, sso_token(secrets, time.time() + 3600))
    table = {"preset": "aws-sso"}
    async with harness_factory([table], env=env) as h:
        await h.fence()
        h.seen.clear()
        engine = h.broker.engine
        engine.watcher.watch([str(h.fence_path)])  # as on a filesystem without inotify
        put(cache / REGISTRATION, sso_registration(secrets, time.time() + 86400))
        await engine.resync()  # stat signatures of the pattern: a new match is a change
        event = await h.next("aws-sso")
        assert event.type == REFRESHED
        assert len(event.data.files) == 2
        h.seen.clear()
        await engine.resync()
        await h.fence()
        assert h.types("aws-sso") == []


# ---------------------------------------------------------------------------------------------
# nebius: the service account's credentials.json when there is no token


@pytest.mark.anyio
async def test_nebius_service_account_then_token(harness_factory: Any,
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    nebius_tenant(home)
    nebius_service_account(home, secrets)
    async with harness_factory([{"preset": "nebius"}], env=env) as h:
        await h.fence()
        assert h.types("nebius") == [REFRESHED]
        state = h.broker.state("nebius")
        assert state.status is Status.VALID
        assert [f.role for f in state.files] == ["credentials", "tenant_id"]
        assert state.expires_at is None
        assert "credentials.json" in state.reason and "fallback" in state.reason

        # The token appearing later (nebius iam get-access-token > ...): one refresh.
        h.seen.clear()
        nebius_token(home, secrets)
        await h.fence()
        assert h.types("nebius") == [REFRESHED]
        state = h.broker.state("nebius")
        assert [f.role for f in state.files] == ["token", "tenant_id"]
        mtime = (home / ".nebius/NEBIUS_IAM_TOKEN.txt").stat().st_mtime
        assert state.expires_at == pytest.approx(mtime + 12 * 3600)
        assert state.reason == "content changed"

        # Deleted and written again: still one event (the fallback waits out the grace).
        h.seen.clear()
        (home / ".nebius/NEBIUS_IAM_TOKEN.txt").unlink()
        await anyio.sleep(0.3)  # the writer takes a moment; the deletion is seen meanwhile
        nebius_token(home, secrets)
        await h.fence()
        assert h.types("nebius") == [REFRESHED]
        assert [f.role for f in h.broker.state("nebius").files] == ["token", "tenant_id"]

        # Deleted for good: back to the service account, once the grace is over.
        h.seen.clear()
        (home / ".nebius/NEBIUS_IAM_TOKEN.txt").unlink()
        event = await h.next("nebius")
        assert event.type == REFRESHED
        assert [f.role for f in event.data.files] == ["credentials", "tenant_id"]

        # The fallback's files are watched too.
        h.seen.clear()
        nebius_service_account(home, secrets)
        assert (await h.next("nebius")).type == REFRESHED


def test_nebius_choice_of_files(
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    (spec,) = load(env, tmp_path, {"preset": "nebius"})
    state = check(spec)  # nothing at all: the token is what is missing
    assert state.status is Status.MISSING
    assert [(p.code, f.role) for p, f in zip(state.problems, state.files, strict=False)][:1] == [
        ("file-missing", "token")
    ]
    assert "nebius iam get-access-token > ~/.nebius/NEBIUS_IAM_TOKEN.txt" in remedies(state)
    nebius_service_account(home, secrets)
    state = check(spec)  # credentials.json, but no tenant ID: that is what is missing
    assert state.status is Status.MISSING
    assert [p.code for p in state.problems] == ["file-missing"]
    assert "nebius iam tenant list" in remedies(state)
    nebius_tenant(home)
    assert check(spec).status is Status.VALID
    put(home / ".nebius/credentials.json", "{not json")
    state = check(spec)
    assert state.status is Status.INVALID
    assert "nebius iam auth-public-key generate" in remedies(state)
    nebius_token(home, secrets)  # the token wins over credentials.json, broken or not
    state = check(spec)
    assert state.status is Status.VALID
    assert [f.role for f in state.files] == ["token", "tenant_id"]


def test_fallback_signatures_cover_every_watched_path(
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    (spec,) = load(env, tmp_path, {"preset": "nebius"})
    nebius_tenant(home)
    nebius_token(home, secrets)
    nebius_service_account(home, secrets)
    for fallback in (False, True):
        read = read_credential(spec)
        assert (read.note is not None) is fallback
        # What a resync compares against: every watched path, as the probe sees it now.
        assert set(read.signatures) == {str(p) for p in spec.watched_paths}
        assert all(read.signatures[p] == stat_signature(p) for p in read.signatures)
        (home / ".nebius/NEBIUS_IAM_TOKEN.txt").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# tls: expiring at 2/3 of the lifetime, and the key must belong to the certificate


@pytest.mark.anyio
async def test_tls_pair(harness_factory: Any,
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    key = new_key()
    not_before, not_after = int(time.time()) - 30 * 86400, int(time.time()) + 60 * 86400
    put(home / "tls/tls.key", key_pem(key, secrets))
    put(home / "tls/tls.crt", cert_pem(key, not_before, not_after))
    table = {"preset": "tls", "files": {"cert": "~/tls/tls.crt", "key": "~/tls/tls.key",
                                        "ca": "~/tls/ca.crt"}}
    put(home / "tls/ca.crt", cert_pem(new_key(), not_before, not_after))
    async with harness_factory([table], env=env) as h:
        await h.fence()
        state = h.broker.state("tls")
        assert state.status is Status.VALID
        assert (state.expires_at, state.expiring_at) == (
            not_after, pytest.approx(not_before + 2 / 3 * (not_after - not_before))
        )
        h.seen.clear()

        wrong = key_pem(new_key(), secrets)
        write_atomic(home / "tls/tls.key", wrong)
        await h.fence()
        assert h.types("tls") == [INVALID]
        state = h.broker.state("tls")
        assert state.status is Status.INVALID
        (problem,) = state.problems
        assert problem.code == "key-mismatch"
        assert "tls.key" in problem.message and "tls.crt" in problem.message
        assert problem.remedy is not None
        assert "openssl pkey -in ~/tls/tls.key -pubout" in problem.remedy
        assert "openssl x509 -in ~/tls/tls.crt -noout -pubkey" in problem.remedy

        h.seen.clear()
        write_atomic(home / "tls/tls.key", key_pem(key, secrets))
        await h.fence()
        assert h.types("tls") == [REFRESHED]
        assert h.broker.state("tls").status is Status.VALID


# ---------------------------------------------------------------------------------------------
# gcp: the environment decides which file


def test_gcp_follows_google_application_credentials(
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    sa = tmp_path / "sa-key.json"
    put(sa, json.dumps({"type": "service_account", "private_key": key_pem(new_key(), secrets),
                        "client_email": "app@project.iam.gserviceaccount.com"}))
    (spec,) = load({**env, "GOOGLE_APPLICATION_CREDENTIALS": str(sa)}, tmp_path,
                   {"preset": "gcp"})
    state = check(spec)
    assert (state.status, [f.path for f in state.files]) == (Status.VALID, [str(sa)])
    (spec,) = load({**env, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}, tmp_path,
                   {"preset": "gcp"})
    state = check(spec)
    assert state.status is Status.MISSING
    assert state.files[0].path == str(tmp_path / "gcloud/application_default_credentials.json")
    assert "gcloud auth application-default login" in remedies(state)


def test_kubernetes_expiring_after_the_kubelets_rotation(
    tmp_path: Path, home: Path, env: dict[str, str], secrets: SecretRegistry
) -> None:
    _k8s_valid(home, secrets, {})
    (spec,) = load(env, tmp_path, SCENARIOS["kubernetes"].table)
    state = check(spec)
    iat = state.expires_at - 3607 if state.expires_at else 0
    # The kubelet rotates at 80% of the lifetime; `expiring` comes at 90%, 6 min before the end.
    assert state.expiring_at == pytest.approx(iat + 0.9 * 3607)
    assert iat + 0.8 * 3607 < state.expiring_at < state.expires_at - 5 * 60  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------
# The reader on pattern roles


def test_pattern_with_no_match_is_one_missing_entry(tmp_path: Path) -> None:
    spec = CredentialSettings(name="c", files={"cache": tmp_path / "cache/*.json"},
                              format="json")
    read = read_credential(spec)
    (only,) = read.reads
    assert (only.info.path, only.info.present) == (str(tmp_path / "cache/*.json"), False)
    assert only.problem is not None and only.problem.code == "file-missing"
    assert read.signatures == {str(tmp_path / "cache/*.json"): None}


_FILE_NAMES = st.lists(
    st.sampled_from(["a.json", "b.json", "c.JSON", ".hidden.json", "x.json.tmp", "notes.txt",
                     "z.json"]),
    unique=True, max_size=6,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=_FILE_NAMES, extra=st.sampled_from(["d.json", "e.txt", ".f.json"]))
def test_pattern_signature_tracks_exactly_the_matching_files(
    names: list[str], extra: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("glob")
    for name in names:
        (directory / name).write_text(name)
    pattern = str(directory / "*.json")
    signature = stat_signature(pattern)
    matching = sorted(n for n in names if n.endswith(".json") and not n.startswith("."))
    if not matching:
        assert signature is None
    else:
        assert signature is not None
        assert [name for name, _ in signature] == matching  # type: ignore[misc]
    assert stat_signature(pattern) == signature  # stable while nothing changes
    (directory / extra).write_text("new")
    changed = stat_signature(pattern)
    assert (changed != signature) == (extra == "d.json")
    if matching:
        (directory / matching[0]).write_text("a different length")
        assert stat_signature(pattern) != changed


# ---------------------------------------------------------------------------------------------
# The command line: `credbroker check` and `credbroker presets` as a user runs them


def credbroker(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_", "CREDBROKER_"))}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**environment, "HOME": str(home)},
    )


CHECK_CONFIG = """\
[broker]
state_dir = "{state}"
host_id = "cli"

[[credentials]]
preset = "nebius"

[[credentials]]
preset = "aws"
profile = "dev"

[[credentials]]
preset = "aws-sso"

[[credentials]]
preset = "gcp"

[[credentials]]
preset = "gcp-token"
files = {{ token = "~/.cache/gcloud-token" }}

[[credentials]]
preset = "kubernetes"
files = {{ token = "~/sa/token", ca = "~/sa/ca.crt", namespace = "~/sa/namespace" }}

[[credentials]]
preset = "tls"
files = {{ cert = "~/tls/tls.crt", key = "~/tls/tls.key" }}
"""


def test_check_shows_each_presets_problem_and_remedy(
    tmp_path: Path, home: Path, secrets: SecretRegistry
) -> None:
    now = time.time()
    aws_credentials(home, secrets, dev_expires=None)  # no [dev] profile
    put(home / ".aws/sso/cache" / TOKEN_CACHE, sso_token(secrets, now - 600))
    write_at(home / ".cache/gcloud-token", secrets.token("ya29"), now - 2 * 3600)
    _k8s_valid(home, secrets, {})
    put(home / "sa/token", secrets.jwt(iat=int(now) - 7200, exp=int(now) - 60))
    key = new_key()
    put(home / "tls/tls.crt", cert_pem(key, now - 86400, now + 86400 * 89))
    put(home / "tls/tls.key", key_pem(new_key(), secrets))
    config = tmp_path / "broker.toml"
    config.write_text(CHECK_CONFIG.format(state=tmp_path / "state"))

    result = credbroker("check", "-c", str(config), home=home)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    secrets.assert_absent(out + result.stderr, "check output")
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]
            if line and not line.startswith(" ")}
    assert rows == {"nebius": "missing", "aws": "missing", "aws-sso": "expired",
                    "gcp": "missing", "gcp-token": "expired", "kubernetes": "expired",
                    "tls": "invalid"}
    for expected in (
        "fix: run: nebius iam get-access-token > ~/.nebius/NEBIUS_IAM_TOKEN.txt",
        "! section-missing: credentials file",
        "fix: aws configure --profile dev",
        "fix: run: aws sso login",
        "fix: run: gcloud auth application-default login",
        "fix: run: gcloud auth print-access-token > ~/.cache/gcloud-token",
        "fix: the kubelet did not rotate ~/sa/token",
        "! key-mismatch: key file",
        "openssl pkey -in ~/tls/tls.key -pubout",
    ):
        assert expected in out, (expected, out)

    as_json = credbroker("check", "--json", "-c", str(config), home=home)
    documents = {d["credential"]: d for d in json.loads(as_json.stdout)["credentials"]}
    assert documents["aws"]["problems"][0]["code"] == "section-missing"
    assert documents["tls"]["problems"][0]["code"] == "key-mismatch"
    secrets.assert_absent(as_json.stdout, "check --json output")


def test_check_all_presets_valid_exits_0(
    tmp_path: Path, home: Path, secrets: SecretRegistry
) -> None:
    for name, scenario in SCENARIOS.items():
        if name != "aws":
            scenario.valid(home, secrets, {})
    nebius_service_account(home, secrets)
    aws_credentials(home, secrets, time.time() + 3600)
    config = tmp_path / "broker.toml"
    config.write_text(CHECK_CONFIG.format(state=tmp_path / "state"))
    result = credbroker("check", "-c", str(config), home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    secrets.assert_absent(result.stdout + result.stderr, "check output")
    assert "!" not in result.stdout


def test_presets_command_lists_every_preset(tmp_path: Path, home: Path) -> None:
    result = credbroker("presets", home=home)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name, preset in PRESETS.items():
        assert f"\n{name}: {preset.description}\n" in f"\n{out}"
        for template in preset.files.values():
            assert template in out
    assert "${AWS_SHARED_CREDENTIALS_FILE:-~/.aws/credentials}" in out
    assert 'profile = "default"' in out
    assert "~/.nebius/credentials.json" in out
    assert (
        "ini:{profile}.x_security_token_expires, else ini:{profile}.aws_expiration, else none"
        in out
    )
    assert "2/3 of the lifetime" in out

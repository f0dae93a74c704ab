"""The settle window: real renewal tools yield one ``refreshed``, nothing transient.

Real files in tmp_path, real inotify, the real Broker, and the real programs (openssl,
install, cp, ln, truncate, sh). Timing-sensitive patterns repeat ROUNDS times.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.config import ConfigError, parse_config
from broker.core.state import Status
from tests.conftest import Harness, SecretRegistry, write_atomic

pytestmark = pytest.mark.anyio

REFRESHED = "credentials.refreshed"
INVALID = "credentials.invalid"
ROUNDS = 20


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=30)


def openssl_pair(key: Path, cert: Path, *, kind: str = "rsa:2048") -> None:
    """What `openssl req -x509 -newkey` does: write the key, then the certificate, in place."""
    newkey = ["-newkey", kind] if kind.startswith("rsa") else ["-newkey", "ec", "-pkeyopt",
                                                               "ec_paramgen_curve:P-256"]
    run("openssl", "req", "-x509", *newkey, "-nodes", "-keyout", key, "-out", cert,
        "-days", "30", "-subj", "/CN=credbroker-test")


def token_cred(path: Path) -> dict[str, Any]:
    return {"name": "svc", "files": {"token": str(path)}}


async def one_refresh_per_round(h: Harness, name: str, change: Any, rounds: int = ROUNDS) -> None:
    """Apply ``change`` ``rounds`` times: each is exactly one ``refreshed``, generation +1."""
    for i in range(rounds):
        await h.fence()
        h.seen.clear()
        before = h.broker.state(name)
        await anyio.to_thread.run_sync(change, i)
        await h.fence()
        events = h.of(name)
        assert [e.type for e in events] == [REFRESHED], (i, [e.type for e in events])
        state = events[0].data
        assert state.status is Status.VALID, (i, state.problems)
        assert state.generation == before.generation + 1
        assert state.problems == (), (i, state.problems)
        assert h.broker.state(name) == state


# -- TLS ------------------------------------------------------------------------------------


async def test_openssl_renewal_onto_a_watched_pair(harness_factory: Any, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    openssl_pair(key, cert)
    os.chmod(cert, 0o644)  # what openssl writes under umask 022: public, and fine
    creds = [{"name": "web", "preset": "tls", "files": {"cert": str(cert), "key": str(key)}}]
    async with harness_factory(creds) as h:
        await h.fence()
        assert h.broker.state("web").status is Status.VALID
        await one_refresh_per_round(h, "web", lambda _: openssl_pair(key, cert))


async def test_certbot_style_renewal_links_repointed_one_by_one(
    harness_factory: Any, tmp_path: Path
) -> None:
    # certbot: new archive/certN.pem + privkeyN.pem, then each live/ link re-pointed in turn.
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    openssl_pair(archive / "privkey1.pem", archive / "cert1.pem", kind="ec")
    for name, target in (("cert.pem", "cert1.pem"), ("privkey.pem", "privkey1.pem")):
        os.symlink(f"../archive/{target}", live / name)
    creds = [{
        "name": "web",
        "preset": "tls",
        "files": {"cert": str(live / "cert.pem"), "key": str(live / "privkey.pem")},
    }]
    rng = random.Random(18)

    def renew(i: int) -> None:
        n = i + 2
        openssl_pair(archive / f"privkey{n}.pem", archive / f"cert{n}.pem", kind="ec")
        links = [("cert.pem", f"cert{n}.pem"), ("privkey.pem", f"privkey{n}.pem")]
        for j, (name, target) in enumerate(links):
            if j:
                time.sleep(rng.uniform(0.02, 0.5))  # the gap between swaps: the pattern itself
            run("ln", "-sfn", f"../archive/{target}", live / name)

    async with harness_factory(creds) as h:
        await h.fence()
        assert h.broker.state("web").status is Status.VALID
        await one_refresh_per_round(h, "web", renew)


async def test_tls_preset_checks_only_the_keys_permissions(
    harness_factory: Any, tmp_path: Path
) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    openssl_pair(key, cert, kind="ec")
    os.chmod(cert, 0o644)
    os.chmod(key, 0o600)
    creds = [{"name": "web", "preset": "tls", "files": {"cert": str(cert), "key": str(key)}}]
    async with harness_factory(creds) as h:
        await h.fence()
        assert h.broker.state("web").problems == ()
        os.chmod(key, 0o644)
        state = await h.broker.check("web")
        assert [(p.code, str(key) in p.message) for p in state.problems] == [
            ("insecure-permissions", True)
        ]


# -- shell tools on a token ------------------------------------------------------------------


@pytest.fixture
def token(tmp_path: Path) -> Path:
    (tmp_path / "creds").mkdir()
    return tmp_path / "creds" / "token"


@pytest.mark.parametrize("tool", ["install", "cp --remove-destination"])
async def test_copy_tools(
    harness_factory: Any, tmp_path: Path, token: Path, secrets: SecretRegistry, tool: str
) -> None:
    write_atomic(token, secrets.token())
    src = tmp_path / "src"

    def copy(_: int) -> None:
        write_atomic(src, secrets.token())
        if tool == "install":
            run("install", "-m", "600", src, token)
        else:
            run("cp", "--remove-destination", src, token)

    async with harness_factory([token_cred(token)]) as h:
        await one_refresh_per_round(h, "svc", copy)


async def test_truncate_then_append(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())

    def rewrite(_: int) -> None:
        run("truncate", "-s", "0", token)
        run("sh", "-c", 'printf %s "$1" >> "$2"', "sh", secrets.token(), token)

    async with harness_factory([token_cred(token)]) as h:
        await one_refresh_per_round(h, "svc", rewrite)


async def test_truncate_now_write_later_from_another_process(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())
    rng = random.Random(10)

    def rewrite(_: int) -> None:
        run("truncate", "-s", "0", token)
        # Another process fills it a moment later, well inside the 1s window.
        delay = f"{rng.uniform(0.05, 0.4):.3f}"
        run("sh", "-c", 'sleep "$1"; printf %s "$2" >> "$3"', "sh", delay, secrets.token(), token)

    async with harness_factory([token_cred(token)]) as h:
        await one_refresh_per_round(h, "svc", rewrite)


# -- the window itself -----------------------------------------------------------------------


async def test_a_state_that_outlives_the_window_is_published_as_first_seen(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())
    async with harness_factory([token_cred(token)], broker={"settle": "0.5s"}) as h:
        await h.fence()
        h.seen.clear()
        before = h.broker.state("svc")
        written = time.time()
        token.write_text("")
        event = await h.next("svc")
        published = time.time()
        assert event.type == INVALID
        assert [p.code for p in event.data.problems] == ["empty"]
        assert event.data.generation == before.generation + 1
        # Held for the window, then published as of the moment it was first observed.
        assert published - written >= 0.5
        assert event.data.changed_at is not None
        assert written - 0.05 <= event.data.changed_at < written + 0.4
        await h.fence()
        assert h.types("svc") == [INVALID]
        assert h.broker.state("svc") == event.data


async def test_a_deletion_that_outlives_the_window_is_missing(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())
    async with harness_factory([token_cred(token)], broker={"settle": "0.3s"}) as h:
        await h.fence()
        h.seen.clear()
        token.unlink()
        event = await h.next("svc")
        assert event.type == "credentials.missing"
        await h.fence()
        assert h.types("svc") == ["credentials.missing"]


async def test_a_valid_change_is_not_delayed_by_the_window(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())
    async with harness_factory([token_cred(token)], broker={"settle": "5s"}) as h:
        await h.fence()
        h.seen.clear()
        latencies = []
        for _ in range(ROUNDS):
            write_atomic(token, secrets.token())
            started = time.monotonic()
            event = await h.next("svc")
            latencies.append(time.monotonic() - started)
            assert event.type == REFRESHED
        # Well below the window: nothing on the normal path waits for it.
        assert max(latencies) < 1.0, latencies


async def test_settle_0_publishes_at_once(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())
    async with harness_factory([token_cred(token)], broker={"settle": 0}) as h:
        await h.fence()
        h.seen.clear()
        token.write_text("")
        started = time.monotonic()
        event = await h.next("svc")
        assert event.type == INVALID
        assert time.monotonic() - started < 0.5


async def test_check_while_held_returns_the_current_truth_and_publishes_nothing(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())
    async with harness_factory([token_cred(token)], broker={"settle": "10s"}) as h:
        await h.fence()
        h.seen.clear()
        published = h.broker.state("svc")
        token.write_text("")
        state = await h.broker.check("svc")
        # Not the published (now stale) valid state: what the file says, marked as held.
        assert state.status is Status.INVALID
        assert [p.code for p in state.problems] == ["empty", "settling"]
        assert h.broker.state("svc") == published
        # Resolved within the window: one refreshed, generation +1 once, nothing else.
        new = secrets.token()
        write_atomic(token, new)
        event = await h.next("svc")
        await h.fence()
        assert h.types("svc") == [REFRESHED]
        assert event.data.generation == published.generation + 1
        assert event.data.files[0].size == len(new)
        assert (await h.broker.check("svc")) == h.broker.state("svc")


async def test_a_held_state_is_not_persisted_and_a_restart_reads_the_truth(
    harness_factory: Any, token: Path, secrets: SecretRegistry
) -> None:
    write_atomic(token, secrets.token())
    async with harness_factory([token_cred(token)], broker={"settle": "30s"}) as h:
        await h.fence()
        valid = h.broker.state("svc")
        token.write_text("")
        assert (await h.broker.check("svc")).status is Status.INVALID
        h.seen.clear()
    assert h.types("svc") == []  # stopped inside the window: nothing went out
    async with harness_factory([token_cred(token)], broker={"settle": "30s"}) as h:
        # The store still held the published valid state; the start-up read tells the truth.
        await h.fence()
        events = h.of("svc")
        assert [e.type for e in events] == [INVALID]
        assert events[0].data.generation == valid.generation + 1


# -- configuration ---------------------------------------------------------------------------


def _config(tmp_path: Path, broker: dict[str, Any], **credential: Any) -> Any:
    cred = {"name": "svc", "files": {"token": str(tmp_path / "t")}, **credential}
    return parse_config(
        {"broker": {"state_dir": str(tmp_path / "s"), **broker}, "credentials": [cred]}
    )


def test_settle_key(tmp_path: Path) -> None:
    assert _config(tmp_path, {}).broker.settle == 1.0
    assert _config(tmp_path, {"settle": "250ms"}).broker.settle == 0.25
    assert _config(tmp_path, {"settle": 0}).broker.settle == 0.0
    with pytest.raises(ConfigError, match=r"broker\.settle: .*non-negative"):
        _config(tmp_path, {"settle": -1})


def test_private_roles_must_name_roles(tmp_path: Path) -> None:
    assert _config(tmp_path, {}).credentials[0].private_roles is None
    assert _config(tmp_path, {}, private_roles=["token"]).credentials[0].private_roles == (
        "token",
    )
    with pytest.raises(ConfigError, match=r"private_roles.*\"cert\" is not a role"):
        _config(tmp_path, {}, private_roles=["cert"])
    tls = parse_config({
        "broker": {"state_dir": str(tmp_path / "s")},
        "credentials": [{"name": "web", "preset": "tls",
                         "files": {"cert": str(tmp_path / "c"), "key": str(tmp_path / "k")}}],
    })
    assert tls.credentials[0].private_roles == ("key",)

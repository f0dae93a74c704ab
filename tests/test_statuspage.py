"""The status page at ``/``: its HTTP contract (assets, CSP, login cookie, CSRF) over a real
client, and its behaviour in a real browser (Debian's chromium, driven by playwright)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.sinks.http.statuspage import COOKIE, CSP, session_value
from tests.conftest import SecretRegistry, write_atomic
from tests.daemon import ROOT, run_daemon
from tests.mosquitto import free_port

CHROMIUM = "/usr/bin/chromium"
#: Where screenshots go (CI keeps this directory as the test artefacts).
ARTIFACTS = Path(os.environ.get("CREDBROKER_ARTIFACTS", ROOT / "test-artifacts"))
STATIC = ROOT / "broker" / "static"


def test_assets_load_nothing_from_elsewhere() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", text), path.name
        assert "@import" not in text and "url(" not in text, path.name
        assert ".innerHTML" not in text, path.name  # data is shown as text nodes only
    html = (STATIC / "index.html").read_text()
    assert "<script>" not in html and "style=" not in html  # the CSP allows neither


def test_the_session_cookie_is_not_the_token() -> None:
    assert session_value(b"tok-1") != session_value(b"tok-2")
    assert "tok-1" not in session_value(b"tok-1")
    assert len(session_value(b"tok-1")) == 64


# -- over HTTP ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_page_and_assets(harness_factory: Any, tmp_path: Path,
                               secrets: SecretRegistry) -> None:
    from tests.test_http import cred, serving

    write_atomic(tmp_path / "svc", secrets.token())
    async with serving(harness_factory, [cred("svc", tmp_path / "svc")], secrets) as (
        _h, api, client
    ):
        session = client.session
        for path, media in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                            ("/static/style.css", "text/css")):
            async with session.get(f"{api.url}{path}") as response:
                assert response.status == 200
                assert response.content_type == media
                assert response.headers["Content-Security-Policy"] == CSP
                assert response.headers["X-Content-Type-Options"] == "nosniff"
        async with session.get(f"{api.url}/static/missing.js") as response:
            assert response.status == 404
            assert response.content_type == "application/json"


@pytest.mark.anyio
async def test_login_cookie_and_csrf(harness_factory: Any, tmp_path: Path,
                                     secrets: SecretRegistry) -> None:
    from tests.test_http import cred, serving

    token = secrets.token("api")
    token_file = tmp_path / "api-token"
    write_atomic(token_file, token)
    write_atomic(tmp_path / "svc", secrets.token())
    async with serving(harness_factory, [cred("svc", tmp_path / "svc")], secrets,
                       token_file=str(token_file)) as (_h, api, _client):
        base = api.url
        assert base is not None
        own = {"Origin": base}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            # The page and its assets are open (they hold no data); the data is not.
            async with s.get(f"{base}/") as r:
                assert r.status == 200
            async with s.get(f"{base}/v1/credentials") as r:
                assert r.status == 401

            # A wrong token: back to the page's form, no cookie.
            async with s.post(f"{base}/login", data={"token": token + "x"}, headers=own,
                              allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/#login-failed"
                assert "Set-Cookie" not in r.headers
            # Another site's form cannot sign a browser in (login CSRF).
            async with s.post(f"{base}/login", data={"token": token},
                              headers={"Origin": "http://evil.example"},
                              allow_redirects=False) as r:
                assert r.status == 403 and "Set-Cookie" not in r.headers

            async with s.post(f"{base}/login", data={"token": token}, headers=own,
                              allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/"
                set_cookie = r.headers["Set-Cookie"]
                body = await r.read()
            secrets.observe("login answer", set_cookie + body.decode())
            attributes = {a.strip().lower() for a in set_cookie.split(";")[1:]}
            assert {"httponly", "samesite=strict", "path=/"} <= attributes
            assert set_cookie.startswith(f"{COOKIE}={session_value(token.encode())};")

            # The cookie reads the API, the event stream included ...
            async with s.get(f"{base}/v1/credentials") as r:
                assert r.status == 200
                secrets.observe("credentials", await r.read())
            async with s.get(f"{base}/v1/events?since=0") as r:
                assert r.status == 200
                assert (await r.content.readline()).startswith(b"retry:")
            # ... but changes nothing without a same-origin Origin (CSRF).
            async with s.post(f"{base}/v1/credentials/svc/check") as r:
                assert r.status == 401
            async with s.post(f"{base}/v1/credentials/svc/check",
                              headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 401
            async with s.post(f"{base}/v1/credentials/svc/check", headers=own) as r:
                assert r.status == 200

            # A forged cookie is nothing; signing out clears it.
            forged = {"Cookie": f"{COOKIE}={'0' * 64}"}
            async with aiohttp.ClientSession() as other, other.get(
                f"{base}/v1/credentials", headers=forged
            ) as r:
                assert r.status == 401
            async with s.post(f"{base}/logout", headers=own, allow_redirects=False) as r:
                assert r.status == 303
            async with s.get(f"{base}/v1/credentials") as r:
                assert r.status == 401


# -- in a browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium refuses its sandbox.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def _jwt(secrets: SecretRegistry, seconds: float) -> str:
    now = int(time.time())
    return secrets.jwt(sub="svc", iat=now - 600, exp=now + int(seconds))


def _config(tmp_path: Path, port: int, token_file: Path) -> Path:
    creds = tmp_path / "creds"
    lines = [
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "web-1"\n',
        f'[http]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token_file}"\n',
    ]
    for name, fmt in (("api", "jwt"), ("deploy", "jwt"), ("legacy", "text"), ("svc", "jwt")):
        expiry = '\nexpiry = "jwt"' if fmt == "jwt" else ""
        lines.append(f'[[credentials]]\nname = "{name}"\nfiles = {{ token = "{creds / name}" }}\n'
                     f'format = "{fmt}"{expiry}\n')
    path = tmp_path / "broker.toml"
    path.write_text("\n".join(lines))
    return path


def test_the_page_follows_rotations_and_a_restart(
    tmp_path: Path, secrets: SecretRegistry, browser: Any
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write_atomic(creds / "api", _jwt(secrets, 10 * 3600))
    write_atomic(creds / "deploy", _jwt(secrets, 8 * 60))  # inside the expiring window
    write_atomic(creds / "svc", secrets.add("not-a-jwt-" + os.urandom(6).hex()))
    token = secrets.token("page")
    token_file = tmp_path / "api-token"
    write_atomic(token_file, token)
    port = free_port()
    config = _config(tmp_path, port, token_file)
    url = f"http://127.0.0.1:{port}/"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    page = browser.new_page(viewport={"width": 1180, "height": 820})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    with run_daemon(config) as daemon:
        daemon.wait_for("broker started")
        page.goto(url)
        # token_file is set: the page asks to sign in, and the form sets the cookie.
        page.wait_for_selector("#login:not([hidden])", timeout=10_000)
        page.fill("#token", token)
        page.click("#login button")
        page.wait_for_selector("#c-api[data-status=valid]", timeout=10_000)
        page.wait_for_selector("#link[data-state=live]", timeout=10_000)
        page.evaluate("window.__noReload = true")
        assert page.evaluate("document.cookie") == ""  # HttpOnly: the script cannot read it
        cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.get_attribute("#c-deploy", "data-status") == "expiring"
        assert page.get_attribute("#c-legacy", "data-status") == "missing"
        assert page.get_attribute("#c-svc", "data-status") == "invalid"
        assert "fix:" in page.inner_text("#c-legacy")  # problems come with their remedy

        # A rotation appears without a reload.
        write_atomic(creds / "api", _jwt(secrets, 12 * 3600))
        page.wait_for_selector("#c-api[data-generation='2']", timeout=10_000)
        write_atomic(creds / "legacy", secrets.token())
        page.wait_for_selector("#c-legacy[data-status=valid]", timeout=10_000)
        assert page.evaluate("window.__noReload") is True
        code, rest = daemon.stop()
        assert code == 0
        secrets.assert_absent(daemon.log_text() + rest, "daemon log")
    page.wait_for_selector("#link:not([data-state=live])", timeout=10_000)

    # The daemon comes back: the page reconnects by itself and keeps following.
    with run_daemon(config) as daemon:
        daemon.wait_for("broker started")
        page.wait_for_selector("#link[data-state=live]", timeout=30_000)
        write_atomic(creds / "api", _jwt(secrets, 11 * 3600))
        page.wait_for_selector("#c-api[data-generation='3']", timeout=15_000)
        assert page.evaluate("window.__noReload") is True
        page.wait_for_timeout(1300)  # let the change highlight fade before the picture
        page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        html = page.content()
        secrets.observe("status page", html)
        secrets.assert_absent(html, "the status page")

        # A narrow window (a phone): no sideways scrolling.
        narrow = browser.new_page(viewport={"width": 360, "height": 780})
        narrow.context.add_cookies([cookie])
        narrow.goto(url)
        narrow.wait_for_selector("#c-api[data-generation='3']", timeout=10_000)
        narrow.screenshot(path=str(ARTIFACTS / "status-page-narrow.png"), full_page=True)
        wide = narrow.evaluate("""[...document.querySelectorAll('*')]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
            .map(e => e.tagName + '.' + e.className + '#' + e.id)""")
        assert not wide, wide  # nothing sticks out sideways
        narrow.close()
        code, rest = daemon.stop()
        assert code == 0
        secrets.assert_absent(daemon.log_text() + rest, "daemon log")
    # Requests refused (401 before signing in, the daemon away) show as console errors;
    # the script itself must never fail.
    assert not [e for e in errors if not e.startswith(("Failed to load resource",
                                                       "net::", "GET ", "POST "))], errors
    page.close()



def test_reported_consumers_are_shown(
    tmp_path: Path, secrets: SecretRegistry, browser: Any
) -> None:
    # The broker's own answer, with the `consumers` field (SPEC section 3) that consumer
    # tracking adds to the state document: one consumer current, one a generation behind.
    import json

    write_atomic(tmp_path / "svc", secrets.token())
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "web-1"\n\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{tmp_path / "svc"}" }}\n'
    )
    with run_daemon(config) as daemon:
        daemon.wait_for("broker started")
        write_atomic(tmp_path / "svc", secrets.token())  # generation 2
        daemon.wait_for("credentials.refreshed", generation=2)

        def with_consumers(route: Any) -> None:
            doc = route.fetch().json()
            for state in doc["credentials"]:
                state["consumers"] = [
                    {"id": "api-7f", "generation": 2, "fingerprint": state["fingerprint"],
                     "since": state["changed_at"], "via": "mqtt"},
                    {"id": "worker-3", "generation": 1, "fingerprint": "hmac-sha256:00",
                     "since": state["changed_at"], "via": "http"},
                ]
            route.fulfill(status=200, content_type="application/json", body=json.dumps(doc))

        page = browser.new_page()
        page.route("**/v1/credentials", with_consumers)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#c-svc .consumers", timeout=10_000)
        rows = page.locator("#c-svc .consumers tbody tr")
        assert rows.count() == 2
        assert "api-7f" in rows.nth(0).inner_text() and "gen 2" in rows.nth(0).inner_text()
        behind = rows.nth(1).locator(".behind")
        assert "worker-3" in rows.nth(1).inner_text() and "behind" in behind.inner_text()
        page.close()
        assert daemon.stop()[0] == 0

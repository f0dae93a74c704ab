"""The recipes of docs/consumers.md, each run against a real daemon (and MQTT server)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.client_daemon import ROOT, Daemon
from tests.conftest import SecretRegistry, write_atomic
from tests.mosquitto import (
    Mosquitto,
    mosquitto_fixture,  # noqa: F401 - fixture "mosquitto"
    mosquitto_server_fixture,  # noqa: F401 - fixture "mosquitto_server"
)

DOC = ROOT / "docs" / "consumers.md"
WAIT = 15.0


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


# Appended to a sync recipe: start it, then answer "is the token <digest>?" lines.
SYNC_DRIVER = '''
import hashlib, sys, time
if "post_fork" in globals():
    post_fork()
assert client.wait_ready(15)
for line in sys.stdin:
    want, deadline = line.strip(), time.monotonic() + 15
    while (got := hashlib.sha256(current_token().encode()).hexdigest()) != want:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    print("ok" if got == want else "stale", flush=True)
'''

ASYNC_DRIVER = '''
import hashlib, sys
async def handle_requests(get_token):
    while line := await anyio.to_thread.run_sync(sys.stdin.readline):
        want = line.strip()
        with anyio.move_on_after(15):
            while hashlib.sha256((await get_token()).encode()).hexdigest() != want:
                await anyio.sleep(0.01)
        got = hashlib.sha256((await get_token()).encode()).hexdigest()
        print("ok" if got == want else "stale", flush=True)
anyio.run(serve, handle_requests)
'''


def run_recipe(code: str, env: dict[str, str], token_file: Path, secrets: SecretRegistry,
               tokens: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for token in tokens:
            if token is not tokens[0]:
                write_atomic(token_file, token)
            proc.stdin.write(digest(token) + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ok"
        proc.stdin.close()
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
        secrets.assert_absent(err, "a recipe's stderr")


@pytest.fixture
def home(tmp_path: Path, secrets: SecretRegistry) -> Path:
    home = tmp_path / "home"
    (home / ".cloudflare").mkdir(parents=True)
    write_atomic(home / ".cloudflare" / "r2.credentials",
                 f"[r2]\naws_access_key_id = {secrets.token()}\n")
    return home


@pytest.mark.parametrize("recipe", [0, 1, 2])
def test_python_recipes_follow_a_rotation(
    tmp_path: Path, home: Path, secrets: SecretRegistry, recipe: int
) -> None:
    token_file = tmp_path / "token"
    tokens = [secrets.token(), secrets.token(), secrets.token()]
    write_atomic(token_file, tokens[0])
    credentials = {"nebius": token_file, "cloudflare-r2": home / ".cloudflare/r2.credentials"}
    code = blocks("python")[recipe]
    driver = ASYNC_DRIVER if "async def serve" in code else SYNC_DRIVER
    with Daemon(tmp_path / "daemon", credentials) as daemon:
        env = {**os.environ, "HOME": str(home), "CREDBROKER_URL": daemon.url,
               "TOKEN_FILE": str(token_file), "PYTHONPATH": str(ROOT)}
        run_recipe(code + driver, env, token_file, secrets, tokens)


def test_the_mqtt_shell_recipe_reloads_on_each_generation(
    tmp_path: Path, secrets: SecretRegistry, mosquitto_server: Mosquitto
) -> None:
    (code,) = blocks("sh")
    token_file = tmp_path / "token"
    write_atomic(token_file, secrets.token())
    prefix = f"t{uuid.uuid4().hex[:8]}"
    mqtt = {"url": mosquitto_server.url, "topic_prefix": prefix}
    with Daemon(tmp_path / "daemon", {"nebius": token_file}, mqtt=mqtt):
        env = {**os.environ, "MQTT_PORT": str(mosquitto_server.port), "PREFIX": prefix}
        proc = subprocess.Popen(["sh", "-c", code], env=env, text=True,
                                stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline().strip() == "reload: status valid"  # retained
            write_atomic(token_file, secrets.token())
            assert proc.stdout.readline().strip() == "reload: status valid"  # the change
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=WAIT)

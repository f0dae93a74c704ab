"""The broker's own resource faults are never a credential's state.

A real Broker in a subprocess with a low RLIMIT_NOFILE exhausts its descriptors while the
test rotates the credential: nothing is published as missing or invalid, and the rotation
comes through as one ``refreshed`` once descriptors are free. And ``credbroker run`` raises
its soft descriptor limit to the hard one.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SecretRegistry, write_atomic

ROOT = Path(__file__).resolve().parent.parent

# Rounds of: exhaust every descriptor, say so, wait until the broker has failed to read the
# rotated file twice (the retry path, not one lucky read), free them, await the refreshed.
_DAEMON = r"""
import errno, json, os, resource, sys
import anyio
from broker import Broker
from broker.config import parse_config

state_dir, token, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
config = parse_config({
    "broker": {"state_dir": state_dir, "host_id": "t", "settle": 0},
    "credentials": [{"name": "svc", "files": {"token": token}}],
})

def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\n").encode())

async def main():
    seen = []
    broker = Broker(config)
    # Subscribed before the start, to see the first-sight event too.
    async with broker.subscribe(credential="svc") as events, broker:
        with anyio.fail_after(10):
            seen.append((await events.get()).type)
        for _ in range(rounds):
            faults = broker.engine.read_faults
            hog = []
            try:
                while True:
                    hog.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
            say("exhausted")
            with anyio.fail_after(20):
                while broker.engine.read_faults < faults + 2:
                    early = events.get_nowait()  # nothing may be published meanwhile
                    if early is not None:
                        seen.append(early.type)
                        say("result", json.dumps({"types": seen, "faults": -1}))
                        return
                    await anyio.sleep(0.01)
            for fd in hog:
                os.close(fd)
            with anyio.fail_after(10):
                event = await events.get()
            seen.append(event.type)
            say("published", event.type, event.data.generation, event.data.status.value)
    say("result", json.dumps({"types": seen, "faults": broker.engine.read_faults}))

anyio.run(main)
"""


@pytest.mark.parametrize("n", [3, pytest.param(20, marks=pytest.mark.soak)])
def test_descriptor_exhaustion_during_a_rotation_is_not_a_credential_state(
    tmp_path: Path, secrets: SecretRegistry, n: int
) -> None:
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    proc = subprocess.Popen(
        [sys.executable, "-c", _DAEMON, str(tmp_path / "state"), str(token), str(n)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        published: list[str] = []
        result: dict[str, object] = {}
        for line in proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "exhausted":
                write_atomic(token, secrets.token())  # the rotation, while it has no fd left
            elif word == "published":
                published.append(rest)
            elif word == "result":
                result = json.loads(rest)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result["types"] == ["credentials.refreshed"] * (n + 1), result
    assert published == [f"credentials.refreshed {g} valid" for g in range(2, n + 2)]
    assert isinstance(result["faults"], int) and result["faults"] >= 2 * n
    secrets.assert_absent(stderr, "daemon stderr")


def test_run_raises_the_soft_descriptor_limit_to_the_hard_one(
    tmp_path: Path, secrets: SecretRegistry
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"the hard limit here ({hard}) leaves no room to test a raise")
    ceiling = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    token = tmp_path / "token"
    write_atomic(token, secrets.token())
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "{tmp_path / "state"}"\nhost_id = "t"\n\n'
        f'[[credentials]]\nname = "svc"\nfiles = {{ token = "{token}" }}\n'
    )
    config.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        # A systemd-style 256 soft limit under a higher hard one.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, ceiling)),
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line or json.loads(line)["message"] == "broker started":
                break
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        row = next(r for r in limits.splitlines() if r.startswith("Max open files"))
        assert row.split()[3:5] == [str(ceiling), str(ceiling)], row
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # the test's own is untouched
    assert os.path.exists(tmp_path / "state")

"""Redaction of secrets from program output (``broker.core.redaction``), under the leak guard.

The property tests generate the shapes in which real CLIs print secrets: whole, a prefix
(``using token NEWTOKEN+abc/d...``), a suffix, one half of a line-wrapped token, lower- or
upper-cased, URL-, base64- and JSON-escaped, and a short INI/JSON field value.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.redaction import MIN_RUN, REDACTED, Redactor
from tests.conftest import SecretRegistry, write_atomic

# Secrets as tokens look: base64/base64url/hex alphabets and a few separators.
_alphabet = st.sampled_from(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_.~=%"
)
_secret = st.text(_alphabet, min_size=16, max_size=80)
_context = st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=40)


def _visible(out: bytes) -> bytes:
    # A secret may look like part of the marker: take the marker out before searching.
    return out.replace(REDACTED.encode(), b"\0")


def _runs(value: bytes) -> list[bytes]:
    return [value[i : i + MIN_RUN] for i in range(len(value) - MIN_RUN + 1)]


def _assert_no_run(out: bytes, value: bytes, *, fold: bool = True) -> None:
    seen = _visible(out)
    if fold:
        seen, value = seen.lower(), value.lower()
    for run in _runs(value):
        assert run not in seen


@st.composite
def _leak(draw: Any) -> tuple[bytes, bytes]:
    """(secret, how a program printed some of it)."""
    secret = draw(_secret).encode()
    start = draw(st.integers(0, len(secret) - MIN_RUN))
    end = draw(st.integers(start + MIN_RUN, len(secret)))
    piece = secret[start:end]
    shape = draw(
        st.sampled_from(
            ["whole", "piece", "lower", "upper", "url", "url+", "b64", "b64url", "json", "wrap"]
        )
    )
    printed = {
        "whole": secret,
        "piece": piece,
        "lower": piece.lower(),
        "upper": piece.upper(),
        "url": urllib.parse.quote(piece, safe="").encode(),
        "url+": urllib.parse.quote_plus(piece).encode(),
        "b64": base64.b64encode(piece),
        "b64url": base64.urlsafe_b64encode(piece).rstrip(b"="),
        "json": json.dumps(piece.decode()).encode()[1:-1].replace(b"/", b"\\/"),
        "wrap": piece[: len(piece) // 2] + b"\n" + piece[len(piece) // 2 :],
    }[shape]
    return secret, printed


@settings(max_examples=500, deadline=None)
@given(_leak(), _context, _context, st.lists(_secret, max_size=2))
def test_no_run_of_a_secret_survives_in_any_printed_shape(
    leak: tuple[bytes, bytes], before: str, after: str, others: list[str]
) -> None:
    secret, printed = leak
    redactor = Redactor.of([secret, *(o.encode() for o in others)])
    out = redactor.redact(before.encode() + printed + after.encode())
    # Whatever shape it was printed in, no 8-run of the printed form is left.
    for line in printed.split(b"\n"):
        _assert_no_run(out, line)


@settings(max_examples=300, deadline=None)
@given(_context, _context, _secret)
def test_text_without_a_secret_is_left_alone(before: str, after: str, secret: str) -> None:
    text = (before + " " + after).encode()
    redactor = Redactor.of([secret.encode()])
    # Only spans that share an 8-run with some form of the secret may change (compared as
    # the redactor compares: case-insensitive, both base64 alphabets alike).
    folded = _visible(text).lower().replace(b"-", b"+").replace(b"_", b"/")
    if not any(run in folded for run in redactor.grams):
        out = redactor.redact(text)
        assert out == text or redactor.words is not None


@settings(max_examples=200, deadline=None)
@given(
    st.text(st.characters(codec="ascii", min_codepoint=33, max_codepoint=126,
                          exclude_characters="%;#=:[]\"\\"), min_size=1, max_size=7),
    _context,
)
def test_short_field_values_of_ini_and_json_are_redacted(value: str, before: str) -> None:
    ini = f"[default]\npassword = {value}\nregion = eu-north1\n".encode()
    doc = json.dumps({"user": "svc-reader", "password": value}).encode()
    for source in (ini, doc):
        redactor = Redactor.of([source])
        out = redactor.redact(f"{before} login with ' {value} ' failed".encode())
        assert f" {value} ".encode() not in _visible(out)


def test_the_reported_leaks_are_gone(secrets: SecretRegistry) -> None:
    password = secrets.add("hunter7")
    ini = f"[default]\nuser = svc\npassword = {password}\n".encode()
    token = secrets.add("NEWTOKEN+abc/d3f5e6a7b8c9d0e1f2a3b4c5d6e7f8a9")
    redactor = Redactor.of([ini, token.encode()])
    stderr = "\n".join([
        f"password={password} rejected",
        f"using token {token[:14]}...",
        f"wrapped: {token[:20]}",
        f"         {token[20:]}",
        f"lower {token.lower()}",
        f"url {urllib.parse.quote(token, safe='')}",
        f"b64 {base64.b64encode(token.encode()).decode()}",
        f"json {json.dumps(token)}",
    ]).encode()
    out = redactor.redact(stderr).decode()
    secrets.observe("redacted stderr", out)
    assert "password=" + REDACTED in out  # the key stays readable, its value does not
    assert password not in out
    assert "NEWTOKEN" not in out.upper()
    assert token[20:] not in out and token[:20] not in out
    assert "%2B" not in out
    assert base64.b64encode(token.encode()).decode()[:12] not in out
    # What is no secret stays readable.
    assert out.startswith("password=") and "using token " in out and "wrapped: " in out


def test_redaction_is_linear_not_quadratic() -> None:
    # 64 KiB of secrets against 16 KiB of stderr: an index lookup per position, not a scan
    # of every secret at every position (that would be ~10^9 byte comparisons).
    secret = bytes(range(33, 127)) * 700
    stderr = (b"noise " * 3000)[:16 * 1024]
    started = time.perf_counter()
    redactor = Redactor.of([secret])
    out = redactor.redact(stderr + secret[5000:5100])
    elapsed = time.perf_counter() - started
    assert out.endswith(REDACTED.encode())
    assert elapsed < 5.0


# -- against a running broker ---------------------------------------------------------------

LEAKY = """#!{python}
import base64, json, sys, urllib.parse
ini, token = open(sys.argv[1]).read(), open(sys.argv[2]).read().strip()
password = ini.split("password = ")[1].split()[0]
sys.stderr.write(
    f"login as svc with password {{password}} failed\\n"
    f"using token {{token[:12]}}...\\n"
    f"token: {{token[:20]}}\\n       {{token[20:]}}\\n"
    f"{{token.lower()}} {{urllib.parse.quote(token, safe='')}}\\n"
    f"{{base64.b64encode(token.encode()).decode()}} {{json.dumps(token)}}\\n"
)
sys.exit(3)
"""


@pytest.mark.anyio
async def test_refresh_failed_carries_no_piece_of_a_secret(
    harness_factory: Any, tmp_path: Path, secrets: SecretRegistry
) -> None:
    password = secrets.add("pw7" + "x9Q" + "k")  # 7 characters
    token = secrets.add("NEWTOKEN+abc/" + "d" * 4 + secrets.token("t")[4:])
    ini = tmp_path / "config.ini"
    write_atomic(ini, f"[default]\nuser = svc\npassword = {password}\n")
    tok = tmp_path / "token"
    write_atomic(tok, token + "\n")
    script = tmp_path / "leaky"
    script.write_text(LEAKY.format(python=sys.executable))
    script.chmod(0o755)
    cred = {
        "name": "svc",
        "files": {"token": str(tok), "config": str(ini)},
        "expiry": "ttl:2s",
        "expiring_before": "2s",
        "refresh": {"command": [str(script), str(ini), str(tok)], "timeout": "10s"},
    }
    async with harness_factory([cred]) as h:
        while True:
            event = await h.next("svc", timeout=15.0)
            if event.type == "credentials.refresh_failed":
                break
        problem = next(p for p in event.data.problems if p.code == "refresh-failed")
        message = problem.message
        assert f"login as {REDACTED} with password {REDACTED} failed" in message
        assert "using token " + REDACTED in message
        lowered = message.lower().replace(REDACTED, "\0")
        for i in range(len(token) - MIN_RUN + 1):
            assert token[i : i + MIN_RUN].lower() not in lowered
        assert password not in message
        assert urllib.parse.quote(token, safe="")[:12] not in message
        assert base64.b64encode(token.encode()).decode()[:12] not in message


def test_a_token_that_is_a_json_scalar_is_redacted_whole() -> None:
    # "Infinity" and digits parse as JSON, but such a file is a token, not structured data.
    for token in (b"Infinity", b"1234567890123", b"true-but-not-json", b'"quoted-token-x"'):
        out = Redactor.of([token]).redact(b"got " + token + b" back")
        assert token.strip(b'"') not in _visible(out), token

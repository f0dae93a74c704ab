"""Content checks for every credential format: good files, each failure code, no leaks."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.formats import (
    FORMATS,
    ContentError,
    Selector,
    apply_selector,
    check_format,
    check_key_pair,
    decode_jwt_claims,
    load_certificates,
    load_ini,
    load_json_object,
    parse_selector,
)

SECRET = "s3cr3t-Zq9xVw7Kp2"
HMAC_KEY = "test-signing-key-that-is-long-enough-for-hs256"
NOT_BEFORE = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)
NOT_AFTER = NOT_BEFORE + timedelta(hours=12)

AWS_SSO_CACHE = {
    "startUrl": "https://example.awsapps.com/start",
    "region": "eu-west-1",
    "accessToken": SECRET,
    "expiresAt": "2026-11-25T18:00:00Z",
    "clientId": "abc",
    "clientSecret": SECRET,
}
AWS_CREDENTIALS = f"""\
[default]
aws_access_key_id = AKIAEXAMPLE
aws_secret_access_key = {SECRET}
aws_session_token = {SECRET}%with%percent
x_security_token_expires = 2026-11-25T18:00:00+00:00

[profile dev.eu]
aws_access_key_id = AKIAEXAMPLE2
aws_secret_access_key = {SECRET}
aws_expiration = 2026-11-25T19:00:00Z
""".encode()


def make_jwt(claims: dict[str, object]) -> bytes:
    """A real HS256 token from PyJWT (the broker never verifies the signature)."""
    return jwt.encode(claims, HMAC_KEY, algorithm="HS256").encode()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(issuer_key, hashes.SHA256())
    )


class CertFiles:
    """PEM material generated once per module: a short-lived leaf, its CA, and a key."""

    def __init__(self) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        ca_until = NOT_AFTER + timedelta(days=30)
        self.ca = _cert("test-ca", ca_key, "test-ca", ca_key, NOT_BEFORE, ca_until)
        self.leaf = _cert("leaf", leaf_key, "test-ca", ca_key, NOT_BEFORE, NOT_AFTER)
        self.leaf_pem = self.leaf.public_bytes(serialization.Encoding.PEM)
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)
        self.key_pem = leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@pytest.fixture(scope="module")
def certs() -> CertFiles:
    return CertFiles()


def content_error(fn: Callable[[bytes], object], data: bytes) -> ContentError:
    with pytest.raises(ContentError) as info:
        fn(data)
    return info.value


def assert_no_secret(err: ContentError, secret: str = SECRET) -> None:
    for text in (str(err), err.message, repr(err), str(err.args)):
        assert secret not in text
    # The original library exception (which may quote input) is never chained as the cause.
    assert err.__cause__ is None


# --- ContentError ---------------------------------------------------------------------------


def test_content_error_shape() -> None:
    err = ContentError("malformed-json", "JSON file is not valid JSON (line 1 column 2)")
    assert err.code == "malformed-json"
    assert err.message == "JSON file is not valid JSON (line 1 column 2)"
    assert str(err) == err.message
    assert "malformed-json" in repr(err)
    assert isinstance(err, Exception)


def test_formats_tuple() -> None:
    assert FORMATS == ("text", "jwt", "json", "pem", "ini")


def test_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        check_format("yaml", b"a: 1")


# --- text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"token", b"  token\n", "tökén\n".encode(), b"a b\tc"])
def test_text_good(data: bytes) -> None:
    check_format("text", data)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b" \n\t\r\n", "empty"),
        ("\u00a0\u2003\n".encode(), "empty"),
        (SECRET.encode() + b"\x00tail", "binary-content"),
        (b"\x00", "binary-content"),
        (SECRET.encode() + b"\xff\xfe", "not-utf8"),
        (b"\xc3\x28" + SECRET.encode(), "not-utf8"),
    ],
)
def test_text_bad(data: bytes, code: str) -> None:
    err = content_error(lambda d: check_format("text", d), data)
    assert err.code == code
    assert_no_secret(err)


def test_text_error_says_where() -> None:
    err = content_error(lambda d: check_format("text", d), b"abc\x00")
    assert "offset 3" in err.message
    err = content_error(lambda d: check_format("text", d), b"abcd\xff")
    assert "offset 4" in err.message


# --- jwt ------------------------------------------------------------------------------------


def test_jwt_good() -> None:
    token = make_jwt({"sub": SECRET, "exp": 1764093600, "iat": 1764050400})
    check_format("jwt", token)
    claims = decode_jwt_claims(b"\n  " + token + b"\n")
    assert claims == {"sub": SECRET, "exp": 1764093600, "iat": 1764050400}


def test_jwt_signature_is_not_verified() -> None:
    token = make_jwt({"exp": 1}).decode()
    head, body, _sig = token.split(".")
    tampered = f"{head}.{body}.{b64url(b'not the signature')}".encode()
    assert decode_jwt_claims(tampered) == {"exp": 1}


def test_jwt_unsecured_and_padded() -> None:
    unsecured = jwt.encode({"exp": 5}, "", algorithm="none").encode()
    assert unsecured.endswith(b".")
    assert decode_jwt_claims(unsecured) == {"exp": 5}
    # Some encoders leave base64 padding in; it is harmless.
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').decode()
    payload = base64.urlsafe_b64encode(b'{"exp":7}').decode()
    assert "=" in header + payload
    assert decode_jwt_claims(f"{header}.{payload}.".encode()) == {"exp": 7}


def _jwt_parts(header: bytes, payload: bytes, sig: str = "c2ln") -> bytes:
    return f"{b64url(header)}.{b64url(payload)}.{sig}".encode()


GOOD_HEADER = b'{"alg":"HS256","typ":"JWT"}'
SECRET_PAYLOAD = json.dumps({"sub": SECRET}).encode()


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        (b"", "empty", "empty"),
        (b"   \n", "empty", "empty"),
        (SECRET.encode(), "malformed-jwt", "1 parts"),
        (f"{SECRET}.{SECRET}".encode(), "malformed-jwt", "2 parts, expected 3"),
        (f"a.b.c.{SECRET}.e".encode(), "malformed-jwt", "5 parts"),
        (b"a.b.c\x00" + SECRET.encode(), "binary-content", "NUL"),
        (b"a.b.\xff" + SECRET.encode(), "not-utf8", "UTF-8"),
        (f"{SECRET}!.{b64url(SECRET_PAYLOAD)}.x".encode(), "malformed-jwt", "header"),
        (f".{b64url(SECRET_PAYLOAD)}.x".encode(), "malformed-jwt", "header is empty"),
        (f"{b64url(GOOD_HEADER)}..x".encode(), "malformed-jwt", "payload is empty"),
        (f"{b64url(GOOD_HEADER)}.{b64url(SECRET_PAYLOAD)}.{SECRET}!".encode(), "malformed-jwt",
         "signature"),
        # Five base64 characters: a length that no byte string encodes to.
        (f"{b64url(GOOD_HEADER)}.abcde.x".encode(), "malformed-jwt", "payload is not valid base64"),
        (f"{b64url(GOOD_HEADER)} .{b64url(SECRET_PAYLOAD)}.x".encode(), "malformed-jwt", "header"),
        (_jwt_parts(SECRET.encode(), SECRET_PAYLOAD), "malformed-jwt", "header is not valid JSON"),
        (_jwt_parts(GOOD_HEADER, b'{"sub": "' + SECRET.encode()), "malformed-jwt",
         "payload is not valid JSON"),
        (_jwt_parts(GOOD_HEADER, b"\xff" + SECRET.encode()), "malformed-jwt", "not valid UTF-8"),
        (_jwt_parts(GOOD_HEADER, json.dumps([SECRET]).encode()), "malformed-jwt",
         "payload is an array"),
        (_jwt_parts(GOOD_HEADER, json.dumps(SECRET).encode()), "malformed-jwt",
         "payload is a string"),
        (_jwt_parts(b"[1]", SECRET_PAYLOAD), "malformed-jwt", "header is an array"),
        (_jwt_parts(GOOD_HEADER, b'{"exp": NaN}'), "malformed-jwt", "NaN"),
    ],
)
def test_jwt_bad(data: bytes, code: str, fragment: str) -> None:
    err = content_error(decode_jwt_claims, data)
    assert err.code == code
    assert fragment in err.message
    assert_no_secret(err)
    assert content_error(lambda d: check_format("jwt", d), data).code == code


# --- json -----------------------------------------------------------------------------------


def test_json_good() -> None:
    data = json.dumps(AWS_SSO_CACHE, indent=2).encode()
    check_format("json", data)
    assert load_json_object(data) == AWS_SSO_CACHE
    assert load_json_object(b"\xef\xbb\xbf{}") == {}  # a UTF-8 BOM is tolerated


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        (b"", "empty", "empty"),
        (b"\n\n", "empty", "empty"),
        (b'{"a": "' + SECRET.encode() + b'"\x00}', "binary-content", "NUL"),
        # UTF-16 is caught as binary: its ASCII characters carry NUL bytes.
        (json.dumps({"k": SECRET}).encode("utf-16"), "binary-content", "NUL"),
        (b'{"a": "\xff' + SECRET.encode() + b'"}', "not-utf8", "UTF-8"),
        (b'{"token": "' + SECRET.encode() + b'",\n  "x": }', "malformed-json",
         "line 2 column 8"),
        (b'{"token": "' + SECRET.encode(), "malformed-json", "not valid JSON"),
        (SECRET.encode(), "malformed-json", "line 1 column 1"),
        (b'{"a": NaN, "b": "' + SECRET.encode() + b'"}', "malformed-json", "NaN"),
        (b'{"a": -Infinity}', "malformed-json", "Infinity"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed-json", "nested too deeply"),
        (b'{"a": ' + b"9" * 5000 + b"}", "malformed-json", "not valid JSON"),
        (json.dumps([SECRET]).encode(), "not-a-json-object", "an array"),
        (json.dumps(SECRET).encode(), "not-a-json-object", "a string"),
        (b"42", "not-a-json-object", "a number"),
        (b"null", "not-a-json-object", "null"),
        (b"true", "not-a-json-object", "a boolean"),
    ],
)
def test_json_bad(data: bytes, code: str, fragment: str) -> None:
    err = content_error(load_json_object, data)
    assert err.code == code
    assert fragment in err.message
    assert_no_secret(err)
    assert content_error(lambda d: check_format("json", d), data).code == code


def test_json_deep_nesting_inside_object() -> None:
    # Deep nesting hits RecursionError in the decoder; that too must become a ContentError.
    err = content_error(load_json_object, b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    assert err.code == "malformed-json"


# --- pem ------------------------------------------------------------------------------------


def test_pem_good(certs: CertFiles) -> None:
    check_format("pem", certs.leaf_pem)
    assert load_certificates(certs.leaf_pem) == [certs.leaf]
    # A chain file (leaf first) and a combined key+cert file both count.
    assert load_certificates(certs.leaf_pem + certs.ca_pem) == [certs.leaf, certs.ca]
    assert load_certificates(certs.key_pem + certs.leaf_pem) == [certs.leaf]
    # Explanatory text around blocks (as `openssl x509 -text` writes) is fine, even non-UTF-8.
    assert load_certificates(b"Subject: \xff leaf\n" + certs.leaf_pem) == [certs.leaf]


def test_pem_bad(certs: CertFiles) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"", "empty"),
        (b"  \n", "empty"),
        (SECRET.encode(), "no-certificate"),
        (certs.key_pem, "no-certificate"),
        (b"\x00\xff" + SECRET.encode(), "no-certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\n"
            + base64.b64encode(SECRET.encode() * 3)
            + b"\n-----END CERTIFICATE-----\n",
            "malformed-pem",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\n" + SECRET.encode() + b"!!\n-----END CERTIFICATE-----\n",
            "malformed-pem",
        ),
        (certs.leaf_pem[: len(certs.leaf_pem) // 2], "malformed-pem"),
    ]
    for data, code in cases:
        err = content_error(load_certificates, data)
        assert err.code == code, data
        assert_no_secret(err)
        assert content_error(lambda d: check_format("pem", d), data).code == code
    err = content_error(load_certificates, certs.key_pem)
    assert err.message == "no X.509 certificate found in PEM file"


# --- ini ------------------------------------------------------------------------------------


def test_ini_good() -> None:
    check_format("ini", AWS_CREDENTIALS)
    parser = load_ini(AWS_CREDENTIALS)
    assert parser.sections() == ["default", "profile dev.eu"]
    # Interpolation is off: "%" in a value is kept literally instead of failing.
    assert parser.get("default", "aws_session_token") == f"{SECRET}%with%percent"
    assert parser.get("profile dev.eu", "AWS_EXPIRATION") == "2026-11-25T19:00:00Z"
    assert load_ini(b"[DEFAULT]\nregion = x\n").defaults() == {"region": "x"}
    assert load_ini(b"\xef\xbb\xbf[default]\n").sections() == ["default"]


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        (b"", "empty", "empty"),
        (b"\n \n", "empty", "empty"),
        (b"[default]\nkey = " + SECRET.encode() + b"\x00\n", "binary-content", "NUL"),
        (b"[default]\nkey = \xff" + SECRET.encode() + b"\n", "not-utf8", "UTF-8"),
        (b"key = " + SECRET.encode() + b"\n[default]\n", "malformed-ini", "line 1"),
        (b"[default]\na = 1\n[" + SECRET.encode() + b"]\n[" + SECRET.encode() + b"]\n",
         "malformed-ini", "line 4 repeats a section"),
        (b"[default]\n" + SECRET.encode() + b" = 1\n" + SECRET.encode() + b" = 2\n",
         "malformed-ini", "line 3 repeats a key"),
        (b"[default]\na = 1\n" + SECRET.encode() + b"\n", "malformed-ini", "line 3"),
        (b"# only a comment " + SECRET.encode() + b"\n", "malformed-ini", "no [section]"),
    ],
)
def test_ini_bad(data: bytes, code: str, fragment: str) -> None:
    err = content_error(load_ini, data)
    assert err.code == code
    assert fragment in err.message
    assert_no_secret(err)
    assert content_error(lambda d: check_format("ini", d), data).code == code


# --- check_format dispatch ------------------------------------------------------------------


def test_check_format_accepts_each_format(certs: CertFiles) -> None:
    samples = {
        "text": b"token\n",
        "jwt": make_jwt({"exp": 1}),
        "json": json.dumps(AWS_SSO_CACHE).encode(),
        "pem": certs.leaf_pem,
        "ini": AWS_CREDENTIALS,
    }
    assert set(samples) == set(FORMATS)
    for fmt, data in samples.items():
        check_format(fmt, data)


def test_formats_reject_each_other(certs: CertFiles) -> None:
    # Content of one format offered as another fails cleanly, with the other's own code.
    assert content_error(lambda d: check_format("jwt", d), AWS_CREDENTIALS).code == "malformed-jwt"
    assert content_error(lambda d: check_format("json", d), make_jwt({})).code == "malformed-json"
    assert content_error(lambda d: check_format("ini", d), certs.leaf_pem).code == "malformed-ini"
    assert content_error(lambda d: check_format("pem", d), make_jwt({})).code == "no-certificate"


# --- properties -----------------------------------------------------------------------------

PARSERS: list[Callable[[bytes], object]] = [
    decode_jwt_claims,
    load_json_object,
    load_certificates,
    load_ini,
    *[partial(check_format, fmt) for fmt in FORMATS],
]

noisy_bytes = st.one_of(
    st.binary(max_size=4096),
    # Large inputs are built by repetition: generating 50 KB of entropy is slow and adds nothing.
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=64), st.integers(300, 999)),
    # Proper PEM framing around random DER gets past the framing checks into the ASN.1 parser.
    st.binary(max_size=512).map(
        lambda der: b"-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(der)
        + b"-----END CERTIFICATE-----\n"
    ),
    st.text().map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from([b"\x00", b"\xff", b".", b"[", b"{", b"=", b"\n", b"-----", b"a"]))
    .map(b"".join),
)


CODES = {
    "empty", "binary-content", "not-utf8", "malformed-jwt", "malformed-json", "not-a-json-object",
    "no-certificate", "malformed-pem", "malformed-ini",
}


def _only_content_errors(fn: Callable[[bytes], object], data: bytes) -> None:
    try:
        fn(data)
    except ContentError as exc:
        err = exc
    else:
        return
    assert err.code in CODES
    assert err.message


@settings(max_examples=200, deadline=None)
@given(data=noisy_bytes)
def test_random_bytes_raise_only_content_error(data: bytes) -> None:
    for fn in PARSERS:
        _only_content_errors(fn, data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    header=st.one_of(json_values.map(json.dumps), st.text()),
    payload=st.one_of(json_values.map(json.dumps), st.text()),
    sig=st.text(alphabet="abcXYZ019-_=.!", max_size=10),
)
def test_near_jwts_raise_only_content_error(header: str, payload: str, sig: str) -> None:
    # Valid base64url around random JSON-ish text reaches the deeper checks random bytes miss.
    head, body = (b64url(part.encode("utf-8", "surrogatepass")) for part in (header, payload))
    token = f"{head}.{body}.{sig}"
    _only_content_errors(decode_jwt_claims, token.encode())


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.text(alphabet=st.sampled_from("[]=:;# \t%\nab.")), max_size=12))
def test_ini_like_text_raises_only_content_error(lines: list[str]) -> None:
    _only_content_errors(load_ini, "\n".join(lines).encode())


@settings(max_examples=100, deadline=None)
@given(secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=24))
def test_errors_never_quote_a_random_secret(secret: str) -> None:
    token = f"ey{secret}.{b64url(secret.encode())}.{secret}"
    samples: list[tuple[Callable[[bytes], object], bytes]] = [
        (decode_jwt_claims, secret.encode()),
        (decode_jwt_claims, token.encode()),
        (decode_jwt_claims, _jwt_parts(GOOD_HEADER, b'{"k": "' + secret.encode())),
        (load_json_object, b'{"k": "' + secret.encode() + b'" x}'),
        (load_json_object, json.dumps([secret]).encode()),
        (load_ini, f"{secret} = 1\n".encode()),
        (load_ini, f"[s]\n{secret}\n".encode()),
        (load_certificates, secret.encode()),
    ]
    for fn, data in samples:
        err = content_error(fn, data)
        assert_no_secret(err, secret)


# --- selectors: one section of a shared INI file ---------------------------------------------


def test_selector_parses_and_prints_back() -> None:
    selector = parse_selector("ini-section:profile dev.eu")
    assert selector == Selector("ini-section", "profile dev.eu")
    assert str(selector) == "ini-section:profile dev.eu"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ini:default", "unknown selector"),
        ("ini-section", "unknown selector"),
        ("ini-section:", "needs a section name"),
        ("ini-section:[x]", "needs a section name"),
        ("ini-section: x", "needs a section name"),
        ("json:a.b", "unknown selector"),
    ],
)
def test_selector_bad(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_selector(text)


def test_selector_keeps_only_the_section() -> None:
    selected = apply_selector(parse_selector("ini-section:profile dev.eu"), AWS_CREDENTIALS)
    parser = load_ini(selected)
    assert parser.sections() == ["profile dev.eu"]
    assert parser.get("profile dev.eu", "aws_expiration") == "2026-11-25T19:00:00Z"
    assert b"AKIAEXAMPLE2" in selected and b"x_security_token_expires" not in selected
    # Canonical: the same section reads the same, however the file around it looks.
    reordered = AWS_CREDENTIALS.split(b"\n\n")
    rewritten = b"# comment\n" + reordered[1] + b"\n\n" + reordered[0].replace(b" = ", b"=")
    assert apply_selector(parse_selector("ini-section:profile dev.eu"), rewritten) == selected


def test_selector_missing_section_and_bad_ini() -> None:
    err = content_error(partial(apply_selector, parse_selector("ini-section:prod")),
                        AWS_CREDENTIALS)
    assert err.code == "section-missing"
    assert "[prod]" in err.message
    assert_no_secret(err)
    err = content_error(partial(apply_selector, parse_selector("ini-section:x")), b"k = v\n")
    assert err.code == "malformed-ini"
    err = content_error(partial(apply_selector, parse_selector("ini-section:x")), b"  \n")
    assert err.code == "empty"


def test_selector_includes_defaults_like_every_ini_reader() -> None:
    data = b"[DEFAULT]\nregion = eu\n[a]\nk = 1\n[b]\nk = 2\n"
    selected = load_ini(apply_selector(parse_selector("ini-section:a"), data))
    assert dict(selected.items("a")) == {"region": "eu", "k": "1"}
    assert dict(load_ini(apply_selector(parse_selector("ini-section:DEFAULT"), data))
                .defaults()) == {"region": "eu"}


_INI_NAME = st.text("abcdefgh0123456789_-", min_size=1, max_size=8)
_INI_VALUE = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789%+/=:._-", min_size=1, max_size=20)
_SECTIONS = st.dictionaries(
    _INI_NAME, st.dictionaries(_INI_NAME, _INI_VALUE, min_size=1, max_size=4),
    min_size=2, max_size=5,
)


def _render(sections: dict[str, dict[str, str]]) -> bytes:
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n"
        for name, items in sections.items()
    ).encode()


@settings(max_examples=200, deadline=None)
@given(sections=_SECTIONS, data=st.data())
def test_selection_ignores_every_other_section(
    sections: dict[str, dict[str, str]], data: st.DataObject
) -> None:
    chosen, other = data.draw(st.permutations(sorted(sections)))[:2]
    selector = Selector("ini-section", chosen)
    before = apply_selector(selector, _render(sections))
    # Any edit of another section (or its removal, or a new one) changes nothing selected...
    edited = dict(sections)
    edited[other] = data.draw(st.dictionaries(_INI_NAME, _INI_VALUE, min_size=1, max_size=4))
    assert apply_selector(selector, _render(edited)) == before
    del edited[other]
    assert apply_selector(selector, _render(edited)) == before
    # ...and any edit of the chosen one changes it.
    changed = dict(sections)
    changed[chosen] = {**sections[chosen], "zz_new_key": "x"}
    assert apply_selector(selector, _render(changed)) != before
    assert dict(load_ini(before).items(chosen)) == {
        k.lower(): v for k, v in sections[chosen].items()
    }


# --- key / certificate pair ------------------------------------------------------------------


def test_key_pair_matches(certs: CertFiles) -> None:
    check_key_pair(certs.leaf_pem + certs.ca_pem, certs.key_pem)  # the leaf comes first
    traditional = serialization.load_pem_private_key(certs.key_pem, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    check_key_pair(certs.leaf_pem, b"leading text\n" + traditional)


def test_key_pair_mismatch_and_bad_keys(certs: CertFiles) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    err = content_error(partial(check_key_pair, certs.leaf_pem), other)
    assert err.code == "key-mismatch"
    # The CA's certificate with the leaf's key: also a mismatch.
    assert content_error(partial(check_key_pair, certs.ca_pem), certs.key_pem).code == (
        "key-mismatch"
    )
    body = certs.key_pem.decode().splitlines()[1]
    for bad in (b"not a key", certs.leaf_pem, certs.key_pem[:-60], SECRET.encode()):
        err = content_error(partial(check_key_pair, certs.leaf_pem), bad)
        assert err.code == "malformed-key"
        assert_no_secret(err)
        assert_no_secret(err, body)
    assert content_error(partial(check_key_pair, certs.leaf_pem), b" \n").code == "empty"
    assert content_error(partial(check_key_pair, b"junk"), certs.key_pem).code == (
        "no-certificate"
    )


def test_encrypted_key_cannot_be_checked_and_passes(certs: CertFiles) -> None:
    key = serialization.load_pem_private_key(certs.key_pem, None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    check_key_pair(certs.leaf_pem, encrypted)

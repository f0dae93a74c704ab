"""Expiry sources, reading lifetimes out of content, and the expiring moment."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.core.expiry import (
    ExpirySource,
    Lifetime,
    expiring_at,
    parse_expiry_source,
    read_lifetime,
)
from broker.core.formats import ContentError
from broker.core.timefmt import MAX_TIMESTAMP

SECRET = "s3cr3t-Hh4nT8wQ1m"
HMAC_KEY = "test-signing-key-that-is-long-enough-for-hs256"
ISSUED = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)
EXPIRES = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
ISSUED_TS = ISSUED.timestamp()
EXPIRES_TS = EXPIRES.timestamp()
MTIME = 1_764_050_400.5

UNKNOWN_MESSAGE = (
    'unknown source "jwtt"; expected jwt, json:<path>, ini:<section>.<key>, pem, '
    "ttl:<duration>, none"
)


def src(text: str) -> ExpirySource:
    return parse_expiry_source(text)


def make_jwt(claims: dict[str, object]) -> bytes:
    return jwt.encode(claims, HMAC_KEY, algorithm="HS256").encode()


def lifetime_error(source: str, data: bytes) -> ContentError:
    with pytest.raises(ContentError) as info:
        read_lifetime(src(source), data, MTIME)
    err = info.value
    for text in (str(err), err.message, repr(err)):
        assert SECRET not in text
    return err


def _self_signed(not_before: datetime, not_after: datetime, name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def leaf_and_ca_pem() -> bytes:
    """A short-lived leaf followed by a longer-lived certificate, as in a chain file."""
    leaf = _self_signed(ISSUED, EXPIRES, "leaf")
    ca = _self_signed(ISSUED - timedelta(days=365), EXPIRES + timedelta(days=365), "ca")
    return leaf + ca


# --- parse_expiry_source ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("jwt", ExpirySource("jwt"), "jwt"),
        ("pem", ExpirySource("pem"), "pem"),
        ("none", ExpirySource("none"), "none"),
        ("json:expiresAt", ExpirySource("json", ("expiresAt",)), "json:expiresAt"),
        ("json:a.b", ExpirySource("json", ("a", "b")), "json:a.b"),
        ("json:a:b.c d", ExpirySource("json", ("a:b", "c d")), "json:a:b.c d"),
        (
            "ini:default.x_security_token_expires",
            ExpirySource("ini", ("default", "x_security_token_expires")),
            "ini:default.x_security_token_expires",
        ),
        (
            "ini:profile dev.aws_expiration",
            ExpirySource("ini", ("profile dev", "aws_expiration")),
            "ini:profile dev.aws_expiration",
        ),
        (
            "ini:profile dev.eu.aws_expiration",
            ExpirySource("ini", ("profile dev.eu", "aws_expiration")),
            "ini:profile dev.eu.aws_expiration",
        ),
        ("ttl:12h", ExpirySource("ttl", ttl=43200.0), "ttl:43200s"),
        ("ttl:43200", ExpirySource("ttl", ttl=43200.0), "ttl:43200s"),
        ("ttl:250ms", ExpirySource("ttl", ttl=0.25), "ttl:0.25s"),
        ("ttl:1.5m", ExpirySource("ttl", ttl=90.0), "ttl:90s"),
        ("ttl:7d", ExpirySource("ttl", ttl=604800.0), "ttl:604800s"),
    ],
)
def test_parse_expiry_source(text: str, expected: ExpirySource, canonical: str) -> None:
    parsed = parse_expiry_source(text)
    assert parsed == expected
    assert str(parsed) == canonical
    assert parse_expiry_source(canonical) == parsed


def test_unknown_source_message_is_exact() -> None:
    with pytest.raises(ValueError, match=re.escape(UNKNOWN_MESSAGE)) as info:
        parse_expiry_source("jwtt")
    assert str(info.value) == UNKNOWN_MESSAGE


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", 'unknown source ""'),
        ("JWT", 'unknown source "JWT"'),
        ("yaml:a", 'unknown source "yaml:a"'),
        ("jwt:exp", 'source "jwt" takes no argument'),
        ("none:", 'source "none" takes no argument'),
        ("json", "needs a field path"),
        ("json:", "needs a field path"),
        ("json:a..b", "empty path component"),
        ("json:.a", "empty path component"),
        ("json:a.", "empty path component"),
        ("ini", "needs <section>.<key>"),
        ("ini:nodot", "needs <section>.<key>"),
        ("ini:.key", "needs <section>.<key>"),
        ("ini:section.", "needs <section>.<key>"),
        ("ttl", "needs a duration"),
        ("ttl:", "needs a duration"),
        ("ttl:abc", "invalid duration"),
        ("ttl:-5s", "invalid duration"),
        ("ttl:0", "greater than zero"),
        ("ttl:0ms", "greater than zero"),
        ("ttl:" + "9" * 400, "finite"),
    ],
)
def test_parse_expiry_source_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_expiry_source(text)


# --- read_lifetime: none, ttl -------------------------------------------------------------


def test_none_source_ignores_content() -> None:
    assert read_lifetime(src("none"), b"\x00\xff anything", MTIME) == Lifetime(None, None)


def test_ttl_counts_from_mtime() -> None:
    # The Nebius preset: the token file's mtime is its issue time, and it lives 12h.
    assert read_lifetime(src("ttl:12h"), b"whatever", MTIME) == Lifetime(MTIME, MTIME + 43200)


@pytest.mark.parametrize("mtime", [-1.0, math.nan, math.inf, MAX_TIMESTAMP])
def test_ttl_out_of_range(mtime: float) -> None:
    with pytest.raises(ContentError) as info:
        read_lifetime(src("ttl:1h"), b"", mtime)
    assert info.value.code == "expiry-out-of-range"


# --- read_lifetime: jwt --------------------------------------------------------------------


def test_jwt_exp_and_iat() -> None:
    token = make_jwt({"sub": SECRET, "iat": int(ISSUED_TS), "exp": int(EXPIRES_TS)})
    assert read_lifetime(src("jwt"), token, MTIME) == Lifetime(ISSUED_TS, EXPIRES_TS)


def test_jwt_float_exp_without_iat() -> None:
    token = make_jwt({"exp": EXPIRES_TS + 0.5})
    assert read_lifetime(src("jwt"), token, MTIME) == Lifetime(None, EXPIRES_TS + 0.5)


@pytest.mark.parametrize("iat", ["2026-11-25T06:00:00Z", None, True, [1], {"a": 1}])
def test_jwt_non_numeric_iat_is_ignored(iat: object) -> None:
    token = make_jwt({"exp": int(EXPIRES_TS), "iat": iat})
    assert read_lifetime(src("jwt"), token, MTIME) == Lifetime(None, EXPIRES_TS)


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"sub": SECRET}, "no-expiry"),
        ({"exp": SECRET}, "bad-expiry"),
        ({"exp": "1764093600"}, "bad-expiry"),
        ({"exp": True}, "bad-expiry"),
        ({"exp": None}, "bad-expiry"),
        ({"exp": [1764093600]}, "bad-expiry"),
        ({"exp": -1}, "expiry-out-of-range"),
        ({"exp": 1e300, "sub": SECRET}, "expiry-out-of-range"),
        ({"exp": 10**400}, "expiry-out-of-range"),
        ({"exp": int(EXPIRES_TS) * 1000}, "expiry-out-of-range"),  # no ms guessing for JWTs
        ({"exp": int(EXPIRES_TS), "iat": -5}, "expiry-out-of-range"),
    ],
)
def test_jwt_bad_expiry(claims: dict[str, object], code: str) -> None:
    token = make_jwt(claims)
    assert lifetime_error("jwt", token).code == code


def test_jwt_malformed_passes_through() -> None:
    assert lifetime_error("jwt", SECRET.encode()).code == "malformed-jwt"
    assert lifetime_error("jwt", b"").code == "empty"


def test_jwt_errors_name_the_claim() -> None:
    assert lifetime_error("jwt", make_jwt({})).message == "JWT has no exp claim"
    assert "exp" in lifetime_error("jwt", make_jwt({"exp": "soon"})).message


# --- read_lifetime: json -------------------------------------------------------------------


def sso_cache(expires_at: object) -> bytes:
    """Shaped like ~/.aws/sso/cache/<hash>.json."""
    return json.dumps(
        {
            "startUrl": "https://example.awsapps.com/start",
            "region": "eu-west-1",
            "accessToken": SECRET,
            "expiresAt": expires_at,
        }
    ).encode()


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-25T18:00:00Z",
        "2026-11-25T18:00:00.000Z",
        "2026-11-25T18:00:00+00:00",
        "2026-11-25T19:00:00+01:00",
        "2026-11-25T18:00:00UTC",  # old AWS SSO caches
        "2026-11-25T18:00:00 UTC",
        "2026-11-25 18:00:00Z",
        "2026-11-25 18:00:00",  # naive: taken as UTC
        " 2026-11-25T18:00:00Z\n",
        EXPIRES_TS,
        int(EXPIRES_TS),
        int(EXPIRES_TS) * 1000,  # milliseconds
        str(int(EXPIRES_TS)),
        str(int(EXPIRES_TS) * 1000),
        f"{EXPIRES_TS:.1f}",
        f"{EXPIRES_TS / 1e9}e9",
    ],
)
def test_json_expiry_values(value: object) -> None:
    lifetime = read_lifetime(src("json:expiresAt"), sso_cache(value), MTIME)
    assert lifetime == Lifetime(None, EXPIRES_TS)


def test_json_expiry_old_aws_format() -> None:
    data = sso_cache("2019-11-14T04:05:45UTC")
    expected = datetime(2019, 11, 14, 4, 5, 45, tzinfo=UTC).timestamp()
    assert read_lifetime(src("json:expiresAt"), data, MTIME).expires_at == expected


def test_json_nested_path() -> None:
    data = json.dumps({"credential": {"token": SECRET, "expiry": {"at": "2026-11-25T18:00:00Z"}}})
    lifetime = read_lifetime(src("json:credential.expiry.at"), data.encode(), MTIME)
    assert lifetime == Lifetime(None, EXPIRES_TS)


@pytest.mark.parametrize(
    ("source", "data", "code", "message"),
    [
        ("json:expiresAt", json.dumps({"token": SECRET}), "no-expiry",
         "JSON field expiresAt is missing"),
        ("json:a.b", json.dumps({"a": {"c": SECRET}}), "no-expiry", "JSON field a.b is missing"),
        ("json:a.b.c", json.dumps({"a": {"b": SECRET}}), "no-expiry",
         "JSON field a.b.c is missing (a.b is not an object)"),
        ("json:a.b", json.dumps({"a": [SECRET]}), "no-expiry",
         "JSON field a.b is missing (a is not an object)"),
        ("json:expiresAt", json.dumps({"expiresAt": None}), "no-expiry",
         "JSON field expiresAt is null"),
        ("json:expiresAt", json.dumps({"expiresAt": SECRET}), "bad-expiry",
         "JSON field expiresAt is not an RFC 3339 time"),
        ("json:expiresAt", json.dumps({"expiresAt": "NaN"}), "bad-expiry", None),
        ("json:expiresAt", json.dumps({"expiresAt": "inf"}), "bad-expiry", None),
        ("json:expiresAt", json.dumps({"expiresAt": ""}), "bad-expiry", None),
        ("json:expiresAt", json.dumps({"expiresAt": "10000-01-01T00:00:00Z"}), "bad-expiry", None),
        ("json:expiresAt", json.dumps({"expiresAt": "2026-13-01T00:00:00Z"}), "bad-expiry", None),
        ("json:expiresAt", json.dumps({"expiresAt": True}), "bad-expiry",
         "JSON field expiresAt is a boolean, expected a time"),
        ("json:expiresAt", json.dumps({"expiresAt": [SECRET]}), "bad-expiry", None),
        ("json:expiresAt", json.dumps({"expiresAt": {"v": SECRET}}), "bad-expiry", None),
        ("json:expiresAt", json.dumps({"expiresAt": -1}), "expiry-out-of-range",
         "JSON field expiresAt is out of range"),
        ("json:expiresAt", '{"expiresAt": 1e400}', "expiry-out-of-range", None),
        ("json:expiresAt", '{"expiresAt": -1e400}', "expiry-out-of-range", None),
        ("json:expiresAt", '{"expiresAt": "1e400"}', "expiry-out-of-range", None),
        ("json:expiresAt", '{"expiresAt": ' + "9" * 400 + "}", "expiry-out-of-range", None),
        ("json:expiresAt", json.dumps({"expiresAt": "1969-12-31T23:59:59Z"}),
         "expiry-out-of-range", None),
        ("json:expiresAt", json.dumps({"expiresAt": "0001-01-01T00:00:00Z"}),
         "expiry-out-of-range", None),
        ("json:expiresAt", json.dumps({"expiresAt": "9999-12-31T23:59:59-05:00"}),
         "expiry-out-of-range", None),
        ("json:expiresAt", json.dumps([SECRET]), "not-a-json-object", None),
        ("json:expiresAt", '{"expiresAt": NaN}', "malformed-json", None),
        ("json:expiresAt", SECRET, "malformed-json", None),
    ],
)
def test_json_expiry_errors(source: str, data: str, code: str, message: str | None) -> None:
    err = lifetime_error(source, data.encode())
    assert err.code == code
    if message is not None:
        assert err.message == message


# --- read_lifetime: ini --------------------------------------------------------------------

AWS_CREDENTIALS = f"""\
[default]
aws_access_key_id = AKIAEXAMPLE
aws_secret_access_key = {SECRET}
aws_session_token = {SECRET}
x_security_token_expires = 2026-11-25T18:00:00+00:00

[profile dev.eu]
aws_access_key_id = AKIAEXAMPLE2
aws_secret_access_key = {SECRET}
aws_expiration = 2026-11-25T19:00:00Z

[epoch]
expires = {int(EXPIRES_TS) * 1000}
broken = {SECRET}
blank =
""".encode()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("ini:default.x_security_token_expires", EXPIRES_TS),
        ("ini:default.X_Security_Token_Expires", EXPIRES_TS),  # INI keys are case-insensitive
        ("ini:profile dev.eu.aws_expiration", EXPIRES_TS + 3600),
        ("ini:epoch.expires", EXPIRES_TS),
    ],
)
def test_ini_expiry(source: str, expected: float) -> None:
    assert read_lifetime(src(source), AWS_CREDENTIALS, MTIME) == Lifetime(None, expected)


def test_ini_default_section() -> None:
    data = b"[DEFAULT]\nexpires = 2026-11-25T18:00:00Z\n[other]\nx = 1\n"
    assert read_lifetime(src("ini:DEFAULT.expires"), data, MTIME).expires_at == EXPIRES_TS
    # DEFAULT values are inherited by every section, as INI readers expect.
    assert read_lifetime(src("ini:other.expires"), data, MTIME).expires_at == EXPIRES_TS
    assert lifetime_error("ini:DEFAULT.missing", data).code == "no-expiry"


@pytest.mark.parametrize(
    ("source", "code", "message"),
    [
        ("ini:nosuch.aws_expiration", "no-expiry", "INI section [nosuch] is missing"),
        ("ini:Default.x_security_token_expires", "no-expiry", None),  # sections are exact
        ("ini:default.aws_expiration", "no-expiry",
         "INI key aws_expiration in section [default] is missing"),
        ("ini:epoch.broken", "bad-expiry", None),
        ("ini:epoch.blank", "bad-expiry", None),
        ("ini:default.aws_secret_access_key", "bad-expiry", None),
    ],
)
def test_ini_expiry_errors(source: str, code: str, message: str | None) -> None:
    err = lifetime_error(source, AWS_CREDENTIALS)
    assert err.code == code
    if message is not None:
        assert err.message == message


def test_ini_malformed_passes_through() -> None:
    data = f"aws_secret_access_key = {SECRET}\n".encode()
    assert lifetime_error("ini:default.x", data).code == "malformed-ini"


# --- read_lifetime: pem --------------------------------------------------------------------


def test_pem_uses_leaf_validity(leaf_and_ca_pem: bytes) -> None:
    lifetime = read_lifetime(src("pem"), leaf_and_ca_pem, MTIME)
    assert lifetime == Lifetime(ISSUED_TS, EXPIRES_TS)


def test_pem_before_epoch_is_out_of_range() -> None:
    pem = _self_signed(datetime(1960, 1, 1, tzinfo=UTC), EXPIRES, "old")
    err = lifetime_error("pem", pem)
    assert err.code == "expiry-out-of-range"
    assert "notBefore" in err.message


def test_pem_errors() -> None:
    assert lifetime_error("pem", SECRET.encode()).code == "no-certificate"
    assert lifetime_error("pem", b" ").code == "empty"


# --- expiring_at ---------------------------------------------------------------------------


def test_expiring_at_spec_example() -> None:
    # SPEC section 3: a 12h Nebius token issued 06:00 with the defaults (15m, 0.8) is
    # expiring from 15:36, well before the 17:45 that the window alone would give.
    lifetime = read_lifetime(src("ttl:12h"), b"token", ISSUED_TS)
    moment = expiring_at(lifetime, before=15 * 60, fraction=0.8)
    assert moment == datetime(2026, 11, 25, 15, 36, tzinfo=UTC).timestamp()


def test_expiring_at_window_wins_for_long_fraction() -> None:
    lifetime = Lifetime(ISSUED_TS, EXPIRES_TS)
    assert expiring_at(lifetime, before=6 * 3600, fraction=0.8) == EXPIRES_TS - 6 * 3600


def test_expiring_at_without_issue_time() -> None:
    assert expiring_at(Lifetime(None, EXPIRES_TS), 900, 0.8) == EXPIRES_TS - 900
    assert expiring_at(Lifetime(None, None), 900, 0.8) is None
    assert expiring_at(Lifetime(ISSUED_TS, None), 900, 0.8) is None


def test_expiring_at_ignores_issue_time_not_before_expiry() -> None:
    assert expiring_at(Lifetime(EXPIRES_TS, EXPIRES_TS), 900, 0.8) == EXPIRES_TS - 900
    assert expiring_at(Lifetime(EXPIRES_TS + 10, EXPIRES_TS), 900, 0.8) == EXPIRES_TS - 900


# --- properties ----------------------------------------------------------------------------

SOURCE_TEXTS = [
    "jwt", "pem", "none", "ttl:1h", "json:expiresAt", "json:a.b.c",
    "ini:default.x_security_token_expires", "ini:profile dev.aws_expiration",
]

noisy_bytes = st.one_of(
    st.binary(max_size=2048),
    st.text().map(lambda s: s.encode("utf-8", "surrogatepass")),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    st.from_regex(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|UTC| UTC|[+-]\d{2}:\d{2})?",
                  fullmatch=True),
    st.from_regex(r"[+-]?\d{0,20}(\.\d*)?([eE][+-]?\d{1,4})?", fullmatch=True),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["a", "b", "expiresAt"]), children, max_size=3),
    max_leaves=8,
)

timestamps = st.floats(min_value=0, max_value=MAX_TIMESTAMP)
lifetimes = st.builds(Lifetime, st.none() | timestamps, st.none() | timestamps)
befores = st.floats(min_value=0, max_value=400 * 86400)
fractions = st.floats(min_value=0, max_value=1)


def _only_content_errors(source: ExpirySource, data: bytes, mtime: float) -> None:
    try:
        lifetime = read_lifetime(source, data, mtime)
    except ContentError as exc:
        err = exc
    else:
        for ts in (lifetime.issued_at, lifetime.expires_at):
            assert ts is None or 0 <= ts <= MAX_TIMESTAMP
        return
    assert err.code
    assert err.message


@settings(max_examples=200, deadline=None)
@given(data=noisy_bytes, mtime=st.floats())
def test_read_lifetime_random_bytes(data: bytes, mtime: float) -> None:
    for text in SOURCE_TEXTS:
        _only_content_errors(parse_expiry_source(text), data, mtime)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_read_lifetime_random_json_values(value: object) -> None:
    data = json.dumps({"expiresAt": value, "a": {"b": {"c": value}}}).encode()
    for text in ("json:expiresAt", "json:a.b.c", "json:a.b"):
        _only_content_errors(parse_expiry_source(text), data, 0.0)


@settings(max_examples=200, deadline=None)
@given(value=json_scalars.map(str))
def test_read_lifetime_random_ini_values(value: str) -> None:
    assume("\n" not in value and "\r" not in value)
    data = f"[default]\nexpires = {value}\n".encode("utf-8", "surrogatepass")
    _only_content_errors(parse_expiry_source("ini:default.expires"), data, 0.0)


@settings(max_examples=200, deadline=None)
@given(exp=json_scalars, iat=json_scalars)
def test_read_lifetime_random_jwt_claims(exp: object, iat: object) -> None:
    _only_content_errors(ExpirySource("jwt"), make_jwt({"exp": exp, "iat": iat}), 0.0)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40) | st.sampled_from(["json:", "ini:", "ttl:"]).flatmap(
    lambda kind: st.text(max_size=30).map(lambda rest: kind + rest)))
def test_parse_expiry_source_raises_only_value_error(text: str) -> None:
    try:
        source = parse_expiry_source(text)
    except ValueError:
        return
    assert parse_expiry_source(str(source)) == source


path_parts = st.text(min_size=1, max_size=12).filter(lambda s: "." not in s)
sources = st.one_of(
    st.sampled_from([ExpirySource("jwt"), ExpirySource("pem"), ExpirySource("none")]),
    st.lists(path_parts, min_size=1, max_size=4).map(lambda p: ExpirySource("json", tuple(p))),
    st.tuples(st.text(min_size=1, max_size=20), path_parts).map(
        lambda sk: ExpirySource("ini", sk)
    ),
    st.floats(min_value=0, exclude_min=True, allow_infinity=False).map(
        lambda s: ExpirySource("ttl", ttl=s)
    ),
)


@settings(max_examples=300, deadline=None)
@given(source=sources)
def test_expiry_source_round_trip(source: ExpirySource) -> None:
    assert parse_expiry_source(str(source)) == source


@settings(max_examples=300, deadline=None)
@given(lifetime=lifetimes, before=befores, fraction=fractions)
def test_expiring_at_never_after_expiry(lifetime: Lifetime, before: float, fraction: float) -> None:
    moment = expiring_at(lifetime, before, fraction)
    if lifetime.expires_at is None:
        assert moment is None
        return
    assert moment is not None
    assert moment <= lifetime.expires_at
    assert moment <= lifetime.expires_at - before
    if lifetime.issued_at is None:
        assert moment == lifetime.expires_at - before


@settings(max_examples=300, deadline=None)
@given(lifetime=lifetimes, b1=befores, b2=befores, fraction=fractions)
def test_expiring_at_monotone_in_before(
    lifetime: Lifetime, b1: float, b2: float, fraction: float
) -> None:
    early, late = sorted((b1, b2))
    m_early = expiring_at(lifetime, early, fraction)
    m_late = expiring_at(lifetime, late, fraction)
    if lifetime.expires_at is None:
        assert m_early is None
        assert m_late is None
    else:
        assert m_early is not None
        assert m_late is not None
        assert m_late <= m_early


@settings(max_examples=300, deadline=None)
@given(lifetime=lifetimes, before=befores, f1=fractions, f2=fractions)
def test_expiring_at_monotone_in_fraction(
    lifetime: Lifetime, before: float, f1: float, f2: float
) -> None:
    small, large = sorted((f1, f2))
    m_small = expiring_at(lifetime, before, small)
    m_large = expiring_at(lifetime, before, large)
    if m_small is not None and m_large is not None:
        assert m_small <= m_large
